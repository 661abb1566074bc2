"""Atomic writes of results and checkpoints, workdir checks and configuration fingerprints."""

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
from flax import serialization

_CHECKPOINT_FORMAT = 'splitjax-checkpoint'
_CHECKPOINT_VERSION = 1


class ResultsError(ValueError, OSError):
  """A results or config JSON file is missing, unreadable or corrupted (one line: file and fix)."""


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupted, or of another model/config (one line with the fix)."""


class WorkdirError(ValueError):
  """A workdir cannot be written, or holds results of another configuration."""


class WriteError(OSError):
  """A file could not be written (disk full, read-only, ...): the message names the file.

  Attributes:
    path: the file that was being written.
    errno: the errno of the failure (e.g. ``errno.ENOSPC``).
  """

  def __init__(self, path, cause: OSError):
    reason = cause.strerror or str(cause)
    if cause.errno in (errno.ENOSPC, errno.EDQUOT):
      fix = 'free space on that filesystem or choose another --workdir'
    elif cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
      fix = 'make the directory writable or choose another --workdir'
    else:
      fix = 'check that filesystem or choose another --workdir'
    super().__init__(
      f'could not write {path} ({reason}): {fix}; the earlier file, if any, is unchanged'
    )
    self.errno = cause.errno
    self.path = pathlib.Path(path)


def check_regular_file(path, error=ValueError) -> None:
  """Raises `error` when `path` exists but is not a regular file (reading a FIFO would hang)."""
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
    raise error(
      f'{path} is {kind}, not a regular file: remove it (splitjax writes a regular '
      'file there) and rerun'
    )


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
    ResultsError: (a `ValueError` and an `OSError`) with one line naming the file and the fix, if
      the file is missing, unreadable, not UTF-8 or not valid JSON.
  """
  path = pathlib.Path(path)
  check_regular_file(path, ResultsError)
  try:
    raw = path.read_bytes()
  except FileNotFoundError:
    raise ResultsError(
      f'no results file at {path}: run the step that writes it first or check --workdir'
    ) from None
  except OSError as e:
    raise ResultsError(f'cannot read {path} ({e.strerror or e}): check --workdir') from None
  try:
    return json.loads(raw.decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ResultsError(
      f'{path} is corrupted ({type(e).__name__}: {e}): delete it and rerun, or use --overwrite'
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
    WorkdirError: "workdir X is not writable (...): choose another --workdir" when the directory
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
      f'workdir {path} is not writable ({reason}): choose another --workdir'
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
    overwrite: the binary's `--overwrite` flag.
    filename: name of the config file inside the workdir.

  Returns:
    The path of the config file.

  Raises:
    WorkdirError: naming the differing keys ("use --overwrite or another --workdir"), when the
      stored config is corrupted and `overwrite` is False, or when the workdir is not writable.
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
        f'of another configuration: use --overwrite or another --workdir'
      ) from None
    diff = _diff_keys(old, new)
    if diff:
      shown = ', '.join(diff[:10]) + (f' and {len(diff) - 10} more' if len(diff) > 10 else '')
      raise WorkdirError(
        f'workdir {workdir} holds results of another configuration (differs in: '
        f'{shown}): use --overwrite or another --workdir'
      )
    return target
  atomic_write_json(target, new)
  return target


# --------------------------------------------------------------------------------------------------
# Checkpoints.


def _is_key_array(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
  """Replaces typed PRNG key arrays (not msgpack-serialisable) by their uint32 key data."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key_array(x) else x, tree)


def _state_dict_diff(expected, saved, where: str = '') -> str | None:
  """First path at which two state dicts' nested key sets differ (None if they agree)."""
  if isinstance(expected, dict) != isinstance(saved, dict):
    return f'{where or "<root>"}: saved {type(saved).__name__}, expected {type(expected).__name__}'
  if not isinstance(expected, dict):
    return None
  missing = sorted(set(map(str, expected)) - set(map(str, saved)))
  extra = sorted(set(map(str, saved)) - set(map(str, expected)))
  if missing or extra:
    parts = ([f'missing keys {missing}'] if missing else []) + (
      [f'unexpected keys {extra}'] if extra else []
    )
    return f'{where or "<root>"}: checkpoint has ' + ' and '.join(parts)
  for k, v in expected.items():
    diff = _state_dict_diff(v, saved[str(k)], f'{where}/{k}')
    if diff:
      return diff
  return None


def save_checkpoint(path, pytree, *, metadata: dict) -> pathlib.Path:
  """Atomically writes `pytree` and `metadata` to one msgpack file.

  The file is a msgpack map `{format, version, sha256, payload}` where `payload` is the msgpack of
  `{'state': flax.serialization.to_state_dict(pytree), 'metadata': JSON text of metadata}` and
  `sha256` its digest, so truncation and bit flips are detected on restore. Arrays (numpy or JAX,
  any shape and dtype), NamedTuple states (optax), Python numbers, and typed PRNG keys (stored as
  their key data) are supported.

  Args:
    path: the checkpoint file; its directory must exist.
    pytree: the state to save.
    metadata: JSON-able dict; put a `'fingerprint'` string in it (e.g. `fingerprint(model_spec)`)
      so that `restore_checkpoint` can refuse a checkpoint of another model/config.

  Returns:
    `path` as a `pathlib.Path`.

  Raises:
    TypeError: if `metadata` is not a dict, its `fingerprint` is not a string, or a leaf cannot be
      serialised (nothing is written then).
  """
  if not isinstance(metadata, dict):
    raise TypeError(f'metadata must be a dict, got {type(metadata).__name__}')
  if 'fingerprint' in metadata and not isinstance(metadata['fingerprint'], str):
    raise TypeError(
      f'metadata["fingerprint"] must be a str, got {type(metadata["fingerprint"]).__name__}'
    )
  state = serialization.to_state_dict(_keys_to_data(pytree))
  payload = serialization.msgpack_serialize({'state': state, 'metadata': dumps_json(metadata)})
  blob = serialization.msgpack_serialize(
    {
      'format': _CHECKPOINT_FORMAT,
      'version': _CHECKPOINT_VERSION,
      'sha256': hashlib.sha256(payload).hexdigest(),
      'payload': payload,
    }
  )
  return atomic_write_bytes(path, blob)


def _load_checkpoint_file(path: pathlib.Path):
  """Reads and verifies a checkpoint file; returns (state_dict, metadata)."""
  check_regular_file(path, CheckpointError)
  try:
    raw = path.read_bytes()
  except FileNotFoundError:
    raise CheckpointError(
      f'no checkpoint at {path}: run experiments.train first or check --workdir'
    ) from None
  except OSError as e:
    raise CheckpointError(
      f'cannot read checkpoint {path} ({e.strerror or e}): check --workdir'
    ) from None
  corrupted = lambda why: (
    f'checkpoint at {path} is corrupted or truncated ({why}): delete it and '
    f'rerun experiments.train, or use --overwrite'
  )
  try:
    outer = serialization.msgpack_restore(raw)
  except Exception as e:  # msgpack raises several unrelated types on bad input.
    raise CheckpointError(corrupted(f'{type(e).__name__}: {e}')) from None
  if not isinstance(outer, dict) or outer.get('format') != _CHECKPOINT_FORMAT:
    raise CheckpointError(corrupted('not a splitjax checkpoint'))
  version = outer.get('version')
  if not isinstance(version, int) or isinstance(version, bool):
    raise CheckpointError(corrupted('damaged header'))
  if version != _CHECKPOINT_VERSION:
    raise CheckpointError(
      f'checkpoint at {path} has format version {version}, this '
      f'splitjax reads {_CHECKPOINT_VERSION}: rerun experiments.train'
    )
  payload = outer.get('payload')
  if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != outer.get('sha256'):
    raise CheckpointError(corrupted('checksum mismatch'))
  try:
    inner = serialization.msgpack_restore(payload)
    metadata = json.loads(inner['metadata'])
    state = inner['state']
  except Exception as e:
    raise CheckpointError(corrupted(f'{type(e).__name__}: {e}')) from None
  return state, metadata


def checkpoint_metadata(path) -> dict:
  """The metadata a checkpoint was saved with (the file is read and verified, not restored).

  Raises:
    CheckpointError: as `restore_checkpoint`, when the file is missing, not a regular file,
      unreadable, corrupted or truncated.
  """
  _, metadata = _load_checkpoint_file(pathlib.Path(path))
  return metadata


def restore_checkpoint(path, target, *, fingerprint=None):  # pylint: disable=redefined-outer-name
  """Restores a checkpoint written by `save_checkpoint` into the structure of `target`.

  Args:
    path: the checkpoint file.
    target: a pytree with the expected structure, shapes and dtypes (e.g. a freshly initialised
      state); its values are not used. Or a callable `metadata -> pytree`, for a structure that
      depends on what was saved (the file is read once either way).
    fingerprint: if given, the `metadata['fingerprint']` the checkpoint must carry.

  Returns:
    `(pytree, metadata)`: `pytree` has the structure of `target`; each array leaf has the saved
    values and dtype, and is a JAX array where the target leaf is one (typed PRNG keys are rebuilt
    with the target's key implementation) and a numpy array otherwise; Python scalars stay Python
    scalars.

  Raises:
    CheckpointError: with one line naming the file and the fix, when the file is missing,
      unreadable, corrupted or truncated, written for another model/config (fingerprint mismatch),
      or when its structure, shapes or dtypes do not match `target`.
  """
  path = pathlib.Path(path)
  state, metadata = _load_checkpoint_file(path)
  if fingerprint is not None and metadata.get('fingerprint') != fingerprint:
    raise CheckpointError(
      f'checkpoint at {path} was written for a different model/config (fingerprint '
      f'{metadata.get("fingerprint")!r}, expected {fingerprint!r}); use a fresh --workdir or '
      f'--overwrite'
    )
  mismatch = lambda why: (
    f'checkpoint at {path} does not match the expected model structure ({why}); '
    f'use a fresh --workdir or --overwrite'
  )
  if callable(target):
    target = target(metadata)
  data_target = _keys_to_data(target)
  try:
    diff = _state_dict_diff(serialization.to_state_dict(data_target), state)
  except Exception as e:
    diff = f'{type(e).__name__}: {e}'
  if diff:
    raise CheckpointError(mismatch(diff))
  try:
    restored = serialization.from_state_dict(data_target, state)
  except Exception as e:  # flax raises ValueError/KeyError/TypeError depending on the container.
    raise CheckpointError(mismatch(f'{type(e).__name__}: {e}')) from None

  tgt_leaves, tgt_def = jax.tree_util.tree_flatten_with_path(target)
  data_leaves = jax.tree.leaves(data_target)
  try:
    new_leaves, new_def = jax.tree.flatten(restored)
  except Exception as e:
    raise CheckpointError(mismatch(f'{type(e).__name__}: {e}')) from None
  if new_def != tgt_def:  # type: ignore[operator]  # PyTreeDef has __eq__ (jaxlib stubs)
    raise CheckpointError(mismatch('tree structure differs'))

  out = []
  for (key_path, tgt), data_tgt, new in zip(tgt_leaves, data_leaves, new_leaves, strict=False):
    where = jax.tree_util.keystr(key_path)
    if isinstance(data_tgt, (np.ndarray, jax.Array, np.generic)):
      new = np.asarray(new)
      if new.shape != np.shape(data_tgt) or new.dtype != data_tgt.dtype:
        raise CheckpointError(
          mismatch(
            f'{where}: saved {new.dtype}{list(new.shape)}, expected '
            f'{data_tgt.dtype}{list(np.shape(data_tgt))}'
          )
        )
      if _is_key_array(tgt):
        new = jax.random.wrap_key_data(jnp.asarray(new), impl=jax.random.key_impl(tgt))
      elif isinstance(tgt, jax.Array):
        new = jnp.asarray(new)
      elif isinstance(tgt, np.generic):
        new = new[()]
    elif isinstance(data_tgt, (bool, int, float, complex)):
      if isinstance(new, np.ndarray) and new.ndim == 0:
        new = new.item()
      if type(new) is not type(data_tgt):  # pylint: disable=unidiomatic-typecheck
        raise CheckpointError(
          mismatch(f'{where}: saved {type(new).__name__}, expected {type(data_tgt).__name__}')
        )
    out.append(new)
  return jax.tree.unflatten(tgt_def, out), metadata
