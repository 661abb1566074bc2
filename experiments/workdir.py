"""Workdir ownership and the run manifest: which directories a binary may write, and what it wrote.

Rules (every binary):

- ``--workdir`` must name a directory. An empty string, or an existing non-empty directory that is
  not a splitjax workdir of the same kind (``train``, ``sweep``, ``reproduce``, ``audit``), is
  refused before anything is written: splitjax never touches a user's own files.
- A finished run records ``run.json`` last and atomically: the run id, the splitjax version, the
  fingerprint of the requested config, the SHA-256 of the training data files and of every
  artifact. Reruns compare against it; ``attack`` reads it (workdirs written before splitjax 0.2
  have none: ``attack`` reads them with one warning line, "unverified").
- ``--overwrite`` never deletes first: the new run is built in ``WORKDIR/.staging`` and swapped in
  when it is complete (see :func:`swap_in`); a run killed before the swap leaves the old results
  as they were.
- One writer per workdir (:func:`locked`, :func:`own`): ``fcntl.flock`` on ``WORKDIR/.lock``,
  exclusive for train, sweep, reproduce and any ``--overwrite``, shared for ``attack`` (plus an
  exclusive lock on the record it writes, ``WORKDIR/.<record>.lock``), so several attack
  variants can run on one trained workdir at once. Never blocking: a held lock is refused with
  one line naming the holder (pid, host, command, written into the lock file). The kernel
  releases a lock on any exit, ``kill -9`` included. Re-entrant within a process (sweep and
  reproduce call train and attack in-process). Under ``jax.distributed`` only process 0 locks and
  writes; the workdir must then be on a filesystem every process sees.
- The next run that owns a workdir exclusively removes the temp files of killed writes
  (``.<name>.*.tmp``, see ``splitjax.results.atomic_write_bytes``).
"""

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import socket
import sys
import time
import uuid

from absl import logging

import splitjax
from splitjax import results

MANIFEST = "run.json"
STAGING = ".staging"
_REPLACED = ".replaced"
_FORMAT = "splitjax-run"
# What marks an existing directory as a workdir of each kind (manifests of 0.2, files of 0.1).
_MARKERS = {
  "train": ("config.json", MANIFEST),
  "sweep": ("sweep_config.json", "sweep.json", "points"),
  "reproduce": ("reproduce_config.json", "results.json", "REPORT.md"),
  "audit": ("audit_config.json", "audit.json"),
  "defense_study": ("defenses.json", "defenses.md"),
}


LOCK = ".lock"
HOLD_ENV = "SPLITJAX_TEST_HOLD_LOCK"  # test hook: see _hold_for_test
HELD_MARKER = "SPLITJAX_TEST_LOCK_HELD"


class WorkdirError(results.WorkdirError):
  """A workdir that must not be written; the message names it and the fix."""


class WorkdirBusy(WorkdirError):
  """Another process holds the workdir's (or the record's) lock.

  Attributes:
    path: the lock file.
    holders: what the holders wrote into it (``pid``, ``host``, ``command``, ``mode``,
      ``since``), possibly empty when a holder has not written yet.
  """

  def __init__(self, message: str, path: pathlib.Path, holders: list[dict]):
    super().__init__(message)
    self.path, self.holders = path, holders


