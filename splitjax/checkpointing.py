"""Checkpoints: one verified msgpack file per saved state, its metadata, and its restore.

The errors carry what went wrong as data (`path`, `reason`) and their messages name no
command-line flag or program: the experiment binaries add theirs (`--workdir`, `--overwrite`).
"""

import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from splitjax import results

_CHECKPOINT_FORMAT = 'splitjax-checkpoint'
_CHECKPOINT_VERSION = 1


class CheckpointError(results.FileError, ValueError):
  """A checkpoint is missing, corrupted, or of another model/config (one line naming the file).

  Attributes:
    path: the checkpoint file.
    reason: `'missing'`, `'unreadable'`, `'not_regular'`, `'corrupted'` (truncated, bit flips, not
      a splitjax checkpoint), `'version'` (another format version), `'other_config'` (the
      fingerprint differs) or `'structure'` (structure, shapes or dtypes differ from the target).
  """


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
    metadata: JSON-able dict; put a `'fingerprint'` string in it (e.g.
      `results.fingerprint(model_spec)`)
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
  payload = serialization.msgpack_serialize(
    {'state': state, 'metadata': results.dumps_json(metadata)}
  )
  blob = serialization.msgpack_serialize(
    {
      'format': _CHECKPOINT_FORMAT,
      'version': _CHECKPOINT_VERSION,
      'sha256': hashlib.sha256(payload).hexdigest(),
      'payload': payload,
    }
  )
  return results.atomic_write_bytes(path, blob)


def _load_checkpoint_file(path: pathlib.Path):
  """Reads and verifies a checkpoint file; returns (state_dict, metadata)."""
  results.check_regular_file(path, CheckpointError)
  try:
    raw = path.read_bytes()
  except FileNotFoundError:
    raise CheckpointError(f'no checkpoint at {path}', path=path, reason='missing') from None
  except OSError as e:
    raise CheckpointError(
      f'cannot read checkpoint {path} ({e.strerror or e})', path=path, reason='unreadable'
    ) from None
  corrupted = lambda why: CheckpointError(
    f'checkpoint at {path} is corrupted or truncated ({why})', path=path, reason='corrupted'
  )
  try:
    outer = serialization.msgpack_restore(raw)
  except Exception as e:  # msgpack raises several unrelated types on bad input.
    raise corrupted(f'{type(e).__name__}: {e}') from None
  if not isinstance(outer, dict) or outer.get('format') != _CHECKPOINT_FORMAT:
    raise corrupted('not a splitjax checkpoint')
  version = outer.get('version')
  if not isinstance(version, int) or isinstance(version, bool):
    raise corrupted('damaged header')
  if version != _CHECKPOINT_VERSION:
    raise CheckpointError(
      f'checkpoint at {path} has format version {version}, this '
      f'splitjax reads {_CHECKPOINT_VERSION}',
      path=path,
      reason='version',
    )
  payload = outer.get('payload')
  if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != outer.get('sha256'):
    raise corrupted('checksum mismatch')
  try:
    inner = serialization.msgpack_restore(payload)
    metadata = json.loads(inner['metadata'])
    state = inner['state']
  except Exception as e:
    raise corrupted(f'{type(e).__name__}: {e}') from None
  return state, metadata


def checkpoint_metadata(path) -> dict:
  """The metadata a checkpoint was saved with (the file is read and verified, not restored).

  Raises:
    CheckpointError: as `restore_checkpoint`, when the file is missing, not a regular file,
      unreadable, corrupted or truncated.
  """
  _, metadata = _load_checkpoint_file(pathlib.Path(path))
  return metadata


def restore_checkpoint(path, target, *, fingerprint=None):
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
    CheckpointError: with one line naming the file, when the file is missing, unreadable,
      corrupted or truncated, written for another model/config (fingerprint mismatch), or when
      its structure, shapes or dtypes do not match `target` (`reason` says which).
  """
  path = pathlib.Path(path)
  state, metadata = _load_checkpoint_file(path)
  if fingerprint is not None and metadata.get('fingerprint') != fingerprint:
    raise CheckpointError(
      f'checkpoint at {path} was written for a different model/config (fingerprint '
      f'{metadata.get("fingerprint")!r}, expected {fingerprint!r})',
      path=path,
      reason='other_config',
    )
  mismatch = lambda why: CheckpointError(
    f'checkpoint at {path} does not match the expected model structure ({why})',
    path=path,
    reason='structure',
  )
  if callable(target):
    target = target(metadata)
  data_target = _keys_to_data(target)
  try:
    diff = _state_dict_diff(serialization.to_state_dict(data_target), state)
  except Exception as e:
    diff = f'{type(e).__name__}: {e}'
  if diff:
    raise mismatch(diff)
  try:
    restored = serialization.from_state_dict(data_target, state)
  except Exception as e:  # flax raises ValueError/KeyError/TypeError depending on the container.
    raise mismatch(f'{type(e).__name__}: {e}') from None

  tgt_leaves, tgt_def = jax.tree_util.tree_flatten_with_path(target)
  data_leaves = jax.tree.leaves(data_target)
  try:
    new_leaves, new_def = jax.tree.flatten(restored)
  except Exception as e:
    raise mismatch(f'{type(e).__name__}: {e}') from None
  if new_def != tgt_def:  # type: ignore[operator]  # PyTreeDef has __eq__ (jaxlib stubs)
    raise mismatch('tree structure differs')

  out = []
  for (key_path, tgt), data_tgt, new in zip(tgt_leaves, data_leaves, new_leaves, strict=False):
    where = jax.tree_util.keystr(key_path)
    if isinstance(data_tgt, (np.ndarray, jax.Array, np.generic)):
      new = np.asarray(new)
      if new.shape != np.shape(data_tgt) or new.dtype != data_tgt.dtype:
        raise mismatch(
          f'{where}: saved {new.dtype}{list(new.shape)}, expected '
          f'{data_tgt.dtype}{list(np.shape(data_tgt))}'
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
        raise mismatch(f'{where}: saved {type(new).__name__}, expected {type(data_tgt).__name__}')
    out.append(new)
  return jax.tree.unflatten(tgt_def, out), metadata
