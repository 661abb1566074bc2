"""Reads delimited text tables into string columns; bad input becomes a one-line DataError."""

import csv
import dataclasses
import functools
import gzip
import io
import os
import zlib

import numpy as np

from splitjax.data import base

DELIMITERS = (",", ";", "\t", "|")
_MISSING = frozenset({"", "?", "na", "n/a", "nan", "null", "none"})


@dataclasses.dataclass(frozen=True)
class RawTable:
  """A parsed table whose cells are stripped strings.

  Attributes:
    header: column names in file order.
    columns: column name -> [N] str array (read-only; shared by the parse cache).
    source: how to name the table in messages (a file name).
    lines: [N] int64 physical line number of each row in its file.
    row_sources: ((file name, first row), ...) when rows come from several files.
  """

  header: tuple[str, ...]
  columns: dict[str, np.ndarray]
  source: str
  lines: np.ndarray
  row_sources: tuple[tuple[str, int], ...] = ()

  def __len__(self) -> int:
    return int(self.lines.shape[0])

  def locate(self, row: int) -> str:
    """Returns "FILE line L" for data row `row` (0-based)."""
    name = self.source
    for file_name, first in self.row_sources:
      if row >= first:
        name = file_name
    return f"{name} line {int(self.lines[row])}"

  def column(self, name: str) -> np.ndarray:
    """Returns the column `name`, or raises DataError listing the available columns."""
    if name not in self.columns:
      raise base.DataError(
        f"unknown column {name!r} in {self.source}; available columns: {', '.join(self.header)}"
      )
    return self.columns[name]


def is_missing(values: np.ndarray) -> np.ndarray:
  """[N] bool: which cells are empty or a usual missing-value marker (?, NA, NaN, NULL, None)."""
  lowered = np.char.lower(values.astype(str))
  return np.isin(lowered, list(_MISSING))


def decode(data: bytes, source: str) -> str:
  """Decompresses gzip bytes if needed and decodes UTF-8, raising DataError on binary input."""
  if data[:2] == b"\x1f\x8b":
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
      raise base.DataError(
        f"{source} looks gzip-compressed but cannot be decompressed ({e}); "
        "give an intact .gz or the plain CSV"
      ) from None
  if not data.strip():
    raise base.DataError(f"{source} is empty; give a CSV file with a header row and data rows")
  if b"\x00" in data[:65536]:
    raise base.DataError(
      f"{source} is a binary file (it contains NUL bytes), not a CSV text file; "
      "export the table as UTF-8 CSV"
    )
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise base.DataError(
      f"{source} is not UTF-8 text (undecodable byte at offset {e.start}); re-save it as UTF-8 CSV"
    ) from None


