"""The UCI tables shipped with splitjax (gzip, CC BY 4.0), verified by SHA-256 on load."""

import functools
import gzip
import hashlib
import os
import zlib

import numpy as np

from splitjax.data import base
from splitjax.data import reader

# Where the shipped files live; tests point this at a temporary copy.
FILES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "files")

# SHA-256 of each shipped file's DECOMPRESSED content (see files/ATTRIBUTION.md).
SHA256 = {
  "adult.data.gz": "5b00264637dbfec36bdeaab5676b0b309ff9eb788d63554ca0a249491c86603d",
  "adult.test.gz": "a2a9044bc167a35b2361efbabec64e89d69ce82d9790d2980119aac5fd7e9c05",
  "bank.csv.gz": "dc8d576e9bda0f41ee891251bd84bab9a39ce576cba715aac08adc2374a01fde",
  "credit.csv.gz": "eeaaa5addd59a2c56e82cbfca996f37ad98714c0237f1a3cbc8d7e973102966d",
}

_FILES = {
  "adult": ("adult.data.gz", "adult.test.gz"),
  "bank": ("bank.csv.gz",),
  "credit": ("credit.csv.gz",),
}

ADULT_COLUMNS = (
  "age",
  "workclass",
  "fnlwgt",
  "education",
  "education-num",
  "marital-status",
  "occupation",
  "relationship",
  "race",
  "sex",
  "capital-gain",
  "capital-loss",
  "hours-per-week",
  "native-country",
  "income",
)


def read_verified(file_name: str, files_dir: str | None = None) -> str:
  """Returns the decoded text of a shipped file after checking its SHA-256.

  Args:
    file_name: a key of `SHA256`.
    files_dir: directory holding the file; defaults to `FILES_DIR`.

  Returns:
    The decompressed UTF-8 text.

  Raises:
    DataError: the file is missing, unreadable, not gzip, or its content's SHA-256 differs.
  """
  files_dir = FILES_DIR if files_dir is None else files_dir
  path = os.path.join(files_dir, file_name)
  if not os.path.exists(path):
    raise base.DataError(
      f"bundled data file {file_name} is missing from {files_dir}; reinstall splitjax "
      "(pip install --force-reinstall splitjax) or restore it from the repository"
    )
  data = reader.read_bytes(path)
  try:
    content = gzip.decompress(data)
  except (OSError, EOFError, zlib.error) as e:
    raise base.DataError(
      f"bundled data file {file_name} is corrupt ({e}); reinstall splitjax or re-download "
      "it (see splitjax/data/_make_files.py)"
    ) from None
  digest = hashlib.sha256(content).hexdigest()
  if digest != SHA256[file_name]:
    raise base.DataError(
      f"checksum mismatch for bundled data file {file_name} (SHA-256 {digest[:12]}..., "
      f"expected {SHA256[file_name][:12]}...); reinstall splitjax or re-download it "
      "(see splitjax/data/_make_files.py)"
    )
  return content.decode("utf-8")


def read_table(name: str, files_dir: str | None = None) -> reader.RawTable:
  """Returns the raw table of a bundled dataset (`adult`, `bank` or `credit`), cached.

  Args:
    name: the dataset.
    files_dir: directory holding the shipped files; defaults to `FILES_DIR`.

  Returns:
    The parsed table, shared between calls (do not modify its arrays).

  Raises:
    DataError: see `read_verified`.
  """
  files_dir = FILES_DIR if files_dir is None else files_dir
  stamps: list[
    tuple[int, int] | None
  ] = []  # The cache key includes each file's size and mtime: a changed file is re-read.
  for file_name in _FILES[name]:
    try:
      stat = os.stat(os.path.join(files_dir, file_name))
      stamps.append((stat.st_size, stat.st_mtime_ns))
    except OSError:
      stamps.append(None)
  return _read_table_cached(name, files_dir, tuple(stamps))


@functools.lru_cache(maxsize=8)
def _read_table_cached(name: str, files_dir: str, stamps: tuple) -> reader.RawTable:
  del stamps  # Only part of the cache key.
  if name == "adult":
    return _adult(files_dir)
  (file_name,) = _FILES[name]
  delimiter = {"bank": ";", "credit": ","}[name]
  return reader.parse(read_verified(file_name, files_dir), source=file_name, delimiter=delimiter)


def _adult(files_dir: str) -> reader.RawTable:
  """adult.data + adult.test: no header, adult.test has a "|1x3 Cross validator" preamble."""
  parts = [
    reader.parse(
      read_verified(file_name, files_dir),
      source=file_name,
      delimiter=",",
      names=ADULT_COLUMNS,
      skip_prefix="|",
    )
    for file_name in ("adult.data.gz", "adult.test.gz")
  ]
  columns = {}
  for col in ADULT_COLUMNS:
    values = np.concatenate([part.columns[col] for part in parts])
    if col == "income":  # adult.test writes "<=50K." and ">50K.".
      values = np.char.rstrip(values, ".")
    values.flags.writeable = False
    columns[col] = values
  lines = np.concatenate([part.lines for part in parts])
  lines.flags.writeable = False
  return reader.RawTable(
    header=ADULT_COLUMNS,
    columns=columns,
    source="adult",
    lines=lines,
    row_sources=(("adult.data", 0), ("adult.test", len(parts[0]))),
  )
