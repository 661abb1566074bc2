"""Tests of EXACT on activations (device_bottom): the device sends a = f_phi(x_priv), after DP."""

import functools

import jax
import numpy as np
import pytest

import splitjax.attacks
from experiments import attacking
from experiments import pipeline
from experiments.configs import base as configs_base
from splitjax import models

CARDS = (2, 3, 4)
NUM_USERS = 96


def _bottom(num_priv_dense=0):
  spec = models.ModelSpec(
    pub_cardinalities=(3, 4),
    num_pub_dense=2,
    priv_cardinalities=CARDS,
    num_priv_dense=num_priv_dense,
    topology='device_bottom',
  )
  return models.make_model(spec)


@functools.cache
def _sent(num_priv_dense=0, seed=0):
  """Device parameters, true private values and the activations the device computes."""
  model = _bottom(num_priv_dense)
  phi = model.encoder_init(jax.random.key(seed))  # the device's encoder in device_bottom
  rng = np.random.default_rng(seed)
  x = rng.integers(0, CARDS, size=(NUM_USERS, len(CARDS))).astype(np.int32)
  dense = rng.uniform(size=(NUM_USERS, num_priv_dense)).astype(np.float32)
  a = np.asarray(jax.jit(model.encode_batch)(phi, x, dense))
  return model, phi, x, dense, a


def _clip(a, c):
  norms = np.linalg.norm(a, axis=1, keepdims=True)
  return a * np.minimum(1.0, c / norms)


def test_activation_matching_recovers_everything_without_noise():
  model, phi, x, _, a = _sent()
  r = splitjax.attacks.exact_activations(model.encoder_apply, phi, a, CARDS)
  np.testing.assert_array_equal(r.features, x)
  assert np.all(r.num_ties == 1) and np.all(r.distances < 1e-5) and np.all(r.gap > 0)
  # The device clips to C_a (below every norm): the clip-aware attacker clips candidates too.
  c = 0.5 * float(np.linalg.norm(a, axis=1).min())
  rc = splitjax.attacks.exact_activations(
    model.encoder_apply, phi, _clip(a, c), CARDS, l2_clip_norm=c
  )
  np.testing.assert_array_equal(rc.features, x)
  paper = splitjax.attacks.exact_activations(
    model.encoder_apply, phi, _clip(a, c), CARDS, l2_clip_norm=c, clip_aware=False
  )
  assert np.mean(paper.features == x) <= 1.0  # runs; clip-unaware is never better here
  assert np.all(paper.distances >= rc.distances - 1e-6)


def test_candidate_activations_do_not_depend_on_the_user():
  model, phi, x, _, a = _sent()
  cand = splitjax.attacks.activations.candidate_activations(model.encoder_apply, phi, CARDS)
  table = splitjax.attacks.candidate_table(CARDS)
  assert cand.shape == (len(table), a.shape[1])
  index = np.ravel_multi_index(x.T, CARDS)  # candidate_table order: first feature slowest
  np.testing.assert_allclose(cand[index], a, rtol=1e-6, atol=1e-6)


def test_bayes_with_noise_gives_posteriors_and_degrades_gracefully():
  model, phi, x, _, a = _sent()
  c = float(np.linalg.norm(a, axis=1).max())  # clip not binding
  rng = np.random.default_rng(1)
  out = {}
  for sigma in (0.01, 10.0):
    noisy = (a + sigma * c * rng.normal(size=a.shape)).astype(np.float32)
    r = splitjax.attacks.exact_activations(
      model.encoder_apply,
      phi,
      noisy,
      CARDS,
      l2_clip_norm=c,
      noise_stddev=sigma * c,
      log_prior=np.zeros(np.prod(CARDS)),
    )
    for post, k in zip(r.feature_posteriors, CARDS, strict=True):
      assert post.shape == (NUM_USERS, k)
      np.testing.assert_allclose(post.sum(-1), 1.0, rtol=1e-4)
    out[sigma] = np.mean(r.features == x)
  assert out[0.01] == 1.0
  assert out[10.0] < 0.8  # mu = 2 / sigma = 0.2: close to guessing


