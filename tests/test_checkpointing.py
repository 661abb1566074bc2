"""Tests of splitjax.checkpointing: round trips, corruption, other configs and structures."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

from splitjax import checkpointing


def _train_state():
  params = {
    'dense': {'w': jnp.ones((3, 2), jnp.float32), 'b': jnp.zeros((2,), jnp.bfloat16)},
    'emb': np.arange(6, dtype=np.float64).reshape(2, 3),
  }
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda x: jnp.ones_like(jnp.asarray(x)), params)
  _, opt_state = tx.update(grads, opt_state, params)
  return {'params': params, 'opt_state': opt_state, 'step': 17, 'rng': jax.random.key(5)}


def test_checkpoint_round_trip_with_adam_state(tmp_path):
  state = _train_state()
  path = tmp_path / 'checkpoint.msgpack'
  checkpointing.save_checkpoint(path, state, metadata={'fingerprint': 'abc123', 'epoch': 2})
  zeros = lambda x: np.zeros_like(x) if isinstance(x, np.ndarray) else jnp.zeros_like(x)
  fresh = jax.tree.map(zeros, {k: v for k, v in state.items() if k != 'rng'})
  fresh['step'] = 0
  fresh['rng'] = jax.random.key(0)
  restored, metadata = checkpointing.restore_checkpoint(path, fresh, fingerprint='abc123')
  assert metadata == {'fingerprint': 'abc123', 'epoch': 2}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert restored['step'] == 17 and isinstance(restored['step'], int)
  assert isinstance(restored['opt_state'][0], optax.ScaleByAdamState)
  leaves = zip(
    jax.tree.leaves(jax.tree.map(_key_data, state)),
    jax.tree.leaves(jax.tree.map(_key_data, restored)),
    strict=True,
  )
  for want, got in leaves:
    assert np.asarray(got).dtype == np.asarray(want).dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert isinstance(restored['params']['dense']['w'], jax.Array)
  assert isinstance(restored['params']['emb'], np.ndarray)
  assert jax.random.normal(restored['rng']) == jax.random.normal(state['rng'])


def _key_data(x):
  if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x)
  return x


@pytest.fixture
def saved(tmp_path):
  state = {'w': jnp.ones((4,)), 'opt': optax.sgd(0.1, momentum=0.9).init(jnp.ones((4,))), 'step': 3}
  path = tmp_path / 'ckpt'
  checkpointing.save_checkpoint(path, state, metadata={'fingerprint': 'model-a'})
  return path, state


def test_checkpoint_missing(tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match='^no checkpoint at .*none$') as info:
    checkpointing.restore_checkpoint(tmp_path / 'none', {'w': jnp.ones(2)})
  assert info.value.path == tmp_path / 'none' and info.value.reason == 'missing'


@pytest.mark.parametrize('damage', ['truncate', 'flip', 'empty', 'garbage'])
def test_checkpoint_corrupted(saved, damage):
  path, state = saved
  data = bytearray(path.read_bytes())
  if damage == 'truncate':
    data = data[: len(data) // 2]
  elif damage == 'flip':  # one bit of an array value: msgpack still parses, the checksum fails
    data[data.find(np.float32(1.0).tobytes()) + 3] ^= 0x01
  elif damage == 'empty':
    data = b''
  else:
    data = b'\x93not a checkpoint'
  path.write_bytes(bytes(data))
  with pytest.raises(checkpointing.CheckpointError, match='corrupted or truncated') as info:
    checkpointing.restore_checkpoint(path, state)
  if damage == 'flip':
    assert 'checksum mismatch' in str(info.value)
  assert '\n' not in str(info.value) and '--' not in str(info.value)
  assert info.value.path == path and info.value.reason == 'corrupted'


def test_checkpoint_fingerprint_mismatch(saved):
  path, state = saved
  with pytest.raises(
    checkpointing.CheckpointError, match=r"different model/config.*expected 'model-b'\)$"
  ) as info:
    checkpointing.restore_checkpoint(path, state, fingerprint='model-b')
  assert info.value.path == path and info.value.reason == 'other_config'
  checkpointing.restore_checkpoint(path, state, fingerprint='model-a')


@pytest.mark.parametrize('change', ['shape', 'dtype', 'extra_key', 'missing_key', 'optimizer'])
def test_checkpoint_structure_mismatch(saved, change):
  path, state = saved
  target = dict(state)
  if change == 'shape':
    target['w'] = jnp.ones((5,))
  elif change == 'dtype':
    target['w'] = jnp.ones((4,), jnp.int32)
  elif change == 'extra_key':
    target['extra'] = jnp.ones(1)
  elif change == 'missing_key':
    del target['step']
  else:
    target['opt'] = optax.adam(0.1).init(jnp.ones((4,)))
  with pytest.raises(
    checkpointing.CheckpointError, match='does not match the expected model structure'
  ) as info:
    checkpointing.restore_checkpoint(path, target)
  assert info.value.path == path and info.value.reason == 'structure'
  assert '--' not in str(info.value)


def test_checkpoint_metadata_and_version(saved, tmp_path):
  path, _ = saved
  assert checkpointing.checkpoint_metadata(path) == {'fingerprint': 'model-a'}
  outer = serialization.msgpack_restore(path.read_bytes())
  newer = tmp_path / 'newer'
  newer.write_bytes(serialization.msgpack_serialize(dict(outer, version=99)))
  with pytest.raises(checkpointing.CheckpointError, match='format version 99') as info:
    checkpointing.checkpoint_metadata(newer)
  assert info.value.path == newer and info.value.reason == 'version'
  with pytest.raises(checkpointing.CheckpointError, match='not a regular file') as info:
    checkpointing.checkpoint_metadata(tmp_path)
  assert info.value.reason == 'not_regular'
  assert isinstance(info.value, ValueError)
