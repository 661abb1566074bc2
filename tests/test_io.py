"""Tests of splitjax.io: atomic writes, JSON results, checkpoints, workdirs, fingerprints."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from splitjax import io


def _listdir(path):
  return sorted(os.listdir(path))


def test_atomic_write_json_failure_keeps_old_file_and_no_temp(tmp_path):
  target = tmp_path / 'results.json'
  io.atomic_write_json(target, {'accuracy': 0.5})
  before = target.read_bytes()
  with pytest.raises(TypeError, match=r'\$\.b\[1\]'):
    io.atomic_write_json(target, {'a': 1, 'b': [1, object()]})
  assert target.read_bytes() == before
  assert _listdir(tmp_path) == ['results.json']


def test_atomic_write_bytes_failure_mid_write_removes_temp(tmp_path, monkeypatch):
  target = tmp_path / 'ckpt'
  io.atomic_write_bytes(target, b'old')

  def broken_fsync(fd):
    del fd
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(os, 'fsync', broken_fsync)
  with pytest.raises(OSError, match='No space'):
    io.atomic_write_bytes(target, b'new' * 1000)
  assert target.read_bytes() == b'old'
  assert _listdir(tmp_path) == ['ckpt']


def test_atomic_write_replaces_and_keeps_mode(tmp_path):
  target = tmp_path / 'a.txt'
  io.atomic_write_text(target, 'one')
  os.chmod(target, 0o640)
  io.atomic_write_text(target, 'two')
  assert target.read_text() == 'two'
  assert target.stat().st_mode & 0o777 == 0o640
  assert _listdir(tmp_path) == ['a.txt']


def test_json_nonfinite_and_array_round_trip(tmp_path):
  target = tmp_path / 'r.json'
  obj = {
    'eps': float('inf'),
    'neg': -np.inf,
    'nan': np.float32('nan'),
    'n': np.int64(3),
    'arr': np.array([1.5, np.inf]),
    'jax': jnp.arange(3),
    'flag': np.bool_(True),
    'tup': (1, 2),
    'nested': {2: 0.1},
  }
  io.atomic_write_json(target, obj)
  text = target.read_text()
  assert text.endswith('\n') and '\n  "arr"' in text  # indent=2, sorted keys
  assert list(json.loads(text)) == sorted(obj)
  assert io.read_json(target) == {
    'eps': 'inf',
    'neg': '-inf',
    'nan': 'nan',
    'n': 3,
    'arr': [1.5, 'inf'],
    'jax': [0, 1, 2],
    'flag': True,
    'tup': [1, 2],
    'nested': {'2': 0.1},
  }


def test_read_json_missing_and_corrupt(tmp_path):
  with pytest.raises(io.ResultsError, match='no results file at .*check --workdir'):
    io.read_json(tmp_path / 'nope.json')
  bad = tmp_path / 'bad.json'
  bad.write_text('{"a": 1,')
  with pytest.raises(ValueError, match='bad.json is corrupted.*--overwrite') as info:
    io.read_json(bad)
  assert isinstance(info.value, io.ResultsError) and isinstance(info.value, OSError)
  assert '\n' not in str(info.value)
  bad.write_bytes(b'\xff\xfe\x00binary')
  with pytest.raises(io.ResultsError, match='corrupted'):
    io.read_json(bad)


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
  io.save_checkpoint(path, state, metadata={'fingerprint': 'abc123', 'epoch': 2})
  zeros = lambda x: np.zeros_like(x) if isinstance(x, np.ndarray) else jnp.zeros_like(x)
  fresh = jax.tree.map(zeros, {k: v for k, v in state.items() if k != 'rng'})
  fresh['step'] = 0
  fresh['rng'] = jax.random.key(0)
  restored, metadata = io.restore_checkpoint(path, fresh, fingerprint='abc123')
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
  io.save_checkpoint(path, state, metadata={'fingerprint': 'model-a'})
  return path, state


def test_checkpoint_missing(tmp_path):
  with pytest.raises(io.CheckpointError, match='no checkpoint at .*run experiments.train first'):
    io.restore_checkpoint(tmp_path / 'none', {'w': jnp.ones(2)})


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
  with pytest.raises(io.CheckpointError, match='corrupted or truncated') as info:
    io.restore_checkpoint(path, state)
  if damage == 'flip':
    assert 'checksum mismatch' in str(info.value)
  assert '\n' not in str(info.value)


def test_checkpoint_fingerprint_mismatch(saved):
  path, state = saved
  with pytest.raises(
    io.CheckpointError, match='different model/config.*use a fresh --workdir or --overwrite'
  ):
    io.restore_checkpoint(path, state, fingerprint='model-b')
  io.restore_checkpoint(path, state, fingerprint='model-a')


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
  with pytest.raises(io.CheckpointError, match='does not match the expected model structure'):
    io.restore_checkpoint(path, target)


def test_ensure_workdir(tmp_path):
  made = io.ensure_workdir(tmp_path / 'a' / 'b')
  assert made.is_dir() and _listdir(made) == []
  blocker = tmp_path / 'afile'
  blocker.write_text('x')
  with pytest.raises(
    io.WorkdirError, match='workdir .*sub is not writable.*choose another --workdir'
  ):
    io.ensure_workdir(blocker / 'sub')
  with pytest.raises(io.WorkdirError, match='not writable'):
    io.ensure_workdir(blocker)


def test_check_config_compatible(tmp_path):
  workdir = tmp_path / 'run'
  config = {'dataset': 'adult', 'lr': 1e-3, 'hidden': (256, 128), 'dp': {'clip': 1.0, 'sigma': 0.5}}
  io.check_config_compatible(workdir, config, overwrite=False)
  assert io.read_json(workdir / 'config.json')['hidden'] == [256, 128]
  io.check_config_compatible(workdir, config, overwrite=False)  # same config: fine
  other = dict(config, lr=1e-2, dp={'clip': 1.0, 'sigma': 1.0}, seed=1)
  with pytest.raises(
    io.WorkdirError,
    match=r'differs in: dp\.sigma, lr, seed\).*use --overwrite or another --workdir',
  ):
    io.check_config_compatible(workdir, other, overwrite=False)
  assert io.read_json(workdir / 'config.json')['lr'] == 1e-3  # untouched
  io.check_config_compatible(workdir, other, overwrite=True)
  assert io.read_json(workdir / 'config.json')['lr'] == 1e-2
  (workdir / 'config.json').write_text('{broken')
  with pytest.raises(io.WorkdirError, match='corrupted.*--overwrite'):
    io.check_config_compatible(workdir, other, overwrite=False)


def test_fingerprint():
  a = io.fingerprint({'b': 1, 'a': (2, 3), 'x': np.float32(0.5)})
  assert a == io.fingerprint({'x': 0.5, 'a': [2, 3], 'b': 1})
  assert len(a) == 16 and int(a, 16) >= 0
  assert a != io.fingerprint({'b': 2, 'a': (2, 3), 'x': 0.5})