def is_writer() -> bool:
  """Whether this process writes results: always, except processes 1.. under jax.distributed."""
  if "jax" not in sys.modules:
    return True
  import jax  # pylint: disable=import-outside-toplevel

  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Under jax.distributed: waits until every process got here (the writer's files are on disk)."""
  if "jax" not in sys.modules:
    return
  import jax  # pylint: disable=import-outside-toplevel

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    multihost_utils.sync_global_devices(f"splitjax-{name}")


def _command_line() -> str:
  argv = list(sys.argv)
  if argv and argv[0].endswith(".py"):
    parts = pathlib.Path(argv[0]).with_suffix("").parts
    if "experiments" in parts:
      argv[0] = "python -m " + ".".join(parts[parts.index("experiments") :])
  return " ".join(argv)


def _holder_text(holders: list[dict]) -> str:
  if not holders:
    return "another process"
  texts = [
    f"pid {h.get('pid', '?')} on {h.get('host', '?')} ({h.get('command', '?')}, "
    f"{h.get('mode', '?')} since {h.get('since', '?')})"
    for h in holders[-3:]
  ]
  more = f" and {len(holders) - 3} more" if len(holders) > 3 else ""
  return " and ".join(texts) + more


def _alive(holder: dict) -> bool:
  """Whether a recorded holder may still hold the lock (another host: assumed so)."""
  if holder.get("host") != socket.gethostname():
    return True
  pid = holder.get("pid")
  if not isinstance(pid, int) or pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:
    return True
  return True


def _read_holders(fd: int) -> list[dict]:
  """The holders recorded in a lock file (one JSON line each) that may still hold it.

  An exclusive holder rewrites the file with its own line; shared holders append theirs (their
  lines stay after they exit, so lines of processes that are gone are left out here)."""
  try:
    raw = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")
  except OSError:
    return []
  holders = []
  for line in raw.splitlines():
    try:
      holder = json.loads(line)
    except ValueError:
      continue
    if isinstance(holder, dict) and _alive(holder):
      holders.append(holder)
  return holders


# Locks this process holds: lock file path -> [fd, exclusive, depth].
_HELD: dict[str, list] = {}


@contextlib.contextmanager
def locked(workdir, *, exclusive: bool, name: str = LOCK, what: str | None = None):
  """Holds ``fcntl.flock`` on ``workdir/name`` (exclusive or shared) for the ``with`` block.

  Non-blocking: a lock another process holds raises :class:`WorkdirBusy` at once. Re-entrant in
  one process (a nested exclusive request on a shared hold upgrades it for the block). A no-op
  on processes other than 0 under jax.distributed.

  Args:
    workdir: an existing directory.
    exclusive: exclusive (writers) or shared (readers that write only their own records).
    name: the lock file's name inside ``workdir``.
    what: what the lock guards, for the message (default: "workdir <path>").

  Raises:
    WorkdirBusy: another process holds a conflicting lock (the message names it).
    WorkdirError: the lock file cannot be created (read-only or missing workdir).
  """
  workdir = pathlib.Path(workdir)
  if not is_writer():
    yield workdir
    return
  path = workdir / name
  key = os.path.realpath(path)
  held = _HELD.get(key)
  if held is not None:  # re-entrant
    fd, was_exclusive = held[0], held[1]
    upgrade = exclusive and not was_exclusive
    if upgrade:
      _flock(fd, True, path, what or f"workdir {workdir}")
      held[1] = True
    held[2] += 1
    try:
      yield workdir
    finally:
      held[2] -= 1
      if upgrade:
        fcntl.flock(fd, fcntl.LOCK_SH)
        held[1] = False
    return
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
  except OSError as e:
    raise WorkdirError(
      f"cannot create the lock file {path} ({e.strerror or e}): the workdir "
      "must be writable (results are written into it); copy it to a writable "
      "place or fix its permissions"
    ) from None
  try:
    _flock(fd, exclusive, path, what or f"workdir {workdir}")
    holder = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "command": _command_line(),
      "mode": "exclusive" if exclusive else "shared",
      "since": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    line = (json.dumps(holder) + "\n").encode()
    if exclusive:  # the only holder: the file names it alone
      os.ftruncate(fd, 0)
      os.pwrite(fd, line, 0)
    else:  # one of several readers: add a line (one write; O_APPEND keeps it whole)
      with open(path, "ab", buffering=0) as f:
        f.write(line)
    _HELD[key] = [fd, exclusive, 1]
    _hold_for_test(path)
    yield workdir
  finally:
    _HELD.pop(key, None)
    os.close(fd)  # releases the lock


def _flock(fd: int, exclusive: bool, path: pathlib.Path, what: str) -> None:
  try:
    fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
  except BlockingIOError:
    holders = _read_holders(fd)
    raise WorkdirBusy(
      f"{what} is in use by {_holder_text(holders)}: wait for it to finish, or "
      "use another --workdir",
      path,
      holders,
    ) from None


def _hold_for_test(path: pathlib.Path) -> None:
  """Test hook: with ``SPLITJAX_TEST_HOLD_LOCK=NAME:F``, a process that took the lock file
  ``NAME`` prints ``HELD_MARKER`` on stdout and waits (at most 60 s) until the file ``F`` exists."""
  name, _, sentinel = os.environ.get(HOLD_ENV, "").partition(":")
  if not sentinel or name != path.name:
    return
  print(f"{HELD_MARKER} {path}", flush=True)
  deadline = time.monotonic() + 60
  while not os.path.exists(sentinel) and time.monotonic() < deadline:
    time.sleep(0.01)


def remove_temp_files(workdir) -> list[str]:
  """Removes the temp files that killed atomic writes left in ``workdir`` (``.<name>.*.tmp``)."""
  removed = []
  for p in pathlib.Path(workdir).glob(".*.tmp"):
    if p.is_file() and not p.name.startswith(".splitjax-probe-"):
      p.unlink(missing_ok=True)
      removed.append(p.name)
  if removed:
    logging.info(
      "removed %d temp file(s) of an interrupted write: %s",
      len(removed),
      ", ".join(sorted(removed)),
    )
  return removed


@contextlib.contextmanager
def own(path, kind: str):
  """Claims ``path`` for ``kind`` (see :func:`claim`) and holds its exclusive lock for the block.

  Yields the directory as a ``pathlib.Path``. Removes the temp files of killed writes once the
  lock is held. Under jax.distributed, processes other than 0 neither create nor lock it.
  """
  if not is_writer():
    yield pathlib.Path(path).expanduser()
    return
  workdir = claim(path, kind)
  with locked(workdir, exclusive=True):
    remove_temp_files(workdir)
    yield workdir


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
    kind: ``'train'``, ``'sweep'``, ``'reproduce'`` or ``'audit'``.

  Returns:
    The directory as a ``pathlib.Path`` (created if it did not exist).

  Raises:
    WorkdirError: an empty path, a path that is a file, or a non-empty directory that holds
      none of the files a ``kind`` workdir has (a foreign directory), or an unwritable one.
  """
  if path is None or not str(path).strip():
    raise WorkdirError(
      "--workdir is empty: give a directory for the results, e.g. "
      "--workdir=workdirs/run1 (splitjax never writes into the current "
      "directory by default)"
    )
  p = pathlib.Path(path).expanduser()
  if p.is_dir():
    entries = _visible(p)
    if entries and not any((p / m).exists() for m in _MARKERS[kind]):
      shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
      raise WorkdirError(
        f"workdir {p} is not empty and is not a splitjax {kind} workdir (it "
        f"holds {shown}): choose a new or empty --workdir; splitjax does not "
        "write into other directories"
      )
  return results.ensure_workdir(p)


def data_files(config) -> list[pathlib.Path]:
  """The files a training config reads: the bundled table, or --data_path (and --schema)."""
  from splitjax.data import bundled  # pylint: disable=import-outside-toplevel

  files = []
  if config.data_path:
    root = pathlib.Path(config.data_path).expanduser()
    files += sorted(q for q in root.iterdir() if q.is_file()) if root.is_dir() else [root]
  elif config.dataset in bundled._FILES:  # pylint: disable=protected-access
    files += [pathlib.Path(bundled.FILES_DIR) / name for name in bundled._FILES[config.dataset]]  # pylint: disable=protected-access
  schema = getattr(config, "schema", "")
  if isinstance(schema, str) and schema:
    files.append(pathlib.Path(schema).expanduser())
  return files


def write_manifest(workdir, *, kind: str, config_fingerprint: str, artifacts, data=()) -> dict:
  """Writes ``run.json`` (atomically, last): what the run is and the SHA-256 of what it wrote.

  Args:
    workdir: the run's directory.
    kind: ``'train'``, ``'sweep'``, ``'reproduce'`` or ``'audit'``.
    config_fingerprint: ``results.fingerprint`` of the requested config.
    artifacts: names (relative to ``workdir``) of the files the run wrote.
    data: paths of the input data files.

  Returns:
    The manifest dict.
  """
  workdir = pathlib.Path(workdir)
  manifest = {
    "format": _FORMAT,
    "kind": kind,
    "splitjax_version": splitjax.__version__,
    "run_id": uuid.uuid4().hex,
    "config_fingerprint": config_fingerprint,
    "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "data_sha256": {str(p): file_sha256(p) for p in data},
    "artifacts": {name: file_sha256(workdir / name) for name in sorted(artifacts)},
  }
  results.atomic_write_json(workdir / MANIFEST, manifest)
  return manifest


def read_manifest(workdir) -> dict | None:
  """The manifest of ``workdir``, or None when it has none (unfinished, or splitjax < 0.2)."""
  path = pathlib.Path(workdir) / MANIFEST
  if not path.exists():
    return None
  manifest = results.read_json(path)
  if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
    raise WorkdirError(
      f"{path} is not a splitjax run manifest: rerun experiments.train with --overwrite"
    )
  return manifest


def changed_artifacts(workdir, manifest: dict) -> list[str]:
  """Artifacts of ``manifest`` that are missing or whose SHA-256 differs."""
  workdir = pathlib.Path(workdir)
  return [
    name
    for name, digest in manifest["artifacts"].items()
    if not (workdir / name).is_file() or file_sha256(workdir / name) != digest
  ]


def verify(workdir, manifest: dict, data=()) -> None:
  """Checks a finished run against its manifest before it is read (``attack``, sweep, reproduce).

  Every artifact the manifest lists must have its recorded SHA-256 (an edited ``metrics.json``
  would make a record claim DP the model never had; a ``transcript.npz`` copied from another run
  would be attacked as this one's), and every training data file its recorded SHA-256 (an edited
  CSV would score the attack against other rows).

  Raises:
    WorkdirError: one line naming the first file that differs and the fix.
  """
  workdir = pathlib.Path(workdir)
  for name in changed_artifacts(workdir, manifest):
    if not os.path.lexists(workdir / name):
      raise WorkdirError(
        f"{workdir / name} is missing ({MANIFEST} lists it): restore it or "
        "retrain with experiments.train --overwrite"
      )
    raise WorkdirError(
      f"{workdir / name} changed since {MANIFEST} recorded it (edited, or copied "
      "from another run): the results would not be of this run; restore it or "
      "retrain with experiments.train --overwrite"
    )
  recorded = {pathlib.Path(k).name: v for k, v in manifest.get("data_sha256", {}).items()}
  for path in data:
    path = pathlib.Path(path)
    want = recorded.get(path.name)
    if want is not None and path.is_file() and file_sha256(path) != want:
      raise WorkdirError(
        f"the training data file {path} changed since this run was trained "
        f"(its SHA-256 differs from {workdir / MANIFEST}): attacks would be "
        "scored against other rows; restore the file or retrain with "
        "experiments.train --overwrite"
      )


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
    raise WorkdirError(
      f"could not swap the new run into {workdir} ({e.strerror or e}); the "
      f"earlier run is back in place and the new one is in {staging}: free the "
      "space or fix the permissions, then rerun with --overwrite"
    ) from None
  shutil.rmtree(replaced)
  shutil.rmtree(staging)
  return old
