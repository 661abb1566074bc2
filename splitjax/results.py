"""Result files: atomic writes, JSON results, configuration fingerprints and workdir checks.

The errors carry what went wrong as data (`path`, `reason`) and their messages name no
command-line flag: a program that exposes these functions adds its own hints (the experiment
binaries add `--workdir`, `--overwrite`, ...).
"""

import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import pathlib
import stat
import tempfile

import jax
import jax.numpy as jnp
import numpy as np


class FileError(Exception):
  """Base of the file and workdir errors of splitjax: a one-line message and its data.

  Attributes:
    path: the file or directory concerned (a `pathlib.Path`), or None.
    reason: what is wrong, as a short constant string listed by each subclass (e.g.
      `'missing'`, `'corrupted'`), or None when the error was raised without one.
  """

  def __init__(self, message: str, *, path=None, reason: str | None = None):
    super().__init__(message)
    self.path = None if path is None else pathlib.Path(path)
    self.reason = reason


class ResultsError(FileError, ValueError, OSError):
  """A results or config JSON file is missing, unreadable or corrupted (one line naming the file).

  Attributes:
    path: the file.
    reason: `'missing'`, `'unreadable'`, `'not_regular'` (a directory or FIFO in its place) or
      `'corrupted'` (not UTF-8 or not JSON).
  """


class WorkdirError(FileError, ValueError):
  """A workdir cannot be written, or holds results of another configuration.

  Attributes:
    path: the workdir (for `'config_unreadable'`: its config file).
    reason: `'not_writable'`, `'config_differs'` (then `keys` lists the differing dotted keys)
      or `'config_unreadable'` (the stored config is corrupted, so it cannot be compared).
    keys: for `'config_differs'`, the dotted keys at which the configurations differ; else ().
  """

  def __init__(self, message: str, *, path=None, reason: str | None = None, keys=()):
    super().__init__(message, path=path, reason=reason)
    self.keys = tuple(keys)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_PERMITTED = (errno.EROFS, errno.EACCES, errno.EPERM)


class WriteError(FileError, OSError):
  """A file could not be written (disk full, read-only, ...): the message names the file.

  Attributes:
    path: the file that was being written.
    reason: `'no_space'` (disk full or quota), `'not_permitted'` (read-only or no permission) or
      `'os_error'` (any other failure).
    errno: the errno of the failure (e.g. ``errno.ENOSPC``).
  """

  def __init__(self, path, cause: OSError):
    why = cause.strerror or str(cause)
    if cause.errno in _NO_SPACE:
      reason, fix = 'no_space', 'free space on that filesystem'
    elif cause.errno in _NOT_PERMITTED:
      reason, fix = 'not_permitted', 'make the directory writable'
    else:
      reason, fix = 'os_error', 'check that filesystem'
    super().__init__(
      f'could not write {path} ({why}); the earlier file, if any, is unchanged: {fix}',
      path=path,
      reason=reason,
    )
    self.errno = cause.errno


def check_regular_file(path, error=ValueError) -> None:
  """Raises `error` when `path` exists but is not a regular file (reading a FIFO would hang).

  A `FileError` class (e.g. `ResultsError`) is raised with `path` and `reason='not_regular'`.
  """
  try:
    mode = os.stat(path).st_mode
  except OSError:
    return  # missing: the caller's read reports it
  if not stat.S_ISREG(mode):
    kind = (
      'a directory'
      if stat.S_ISDIR(mode)
      else 'a FIFO'
      if stat.S_ISFIFO(mode)
      else ('not a regular file')
    )
    message = (
      f'{path} is {kind}, not a regular file: remove it (splitjax writes a regular '
      'file there) and rerun'
    )
    if isinstance(error, type) and issubclass(error, FileError):
      raise error(message, path=path, reason='not_regular')
    raise error(message)


# --------------------------------------------------------------------------------------------------
# Atomic writes.


