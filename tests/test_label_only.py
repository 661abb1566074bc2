"""Tests of the label-only attacks (Li et al. 2021: gradient norm, direction) and their runner."""

import json

import numpy as np
import pytest

import splitjax.attacks
from experiments import attacking
from experiments import pipeline
from experiments.configs import base as configs_base
from splitjax import metrics

D = 12
N = 400


def _linear_top_gradients(bias: float, positive_rate: float, seed: int = 0):
  """`g_i = (sigmoid(z_i) - y_i) w` of a linear device top `z = w.h + bias` (sign = label)."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=D)
  h = rng.normal(size=(N, D))
  y = (rng.uniform(size=N) < positive_rate).astype(np.int32)
  z = h @ w / np.sqrt(D) + bias
  g = (1.0 / (1.0 + np.exp(-z)) - y)[:, None] * w[None, :]
  return g.astype(np.float32), y


def test_direction_attack_separates_labels_perfectly():
  # The model leans negative (positives rare): the largest gradient is a positive's.
  g, y = _linear_top_gradients(bias=-2.0, positive_rate=0.3)
  r = splitjax.attacks.label_direction(g)  # principal direction, oriented to the largest gradient
  assert metrics.roc_auc(r.scores, y) == 1.0
  np.testing.assert_array_equal(r.labels, y)
  # A balanced model: the largest gradient may be a negative's; the prior orients the direction.
  g, y = _linear_top_gradients(bias=0.0, positive_rate=0.3)
  r = splitjax.attacks.label_direction(g, positive_fraction=0.3)
  assert metrics.roc_auc(r.scores, y) == 1.0
  # Li et al.'s setting: one example with a known label as the reference.
  neg = int(np.flatnonzero(y == 0)[0])
  pos = int(np.flatnonzero(y == 1)[0])
  assert metrics.roc_auc(splitjax.attacks.label_direction(g, reference=pos).scores, y) == 1.0
  r0 = splitjax.attacks.label_direction(g, reference=neg, reference_label=0)
  assert metrics.roc_auc(r0.scores, y) == 1.0
  assert np.all(np.abs(r0.scores) <= 1.0 + 1e-6)


def test_norm_attack_separates_rare_positives_perfectly():
  # The model predicts negatives (bias -6): |sigmoid(z) - 1| ~ 1 for positives, ~ 0 for negatives.
  g, y = _linear_top_gradients(bias=-6.0, positive_rate=0.2)
  r = splitjax.attacks.label_norm(g, positive_fraction=float(y.mean()))
  assert metrics.roc_auc(r.scores, y) == 1.0
  assert r.labels.sum() == round(y.mean() * N)
  np.testing.assert_array_equal(r.labels, y)
  np.testing.assert_array_equal(splitjax.attacks.label_norm(g).labels, y)  # midpoint threshold


def test_clipping_defeats_the_norm_attack_but_not_the_direction_attack():
  g, y = _linear_top_gradients(bias=-6.0, positive_rate=0.2)
  clip = 0.5 * float(np.min(np.linalg.norm(g, axis=1)))  # every row is clipped to norm C
  gc = g * (clip / np.linalg.norm(g, axis=1))[:, None]
  auc_norm = metrics.roc_auc(splitjax.attacks.label_norm(gc).scores, y)
  assert abs(auc_norm - 0.5) < 0.1  # norms all equal C up to rounding
  assert metrics.roc_auc(splitjax.attacks.label_direction(gc).scores, y) == 1.0


def test_label_attacks_validate_inputs():
  g, _ = _linear_top_gradients(bias=0.0, positive_rate=0.5)
  with pytest.raises(splitjax.attacks.AttackError, match='\\[N, d\\]'):
    splitjax.attacks.label_norm(g[0])
  with pytest.raises(splitjax.attacks.AttackError, match='positive_fraction'):
    splitjax.attacks.label_norm(g, positive_fraction=1.5)
  with pytest.raises(splitjax.attacks.AttackError, match='reference row'):
    splitjax.attacks.label_direction(g, reference=N)
  with pytest.raises(splitjax.attacks.AttackError, match='reference must be'):
    splitjax.attacks.label_direction(g, reference=np.ones(D + 1))
  with pytest.raises(splitjax.attacks.AttackError, match='reference_label'):
    splitjax.attacks.label_direction(g, reference_label=2)
  bad = g.copy()
  bad[1, 1] = np.inf
  with pytest.raises(splitjax.attacks.AttackError, match='NaN'):
    splitjax.attacks.label_direction(bad)
  empty = splitjax.attacks.label_norm(np.zeros((0, D), np.float32))
  assert empty.scores.shape == (0,) and empty.labels.shape == (0,)


@pytest.fixture(scope='module')
def tiny_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('tiny_top')
  config = configs_base.TrainConfig(
    dataset='synthetic', synthetic_examples=400, epochs=2, hidden=(16, 8), batch_size=64
  )
  pipeline.train_workdir(config, workdir, progress=None)
  return workdir


@pytest.mark.parametrize('attack', ['label_norm', 'label_direction'])
def test_runner_writes_the_attack_record_with_auc(tiny_workdir, attack):
  config = configs_base.AttackConfig(attack=attack, num_examples=30)
  rec = attacking.attack_workdir(tiny_workdir, config, progress=None)
  saved = json.loads((tiny_workdir / f'attack_{attack}_auto_test.json').read_text())
  assert saved['label']['auc'] == rec['label']['auc']
  assert 0.0 <= rec['label']['auc'] <= 1.0
  for key in ('accuracy', 'ci', 'macro_f1', 'prior_accuracy', 'knn_accuracy', 'bound_marginal'):
    assert key in rec['label'], key
  assert rec['features'] == {} and rec['num_examples'] == 30
  assert 'epsilon' in rec and 'attack_epsilon' in rec
  # Same configuration again: nothing to do, the saved record comes back.
  assert attacking.attack_workdir(tiny_workdir, config, progress=None)['label'] == saved['label']


def test_runner_hybrid_equals_exact_without_dense(tiny_workdir):
  config = configs_base.AttackConfig(attack='hybrid', num_examples=30)
  rec = attacking.attack_workdir(tiny_workdir, config, progress=None)
  ex = attacking.attack_workdir(
    tiny_workdir, configs_base.AttackConfig(num_examples=30), progress=None
  )
  for name in ex['features']:
    assert rec['features'][name]['accuracy'] == ex['features'][name]['accuracy'], name
  assert rec['label']['accuracy'] == ex['label']['accuracy']
  with pytest.raises(pipeline.ConfigError, match='device_bottom'):
    attacking.attack_workdir(
      tiny_workdir, configs_base.AttackConfig(attack='exact_activations'), progress=None
    )
