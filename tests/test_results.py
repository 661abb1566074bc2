"""Tests of splitjax.results: atomic writes, JSON results, workdirs, fingerprints, errors' data."""

import errno
import json
import os
import pickle

import jax.numpy as jnp
import numpy as np
import pytest

from splitjax import results


def _listdir(path):
  return sorted(os.listdir(path))


def test_atomic_write_json_failure_keeps_old_file_and_no_temp(tmp_path):
  target = tmp_path / 'results.json'
  results.atomic_write_json(target, {'accuracy': 0.5})
  before = target.read_bytes()
  with pytest.raises(TypeError, match=r'\$\.b\[1\]'):
    results.atomic_write_json(target, {'a': 1, 'b': [1, object()]})
  assert target.read_bytes() == before
  assert _listdir(tmp_path) == ['results.json']


def test_atomic_write_bytes_failure_mid_write_removes_temp(tmp_path, monkeypatch):
  target = tmp_path / 'ckpt'
  results.atomic_write_bytes(target, b'old')

  def broken_fsync(fd):
    del fd
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(os, 'fsync', broken_fsync)
  with pytest.raises(OSError, match='No space'):
    results.atomic_write_bytes(target, b'new' * 1000)
  assert target.read_bytes() == b'old'
  assert _listdir(tmp_path) == ['ckpt']


def test_atomic_write_replaces_and_keeps_mode(tmp_path):
  target = tmp_path / 'a.txt'
  results.atomic_write_text(target, 'one')
  os.chmod(target, 0o640)
  results.atomic_write_text(target, 'two')
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
  results.atomic_write_json(target, obj)
  text = target.read_text()
  assert text.endswith('\n') and '\n  "arr"' in text  # indent=2, sorted keys
  assert list(json.loads(text)) == sorted(obj)
  assert results.read_json(target) == {
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
  with pytest.raises(results.ResultsError, match='no results file at .*writes it first$') as info:
    results.read_json(tmp_path / 'nope.json')
  assert info.value.path == tmp_path / 'nope.json' and info.value.reason == 'missing'
  bad = tmp_path / 'bad.json'
  bad.write_text('{"a": 1,')
  with pytest.raises(ValueError, match='bad.json is corrupted.*delete it and rerun$') as info:
    results.read_json(bad)
  assert isinstance(info.value, results.ResultsError) and isinstance(info.value, OSError)
  assert info.value.path == bad and info.value.reason == 'corrupted'
  assert '\n' not in str(info.value)
  bad.write_bytes(b'\xff\xfe\x00binary')
  with pytest.raises(results.ResultsError, match='corrupted'):
    results.read_json(bad)


def test_ensure_workdir(tmp_path):
  made = results.ensure_workdir(tmp_path / 'a' / 'b')
  assert made.is_dir() and _listdir(made) == []
  blocker = tmp_path / 'afile'
  blocker.write_text('x')
  with pytest.raises(results.WorkdirError, match=r'workdir .*sub is not writable \(.*\)$') as info:
    results.ensure_workdir(blocker / 'sub')
  assert info.value.path == blocker / 'sub' and info.value.reason == 'not_writable'
  with pytest.raises(results.WorkdirError, match='not writable'):
    results.ensure_workdir(blocker)


def test_check_config_compatible(tmp_path):
  workdir = tmp_path / 'run'
  config = {'dataset': 'adult', 'lr': 1e-3, 'hidden': (256, 128), 'dp': {'clip': 1.0, 'sigma': 0.5}}
  results.check_config_compatible(workdir, config, overwrite=False)
  assert results.read_json(workdir / 'config.json')['hidden'] == [256, 128]
  results.check_config_compatible(workdir, config, overwrite=False)  # same config: fine
  other = dict(config, lr=1e-2, dp={'clip': 1.0, 'sigma': 1.0}, seed=1)
  with pytest.raises(results.WorkdirError, match=r'differs in: dp\.sigma, lr, seed\)$') as info:
    results.check_config_compatible(workdir, other, overwrite=False)
  assert info.value.path == workdir and info.value.reason == 'config_differs'
  assert info.value.keys == ('dp.sigma', 'lr', 'seed')
  assert results.read_json(workdir / 'config.json')['lr'] == 1e-3  # untouched
  results.check_config_compatible(workdir, other, overwrite=True)
  assert results.read_json(workdir / 'config.json')['lr'] == 1e-2
  (workdir / 'config.json').write_text('{broken')
  with pytest.raises(results.WorkdirError, match='corrupted.*of another configuration$') as info:
    results.check_config_compatible(workdir, other, overwrite=False)
  assert info.value.path == workdir / 'config.json' and info.value.reason == 'config_unreadable'


def test_fingerprint():
  a = results.fingerprint({'b': 1, 'a': (2, 3), 'x': np.float32(0.5)})
  assert a == results.fingerprint({'x': 0.5, 'a': [2, 3], 'b': 1})
  assert len(a) == 16 and int(a, 16) >= 0
  assert a != results.fingerprint({'b': 2, 'a': (2, 3), 'x': 0.5})


@pytest.mark.parametrize(
  ('code', 'reason', 'fix'),
  [
    (errno.ENOSPC, 'no_space', 'free space on that filesystem'),
    (errno.EROFS, 'not_permitted', 'make the directory writable'),
    (errno.EIO, 'os_error', 'check that filesystem'),
  ],
)
def test_write_error_carries_path_reason_and_errno(tmp_path, monkeypatch, code, reason, fix):
  target = tmp_path / 'r.json'

  def broken_fsync(fd):
    del fd
    raise OSError(code, os.strerror(code))

  monkeypatch.setattr(os, 'fsync', broken_fsync)
  with pytest.raises(results.WriteError) as info:
    results.atomic_write_json(target, {'a': 1})
  e = info.value
  assert (e.path, e.reason, e.errno) == (target, reason, code)
  assert str(e).startswith(f'could not write {target} ({os.strerror(code)})')
  assert str(e).endswith(f': {fix}') and '--' not in str(e)
  assert isinstance(e, OSError) and isinstance(e, results.FileError)


def test_check_regular_file_raises_the_error_given(tmp_path):
  with pytest.raises(results.ResultsError, match='is a directory, not a regular file') as info:
    results.check_regular_file(tmp_path, results.ResultsError)
  assert info.value.path == tmp_path and info.value.reason == 'not_regular'
  with pytest.raises(ValueError, match='is a directory') as plain:
    results.check_regular_file(tmp_path)
  assert type(plain.value) is ValueError
  results.check_regular_file(tmp_path / 'missing')  # the read reports a missing file


def test_file_errors_keep_their_bases_and_pickle():
  err = results.ResultsError('m', path='/x/r.json', reason='missing')
  assert isinstance(err, ValueError) and isinstance(err, OSError)
  assert issubclass(results.WorkdirError, ValueError) and issubclass(results.WriteError, OSError)
  back = pickle.loads(pickle.dumps(err))
  assert (str(back), back.path, back.reason) == ('m', err.path, 'missing')
  plain = results.WorkdirError('no data')
  assert plain.path is None and plain.reason is None and plain.keys == ()