@functools.cache
def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _fsync_dir(directory: pathlib.Path) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write_bytes(path, data) -> pathlib.Path:
  """Writes `data` to `path` so that readers see either the old file or the complete new one.

  The bytes go to a temporary file in the same directory, are flushed and fsync'ed, and the file is
  renamed over `path` with `os.replace` (atomic on POSIX); the directory is then fsync'ed. On any
  failure the temporary file is removed and an existing `path` is left untouched. The new file
  keeps the permissions of the file it replaces (or gets `0o666 & ~umask`).

  Args:
    path: destination file; its directory must exist.
    data: `bytes`, `bytearray` or `memoryview`.

  Returns:
    `path` as a `pathlib.Path`.

  Raises:
    TypeError: if `data` is not bytes-like.
    WriteError: (an `OSError`) naming `path`, if it cannot be written (disk full, read-only):
      the old file is then unchanged.
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f'atomic_write_bytes needs bytes, got {type(data).__name__}')
  path = pathlib.Path(path)
  directory = path.parent
  try:
    mode = path.stat().st_mode & 0o7777
  except OSError:
    mode = 0o666 & ~_umask()
  try:
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=directory)
  except OSError as e:
    raise WriteError(path, e) from None
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
  except BaseException as e:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    if isinstance(e, OSError) and not isinstance(e, WriteError):
      raise WriteError(path, e) from None
    raise
  _fsync_dir(directory)
  return path


def atomic_write_text(path, text: str) -> pathlib.Path:
  """Writes `text` (UTF-8) to `path` atomically; see `atomic_write_bytes`."""
  if not isinstance(text, str):
    raise TypeError(f'atomic_write_text needs str, got {type(text).__name__}')
  return atomic_write_bytes(path, text.encode('utf-8'))


def _float_to_json(x: float):
  if math.isnan(x):
    return 'nan'
  if math.isinf(x):
    return 'inf' if x > 0 else '-inf'
  return x


def to_jsonable(obj, _where: str = '$'):
  """Converts `obj` to plain JSON types.

  numpy/JAX scalars and arrays become Python numbers and (nested) lists; non-finite floats become
  the strings "inf", "-inf" and "nan"; tuples become lists; NamedTuples and dataclasses become
  dicts; `pathlib.Path` becomes a string; dict keys that are numpy/Python scalars become strings.

  Raises:
    TypeError: naming the location (`$.a.b[2]`) of a value that cannot be converted.
  """
  if obj is None or isinstance(obj, (bool, str)):
    return obj
  if isinstance(obj, int):
    return int(obj)
  if isinstance(obj, float):
    return _float_to_json(float(obj))
  if isinstance(obj, np.bool_):
    return bool(obj)
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.floating):
    return _float_to_json(float(obj))
  if isinstance(obj, (np.ndarray, jax.Array)):
    if isinstance(obj, jax.Array) and jnp.issubdtype(obj.dtype, jax.dtypes.prng_key):
      obj = jax.random.key_data(obj)
    arr = np.asarray(obj)
    if arr.dtype.kind not in 'biuf':
      raise TypeError(f'cannot convert an array of dtype {arr.dtype} at {_where} to JSON')
    return to_jsonable(arr.tolist(), _where)
  if isinstance(obj, pathlib.PurePath):
    return str(obj)
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
  if isinstance(obj, tuple) and hasattr(obj, '_asdict'):
    obj = obj._asdict()
  if isinstance(obj, dict):
    out = {}
    for k, v in obj.items():
      if isinstance(k, (np.integer, np.floating, np.bool_)):
        k = k.item()
      if not isinstance(k, (str, int, float, bool)) and k is not None:
        raise TypeError(f'cannot use a key of type {type(k).__name__} at {_where} in JSON')
      key = str(k) if not isinstance(k, str) else k
      out[key] = to_jsonable(v, f'{_where}.{key}')
    return out
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v, f'{_where}[{i}]') for i, v in enumerate(obj)]
  raise TypeError(f'cannot convert an object of type {type(obj).__name__} at {_where} to JSON')


def dumps_json(obj) -> str:
  """Serialises `obj` (after `to_jsonable`) with indent=2 and sorted keys, ending with a newline."""
  return json.dumps(to_jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + '\n'


def atomic_write_json(path, obj) -> pathlib.Path:
  """Writes `obj` as JSON (indent=2, sorted keys) to `path` atomically.

  The whole document is serialised in memory first, so a value that cannot be converted raises
  before anything touches the disk. numpy/JAX scalars and arrays are converted; float inf/nan are
  written as the strings "inf", "-inf", "nan" (they are not valid JSON numbers).

  Args:
    path: destination file; its directory must exist.
    obj: a JSON-like structure (see `to_jsonable`).

  Returns:
    `path` as a `pathlib.Path`.

  Raises:
    TypeError: if part of `obj` cannot be converted (the old file is unchanged).
    OSError: if the file cannot be written (the old file is unchanged).
  """
  return atomic_write_text(path, dumps_json(obj))


def read_json(path):
  """Reads a JSON results or config file.

  Args:
    path: the file.

  Returns:
    The parsed JSON value (non-finite floats come back as the strings written by
    `atomic_write_json`).

  Raises:
    ResultsError: (a `ValueError` and an `OSError`) with one line naming the file, if the file is
      missing, unreadable, not a regular file, not UTF-8 or not valid JSON (`reason` says which).
  """
  path = pathlib.Path(path)
  check_regular_file(path, ResultsError)
  try:
    raw = path.read_bytes()
  except FileNotFoundError:
    raise ResultsError(
      f'no results file at {path}: run the step that writes it first', path=path, reason='missing'
    ) from None
  except OSError as e:
    raise ResultsError(
      f'cannot read {path} ({e.strerror or e})', path=path, reason='unreadable'
    ) from None
  try:
    return json.loads(raw.decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ResultsError(
      f'{path} is corrupted ({type(e).__name__}: {e}): delete it and rerun',
      path=path,
      reason='corrupted',
    ) from None


# --------------------------------------------------------------------------------------------------
# Fingerprints and workdirs.


def fingerprint(obj) -> str:
  """First 16 hex characters of the SHA-256 of the canonical JSON of `obj`.

  Canonical JSON: `to_jsonable`, sorted keys, no whitespace. Tuples and lists hash alike, as do
  numpy and Python numbers of the same value; `1` and `1.0` hash differently.

  Args:
    obj: a dict (e.g. a model spec or config) or any value `to_jsonable` accepts.

  Returns:
    A 16-character lowercase hex string.

  Example:
    >>> fingerprint({'b': 1, 'a': (2, 3)}) == fingerprint({'a': [2, 3], 'b': 1})
    True
  """
  canonical = json.dumps(to_jsonable(obj), sort_keys=True, separators=(',', ':'), allow_nan=False)
  return hashlib.sha256(canonical.encode('utf-8')).hexdigest()[:16]


def ensure_workdir(path) -> pathlib.Path:
  """Creates `path` (with parents) and checks that a file can be created in it.

  Args:
    path: the workdir.

  Returns:
    `path` as a `pathlib.Path` (user-expanded).

  Raises:
    WorkdirError: "workdir X is not writable (...)" (`reason='not_writable'`) when the directory
      cannot be created (e.g. a parent is a regular file) or a file cannot be created in it.
  """
  path = pathlib.Path(path).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
      raise NotADirectoryError(f'{path} exists and is not a directory')
    with tempfile.TemporaryFile(dir=path, prefix='.splitjax-probe-'):
      pass
  except OSError as e:
    reason = e.strerror or str(e)
    raise WorkdirError(
      f'workdir {path} is not writable ({reason})', path=path, reason='not_writable'
    ) from None
  return path


def _diff_keys(old, new, prefix: str = '') -> list[str]:
  """Dotted paths at which two JSON values differ (recursing into dicts only)."""
  if isinstance(old, dict) and isinstance(new, dict):
    keys = []
    for k in sorted(set(old) | set(new)):
      name = f'{prefix}.{k}' if prefix else str(k)
      if k not in old or k not in new:
        keys.append(name)
      else:
        keys.extend(_diff_keys(old[k], new[k], name))
    return keys
  return [] if old == new else [prefix or '<whole config>']


def check_config_compatible(
  workdir, config, *, overwrite: bool, filename: str = 'config.json'
) -> pathlib.Path:
  """Refuses to mix results of different configurations in one workdir, then records `config`.

  If `workdir/filename` exists and differs from `config` (compared after `to_jsonable`, so tuples
  equal lists and inf equals "inf"), raises unless `overwrite`. Otherwise (no file, same config, or
  `overwrite`) writes `config` there atomically. Creates the workdir if needed.

  Args:
    workdir: the run's workdir.
    config: a dict (or dataclass) of the run's settings.
    overwrite: whether a different stored config may be replaced.
    filename: name of the config file inside the workdir.

  Returns:
    The path of the config file.

  Raises:
    WorkdirError: naming the differing keys (`reason='config_differs'`, the keys in `keys`), when
      the stored config is corrupted (`'config_unreadable'`) and `overwrite` is False, or when the
      workdir is not writable (`'not_writable'`).
    TypeError: if `config` cannot be converted to JSON.
  """
  workdir = ensure_workdir(workdir)
  new = json.loads(dumps_json(config))
  if not isinstance(new, dict):
    raise TypeError(f'config must be a dict or dataclass, got {type(config).__name__}')
  target = workdir / filename
  if target.exists() and not overwrite:
    try:
      old = read_json(target)
    except ResultsError:
      raise WorkdirError(
        f'{target} is unreadable or corrupted, so workdir {workdir} may hold results '
        'of another configuration',
        path=target,
        reason='config_unreadable',
      ) from None
    diff = _diff_keys(old, new)
    if diff:
      shown = ', '.join(diff[:10]) + (f' and {len(diff) - 10} more' if len(diff) > 10 else '')
      raise WorkdirError(
        f'workdir {workdir} holds results of another configuration (differs in: {shown})',
        path=workdir,
        reason='config_differs',
        keys=diff,
      )
    return target
  atomic_write_json(target, new)
  return target
