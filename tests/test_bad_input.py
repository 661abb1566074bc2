"""Bad flags and files given to every binary: one clear line, exit 2, no traceback, results kept.

Each case of the table runs a binary's ``main`` in-process through ``common.run_main`` (as
``app.run`` would), against a copy of a finished tiny workdir, and checks that the binary

- exits with status 2 and prints exactly one line, ``error: ...``, naming the problem and the fix;
- prints no traceback (tracebacks only with ``--debug``);
- leaves every file already in the workdir byte-for-byte and mtime-for-mtime as it was, and adds
  none.

A few cases also run as real subprocesses (``python -m experiments.<binary>``) so that the whole
path, ``app.run`` and absl flag parsing included, is covered. The other half of the issue's "never
lose results" promise, overwrite protection, is checked at the end for ``train`` and ``attack``.
"""

import dataclasses
import errno
import gzip
import hashlib
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import flagsaver

import splitjax
from experiments import attack as attack_bin
from experiments import common
from experiments import pipeline
from experiments import records
from experiments import reproduce as reproduce_bin
from experiments import sweep as sweep_bin
from experiments import train as train_bin
from experiments import workdir as workdir_lib
from experiments.configs import base as configs_base
from splitjax import checkpointing
from splitjax import data as sj_data
from splitjax import results as sj_results

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "synthetic_tiny"
MAINS = {
  "train": train_bin.main,
  "attack": attack_bin.main,
  "sweep": sweep_bin.main,
  "reproduce": reproduce_bin.main,
}
HAS_SCHEMA = "schema" in {f.name for f in dataclasses.fields(configs_base.TrainConfig)}

# --------------------------------------------------------------------------------------------------
# Helpers.


def _call(capsys, binary: str, **flag_values) -> tuple[int, str]:
  """Runs ``binary``'s main in-process like ``app.run(common.run_main(main))``: (status, stderr)."""
  capsys.readouterr()
  code = 0
  with flagsaver.flagsaver(**flag_values):
    try:
      common.run_main(MAINS[binary])([])
    except SystemExit as e:
      code = e.code
  return code, capsys.readouterr().err


def _run(args, env_extra=None) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env.pop(common.KILL_ENV, None)
  env.update(env_extra or {})
  return subprocess.run(
    [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
  )


def _snapshot(root: pathlib.Path) -> dict:
  """Every file under ``root``: relative path -> (bytes, mtime_ns). Lock files (``.lock``,
  ``.<record>.lock``) are left out: they hold the last holder's pid, not results."""
  if root.is_file():
    return {".": (root.read_bytes(), root.stat().st_mtime_ns)}
  return {
    str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
    for p in sorted(root.rglob("*"))
    if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".lock"))
  }


def _assert_one_clear_line(code: int, err: str, expected: tuple[str, ...]) -> str:
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2, f"exit status {code}, stderr:\n{err}"
  assert "Traceback" not in err, err
  assert len(lines) == 1 and lines[0].startswith("error: "), f"want one 'error:' line, got:\n{err}"
  for part in expected:
    assert part in lines[0], f"{part!r} not in {lines[0]!r}"
  return lines[0]


# --------------------------------------------------------------------------------------------------
# Fixtures: two finished tiny workdirs of different models, and a directory of bad files.


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """``a``: tiny DeepFM, trained and attacked; ``b``: tiny MLP head (another model)."""
  root = tmp_path_factory.mktemp("bad_input")
  a, b = root / "a", root / "b"
  with flagsaver.flagsaver(workdir=str(a), config=TINY):
    train_bin.main([])
  with flagsaver.flagsaver(workdir=str(a), num_examples=10):
    attack_bin.main([])
  with flagsaver.flagsaver(workdir=str(b), config=TINY, head="mlp"):
    train_bin.main([])
  return {"a": a, "b": b}


_GOOD = "a,b,c,d,y\n" + "".join(
  f"{i % 2},{i % 3},{i * 0.5},{i % 4},{'yes' if i % 3 else 'no'}\n" for i in range(30)
)
_BANK_COLUMNS = (
  "marital",
  "job",
  "education",
  "housing",
  "loan",
  "contact",
  "month",
  "poutcome",
  "default",
  "balance",
  "age",
  "day",
  "duration",
  "campaign",
  "pdays",
  "previous",
  "y",
)


def _bank_like(labels) -> str:
  rows = [
    ",".join(str((i + j) % 3) for j in range(len(_BANK_COLUMNS) - 1)) + f",{y}"
    for i, y in enumerate(labels)
  ]
  return ",".join(_BANK_COLUMNS) + "\n" + "\n".join(rows) + "\n"


