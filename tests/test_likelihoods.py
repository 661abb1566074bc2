"""The adaptive attack's likelihoods of the randomized defences: each is the density the
defence samples from (checked in closed form and by Monte Carlo), and EXACT scored by it beats
the attack that ignores the defence."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import flagsaver

from splitjax import attacks
from splitjax import defenses
from splitjax.attacks import likelihoods

D = 8


def _batch(n=48, seed=0):
  rng = np.random.default_rng(seed)
  y = jnp.asarray(rng.integers(0, 2, n), jnp.int32)
  x = rng.normal(size=(n, D)) * rng.uniform(0.2, 2.0, (n, 1)) + np.asarray(y)[:, None] * 0.7
  return jnp.asarray(x, jnp.float32), y


def _draws(d, x, y, num=4000):
  keys = jax.random.split(jax.random.key(3), num)
  mask = jnp.ones(x.shape[0], jnp.float32)
  return jax.vmap(lambda k: defenses.apply_one(d, x, k, mask, jnp.inf, y))(keys)


def test_max_norm_likelihood_is_the_gaussian_it_samples_from():
  x, y = _batch()
  d = defenses.Defense("max_norm")
  info = defenses.batch_info(d, x, y, jnp.ones(x.shape[0]))
  g_max_sq = float(info[0])
  assert g_max_sq == pytest.approx(float(np.max(np.sum(np.asarray(x) ** 2, 1))), rel=1e-6)
  obs = _draws(d, x, y)  # [S, N, D]
  row = 5
  var = (g_max_sq - float(np.sum(np.asarray(x[row]) ** 2))) / D
  o = obs[:, row, :]
  nll = likelihoods.max_norm_nll(
    o, jnp.broadcast_to(x[row], (o.shape[0], 1, 1, D)), jnp.full((o.shape[0],), g_max_sq)
  )[:, 0, 0]
  # Closed form: the Gaussian's negative log density without the (d/2) log(2 pi).
  want = 0.5 * np.sum((np.asarray(o) - np.asarray(x[row])) ** 2, 1) / var + 0.5 * D * math.log(var)
  np.testing.assert_allclose(np.asarray(nll), want, rtol=1e-4, atol=1e-4)
  # Monte Carlo: the defence's draws have that variance, so the mean nll is d/2 + (d/2) log var.
  assert float(jnp.mean(nll)) == pytest.approx(0.5 * D + 0.5 * D * math.log(var), abs=0.15)
  assert float(np.var(np.asarray(o) - np.asarray(x[row]))) == pytest.approx(var, rel=0.05)


def test_marvell_likelihood_is_the_density_of_its_covariance():
  x, y = _batch(seed=1)
  d = defenses.Defense("marvell", 2.0)
  info = np.asarray(defenses.batch_info(d, x, y, jnp.ones(x.shape[0])), np.float64)
  unit, lam = info[:D], info[D:]
  assert np.linalg.norm(unit) == pytest.approx(1.0, rel=1e-5)
  obs = np.asarray(_draws(d, x, y), np.float64)
  # The solver often gives one class no noise across Delta (lambda2 = 0: a degenerate Gaussian,
  # which the nll floors); the closed form is compared on rows of classes with both positive.
  full = [c for c in (0, 1) if lam[2 * c] > 1e-3 and lam[2 * c + 1] > 1e-3]
  assert full
  rows = [int(r) for r in np.flatnonzero(np.isin(np.asarray(y), full))[:3]]
  for row in rows:
    cls = int(y[row])
    l1, l2 = lam[2 * cls], lam[2 * cls + 1]
    cov = (l1 - l2) * np.outer(unit, unit) + l2 * np.eye(D)
    noise = obs[:, row, :] - np.asarray(x[row], np.float64)
    np.testing.assert_allclose(np.cov(noise.T), cov, atol=0.06 * np.max(np.diag(cov)))
    o = jnp.asarray(obs[:50, row, :], jnp.float32)
    g_cand = jnp.broadcast_to(jnp.stack([x[row], x[row]]), (50, 1, 2, D))
    nll = np.asarray(
      likelihoods.marvell_nll(o, g_cand, jnp.asarray(np.tile(info, (50, 1)), jnp.float32))
    )
    inv = np.linalg.inv(cov)
    r = obs[:50, row, :] - np.asarray(x[row], np.float64)
    want = 0.5 * (np.einsum("si,ij,sj->s", r, inv, r) + np.linalg.slogdet(cov)[1])
    np.testing.assert_allclose(nll[:, 0, cls], want, rtol=2e-3, atol=2e-3)


def test_stochastic_quantization_likelihood_is_its_rounding_probability():
  c, bits = 1.0, 2
  g = jnp.asarray([[0.2, -0.55]], jnp.float32)  # one row, two coordinates
  d = defenses.Defense("quantize_stochastic", bits)
  keys = jax.random.split(jax.random.key(0), 20000)
  mask = jnp.ones(1, jnp.float32)
  obs = np.asarray(jax.vmap(lambda k: defenses.apply_one(d, g, k, mask, c))(keys))[:, 0, :]
  outcomes, counts = np.unique(obs, axis=0, return_counts=True)
  assert len(outcomes) == 4  # two neighbouring levels per coordinate
  nll = likelihoods.quantize_stochastic_nll(
    jnp.asarray(outcomes), jnp.broadcast_to(g, (4, 1, 1, 2)), c, bits
  )[:, 0, 0]
  p = np.exp(-np.asarray(nll))
  assert p.sum() == pytest.approx(1.0, abs=1e-5)
  np.testing.assert_allclose(counts / counts.sum(), p, atol=0.012)


def _split_and_model():
  import splits

  from splitjax import models
  from splitjax import training

  split = splits.split(256, seed=3)
  recipe = training.Recipe(optimizer="sgd", learning_rate=0.0, batch_size=256, epochs=1)
  state = training.init_state(splits.MODEL, recipe, 0)
  return splits, split, state, models.device_logit_fn(splits.MODEL), training


@pytest.mark.parametrize("chain", [["max_norm"], ["marvell:4"]])
def test_likelihood_attack_beats_the_naive_one(chain):
  splits, split, state, apply, training = _split_and_model()
  p = defenses.plan(chain)
  tr = training.replay_transcript(splits.MODEL, state, split, defenses=p, seed=1)
  clean = training.replay_transcript(splits.MODEL, state, split)
  model, why = defenses.attack_model(p, 0.0)
  assert model is not None, why
  info = defenses.batch_info(
    model.likelihood, jnp.asarray(clean.g), jnp.asarray(split.y), jnp.ones(len(split.y))
  )
  info = np.repeat(np.asarray(info)[None], len(split.y), axis=0)  # one batch: the same for all
  common = dict(cardinalities=splits.PRIV_CARDS)
  adaptive = attacks.exact(
    apply, state.device_params, tr.h, tr.g, defense=model, defense_info=info, **common
  )
  naive = attacks.exact(apply, state.device_params, tr.h, tr.g, **common)
  assert adaptive.distances.size and np.isnan(adaptive.distances).all()
  hits = lambda r: (
    np.mean(np.asarray(r.features) == split.priv_cat) + np.mean(np.asarray(r.labels) == split.y)
  )
  # Scored by the right likelihood, the label posterior is calibrated: its mean confidence is
  # the accuracy it reaches (within sampling error of 256 users), which no mismatched model has.
  post = np.asarray(adaptive.label_posterior)
  conf = float(np.mean(np.max(post, axis=1)))
  acc = float(np.mean(np.asarray(adaptive.labels) == split.y))
  assert abs(conf - acc) < 0.06, (conf, acc)
  if chain == ["marvell:4"]:  # Marvell's noise along Delta: the naive attack is far off
    assert hits(adaptive) > hits(naive) + 0.05, (hits(adaptive), hits(naive))
  else:  # max_norm's isotropic noise: distance ranks almost as the likelihood does here
    assert hits(adaptive) >= hits(naive) - 0.02, (hits(adaptive), hits(naive))
  with pytest.raises(attacks.AttackError, match="defense_info"):
    attacks.exact(apply, state.device_params, tr.h, tr.g, defense=model, **common)
  with pytest.raises(attacks.AttackError, match="noise_stddev=None"):
    attacks.exact(
      apply,
      state.device_params,
      tr.h,
      tr.g,
      defense=model,
      defense_info=info,
      noise_stddev=0.1,
      **common,
    )


def test_attack_binary_scores_max_norm_by_its_likelihood(tmp_path):
  from experiments import attack as attack_bin
  from experiments import train as train_bin

  work = tmp_path / "mn"
  with flagsaver.flagsaver(workdir=str(work), config="synthetic_tiny", defense=["max_norm"]):
    train_bin.main([])
  got = {}
  for mode in ("adaptive", "white_box", "naive"):
    with flagsaver.flagsaver(
      workdir=str(work), num_examples=60, defense_model=mode, overwrite=True
    ):
      attack_bin.main([])
    got[mode] = json.loads((work / f"attack_exact_auto_auto_test_{mode}.json").read_text())
  assert got["adaptive"]["defense_model"].startswith("adaptive (likelihood: G^2 estimated")
  assert got["white_box"]["defense_model"].startswith("white_box (likelihood: the device's")
  assert got["naive"]["defense_model"] == "naive"
  acc = lambda r: r["label"]["accuracy"]
  assert acc(got["white_box"]) >= acc(got["naive"]) - 0.05


def test_ties_of_a_deterministic_defence_are_answered_by_the_prior_among_them():
  from splitjax.attacks import scoring

  splits, split, state, apply, training = _split_and_model()
  c = 0.05
  p = defenses.plan(["clip", "quantize:1"])  # one bit per coordinate: many pairs tie
  tr = training.replay_transcript(
    splits.MODEL, state, split, dp=training.DPConfig(np.float32(c), np.float32(0.0)), defenses=p
  )
  model, why = defenses.attack_model(p, 0.0, c)
  assert model is not None, why
  rng = np.random.default_rng(0)
  n_pairs = int(np.prod(splits.PRIV_CARDS)) * 2
  log_prior = np.log(rng.dirichlet(np.ones(n_pairs), size=len(split.y)))  # per user, [N, C*L]
  res = attacks.exact(
    apply,
    state.device_params,
    tr.h,
    tr.g,
    splits.PRIV_CARDS,
    defense=model,
    l2_clip_norm=c,
    log_prior=log_prior,
  )
  # Brute force: every pair's defended gradient, the pairs that reproduce the observation
  # exactly, and the prior's marginals over them.
  table = scoring.candidate_table(splits.PRIV_CARDS)
  grad = jax.vmap(jax.vmap(jax.value_and_grad(apply, argnums=1), (None, None, 0)), (None, 0, None))
  z, v = grad(state.device_params, jnp.asarray(tr.h), jnp.asarray(table))  # [N, C], [N, C, d]
  sims = []
  for y in (0, 1):
    gy = (jax.nn.sigmoid(z) - y)[..., None] * v
    gy = defenses.simulate(model, gy, c, lambda x: scoring.clip_rows(x, c))
    sims.append(np.asarray(gy))
  sims = np.stack(sims, axis=2).reshape(len(split.y), n_pairs, -1)  # label fastest
  tied = np.all(np.abs(sims - np.asarray(tr.g)[:, None, :]) < 1e-6, axis=-1)
  assert tied.any(axis=1).all() and (tied.sum(1) > 1).mean() > 0.1  # 16 % tie here
  w = np.where(tied, np.exp(log_prior), 0.0)
  w /= w.sum(1, keepdims=True)
  w = w.reshape(len(split.y), *splits.PRIV_CARDS, 2)
  np.testing.assert_allclose(res.label_posterior, w.sum((1, 2)), atol=1e-4)
  np.testing.assert_allclose(res.feature_posteriors[1], w.sum((1, 3)), atol=1e-4)
  np.testing.assert_array_equal(res.features[:, 1], np.argmax(w.sum((1, 3)), axis=1))
  np.testing.assert_array_equal(np.asarray(res.num_ties), tied.sum(1))


def test_estimated_marvell_statistics_recover_the_label_the_noise_hides():
  # A Marvell batch of label-dependent gradients (g = (sigmoid - y) v, the rows' directions v
  # clustered as a trained model's are): the nearest candidate guesses poorly under the noise;
  # the likelihood with the server's estimate (direction from the observed batch alone, lambdas
  # from the clean rows) recovers the label, as well as with the device's own statistics.
  n = 512
  rng = np.random.default_rng(5)
  y = rng.random(n) < 0.25
  v = rng.normal(size=D) + 0.5 * rng.normal(size=(n, D))
  sig = rng.uniform(0.05, 0.95, n)
  cand = np.stack([sig[:, None] * v, (sig - 1)[:, None] * v], 1)  # [n, label, D]
  x = jnp.asarray(cand[np.arange(n), y.astype(int)], jnp.float32)
  labels = jnp.asarray(y, jnp.int32)
  d = defenses.Defense("marvell", 4.0)
  mask = jnp.ones(n, jnp.float32)
  obs = defenses.apply_one(d, x, jax.random.key(11), mask, jnp.inf, labels)
  device = np.asarray(defenses.batch_info(d, x, labels, mask))
  est = defenses.marvell_estimate(obs, device)
  assert abs(float(est[:D] @ device[:D])) > 0.999
  np.testing.assert_allclose(est[[D, D + 2]], device[[D, D + 2]])  # lambda1s kept
  assert est[D + 1] > device[D + 1] and est[D + 3] > device[D + 3]  # lambda2s regularised
  g_cand = jnp.asarray(cand[:, None], jnp.float32)

  def accuracy(info):
    nll = likelihoods.marvell_nll(obs, g_cand, jnp.asarray(np.tile(info, (n, 1)), jnp.float32))
    return float(np.mean(np.argmin(np.asarray(nll)[:, 0, :], axis=1) == y))

  nearest = float(np.mean(np.argmin(np.sum((np.asarray(obs)[:, None] - cand) ** 2, -1), 1) == y))
  white, estimated = accuracy(device), accuracy(est)
  assert nearest < 0.75, nearest
  assert estimated > 0.95 and estimated >= white - 0.02, (estimated, white, nearest)
