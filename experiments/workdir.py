"""Workdir ownership and the run manifest: which directories a binary may write, and what it wrote.

Rules (every binary):

- ``--workdir`` must name a directory. An empty string, or an existing non-empty directory that is
  not a splitjax workdir of the same kind (``train``, ``sweep``, ``reproduce``), is refused before
  anything is written: splitjax never touches a user's own files.
- A finished run records ``run.json`` last and atomically: the run id, the splitjax version, the
  fingerprint of the requested config, the SHA-256 of the training data files and of every
  artifact. Reruns compare against it; ``attack`` reads it (workdirs written before splitjax 0.2
  have none: ``attack`` reads them with one warning line, "unverified").
- ``--overwrite`` never deletes first: the new run is built in ``WORKDIR/.staging`` and swapped in
  when it is complete (see :func:`swap_in`); a run killed before the swap leaves the old results
  as they were.
"""

import datetime
import hashlib
import os
import pathlib
import shutil
import uuid

from splitjax import io

import splitjax

MANIFEST = "run.json"
STAGING = ".staging"
_REPLACED = ".replaced"
_FORMAT = "splitjax-run"
# What marks an existing directory as a workdir of each kind (manifests of 0.2, files of 0.1).
_MARKERS = {"train": ("config.json", MANIFEST),
            "sweep": ("sweep_config.json", "sweep.json", "points"),
            "reproduce": ("reproduce_config.json", "results.json", "REPORT.md")}


class WorkdirError(io.WorkdirError):
  """A workdir that must not be written; the message names it and the fix."""


def file_sha256(path, chunk: int = 1 << 20) -> str:
  """SHA-256 of a file's bytes (read in 1 MiB chunks)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()


def _visible(path: pathlib.Path) -> list[str]:
  return sorted(p.name for p in path.iterdir() if not p.name.startswith("."))


def claim(path, kind: str) -> pathlib.Path:
  """Checks that ``kind`` may write into ``path`` and creates it; nothing else is written.

  Args:
    path: the ``--workdir`` value.
    kind: ``'train'``, ``'sweep'`` or ``'reproduce'``.

  Returns:
    The directory as a ``pathlib.Path`` (created if it did not exist).

  Raises:
    WorkdirError: an empty path, a path that is a file, or a non-empty directory that holds
      none of the files a ``kind`` workdir has (a foreign directory), or an unwritable one.
  """
  if path is None or not str(path).strip():
    raise WorkdirError("--workdir is empty: give a directory for the results, e.g. "
                       "--workdir=workdirs/run1 (splitjax never writes into the current "
                       "directory by default)")
  p = pathlib.Path(path).expanduser()
  if p.is_dir():
    entries = _visible(p)
    if entries and not any((p / m).exists() for m in _MARKERS[kind]):
      shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5
                                        else "")
      raise WorkdirError(f"workdir {p} is not empty and is not a splitjax {kind} workdir (it "
                         f"holds {shown}): choose a new or empty --workdir; splitjax does not "
                         "write into other directories")
  return io.ensure_workdir(p)


def data_files(config) -> list[pathlib.Path]:
  """The files a training config reads: the bundled table, or --data_path (and --schema)."""
  from splitjax.data import bundled  # pylint: disable=import-outside-toplevel
  files = []
  if config.data_path:
    root = pathlib.Path(config.data_path).expanduser()
    files += sorted(q for q in root.iterdir() if q.is_file()) if root.is_dir() else [root]
  elif config.dataset in bundled._FILES:  # pylint: disable=protected-access
    files += [pathlib.Path(bundled.FILES_DIR) / name
              for name in bundled._FILES[config.dataset]]  # pylint: disable=protected-access
  schema = getattr(config, "schema", "")
  if isinstance(schema, str) and schema:
    files.append(pathlib.Path(schema).expanduser())
  return files


def write_manifest(workdir, *, kind: str, config_fingerprint: str, artifacts, data=()) -> dict:
  """Writes ``run.json`` (atomically, last): what the run is and the SHA-256 of what it wrote.

  Args:
    workdir: the run's directory.
    kind: ``'train'``, ``'sweep'`` or ``'reproduce'``.
    config_fingerprint: ``io.fingerprint`` of the requested config.
    artifacts: names (relative to ``workdir``) of the files the run wrote.
    data: paths of the input data files.

  Returns:
    The manifest dict.
  """
  workdir = pathlib.Path(workdir)
  manifest = {
      "format": _FORMAT, "kind": kind, "splitjax_version": splitjax.__version__,
      "run_id": uuid.uuid4().hex, "config_fingerprint": config_fingerprint,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "data_sha256": {str(p): file_sha256(p) for p in data},
      "artifacts": {name: file_sha256(workdir / name) for name in sorted(artifacts)},
  }
  io.atomic_write_json(workdir / MANIFEST, manifest)
  return manifest


def read_manifest(workdir) -> dict | None:
  """The manifest of ``workdir``, or None when it has none (unfinished, or splitjax < 0.2)."""
  path = pathlib.Path(workdir) / MANIFEST
  if not path.exists():
    return None
  manifest = io.read_json(path)
  if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
    raise WorkdirError(f"{path} is not a splitjax run manifest: rerun experiments.train with "
                       "--overwrite")
  return manifest


def changed_artifacts(workdir, manifest: dict) -> list[str]:
  """Artifacts of ``manifest`` that are missing or whose SHA-256 differs."""
  workdir = pathlib.Path(workdir)
  return [name for name, digest in manifest["artifacts"].items()
          if not (workdir / name).is_file() or file_sha256(workdir / name) != digest]


def fresh_staging(workdir) -> pathlib.Path:
  """An empty ``WORKDIR/.staging`` (a leftover of a killed --overwrite is removed first)."""
  staging = pathlib.Path(workdir) / STAGING
  if staging.exists():
    shutil.rmtree(staging)
  staging.mkdir()
  return staging


def swap_in(workdir) -> list[str]:
  """Replaces the run in ``workdir`` by the complete one in ``WORKDIR/.staging``.

  The old run's visible files are moved to ``.replaced`` first, the new ones moved in (the
  manifest last), then ``.replaced`` is deleted. Each step is a rename on one filesystem, so a
  kill leaves every file of both runs on disk.

  Returns:
    The names of the old run's files that were removed.
  """
  workdir = pathlib.Path(workdir)
  staging, replaced = workdir / STAGING, workdir / _REPLACED
  if replaced.exists():
    shutil.rmtree(replaced)
  replaced.mkdir()
  old = _visible(workdir)
  new = sorted(_visible(staging), key=lambda n: n == MANIFEST)
  moved = []  # (src, dst) renames done, undone in reverse order if a later one fails
  try:
    for name in old:
      os.replace(workdir / name, replaced / name)
      moved.append((workdir / name, replaced / name))
    for name in new:
      os.replace(staging / name, workdir / name)
      moved.append((staging / name, workdir / name))
  except OSError as e:
    for src, dst in reversed(moved):
      os.replace(dst, src)
    raise WorkdirError(f"could not swap the new run into {workdir} ({e.strerror or e}); the "
                       f"earlier run is back in place and the new one is in {staging}: free the "
                       "space or fix the permissions, then rerun with --overwrite") from None
  shutil.rmtree(replaced)
  shutil.rmtree(staging)
  return old