BAD_FILES = {
  "empty.csv": b"",
  "blank.csv": b"\n\n  \n",
  "header_only.csv": b"a,b,c,d,y\n",
  "truncated.csv": _GOOD.encode()[:-7],  # last row cut mid-way
  "colon.csv": _GOOD.replace(",", ":").encode(),  # delimiter it does not know
  "latin1.csv": _GOOD.replace("yes", "y\xe9s").encode("latin-1"),
  "binary.csv": bytes(range(256)) * 8,
  "truncated.csv.gz": gzip.compress(_GOOD.encode())[:40],
  "good.csv": _GOOD.encode(),
  "three_labels.csv": _GOOD.replace("no\n", "maybe\n", 3).encode(),
  "bank_three_labels.csv": _bank_like(["yes", "no", "maybe"] * 10).encode(),
  "schema.json": json.dumps(
    {
      "private_categorical": ["a", "b"],
      "server_categorical": ["d"],
      "server_dense": ["c"],
      "label": "y",
    }
  ).encode(),
  "a_regular_file": b"not a directory\n",
  # A quote opened on line 5 and never closed (the csv module would read to the end of file).
  "open_quote.csv": "\n".join(
    line.replace(",", ',"', 1) if i == 4 else line for i, line in enumerate(_GOOD.split("\n"))
  ).encode(),
  "syntax_config.py": b"from experiments.configs import base\n\ndef get_config(:\n",
  "raising_config.py": (
    b"from experiments.configs import base\n\n\ndef get_config():\n"
    b"  return base.TrainConfig(dataset=undefined_name)\n"
  ),
  "no_get_config.py": b"X = 1\n",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_files")
  for name, content in BAD_FILES.items():
    (root / name).write_bytes(content)
  return root


# --------------------------------------------------------------------------------------------------
# The table. Each case: binary, flags (str values may name files as {files}/...), the substrings
# the one error line must contain, and optionally a change made to the workdir copy first.


def _truncate(path: pathlib.Path):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: pathlib.Path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


def _from_b(name):
  def swap(wd: pathlib.Path, wds):
    shutil.copyfile(wds["b"] / name, wd / name)

  return swap


def _on(name, fn):
  return lambda wd, wds: fn(wd / name)


_TINY_TRAIN = dict(config=TINY)
NAN = float("nan")

CASES = [
  # ---- unknown names ------------------------------------------------------------------------
  ("train", dict(dataset="nope"), ("unknown dataset 'nope' (--dataset)", "choose one of")),
  ("train", dict(config="nope"), ("unknown config 'nope'", "choose one of")),
  (
    "train",
    dict(dataset="adult", private_dense=["nonexistent"]),
    ("unknown column 'nonexistent' for adult", "available columns"),
  ),
  (
    "train",
    dict(_TINY_TRAIN, private_dense=["nonexistent"]),
    ("synthetic takes no path, schema or column roles (got private_dense)", "drop it"),
  ),
  ("train", dict(_TINY_TRAIN, recipe="nope"), ("unknown --recipe 'nope'", "choose one of")),
  ("train", dict(_TINY_TRAIN, head="nope"), ("unknown --head 'nope'", "choose one of")),
  ("train", dict(_TINY_TRAIN, topology="nope"), ("unknown --topology 'nope'", "choose one of")),
  ("attack", dict(attack="nope"), ("unknown --attack 'nope'", "choose one of")),
  ("attack", dict(variant="nope"), ("unknown --variant 'nope'", "choose one of")),
  ("attack", dict(users="nope"), ("unknown --users 'nope'", "choose one of")),
  ("attack", dict(distance="nope"), ("unknown --distance 'nope'", "choose one of")),
  ("attack", dict(top_k=0), ("--top_k=0 must be >= 1",)),
  ("attack", dict(num_examples=-1), ("--num_examples=-1 must be > 0",)),
  ("sweep", dict(dataset="nope"), ("unknown dataset 'nope' (--dataset)", "choose one of")),
  ("sweep", dict(config=TINY, seeds=["x"]), ("--seeds must be a comma-separated list",)),
  ("reproduce", dict(preset="nope"), ("unknown --preset 'nope'", "choose one of")),
  (
    "reproduce",
    dict(preset="tiny", datasets=["nope"]),
    ("unknown dataset 'nope' in --datasets", "choose among"),
  ),
  (
    "reproduce",
    dict(preset="tiny", datasets=["synthetic"], taobao_dir="{files}/nowhere"),
    ("--preset=tiny has no taobao config",),
  ),
  # ---- noise, clip, epsilon, delta ----------------------------------------------------------
  (
    "train",
    dict(_TINY_TRAIN, dp_clip="auto", dp_noise_multiplier=-1.0),
    ("--dp_noise_multiplier=-1.0 must be >= 0",),
  ),
  (
    "train",
    dict(_TINY_TRAIN, dp_clip="auto", dp_noise_multiplier=NAN),
    ("--dp_noise_multiplier=nan must be >= 0",),
  ),
  ("train", dict(_TINY_TRAIN, dp_noise_multiplier=1.0), ("noise needs a clip norm", "--dp_clip")),
  ("train", dict(_TINY_TRAIN, dp_clip="0"), ("--dp_clip=0 must be a positive number",)),
  ("train", dict(_TINY_TRAIN, dp_clip="-1"), ("--dp_clip=-1 must be a positive number",)),
  ("train", dict(_TINY_TRAIN, dp_clip="nan"), ("--dp_clip=nan must be a positive number",)),
  ("train", dict(_TINY_TRAIN, dp_clip="big"), ("--dp_clip='big' is not a number",)),
  (
    "train",
    dict(_TINY_TRAIN, dp_clip="inf", dp_noise_multiplier=1.0),
    ("--dp_clip=inf with noise gives infinite noise", "finite number"),
  ),
  (
    "train",
    dict(_TINY_TRAIN, device_dp_clip=float("inf"), device_dp_noise_multiplier=1.0),
    ("--device_dp_clip=inf with noise gives infinite noise", "finite positive number"),
  ),
  (
    "train",
    dict(_TINY_TRAIN, dp_clip="1e30", dp_noise_multiplier=1e10),
    ("--dp_noise_multiplier x --dp_clip = 1e+40 overflows float32", "lower the noise"),
  ),
  (
    "train",
    dict(_TINY_TRAIN, device_dp_clip=1e30, device_dp_noise_multiplier=1e10),
    ("--device_dp_noise_multiplier x --device_dp_clip = 1e+40 overflows float32",),
  ),
  (
    "train",
    dict(_TINY_TRAIN, dp_clip="auto", target_epsilon=0.0),
    ("--target_epsilon=0 is not a valid epsilon", "omit --target_epsilon"),
  ),
  (
    "train",
    dict(_TINY_TRAIN, dp_clip="auto", target_epsilon=-1.0),
    ("--target_epsilon=-1.0 must be a positive finite number",),
  ),
  (
    "train",
    dict(_TINY_TRAIN, dp_clip="auto", target_epsilon=NAN),
    ("--target_epsilon=nan must be a positive finite number",),
  ),
  (
    "train",
    dict(_TINY_TRAIN, label_dp_epsilon=0.0),
    ("--label_dp_epsilon=0 is not a valid epsilon", "omit --label_dp_epsilon"),
  ),
  (
    "train",
    dict(_TINY_TRAIN, label_dp_epsilon=-1.0),
    ("--label_dp_epsilon=-1.0 must be a positive finite number",),
  ),
  (
    "train",
    dict(_TINY_TRAIN, label_dp_epsilon=NAN),
    ("--label_dp_epsilon=nan must be a positive finite number",),
  ),
  ("train", dict(_TINY_TRAIN, target_delta=0.0), ("--target_delta=0.0 must lie in (0, 1)",)),
  ("train", dict(_TINY_TRAIN, target_delta=1.0), ("--target_delta=1.0 must lie in (0, 1)",)),
  ("train", dict(_TINY_TRAIN, target_delta=-0.5), ("--target_delta=-0.5 must lie in (0, 1)",)),
  ("train", dict(_TINY_TRAIN, target_delta=NAN), ("--target_delta=nan must lie in (0, 1)",)),
  ("train", dict(_TINY_TRAIN, local_steps=0), ("--local_steps=0 must be >= 1",)),
  ("sweep", dict(config=TINY, sigmas=["-1"]), ("--sigmas value -1 is invalid", ">= 0")),
  ("sweep", dict(config=TINY, sigmas=["nan"]), ("--sigmas value nan is invalid",)),
  (
    "sweep",
    dict(config=TINY, sigmas=[], target_epsilons=["0"]),
    ("--target_epsilons value 0 is invalid", "positive finite epsilon"),
  ),
  (
    "sweep",
    dict(config=TINY, sigmas=[], target_epsilons=["-4"]),
    ("--target_epsilons value -4 is invalid",),
  ),
  (
    "sweep",
    dict(config=TINY, sigmas=[], target_epsilons=[], label_epsilons=["nan"]),
    ("--label_epsilons value nan is invalid",),
  ),
  (
    "sweep",
    dict(config=TINY, sigmas=[], target_epsilons=[], label_epsilons=["0"]),
    ("--label_epsilons value 0 is invalid",),
  ),
  ("sweep", dict(config=TINY, seeds=["0", "0"]), ("--seeds has duplicates",)),
  # ---- CSV files given to --dataset=csv / bank --data_path ----------------------------------
  ("train", dict(dataset="csv"), ("csv needs a table", "--data_path=FILE and --schema=FILE.json")),
  (
    "train",
    dict(dataset="csv", data_path="{files}/missing.csv"),
    ("file not found", "missing.csv", "check the path"),
  ),
  ("train", dict(dataset="csv", data_path="{files}"), ("is a directory, not a file",)),
  (
    "train",
    dict(dataset="csv", data_path="{files}/empty.csv"),
    ("empty.csv is empty", "give a CSV file with a header row"),
  ),
  ("train", dict(dataset="csv", data_path="{files}/blank.csv"), ("blank.csv is empty",)),
  (
    "train",
    dict(dataset="csv", data_path="{files}/header_only.csv"),
    ("header_only.csv has a header but no data rows",),
  ),
  (
    "train",
    dict(dataset="csv", data_path="{files}/truncated.csv"),
    ("truncated.csv line 31: 3 fields, expected 5", "fix or remove that row"),
  ),
  (
    "train",
    dict(dataset="csv", data_path="{files}/truncated.csv.gz"),
    ("truncated.csv.gz looks gzip-compressed but cannot be decompressed", "intact .gz"),
  ),
  (
    "train",
    dict(dataset="csv", data_path="{files}/colon.csv"),
    ("colon.csv has one column only when split on ','", "check the delimiter"),
  ),
  (
    "train",
    dict(dataset="csv", data_path="{files}/latin1.csv"),
    ("latin1.csv is not UTF-8 text", "re-save it as UTF-8"),
  ),
  (
    "train",
    dict(dataset="csv", data_path="{files}/binary.csv"),
    ("binary.csv is a binary file", "export the table as UTF-8 CSV"),
  ),
  (
    "train",
    dict(dataset="csv", data_path="{files}/good.csv"),
    ("no label column for good.csv", "\"label\" key of the schema", "JSON file of --schema"),
  ),
  (
    "train",
    dict(dataset="bank", data_path="{files}/bank_three_labels.csv"),
    ("label 'y' must be binary but has 3 distinct value(s)", "choose a two-valued label"),
  ),
  pytest.param(
    (
      "train",
      dict(dataset="csv", data_path="{files}/three_labels.csv", schema="{files}/schema.json"),
      ("label 'y' must be binary but has 3 distinct value(s)",),
    ),
    marks=pytest.mark.skipif(
      not HAS_SCHEMA, reason="TrainConfig has no schema field yet (see issue 6 report)"
    ),
  ),
  # ---- checkpoints and results files --------------------------------------------------------
  # (attack verifies every artifact against run.json before reading it; the checkpoint's own
  # checks, for workdirs without a manifest, are in test_checkpoint_checks_without_a_manifest)
  (
    "attack",
    dict(),
    ("checkpoint.msgpack is missing", "run.json lists it"),
    _on("checkpoint.msgpack", os.remove),
  ),
  (
    "attack",
    dict(),
    ("checkpoint.msgpack changed since run.json", "--overwrite"),
    _on("checkpoint.msgpack", _truncate),
  ),
  (
    "attack",
    dict(),
    ("checkpoint.msgpack changed since run.json",),
    _on("checkpoint.msgpack", _flip_byte),
  ),
  ("attack", dict(), ("checkpoint.msgpack changed since run.json",), _from_b("checkpoint.msgpack")),
  ("attack", dict(), ("config.json changed since run.json",), _from_b("config.json")),
  (
    "attack",
    dict(),
    ("config.json is corrupted", "delete it and rerun"),
    _on("config.json", _truncate),
  ),
  (
    "attack",
    dict(),
    ("no finished training run", "run experiments.train"),
    _on("metrics.json", os.remove),
  ),
  (
    "attack",
    dict(users="train"),
    ("transcript.npz changed since run.json",),
    _on("transcript.npz", _truncate),
  ),
  (
    "train",
    dict(_TINY_TRAIN, resume=True),
    ("is damaged: checkpoint.msgpack changed since run.json", "--overwrite to retrain"),
    _on("checkpoint.msgpack", _truncate),
  ),
  (
    "train",
    dict(_TINY_TRAIN),
    ("is damaged: checkpoint.msgpack changed",),
    _from_b("checkpoint.msgpack"),
  ),
  (
    "train",
    dict(_TINY_TRAIN, resume=True),
    ("is corrupted or truncated",),
    lambda wd, wds: (_truncate(wd / "checkpoint.msgpack"), os.remove(wd / "metrics.json")),
  ),
  (
    "train",
    dict(_TINY_TRAIN, resume=True),
    ("written for a different model/config",),
    lambda wd, wds: (_from_b("checkpoint.msgpack")(wd, wds), os.remove(wd / "metrics.json")),
  ),
  (
    "train",
    dict(_TINY_TRAIN),
    ("is unreadable or corrupted", "use --overwrite"),
    _on("config.json", _flip_byte),
  ),
  # ---- unwritable workdir (a path under a regular file) -------------------------------------
  (
    "train",
    dict(_TINY_TRAIN, workdir="{files}/a_regular_file/w"),
    ("is not writable", "choose another --workdir"),
  ),
  (
    "sweep",
    dict(config=TINY, seeds=["0"], workdir="{files}/a_regular_file/w"),
    ("is not writable", "choose another --workdir"),
  ),
  (
    "reproduce",
    dict(preset="tiny", datasets=["synthetic"], workdir="{files}/a_regular_file/w"),
    ("is not writable", "choose another --workdir"),
  ),
  ("attack", dict(workdir="{files}/a_regular_file/w"), ("no finished training run",)),
  # ---- results of another configuration ----------------------------------------------------
  (
    "train",
    dict(_TINY_TRAIN, seed=1),
    ("holds results of another configuration (differs in: seed)", "use --overwrite"),
  ),
  (
    "attack",
    dict(num_examples=5),
    ("attack.json holds another attack configuration", "use --overwrite"),
  ),
  # ==== issue "one owner per workdir" ========================================================
  # ---- M4: two ways to choose sigma --------------------------------------------------------
  (
    "train",
    dict(_TINY_TRAIN, dp_clip="auto", dp_noise_multiplier=1.0, target_epsilon=2.0),
    (
      "--dp_noise_multiplier=1.0 and --target_epsilon=2.0 contradict each other",
      "give one of them",
    ),
  ),
  # ---- L10: numeric overrides are unset by default; an explicit 0 is an error --------------
  ("train", dict(_TINY_TRAIN, epochs=0), ("--epochs=0 must be > 0", "omit --epochs")),
  ("train", dict(_TINY_TRAIN, batch_size=0), ("--batch_size=0 must be > 0",)),
  ("train", dict(_TINY_TRAIN, learning_rate=0.0), ("--learning_rate=0.0 must be > 0",)),
  ("attack", dict(num_examples=0), ("--num_examples=0 must be > 0", "omit --num_examples")),
  ("sweep", dict(config=TINY, num_examples=0), ("--num_examples=0 must be >= 1",)),
  # ---- M6, L1, L8: artifacts and data tied to their run (manifest verified by attack) -------
  (
    "attack",
    dict(),
    (
      "transcript.npz changed since run.json recorded it",
      "copied from another run",
      "experiments.train --overwrite",
    ),
    _from_b("transcript.npz"),
  ),
  (
    "attack",
    dict(users="train"),
    ("transcript_params.msgpack changed since run.json",),
    _from_b("transcript_params.msgpack"),
  ),
  (
    "attack",
    dict(),
    ("metrics.json changed since run.json recorded it",),
    _on(
      "metrics.json",
      lambda p: p.write_text(
        json.dumps(dict(json.loads(p.read_text()), noise_multiplier=1.0, epsilon=0.5))
      ),
    ),
  ),
  (
    "attack",
    dict(),
    ("checkpoint.msgpack changed since run.json",),
    _on("checkpoint.msgpack", lambda p: (os.remove(p), os.mkfifo(p))),
  ),  # no hang on a FIFO
  # ---- L2: corrupted records --------------------------------------------------------------
  (
    "attack",
    dict(num_examples=10),
    ("attack.json is corrupted", "--overwrite"),
    _on("attack.json", _truncate),
  ),
  (
    "attack",
    dict(num_examples=10),
    ("attack.json is not an attack record", "--overwrite"),
    _on("attack.json", lambda p: p.write_text("[1, 2, 3]")),
  ),
  # ---- L3: the user's --config file, with the line --------------------------------------
  (
    "train",
    dict(config="{files}/syntax_config.py"),
    ("--config file", "syntax_config.py line 3: SyntaxError", "fix that file"),
  ),
  (
    "train",
    dict(config="{files}/raising_config.py"),
    ("raising_config.py line 5: NameError: name 'undefined_name' is not defined",),
  ),
  ("train", dict(config="{files}/no_get_config.py"), ("defines no get_config()",)),
  # ---- L5: inputs that fail before any work -------------------------------------------------
  ("attack", dict(knn_k=10**6), ("--knn_k=1000000 exceeds the", "reference split")),
  (
    "train",
    dict(dataset="csv", data_path="{files}/open_quote.csv"),
    ("open_quote.csv line 5: a quoted field opens there and is not closed", "balance the quotes"),
  ),
  (
    "train",
    dict(_TINY_TRAIN, resume=True),
    ("checkpoint.msgpack is a FIFO, not a regular file", "remove it"),
    lambda wd, wds: (
      os.remove(wd / "checkpoint.msgpack"),
      os.mkfifo(wd / "checkpoint.msgpack"),
      os.remove(wd / "metrics.json"),
    ),
  ),
]


def _case_id(case) -> str:
  values = case.values[0] if hasattr(case, "values") else case
  binary, flag_values = values[0], values[1]
  parts = [
    f"{k}={os.path.basename(str(v)) if 'path' in k or 'workdir' in k else v}"
    for k, v in flag_values.items()
    if k not in ("config",)
  ]
  setup = values[3] if len(values) > 3 else None
  tag = f"+{values[2][0][:24]}" if setup else ""
  return f"{binary}[{','.join(parts)}]{tag}"


def _resolve(flag_values: dict, files: pathlib.Path) -> dict:
  out = {}
  for k, v in flag_values.items():
    if isinstance(v, str):
      v = v.replace("{files}", str(files))
    out[k] = v
  return out


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_gives_one_clear_line_and_keeps_results(case, workdirs, files, tmp_path, capsys):
  binary, flag_values, expected, *setup = case
  workdir = tmp_path / "w"
  shutil.copytree(workdirs["a"], workdir)
  if setup:
    setup[0](workdir, workdirs)
  flag_values = {"workdir": str(workdir), **_resolve(flag_values, files)}
  before, before_files = _snapshot(workdir), _snapshot(files)
  code, err = _call(capsys, binary, **flag_values)
  _assert_one_clear_line(code, err, expected)
  assert _snapshot(workdir) == before, "the workdir's files changed"
  assert _snapshot(files) == before_files, "the input files changed"


def test_debug_flag_shows_the_traceback(workdirs, tmp_path, capsys):
  workdir = tmp_path / "w"
  with pytest.raises(pipeline.ConfigError, match="dp_clip"):
    _call(capsys, "train", workdir=str(workdir), config=TINY, dp_clip="0", debug=True)


def test_three_class_label_message_from_the_csv_loader(files):
  # The same check as the binary's --schema case, through the library (works without the flag).
  with pytest.raises(
    sj_data.DataError,
    match=r"^label 'y' must be binary but has 3 distinct "
    r"value\(s\) \('maybe', 'no', 'yes'\); choose a two-valued label column",
  ):
    sj_data.load("csv", path=files / "three_labels.csv", schema=files / "schema.json")
  with pytest.raises(sj_data.DataError, match="one column only when split on ','; it looks ';'"):
    (files / "semicolon.csv").write_text(_GOOD.replace(",", ";"))
    sj_data.load("csv", path=files / "semicolon.csv", schema=files / "schema.json", delimiter=",")


# --------------------------------------------------------------------------------------------------
# The same through real subprocesses (app.run, absl flag parsing, exit status), a few only.


@pytest.mark.parametrize(
  "args, expected",
  [
    (
      ["experiments.train", "--dataset=csv", "--data_path={files}/binary.csv"],
      "binary.csv is a binary file",
    ),
    (["experiments.attack", "--users=train"], "checkpoint.msgpack changed since run.json"),
    (["experiments.sweep", f"--config={TINY}", "--sigmas=0,-0.5"], "--sigmas value -0.5"),
    (["experiments.reproduce", "--preset=huge"], "unknown --preset 'huge'"),
  ],
  ids=[
    "train-binary-csv",
    "attack-truncated-checkpoint",
    "sweep-negative-sigma",
    "reproduce-unknown-preset",
  ],
)
def test_bad_input_subprocess(args, expected, workdirs, files, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(workdirs["a"], workdir)
  _truncate(workdir / "checkpoint.msgpack")
  before = _snapshot(workdir)
  res = _run([a.replace("{files}", str(files)) for a in args] + [f"--workdir={workdir}"])
  lines = [line for line in res.stderr.splitlines() if line.strip()]
  assert res.returncode == 2, res.stderr[-2000:]
  assert "Traceback" not in res.stderr
  error_lines = [line for line in lines if line.startswith("error: ")]
  assert len(error_lines) == 1 and expected in error_lines[0], res.stderr[-2000:]
  assert _snapshot(workdir) == before


def test_unparsable_flag_value_is_rejected_by_absl_without_traceback(tmp_path):
  res = _run(["experiments.train", "--seed=abc", f"--workdir={tmp_path / 'w'}"])
  assert res.returncode != 0
  assert "Traceback" not in res.stderr
  assert "--seed=abc" in res.stderr.splitlines()[0]
  assert not (tmp_path / "w").exists()


# --------------------------------------------------------------------------------------------------
# Overwrite protection: another configuration replaces results only with --overwrite.


def test_train_overwrites_another_configuration_only_when_asked(workdirs, tmp_path, capsys):
  workdir = tmp_path / "w"
  shutil.copytree(workdirs["a"], workdir)
  before = _snapshot(workdir)
  code, err = _call(capsys, "train", workdir=str(workdir), config=TINY, head="mlp")
  _assert_one_clear_line(
    code,
    err,
    (
      "holds results of another configuration (differs in: head)",
      "use --overwrite or another --workdir",
    ),
  )
  assert _snapshot(workdir) == before
  code, err = _call(capsys, "train", workdir=str(workdir), config=TINY, head="mlp", overwrite=True)
  assert code == 0, err
  assert json.loads((workdir / "config.json").read_text())["head"] == "mlp"
  # The new run's results are those of a fresh run of the same configuration (the MLP workdir).
  assert (workdir / "config.json").read_bytes() == (workdirs["b"] / "config.json").read_bytes()
  with (
    np.load(workdir / "transcript.npz") as got,
    np.load(workdirs["b"] / "transcript.npz") as want,
  ):
    assert got.files == want.files
    for key in want.files:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_attack_overwrites_another_configuration_only_when_asked(workdirs, tmp_path, capsys):
  workdir = tmp_path / "w"
  shutil.copytree(workdirs["a"], workdir)
  before = _snapshot(workdir)
  code, err = _call(capsys, "attack", workdir=str(workdir), num_examples=5, knn_k=3)
  _assert_one_clear_line(
    code,
    err,
    ("attack.json holds another attack configuration", "use --overwrite or another --workdir"),
  )
  assert _snapshot(workdir) == before
  # The same attack configuration is a no-op (nothing rewritten).
  code, err = _call(capsys, "attack", workdir=str(workdir), num_examples=10)
  assert code == 0, err
  assert _snapshot(workdir) == before
  code, err = _call(capsys, "attack", workdir=str(workdir), num_examples=5, overwrite=True)
  assert code == 0, err
  record = json.loads((workdir / "attack.json").read_text())
  assert record["num_examples"] == 5 and record["config"]["num_examples"] == 5
  # A different attack configuration with its own results file leaves attack.json alone.
  after = _snapshot(workdir)["attack.json"]
  code, err = _call(capsys, "attack", workdir=str(workdir), num_examples=5, variant="paper")
  assert code == 0, err
  assert _snapshot(workdir)["attack.json"] == after
  assert (workdir / "attack_exact_paper_auto_test.json").exists()


def _timing_free(record: dict) -> dict:
  return {
    k: v
    for k, v in records.without_environment(record).items()
    if "seconds" not in k and k != "candidates_per_second"
  }


def test_attack_after_train_overwrite_is_of_the_new_model(workdirs, tmp_path, capsys):
  workdir, fresh = tmp_path / "w", tmp_path / "fresh"
  shutil.copytree(workdirs["a"], workdir)
  shutil.copytree(workdirs["b"], fresh)
  code, err = _call(capsys, "train", workdir=str(workdir), config=TINY, head="mlp", overwrite=True)
  assert code == 0, err
  for wd in (workdir, fresh):
    code, err = _call(capsys, "attack", workdir=str(wd), num_examples=10)
    assert code == 0, err
  got = json.loads((workdir / "attack.json").read_text())
  want = json.loads((fresh / "attack.json").read_text())
  assert _timing_free(got) == _timing_free(want)


class _Killed(BaseException):
  """Raised instead of os._exit by an in-process kill."""


def test_attack_resume_ignores_a_partial_of_another_configuration(
  workdirs, tmp_path, capsys, monkeypatch
):
  workdir, fresh = tmp_path / "w", tmp_path / "fresh"
  shutil.copytree(workdirs["a"], workdir)
  shutil.copytree(workdirs["a"], fresh)

  def kill(status):
    raise _Killed(status)

  monkeypatch.setattr(common.os, "_exit", kill)
  # Killed after the first block written (a block's parameter versions go in one EXACT call).
  monkeypatch.setenv(common.KILL_ENV, "1")
  with pytest.raises(_Killed), flagsaver.flagsaver(workdir=str(workdir), users="train"):
    attack_bin.main([])
  monkeypatch.delenv(common.KILL_ENV)
  assert (workdir / "attack_exact_auto_auto_train.json.partial.npz").exists()
  for wd, extra in ((workdir, {"resume": True}), (fresh, {})):
    code, err = _call(capsys, "attack", workdir=str(wd), users="train", num_examples=100, **extra)
    assert code == 0, err
  got = json.loads((workdir / "attack_exact_auto_auto_train.json").read_text())
  want = json.loads((fresh / "attack_exact_auto_auto_train.json").read_text())
  assert _timing_free(got) == _timing_free(want)


# --------------------------------------------------------------------------------------------------
# Reruns keep results (H1), foreign directories are never touched (H2), everything is validated
# before the workdir is touched (M2), sweeps refuse another point set and honour --overwrite (M7).

CHANGED_BY_RETRAINING = [
  "checkpoint.msgpack",
  "history.jsonl",
  "metrics.json",
]  # they record timings
_ALL_PRIVATE = {"private_categorical": ["a", "b", "d"], "private_dense": ["c"], "label": "y"}

RERUN_CASES = [
  (
    "train",
    dict(_TINY_TRAIN, resume=True, overwrite=True),
    ("--resume and --overwrite contradict each other", "give one of them"),
  ),
  ("train", dict(_TINY_TRAIN, seed=-1, overwrite=True), ("--seed=-1 must be an integer >= 0",)),
  ("train", dict(_TINY_TRAIN, workdir=""), ("--workdir is empty", "give a directory")),
  (
    "train",
    dict(_TINY_TRAIN, workdir="{files}"),
    ("is not empty and is not a splitjax train workdir", "choose a new or empty --workdir"),
  ),
  (
    "sweep",
    dict(config=TINY, seeds=["0"], workdir="{files}"),
    ("is not empty and is not a splitjax sweep workdir",),
  ),
  (
    "reproduce",
    dict(preset="tiny", datasets=["synthetic"], workdir="{files}"),
    ("is not empty and is not a splitjax reproduce workdir",),
  ),
  (
    "train",
    dict(_TINY_TRAIN),
    ("an unfinished run (epoch 2 of 2)", "--resume to continue", "--overwrite to restart"),
    _on("metrics.json", os.remove),
  ),
]
if HAS_SCHEMA:
  RERUN_CASES.append(
    (
      "train",
      dict(
        dataset="csv", data_path="{files}/good.csv", schema="{files}/private.json", overwrite=True
      ),
      ("the server holds no feature",),
    )
  )


@pytest.mark.parametrize("case", RERUN_CASES, ids=[_case_id(c) for c in RERUN_CASES])
def test_refused_rerun_leaves_workdir_and_files_as_they_were(
  case, workdirs, files, tmp_path, capsys
):
  (files / "private.json").write_text(json.dumps(_ALL_PRIVATE))
  test_bad_input_gives_one_clear_line_and_keeps_results(case, workdirs, files, tmp_path, capsys)


def test_identical_rerun_keeps_every_file(workdirs, tmp_path, caplog):
  workdir = tmp_path / "w"
  shutil.copytree(workdirs["a"], workdir)
  before = _snapshot(workdir)
  assert "attack.json" in before and "run.json" in before
  caplog.set_level(logging.INFO)
  with flagsaver.flagsaver(workdir=str(workdir), config=TINY):
    train_bin.main([])
  assert "already trained (test AUC" in caplog.text and "--overwrite to retrain" in caplog.text
  assert _snapshot(workdir) == before


def test_overwrite_builds_beside_and_a_kill_loses_nothing(workdirs, tmp_path, caplog, monkeypatch):
  workdir = tmp_path / "w"
  shutil.copytree(workdirs["a"], workdir)
  before = _snapshot(workdir)

  def kill(status):
    raise _Killed(status)

  monkeypatch.setattr(common.os, "_exit", kill)
  monkeypatch.setenv(common.KILL_ENV, "1")  # killed after the new run's first checkpoint
  with (
    pytest.raises(_Killed),
    flagsaver.flagsaver(workdir=str(workdir), config=TINY, overwrite=True),
  ):
    train_bin.main([])
  monkeypatch.delenv(common.KILL_ENV)
  after = _snapshot(workdir)
  assert {k: v for k, v in after.items() if not k.startswith(".staging")} == before
  caplog.clear()
  caplog.set_level(logging.INFO)
  with flagsaver.flagsaver(workdir=str(workdir), config=TINY, overwrite=True):
    train_bin.main([])
  out = caplog.text
  assert "replaced the earlier one" in out and "attack.json" in out  # names what it removed
  files_now = set(_snapshot(workdir))
  assert not any(name.startswith((".staging", ".replaced")) for name in files_now)
  assert "attack.json" not in files_now and "run.json" in files_now
  manifest = json.loads((workdir / "run.json").read_text())
  assert manifest["run_id"] != json.loads(before["run.json"][0])["run_id"]
  # Same config and seed: the retrained run equals the old one, artifact for artifact.
  old = json.loads(before["run.json"][0])["artifacts"]
  changed = sorted(name for name in old if manifest["artifacts"][name] != old[name])
  assert changed == CHANGED_BY_RETRAINING, changed


def test_manifest_records_data_and_artifact_hashes(workdirs):
  manifest = json.loads((workdirs["a"] / "run.json").read_text())
  assert manifest["kind"] == "train" and manifest["splitjax_version"] == "0.2.0"
  assert set(manifest["artifacts"]) == {
    "config.json",
    "checkpoint.msgpack",
    "transcript.npz",
    "transcript_params.msgpack",
    "history.jsonl",
    "metrics.json",
  }
  for name, digest in manifest["artifacts"].items():
    assert hashlib.sha256((workdirs["a"] / name).read_bytes()).hexdigest() == digest


def test_attack_reads_a_legacy_workdir_with_one_warning(workdirs, tmp_path, capsys):
  workdir = tmp_path / "w"
  shutil.copytree(workdirs["a"], workdir)
  (workdir / "run.json").unlink()
  code, err = _call(capsys, "attack", workdir=str(workdir), num_examples=10)
  assert code == 0
  lines = [line for line in err.splitlines() if line.strip()]
  assert lines == [
    f"warning: unverified: {workdir} was written by splitjax < 0.2 (no run.json);"
    " its files are read as they are"
  ]


_SWEEP = dict(
  config=TINY, seeds=["0"], sigmas=["0"], target_epsilons=[], label_epsilons=[], num_examples=10
)


def test_sweep_refuses_another_point_set_and_honours_overwrite(tmp_path, capsys):
  workdir = tmp_path / "sweep"
  code, err = _call(capsys, "sweep", workdir=str(workdir), **_SWEEP)
  assert code == 0, err
  first = _snapshot(workdir)
  code, err = _call(capsys, "sweep", workdir=str(workdir), **_SWEEP)  # identical: kept
  assert code == 0, err
  before = _snapshot(workdir)
  assert {k: v[0] for k, v in before.items() if not k.endswith(".png")} == {
    k: v[0] for k, v in first.items() if not k.endswith(".png")
  }
  other = dict(_SWEEP, sigmas=["1"])
  code, err = _call(capsys, "sweep", workdir=str(workdir), **other)
  _assert_one_clear_line(
    code, err, ("holds results of another configuration (differs in: points", "use --overwrite")
  )
  assert _snapshot(workdir) == before
  code, err = _call(capsys, "sweep", workdir=str(workdir), overwrite=True, **other)
  assert code == 0, err
  assert [row["point"] for row in json.loads((workdir / "sweep.json").read_text())["rows"]] == [
    "no_dp",
    "sigma_1",
    "sigma_inf",
  ]


def test_reproduce_refuses_a_workdir_of_another_study(tmp_path, capsys):
  workdir = tmp_path / "r"
  workdir.mkdir()
  (workdir / "results.json").write_text(json.dumps({"preset": "quick", "datasets": {"adult": {}}}))
  before = _snapshot(workdir)
  code, err = _call(
    capsys, "reproduce", workdir=str(workdir), preset="tiny", datasets=["synthetic"]
  )
  _assert_one_clear_line(
    code, err, ("holds a study of --preset=quick on ['adult']", "use --overwrite")
  )
  assert _snapshot(workdir) == before


# --------------------------------------------------------------------------------------------------
# Disk full and read-only filesystems, injected (CI runs as root: permission bits prove nothing).


def _failing(real, errno_code, when):
  def wrapper(*args, **kwargs):
    if when(*args):
      raise OSError(errno_code, os.strerror(errno_code))
    return real(*args, **kwargs)

  return wrapper


def test_disk_full_during_the_overwrite_swap_puts_the_old_run_back(
  workdirs, tmp_path, capsys, monkeypatch
):
  workdir = tmp_path / "w"
  shutil.copytree(workdirs["a"], workdir)
  before = _snapshot(workdir)
  real = os.replace
  # The third rename of the swap fails (the old run is half moved away at that point).
  calls = {"n": 0}

  def third_swap_rename(src, dst):
    if os.path.dirname(str(src)) != os.path.dirname(str(dst)):  # a move, not an atomic write
      calls["n"] += 1
      return calls["n"] == 3
    return False

  monkeypatch.setattr(os, "replace", _failing(real, errno.ENOSPC, third_swap_rename))
  code, err = _call(capsys, "train", workdir=str(workdir), config=TINY, overwrite=True)
  monkeypatch.setattr(os, "replace", real)
  _assert_one_clear_line(
    code, err, ("could not swap the new run into", "the earlier run is back in place")
  )
  after = {k: v for k, v in _snapshot(workdir).items() if not k.startswith(".staging")}
  assert after == before


def test_disk_full_while_writing_the_manifest_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
  workdir = tmp_path / "w"
  real = os.fsync
  monkeypatch.setattr(
    os,
    "fsync",
    _failing(
      real,
      errno.ENOSPC,
      lambda fd: os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".run.json."),
    ),
  )
  code, err = _call(capsys, "train", workdir=str(workdir), config=TINY)
  monkeypatch.setattr(os, "fsync", real)
  _assert_one_clear_line(
    code,
    err,
    (
      f"could not write {workdir / 'run.json'} (No space left on device)",
      "free space on that filesystem, or choose another --workdir",
    ),
  )
  names = set(_snapshot(workdir))
  assert "run.json" not in names and not any(n.startswith(".run.json") for n in names)
  assert "metrics.json" in names  # everything before the manifest was written whole


def test_read_only_workdir_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
  workdir = tmp_path / "ro"
  workdir.mkdir()
  real = os.open
  monkeypatch.setattr(
    os, "open", _failing(real, errno.EROFS, lambda path, *a: str(path).startswith(str(workdir)))
  )
  code, err = _call(capsys, "train", workdir=str(workdir), config=TINY)
  monkeypatch.setattr(os, "open", real)
  _assert_one_clear_line(
    code, err, ("is not writable (Read-only file system)", "choose another --workdir")
  )
  assert not any(workdir.iterdir())


# --------------------------------------------------------------------------------------------------
# One writer per workdir (M1): flock on WORKDIR/.lock, held by a subprocess that a test hook keeps
# waiting on a sentinel file (no sleeps: the test waits for the holder's ".held" file, and kills
# it with SIGKILL at the end; the kernel releases its locks).


def _holding(tmp_path, lock_name: str, args) -> tuple[subprocess.Popen, pathlib.Path]:
  """Starts ``python -m args``, held by the test hook once it has taken ``lock_name``; returns
  when the hook says so on stdout (a blocking read: no polling, no sleeps; killed after 60 s)."""
  sentinel = tmp_path / "release"
  env = dict(os.environ)
  env.pop(common.KILL_ENV, None)
  env[workdir_lib.HOLD_ENV] = f"{lock_name}:{sentinel}"
  proc = subprocess.Popen(
    [sys.executable, "-m", *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  timer = threading.Timer(60, proc.kill)
  timer.start()
  for line in proc.stdout:
    if line.startswith(workdir_lib.HELD_MARKER):
      break
  timer.cancel()
  assert proc.poll() is None, proc.communicate(timeout=60)[1][-2000:]
  return proc, sentinel


def _kill(proc: subprocess.Popen) -> None:
  proc.kill()  # SIGKILL: no cleanup; the kernel releases the process's locks
  proc.communicate(timeout=60)


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(workdirs, tmp_path, capsys):
  workdir = tmp_path / "w"
  shutil.copytree(workdirs["a"], workdir)
  proc, _ = _holding(
    tmp_path,
    ".lock",
    ["experiments.train", f"--config={TINY}", "--seed=3", f"--workdir={workdir}", "--overwrite"],
  )
  try:
    before = _snapshot(workdir)
    for binary, extra in (
      ("train", dict(config=TINY)),
      ("train", dict(config=TINY, overwrite=True)),
      ("attack", dict(num_examples=10, variant="paper")),
    ):
      code, err = _call(capsys, binary, workdir=str(workdir), **extra)
      _assert_one_clear_line(
        code,
        err,
        (
          f"workdir {workdir} is in use by pid {proc.pid} on {socket.gethostname()}",
          "python -m experiments.train",
          "--seed=3",
          "exclusive since",
          "wait for it to finish, or use another --workdir",
        ),
      )
      assert _snapshot(workdir) == before, binary
  finally:
    _kill(proc)
  # SIGKILL released the lock: the workdir can be owned again (and the copy was never touched).
  with workdir_lib.locked(workdir, exclusive=True):
    pass
  assert _snapshot(workdir) == before


def test_attacks_of_other_records_share_a_workdir_and_one_record_has_one_writer(
  workdirs, tmp_path, capsys
):
  workdir = tmp_path / "w"
  shutil.copytree(workdirs["a"], workdir)
  record = ".attack_exact_paper_auto_test.json.lock"  # held: the workdir's lock (shared) too
  proc, _ = _holding(
    tmp_path,
    record,
    ["experiments.attack", "--variant=paper", "--num_examples=10", f"--workdir={workdir}"],
  )
  try:
    code, err = _call(capsys, "attack", workdir=str(workdir), num_examples=10, variant="paper")
    _assert_one_clear_line(
      code,
      err,
      (
        f"{workdir / 'attack_exact_paper_auto_test.json'} is in use by pid {proc.pid}",
        "experiments.attack",
      ),
    )
    for binary, extra in (
      ("train", dict(config=TINY)),
      ("attack", dict(num_examples=10, overwrite=True)),
    ):
      code, err = _call(capsys, binary, workdir=str(workdir), **extra)
      _assert_one_clear_line(
        code, err, (f"workdir {workdir} is in use by pid {proc.pid}", "shared since")
      )
    # Another attack configuration runs beside it (both hold the workdir's lock shared).
    code, err = _call(capsys, "attack", workdir=str(workdir), num_examples=10, variant="clip_aware")
    assert code == 0, err
    assert (workdir / "attack_exact_clip_aware_auto_test.json").exists()
  finally:
    _kill(proc)


def test_the_next_owner_removes_temp_files_of_a_killed_write(
  workdirs, tmp_path, capsys, monkeypatch
):
  """A kill exactly between the temp file's fsync and the rename (os.replace wrapped) leaves the
  old file whole and a temp file beside it; the next run that owns the workdir removes it."""
  workdir = tmp_path / "w"
  shutil.copytree(workdirs["a"], workdir)
  before = _snapshot(workdir)
  real_replace, real_unlink = os.replace, os.unlink

  def killed_before_renaming_the_record(src, dst):
    if os.path.basename(str(dst)) == "attack.json":
      # The process dies here: no except/finally of it runs (its temp file stays).
      monkeypatch.setattr(
        os,
        "unlink",
        lambda path, *a, **k: None if str(path).endswith(".tmp") else real_unlink(path, *a, **k),
      )
      raise _Killed()
    return real_replace(src, dst)

  monkeypatch.setattr(os, "replace", killed_before_renaming_the_record)
  with pytest.raises(_Killed):
    _call(capsys, "attack", workdir=str(workdir), num_examples=5, overwrite=True)
  monkeypatch.setattr(os, "replace", real_replace)
  monkeypatch.setattr(os, "unlink", real_unlink)
  temps = sorted(p.name for p in workdir.glob(".attack.json.*.tmp"))
  assert len(temps) == 1, temps
  assert (workdir / "attack.json").read_bytes() == before["attack.json"][0]
  code, err = _call(capsys, "train", workdir=str(workdir), config=TINY)  # kept: same config
  assert code == 0, err
  assert not list(workdir.glob("*.tmp")) and not list(workdir.glob(".*.tmp"))
  # Everything else as it was, and the killed attack's partial results kept for --resume.
  after = {k: v for k, v in _snapshot(workdir).items() if not k.startswith(".")}
  assert set(after) - set(before) == {"attack.json.partial.npz"}
  assert {k: v for k, v in after.items() if k in before} == {
    k: v for k, v in before.items() if not k.startswith(".")
  }


# --------------------------------------------------------------------------------------------------
# The rest of the workdir-ownership issue's faults, each with its test.


def _errors(code: int, err: str, want_code: int = 2) -> list[str]:
  """The "error:" lines of a run that must fail with ``want_code`` and print no traceback."""
  assert code == want_code, f"exit status {code}, stderr:\n{err}"
  assert "Traceback" not in err, err
  return [line for line in err.splitlines() if line.startswith("error: ")]


def _legacy(workdir: pathlib.Path) -> None:
  os.remove(workdir / workdir_lib.MANIFEST)  # as splitjax < 0.2 wrote it: nothing to verify


@pytest.mark.parametrize(
  "setup, expected",
  [
    (lambda wd: _truncate(wd / "checkpoint.msgpack"), "is corrupted or truncated"),
    (
      lambda wd: shutil.copyfile(wd.parent / "b" / "checkpoint.msgpack", wd / "checkpoint.msgpack"),
      "written for a different model/config",
    ),
    (
      lambda wd: np.savez(
        wd / "transcript.npz",
        **dict(np.load(wd / "transcript.npz"), example_index=np.full(320, 10**6)),
      ),
      "does not fit this run's data",
    ),
    (
      lambda wd: (wd / "metrics.json").write_text(
        json.dumps(
          {
            k: v
            for k, v in json.loads((wd / "metrics.json").read_text()).items()
            if k != "l2_clip_norm"
          }
        )
      ),
      "lacks the entry 'l2_clip_norm'",
    ),
  ],
  ids=[
    "truncated-checkpoint",
    "checkpoint-of-another-model",
    "transcript-index-out-of-range",
    "metrics-missing-a-key",
  ],
)
def test_checks_of_a_workdir_without_a_manifest(setup, expected, workdirs, tmp_path, capsys):
  """Workdirs of splitjax < 0.2 (no run.json) are read with one warning line; what is wrong in
  them still gets one error line (no internal error, no bare key)."""
  workdir = tmp_path / "a"
  shutil.copytree(workdirs["a"], workdir)
  shutil.copytree(workdirs["b"], tmp_path / "b")
  _legacy(workdir)
  setup(workdir)
  code, err = _call(capsys, "attack", workdir=str(workdir), users="train", num_examples=20)
  errors = _errors(code, err)
  assert len(errors) == 1 and expected in errors[0], err
  assert "warning: unverified" in err


def test_an_unreadable_partial_is_ignored_with_one_line_and_resume_works(
  workdirs, tmp_path, capsys
):
  workdir = tmp_path / "w"
  shutil.copytree(workdirs["a"], workdir)
  name = "attack_exact_paper_auto_test.json"
  for garbage in (b"PK\x03\x04 truncated zip", b"\x00" * 100):
    (workdir / f"{name}.partial.npz").write_bytes(garbage)
    code, err = _call(
      capsys,
      "attack",
      workdir=str(workdir),
      variant="paper",
      num_examples=10,
      resume=True,
      overwrite=True,
    )
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "ignoring" in line]
    assert len(warnings) == 1 and "unreadable" in warnings[0] and name in warnings[0], err
    assert json.loads((workdir / name).read_text())["num_examples"] == 10
    assert not (workdir / f"{name}.partial.npz").exists()


def test_an_edited_training_csv_is_refused_by_attack(files, tmp_path, capsys):
  workdir, table = tmp_path / "w", tmp_path / "table.csv"
  shutil.copyfile(files / "good.csv", table)
  flag_values = dict(
    dataset="csv", data_path=str(table), schema=str(files / "schema.json"), epochs=1
  )
  code, err = _call(capsys, "train", workdir=str(workdir), **flag_values)
  assert code == 0, err
  table.write_text(table.read_text().replace("yes", "no", 3))  # three labels flipped
  before = _snapshot(workdir)
  code, err = _call(capsys, "attack", workdir=str(workdir))
  _assert_one_clear_line(
    code,
    err,
    (f"the training data file {table} changed since this run", "restore the file or retrain"),
  )
  assert _snapshot(workdir) == before


def test_exact_that_cannot_fit_in_memory_is_refused_before_it_runs(
  workdirs, tmp_path, capsys, monkeypatch
):
  workdir = tmp_path / "w"
  shutil.copytree(workdirs["a"], workdir)
  monkeypatch.setattr(common, "available_memory_bytes", lambda: (1 << 10, "available RAM"))
  before = _snapshot(workdir)
  code, err = _call(capsys, "attack", workdir=str(workdir), variant="paper", num_examples=10)
  _assert_one_clear_line(
    code,
    err,
    ("EXACT over", "pairs per user needs at least", "GiB of available RAM", "--skip_memory_check"),
  )
  assert _snapshot(workdir) == before
  code, err = _call(
    capsys, "attack", workdir=str(workdir), variant="paper", num_examples=10, skip_memory_check=True
  )
  assert code == 0, err
  # 10^9 candidates (three features of 1000 values): the smallest peak is 30 GB of pair scores.
  est = splitjax.attacks.estimate(
    lambda p, h, x: jnp.sum(h) * p["w"][x[0]],
    {"w": jnp.ones(1000)},
    4,
    (1000, 1000, 1000),
    num_users=1,
  )
  assert est.min_peak_bytes >= 10**9 * 2 * 16


def test_batch_and_device_sizes_larger_than_the_data_are_clamped(tmp_path, capsys, caplog):
  caplog.set_level(logging.INFO)
  for extra, clamped in (
    (dict(batch_size=10**9), {"batch_size"}),
    (
      dict(protocol="fsl", samples_per_device=10**9, devices_per_round=10**9),
      {"samples_per_device", "devices_per_round"},
    ),
  ):
    workdir = tmp_path / extra.get("protocol", "sl")
    code, err = _call(capsys, "train", workdir=str(workdir), config=TINY, epochs=1, **extra)
    assert code == 0, err
    metrics = json.loads((workdir / "metrics.json").read_text())
    resolved, num_train = metrics["resolved_config"], metrics["num_train"]
    notes = [r.getMessage() for r in caplog.records if "clamped" in r.getMessage()]
    for name in clamped:
      assert any(f"--{name}=1000000000" in n for n in notes), notes
    if "batch_size" in clamped:
      assert resolved["batch_size"] == num_train
    else:
      assert resolved["samples_per_device"] == num_train and resolved["devices_per_round"] == 1
    caplog.clear()


def test_ctrl_c_prints_one_line_and_exits_130_then_resume_finishes(tmp_path, capsys, monkeypatch):
  workdir = tmp_path / "w"

  def interrupt(self):
    raise KeyboardInterrupt

  monkeypatch.setattr(common.KillSwitch, "tick", interrupt)  # Ctrl-C after the first checkpoint
  code, err = _call(capsys, "train", workdir=str(workdir), config=TINY)
  monkeypatch.undo()
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 130 and "Traceback" not in err, err
  assert lines == [
    "interrupted after epoch 1 of 2; rerun the same command with --resume to continue"
  ], err
  code, err = _call(capsys, "train", workdir=str(workdir), config=TINY, resume=True)
  assert code == 0, err
  assert json.loads((workdir / "metrics.json").read_text())["epochs"] == 2


def test_an_internal_error_is_one_line_without_jax_notes(capsys):
  def fails_inside_jit(argv):
    del argv
    jax.jit(lambda x: x.reshape(7))(jnp.ones(3))

  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    common.run_main(fails_inside_jit)([])
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert e.value.code == 3 and len(lines) == 1, err
  assert lines[0].startswith("error: internal error (TypeError: cannot reshape"), lines
  assert "JAX" not in lines[0] and "Traceback" not in err


def test_attack_on_a_read_only_workdir_fails_before_the_attack(
  workdirs, tmp_path, capsys, monkeypatch
):
  workdir = tmp_path / "w"
  shutil.copytree(workdirs["a"], workdir)
  before = _snapshot(workdir)
  real = os.open
  monkeypatch.setattr(
    os,
    "open",
    _failing(
      real,
      errno.EROFS,
      lambda path, *a: (
        str(path).startswith(str(workdir))
        and bool(a and a[0] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
      ),
    ),
  )
  monkeypatch.setattr(pipeline, "Restored", None)  # reaching the restore would fail loudly
  code, err = _call(capsys, "attack", workdir=str(workdir), variant="paper")
  monkeypatch.undo()
  _assert_one_clear_line(
    code, err, ("cannot create the lock file", "Read-only file system", "must be writable")
  )
  assert _snapshot(workdir) == before


def test_disk_full_names_the_file(tmp_path):
  real = os.fsync
  target = tmp_path / "results.json"
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(os, "fsync", _failing(real, errno.ENOSPC, lambda fd: True))
    with pytest.raises(
      sj_results.WriteError,
      match=f"could not write {target} \\(No space left on "
      "device\\); the earlier file, if any, is unchanged: free space on that filesystem$",
    ) as e:
      sj_results.atomic_write_json(target, {"a": 1})
  assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
  assert e.value.path == target and e.value.reason == "no_space"
  assert not list(tmp_path.iterdir())


def test_library_errors_name_no_flag_and_the_binaries_add_the_fix(tmp_path, capsys):
  bad_json = tmp_path / "bad.json"
  bad_json.write_text("{")
  blocker = tmp_path / "afile"
  blocker.write_text("x")
  sj_results.check_config_compatible(tmp_path / "run", {"seed": 0}, overwrite=False)
  ckpt = tmp_path / "ckpt.msgpack"
  checkpointing.save_checkpoint(ckpt, {"w": np.ones(2)}, metadata={"fingerprint": "a"})
  cases = [  # (raise a library error, its reason, the hint the binaries add)
    (lambda: sj_results.read_json(tmp_path / "none.json"), "missing", "check --workdir"),
    (lambda: sj_results.read_json(bad_json), "corrupted", "or use --overwrite"),
    (lambda: sj_results.ensure_workdir(blocker / "sub"), "not_writable", "another --workdir"),
    (
      lambda: sj_results.check_config_compatible(tmp_path / "run", {"seed": 1}, overwrite=False),
      "config_differs",
      "use --overwrite or another --workdir",
    ),
    (
      lambda: checkpointing.restore_checkpoint(tmp_path / "none", {"w": np.ones(2)}),
      "missing",
      "run experiments.train first or check --workdir",
    ),
    (
      lambda: checkpointing.restore_checkpoint(bad_json, {"w": np.ones(2)}),
      "corrupted",
      "delete it and rerun experiments.train, or use --overwrite",
    ),
    (
      lambda: checkpointing.restore_checkpoint(ckpt, {"w": np.ones(2)}, fingerprint="b"),
      "other_config",
      "use a fresh --workdir or --overwrite",
    ),
    (
      lambda: checkpointing.restore_checkpoint(ckpt, {"w": np.ones(3)}),
      "structure",
      "use a fresh --workdir or --overwrite",
    ),
  ]
  for make, reason, hint in cases:
    with pytest.raises(sj_results.FileError) as info:
      make()
    e = info.value
    assert e.reason == reason and e.path is not None and "--" not in str(e), (reason, str(e))

    def main(argv, e=e):
      del argv
      raise e

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
      common.run_main(main)([])
    line = _assert_one_clear_line(exit_info.value.code, capsys.readouterr().err, (hint,))
    assert line == f"error: {e}{common.flag_hint(e)}" and line.startswith(f"error: {e}")
  for kwargs, reason, hint in (
    (dict(name="adult", path=str(bad_json)), "path_not_taken", "drop --data_path, or use"),
    (dict(name="csv"), "no_table", "--data_path=FILE and --schema=FILE.json"),
    (dict(name="taobao"), "no_directory", "--data_path=DIR"),
  ):
    with pytest.raises(sj_data.DataError) as info:
      sj_data.load(**kwargs)
    e = info.value
    assert e.reason == reason and "--" not in str(e), (reason, str(e))
    assert hint in common.flag_hint(e), (reason, common.flag_hint(e))
  # An error the binaries raise themselves (no reason) gets no second hint.
  assert common.flag_hint(sj_results.WorkdirError("x: use --overwrite")) == ""
  assert common.flag_hint(ValueError("plain")) == ""


def test_a_one_class_test_split_reports_auc_as_undefined(tmp_path, capsys, monkeypatch):
  real_load = pipeline.load_data

  def one_class_test_split(config):
    data = real_load(config)
    return dataclasses.replace(
      data, test=dataclasses.replace(data.test, y=np.zeros_like(data.test.y))
    )

  monkeypatch.setattr(pipeline, "load_data", one_class_test_split)
  workdir = tmp_path / "w"
  code, err = _call(capsys, "train", workdir=str(workdir), config=TINY, epochs=1)
  assert code == 0, err
  assert "warning: test AUC undefined: the 40 test rows all have label 0" in err, err
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["test_auc"] == "nan" and metrics["test_auc_note"].startswith("undefined")
  assert pipeline.auc_text(metrics) == "undefined (one class in the test split)"