def read_bytes(path: str) -> bytes:
  """Reads a file, raising DataError when it is missing or unreadable."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise base.DataError(f"file not found: {path}; check the path you gave (path=...)")
  if os.path.isdir(path):
    raise base.DataError(f"{path} is a directory, not a file; give the path of the CSV file")
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise base.DataError(
      f"cannot read {path} ({e.strerror or e}); check that the file is readable"
    ) from None


def detect_delimiter(first_line: str) -> str | None:
  """Returns the candidate delimiter occurring most often in `first_line`, or None."""
  counts = {d: first_line.count(d) for d in DELIMITERS}
  best = max(counts, key=lambda d: counts[d])
  return best if counts[best] > 0 else None


def parse(
  text: str,
  *,
  source: str,
  delimiter: str | None = None,
  names: tuple[str, ...] | None = None,
  skip_prefix: str | None = None,
  max_rows: int | None = None,
) -> RawTable:
  """Parses delimited text into a `RawTable` of stripped strings.

  Args:
    text: the decoded file content.
    source: file name used in messages.
    delimiter: field separator; None detects one of `DELIMITERS` from the first line.
    names: column names when the file has no header row (then every row is data).
    skip_prefix: rows whose first field starts with this are skipped (e.g. adult.test's "|1x3").
    max_rows: keep only the first `max_rows` data rows.

  Returns:
    The parsed table.

  Raises:
    DataError: empty file, one column only (wrong delimiter), duplicate header names, a row
      with the wrong number of fields (with its line number), or no data rows.
  """
  stripped = text.lstrip("\r\n")
  first_line = stripped.split("\n", 1)[0]
  if delimiter is None:
    delimiter = detect_delimiter(first_line) or ","
  if len(delimiter) != 1:
    raise base.DataError(f"delimiter must be one character, got {delimiter!r}; e.g. ',' or ';'")
  reader = csv.reader(io.StringIO(text), delimiter=delimiter, skipinitialspace=True)
  rows, lines = [], []
  header = names
  end = 0  # physical line where the previous row ended
  try:
    for row in reader:
      start, end = end + 1, reader.line_num  # a quoted field may span lines
      if not row or (len(row) == 1 and not row[0].strip()):
        continue
      if skip_prefix is not None and row[0].startswith(skip_prefix):
        continue
      row = [field.strip() for field in row]
      if header is None:
        header = tuple(name or f"unnamed_{i}" for i, name in enumerate(row))
        if len(header) == 1:
          guess = detect_delimiter(first_line)
          hint = (
            f"it looks {guess!r}-separated: set delimiter={guess!r}"
            if guess and guess != delimiter
            else "a table needs at least a feature and a label column; check the delimiter"
          )
          raise base.DataError(f"{source} has one column only when split on {delimiter!r}; {hint}")
        duplicates = sorted({n for n in header if header.count(n) > 1})
        if duplicates:
          raise base.DataError(
            f"{source} has duplicate column names {duplicates}; rename them in the header"
          )
        continue
      if len(row) != len(header) and end > start and any("\n" in f for f in row):
        raise base.DataError(
          f"{source} line {start}: a quoted field opens there and is not closed where the "
          f"row should end (it runs on to line {end}); balance the quotes of that row"
        )
      if len(row) != len(header):
        raise base.DataError(
          f"{source} line {reader.line_num}: {len(row)} fields, expected {len(header)} "
          f"(delimiter {delimiter!r}); fix or remove that row"
        )
      rows.append(row)
      lines.append(reader.line_num)
      if max_rows is not None and len(rows) >= max_rows:
        break
  except csv.Error as e:
    raise base.DataError(
      f"{source} line {end + 1}: malformed CSV ({e}); fix the quoting of that row"
    ) from None
  if header is None:
    raise base.DataError(f"{source} is empty; give a CSV file with a header row and data rows")
  if not rows:
    raise base.DataError(f"{source} has a header but no data rows; give a table with data")
  cells = np.array(rows, dtype=str)
  columns = {}
  for j, name in enumerate(header):
    col = np.ascontiguousarray(cells[:, j])
    col.flags.writeable = False
    columns[name] = col
  line_numbers = np.asarray(lines, dtype=np.int64)
  line_numbers.flags.writeable = False
  return RawTable(header=tuple(header), columns=columns, source=source, lines=line_numbers)


def read_csv(
  path,
  *,
  delimiter: str | None = None,
  names: tuple[str, ...] | None = None,
  max_rows: int | None = None,
) -> RawTable:
  """Reads and parses a CSV file (plain or gzip), cached on path, size and modification time.

  Args:
    path: file path.
    delimiter: field separator, or None to detect it from the header line.
    names: column names when the file has no header row.
    max_rows: keep only the first `max_rows` data rows.

  Returns:
    The parsed `RawTable` (shared between calls: do not modify its arrays).

  Raises:
    DataError: see `read_bytes`, `decode` and `parse`.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise base.DataError(f"file not found: {path}; check the path you gave (path=...)")
  try:
    stat = os.stat(path)
  except OSError as e:
    raise base.DataError(f"cannot read {path} ({e.strerror or e}); check the path") from None
  return _read_csv_cached(
    os.path.realpath(path), stat.st_size, stat.st_mtime_ns, delimiter, names, max_rows
  )


@functools.lru_cache(maxsize=16)
def _read_csv_cached(path, size, mtime_ns, delimiter, names, max_rows) -> RawTable:
  del size, mtime_ns  # Only part of the cache key.
  text = decode(read_bytes(path), os.path.basename(path))
  return parse(
    text, source=os.path.basename(path), delimiter=delimiter, names=names, max_rows=max_rows
  )