def test_activation_matching_with_a_private_dense_feature():
  model, phi, x, dense, a = _sent(num_priv_dense=1)
  r = splitjax.attacks.exact_activations(
    model.encoder_apply, phi, a, CARDS, num_dense=1, num_restarts=16, num_steps=30, num_refine=4
  )
  np.testing.assert_array_equal(r.features, x)
  assert np.mean(np.abs(r.dense[:, 0] - dense[:, 0]) <= 0.01) >= 0.95


def test_bad_inputs_raise():
  model, phi, _, _, a = _sent()
  with pytest.raises(splitjax.attacks.AttackError, match='columns'):
    splitjax.attacks.exact_activations(model.encoder_apply, phi, a[:, :5], CARDS)
  with pytest.raises(splitjax.attacks.AttackError, match='distance'):
    splitjax.attacks.exact_activations(model.encoder_apply, phi, a, CARDS, distance='l1')
  with pytest.raises(splitjax.attacks.AttackError, match='log_prior'):
    splitjax.attacks.exact_activations(model.encoder_apply, phi, a, CARDS, log_prior=np.zeros(24))
  with pytest.raises(splitjax.attacks.AttackError, match='Bayes'):
    splitjax.attacks.exact_activations(
      model.encoder_apply, phi, a, CARDS, noise_stddev=0.1, distance='cosine'
    )
  with pytest.raises(splitjax.attacks.AttackError, match='cardinalities'):
    splitjax.attacks.exact_activations(model.encoder_apply, phi, a, (2, 0, 4))


# A seconds-long device_bottom run, clipped at 0.5.
_TINY_BOTTOM = dict(
  dataset='synthetic',
  synthetic_examples=400,
  epochs=2,
  hidden=(16, 8),
  batch_size=64,
  topology='device_bottom',
  dp_clip='0.5',
)


def test_runner_on_a_device_bottom_workdir_with_dp_clipping(tmp_path):
  config = configs_base.TrainConfig(**_TINY_BOTTOM)
  pipeline.train_workdir(config, tmp_path, progress=None)
  rec = attacking.attack_workdir(
    tmp_path, configs_base.AttackConfig(attack='exact', num_examples=40), progress=None
  )
  assert rec['attack'] == 'exact_activations' and rec['label'] is None
  assert (tmp_path / 'attack.json').exists()
  for name, r in rec['features'].items():
    assert r['accuracy'] == 1.0, name  # clipped, no noise: every candidate still unique
    for key in ('ci', 'macro_f1', 'prior_accuracy', 'knn_accuracy', 'bound_marginal'):
      assert key in r, key
  with pytest.raises(pipeline.ConfigError, match='device_top'):
    attacking.attack_workdir(
      tmp_path, configs_base.AttackConfig(attack='label_norm'), progress=None
    )


def test_activation_attack_under_noise_is_bayes_with_the_server_features_prior(tmp_path):
  """Under activation noise the default (auto) attack scores by the Gaussian likelihood with the
  informed prior of the server's own features; at a noise that drowns the activations its answers
  are that prior's per-feature argmax (it no longer falls below the prior, as the uniform-prior
  nearest match did)."""
  import types

  config = configs_base.TrainConfig(**_TINY_BOTTOM, dp_noise_multiplier=1e4)
  pipeline.train_workdir(config, tmp_path, progress=None)
  rec = attacking.attack_workdir(
    tmp_path, configs_base.AttackConfig(attack='exact', num_examples=40), progress=None
  )
  assert rec['resolved_variant'] == 'bayes' and rec['prior'] == 'informed'
  restored = pipeline.Restored(tmp_path)
  transcript = types.SimpleNamespace(example_index=np.arange(40))  # the first 40 test users
  config = configs_base.AttackConfig(attack='exact', num_examples=40)
  lp = attacking.bottom_informed_log_prior(restored, config, transcript, 'test')
  cards = restored.dataset.priv_cardinalities
  post = np.exp(lp - lp.max(axis=1, keepdims=True)).reshape((40,) + tuple(cards))
  truth = restored.dataset.test.priv_cat[transcript.example_index]
  for j, name in enumerate(restored.dataset.roles.private_categorical):
    other = tuple(a for a in range(1, post.ndim) if a != j + 1)
    guess = post.sum(axis=other).argmax(axis=1)
    assert rec['features'][name]['accuracy'] == pytest.approx(np.mean(guess == truth[:, j])), name
