"""The attacker's informed prior, the per-user bounds and the paired gain."""

import math

import numpy as np
import pytest

from splitjax import attacks
from splitjax import metrics
from splitjax.attacks import priors
from splitjax.privacy import bounds


def test_tuple_codes_follow_candidate_table_order():
  cards = (2, 3, 4)
  table = attacks.candidate_table(cards)
  np.testing.assert_array_equal(attacks.tuple_codes(table, cards), np.arange(len(table)))


def test_joint_prior_mixes_neighbour_counts_and_reference_joint():
  ref_codes = np.array([0, 0, 1, 2, 2, 2])
  joint = priors.reference_joint(ref_codes, 4)
  np.testing.assert_allclose(joint.sum(), 1.0)
  assert joint[3] > 0  # unseen tuples keep a little mass
  neigh = np.array([[0, 0, 1], [2, 2, 2]])
  p = priors.joint_prior(neigh, joint, k=2, lam=0.25)
  np.testing.assert_allclose(p.sum(axis=1), 1.0)
  np.testing.assert_allclose(p[0], 0.75 * np.array([1, 0, 0, 0]) + 0.25 * joint)
  np.testing.assert_allclose(priors.joint_prior(neigh, joint, k=3, lam=1.0)[1], joint)


def _correlated(n, rng):
  """Server feature x in {0..3}; private (a, b) = (x mod 2, x // 2) with 10 % noise: a joint
  prior from neighbours in x-space knows the tuple, a product of marginals does not."""
  x = rng.integers(0, 4, n)
  a = np.where(rng.random(n) < 0.9, x % 2, rng.integers(0, 2, n))
  b = np.where(rng.random(n) < 0.9, x // 2, rng.integers(0, 2, n))
  feats = np.eye(4, dtype=np.float32)[x] + rng.normal(0, 0.01, (n, 4)).astype(np.float32)
  return feats, np.stack([a, b], axis=1)


def test_informed_prior_beats_the_marginal_prior_and_is_calibrated():
  rng = np.random.default_rng(0)
  ref_x, ref_v = _correlated(2000, rng)
  q_x, q_v = _correlated(500, rng)
  fit = attacks.fit_informed_prior(
    {"server": ref_x, "noise": rng.normal(size=(2000, 4))},
    ref_v,
    (2, 2),
    query_spaces={"server": q_x, "noise": rng.normal(size=(500, 4))},
  )
  assert fit.space == "server"  # chosen by held-out log-loss, not the uninformative space
  codes = attacks.tuple_codes(q_v, (2, 2))
  informed_ll = -np.mean(np.log(fit.probs[np.arange(500), codes]))
  marginal = priors.marginal_tuple_prior(ref_v, (2, 2))
  marginal_ll = -np.mean(np.log(marginal[codes]))
  assert informed_ll < marginal_ll - 0.5, (informed_ll, marginal_ll)
  np.testing.assert_allclose(fit.probs.sum(axis=1), 1.0)
  assert all(e < 0.08 for e in fit.ece.values()), fit.ece


def test_informed_prior_never_uses_the_attacked_users_own_row():
  # Every reference row is its own far-away cluster with a unique tuple: with its own row
  # excluded, a query equal to a reference row gets that tuple only through the lam part.
  n = 6
  x = np.eye(n, dtype=np.float32) * 100
  values = np.stack([np.arange(n) % 2, np.arange(n) // 2], axis=1)
  fit = attacks.fit_informed_prior(
    {"x": x},
    values,
    (2, 3),
    query_spaces={"x": x},
    exclude=np.arange(n),
    ks=(1,),
    lams=(0.5,),
    holdout=0.5,
  )
  own = fit.probs[np.arange(n), attacks.tuple_codes(values, (2, 3))]
  assert np.all(own < 0.5 + 1e-9)  # without exclusion the k=1 neighbour would give 0.5 + 0.5 p


def test_debias_undoes_randomized_response():
  p = np.array([0.0, 0.2, 0.5, 0.9, 1.0])
  q = 1 / (1 + math.e)
  noisy = q + (1 - 2 * q) * p
  np.testing.assert_allclose(
    attacks.debias_label_probability(noisy, q), np.clip(p, 1e-6, 1 - 1e-6), atol=1e-12
  )


def test_pair_log_prior_and_prior_guess():
  probs = np.array([[0.1, 0.6, 0.3, 0.0]])
  p1 = np.array([[0.9, 0.2, 0.5, 0.5]])
  lp = attacks.pair_log_prior(probs, p1)
  assert lp.shape == (1, 4, 2)
  np.testing.assert_allclose(np.exp(lp[0, 1]), [0.6 * 0.8, 0.6 * 0.2])
  feats, labels, margs, py1 = attacks.prior_guess(probs, p1, (2, 2))
  np.testing.assert_allclose(margs[0][0], [0.7, 0.3])
  np.testing.assert_allclose(py1, [0.1 * 0.9 + 0.6 * 0.2 + 0.3 * 0.5])
  assert feats.tolist() == [[0, 1]] and labels.tolist() == [0]


def test_reference_mu_and_per_user_bounds():
  assert bounds.reference_mu(noise_multiplier=2.0) == pytest.approx(0.5)
  assert bounds.reference_mu(
    noise_multiplier=1.0, releases=4, device_noise_multiplier=2.0, device_releases=4
  ) == pytest.approx(math.sqrt(4 + 1))
  assert math.isinf(bounds.reference_mu(noise_multiplier=0.0))
  prior2 = np.array([[0.5, 0.5], [0.9, 0.1]])
  np.testing.assert_allclose(
    bounds.per_user_bound(prior2, 1.0), bounds.binary_bound(prior2[:, 1], 2.0)
  )
  prior3 = np.array([[0.2, 0.5, 0.3]])
  np.testing.assert_allclose(
    bounds.per_user_bound(prior3, 1.0), bounds.reconstruction_bound(0.5, 1.0)
  )
  # The binary bound is never above the reference bound.
  for p in np.linspace(0.01, 0.99, 25):
    for mu_ref in (0.1, 0.5, 1.0, 3.0):
      assert (
        bounds.binary_bound(p, 2 * mu_ref)
        <= bounds.reconstruction_bound(max(p, 1 - p), mu_ref) + 1e-9
      )


def test_paired_difference_counts_only_discordant_users():
  a = np.array([1, 1, 1, 0, 1, 0, 1, 1], bool)
  b = np.array([1, 0, 0, 0, 1, 1, 1, 0], bool)
  out = metrics.paired_difference(a, b)
  assert out["discordant"] == [3, 1] and out["n"] == 8
  assert out["difference"] == pytest.approx(2 / 8)
  half = 1.959964 * math.sqrt(4 - 4 / 8) / 8
  np.testing.assert_allclose(out["ci"], [2 / 8 - half, 2 / 8 + half], rtol=1e-5)
  assert out["p_value"] == pytest.approx(0.625)  # exact binomial, 3 of 4 discordant
  same = metrics.paired_difference(a, a)
  assert same["difference"] == 0 and same["ci"] == [0.0, 0.0] and same["p_value"] == 1.0
  with pytest.raises(ValueError):
    metrics.paired_difference(a, b[:3])
