"""Tests of DP-implied attack bounds and label DP (randomized response)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from scipy import special
from scipy import stats

from splitjax import privacy

N_DRAWS = 20_000


def _tolerance(acc, n=N_DRAWS, z=4.0):
  return z * math.sqrt(max(acc * (1 - acc), 1e-4) / n)


class GaussianMechanismAttackTest(parameterized.TestCase):
  """Bayes-optimal attacker on +-C rows: reaches Phi(mu/2), the bound, within sampling error."""

  @parameterized.parameters(0.5, 1.0, 2.0, 4.0)
  def test_direct_mechanism_reaches_bound(self, sigma):
    c = 0.7
    rng = np.random.default_rng(int(sigma * 10))
    secret = rng.integers(0, 2, N_DRAWS)
    out = np.where(secret == 1, c, -c) + rng.normal(0.0, sigma * c, N_DRAWS)
    acc = np.mean((out > 0) == (secret == 1))  # likelihood-ratio test = sign
    bound = privacy.binary_bound(0.5, privacy.per_release_mu(sigma))
    self.assertAlmostEqual(bound, stats.norm.cdf(1.0 / sigma), places=12)
    self.assertAlmostEqual(acc, bound, delta=_tolerance(bound))

  def test_cut_layer_dp_rows_reach_bound(self):
    # Two candidate gradients, antipodal and both of norm > C: after clipping they sit at +-C.
    sigma, c, d = 1.0, 0.5, 8
    key_secret, key_noise = jax.random.split(jax.random.key(0))
    secret = jax.random.bernoulli(key_secret, 0.5, (N_DRAWS,))
    direction = jnp.arange(1.0, d + 1.0) / jnp.linalg.norm(jnp.arange(1.0, d + 1.0))
    g = jnp.where(secret[:, None], 3.0, -3.0) * direction
    tx = privacy.cut_layer_dp(c, sigma, key=key_noise)
    sent, _ = jax.jit(tx.update)(g, tx.init(g))
    acc = float(jnp.mean((sent @ direction > 0) == secret))
    bound = privacy.binary_bound(0.5, privacy.per_release_mu(sigma))
    self.assertAlmostEqual(acc, bound, delta=_tolerance(bound))

  def test_closer_candidates_stay_under_bound(self):
    c = 1.0
    for sigma in (0.3, 1.0, 3.0):
      bound = privacy.binary_bound(0.5, privacy.per_release_mu(sigma))
      for dist in np.linspace(0.0, 2 * c, 9):
        best = stats.norm.cdf(dist / (2 * sigma * c))  # Bayes accuracy at distance d
        self.assertLessEqual(best, bound + 1e-12)
      # Empirically too, at distance C.
      rng = np.random.default_rng(1)
      secret = rng.integers(0, 2, N_DRAWS)
      out = np.where(secret == 1, c / 2, -c / 2) + rng.normal(0.0, sigma * c, N_DRAWS)
      acc = np.mean((out > 0) == (secret == 1))
      self.assertLessEqual(acc, bound + _tolerance(bound))


class BinaryBoundTest(parameterized.TestCase):
  def test_half_prior_is_phi_mu_over_two(self):
    mus = np.array([0.0, 0.1, 1.0, 2.0, 5.0, 40.0])
    np.testing.assert_allclose(privacy.binary_bound(0.5, mus), special.ndtr(mus / 2), rtol=1e-14)
    self.assertEqual(privacy.binary_bound(0.5, math.inf), 1.0)

  @parameterized.parameters((0.1, 0.5), (0.3, 1.0), (0.8, 2.5), (0.97, 0.4), (0.5, 3.0))
  def test_equals_brute_force_maximum(self, p, mu):
    alpha = np.linspace(0.0, 1.0, 200_001)
    brute = np.max((1 - p) * (1 - alpha) + p * (1 - privacy.gaussian_tradeoff(alpha, mu)))
    exact = privacy.binary_bound(p, mu)
    self.assertGreaterEqual(exact, brute - 1e-12)
    self.assertAlmostEqual(exact, brute, delta=1e-6)

  def test_monotone_prior_floor_symmetric_vectorised(self):
    p = np.linspace(0.0, 1.0, 41)
    mus = np.array([0.0, 0.05, 0.3, 1.0, 2.0, 4.0, 8.0, 20.0])
    b = privacy.binary_bound(p[:, None], mus[None, :])
    self.assertEqual(b.shape, (41, 8))
    self.assertTrue(np.all(np.diff(b, axis=1) >= -1e-15))
    self.assertTrue(np.all(b >= np.maximum(p, 1 - p)[:, None]))
    np.testing.assert_allclose(b[:, 0], np.maximum(p, 1 - p))
    np.testing.assert_allclose(b, b[::-1], atol=1e-12)
    self.assertTrue(np.all(b <= 1.0))

  def test_mu_hat_inverts_binary_bound(self):
    for p in (0.5, 0.3, 0.8):
      for mu in (0.2, 1.0, 3.0):
        acc = privacy.binary_bound(p, mu)
        m = privacy.mu_hat(acc, p)
        self.assertAlmostEqual(privacy.binary_bound(p, m), acc, delta=1e-12)
        # For skewed priors the bound is flat near mu = 0 (acc - max(p, 1-p) ~ 1e-14 at
        # p = 0.8, mu = 0.2), so mu itself is recovered to ~1e-5 there.
        self.assertAlmostEqual(m, mu, delta=1e-5 if acc - max(p, 1 - p) < 1e-6 else 1e-8)
    self.assertEqual(privacy.mu_hat(0.6, 0.3), 0.0)  # at or below the prior
    self.assertEqual(privacy.mu_hat(0.7, 0.3), 0.0)
    self.assertAlmostEqual(privacy.mu_hat(0.9, 0.5), 2 * special.ndtri(0.9), places=12)
    self.assertEqual(privacy.mu_hat(1.0, 0.5), math.inf)
    np.testing.assert_allclose(
      privacy.mu_hat(np.array([0.5, 0.9]), 0.5), [0.0, 2 * special.ndtri(0.9)]
    )


class ReconstructionBoundTest(absltest.TestCase):
  def test_limits_and_tradeoff(self):
    kappa = np.array([0.05, 0.2, 0.5, 1.0])
    np.testing.assert_allclose(privacy.reconstruction_bound(kappa, 0.0), kappa)
    np.testing.assert_allclose(privacy.reconstruction_bound(kappa, math.inf), 1.0)
    np.testing.assert_allclose(
      privacy.reconstruction_bound(kappa, 1.3),
      1 - privacy.gaussian_tradeoff(kappa, 1.3),
      atol=1e-14,
    )
    self.assertTrue(np.all(np.diff(privacy.reconstruction_bound(0.2, [0.1, 1, 2, 5])) > 0))
    # G_mu is a symmetric trade-off function: G(G(a)) = a; G_0(a) = 1 - a.
    a = np.linspace(0.01, 0.99, 9)
    np.testing.assert_allclose(
      privacy.gaussian_tradeoff(privacy.gaussian_tradeoff(a, 1.5), 1.5), a, atol=1e-12
    )
    np.testing.assert_allclose(privacy.gaussian_tradeoff(a, 0.0), 1 - a, atol=1e-14)
    # For a binary secret the Bayes bound is tighter than the generic one.
    self.assertLess(privacy.binary_bound(0.5, 1.0), privacy.reconstruction_bound(0.5, 1.0))

  def test_prior_and_knn_bounds(self):
    uniform4 = np.full((5, 4), 0.25)
    self.assertAlmostEqual(privacy.knn_bound(uniform4, 0.0), 0.25)
    self.assertAlmostEqual(
      privacy.knn_bound(uniform4, 1.0), privacy.reconstruction_bound(0.25, 1.0)
    )
    post = np.array([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]])
    expect = np.mean(privacy.binary_bound(post[:, 1], 1.0))
    self.assertAlmostEqual(privacy.knn_bound(post, 1.0), expect)
    self.assertAlmostEqual(privacy.prior_bound([0.5, 0.5], 2.0), special.ndtr(1.0))
    self.assertEqual(privacy.knn_bound(post, math.inf), 1.0)

  def test_wrong_inputs_raise(self):
    for call in (
      lambda: privacy.binary_bound(1.2, 1.0),
      lambda: privacy.binary_bound(0.5, -1.0),
      lambda: privacy.binary_bound(0.5, math.nan),
      lambda: privacy.reconstruction_bound(-0.1, 1.0),
      lambda: privacy.mu_hat(1.5, 0.5),
      lambda: privacy.knn_bound(np.ones(3) / 3, 1.0),
      lambda: privacy.knn_bound(np.array([[0.7, 0.7]]), 1.0),
      lambda: privacy.randomized_response_bound(0.5, 0.0),
    ):
      with self.assertRaises(ValueError):
        call()


class RandomizedResponseTest(parameterized.TestCase):
  def test_flip_probability(self):
    self.assertAlmostEqual(privacy.flip_probability(math.log(3.0)), 0.25)
    self.assertEqual(privacy.flip_probability(math.inf), 0.0)
    self.assertAlmostEqual(privacy.flip_probability(1e-9), 0.5)
    for bad in (0.0, -1.0, math.nan):
      with self.assertRaises(ValueError):
        privacy.flip_probability(bad)

  @parameterized.parameters(0.5, 1.0, 2.0, 4.0)
  def test_best_guesser_matches_bound(self, eps):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, N_DRAWS).astype(np.int32)
    noisy = privacy.randomized_response(labels, eps, rng=rng)
    self.assertEqual(noisy.dtype, np.int32)
    acc = np.mean(noisy == labels)  # guess the reported label
    bound = privacy.randomized_response_bound(0.5, eps)
    self.assertAlmostEqual(bound, math.exp(eps) / (1 + math.exp(eps)), places=12)
    self.assertAlmostEqual(acc, bound, delta=_tolerance(bound))
    noisy_jax = privacy.randomized_response_jax(jax.random.key(1), jnp.asarray(labels), eps)
    self.assertEqual(noisy_jax.dtype, jnp.int32)
    acc_jax = float(jnp.mean(noisy_jax == labels))
    self.assertAlmostEqual(acc_jax, bound, delta=_tolerance(bound))

  def test_skewed_prior_and_limits(self):
    self.assertEqual(privacy.randomized_response_bound(0.9, 0.5), 0.9)
    np.testing.assert_allclose(
      privacy.randomized_response_bound(np.array([0.1, 0.5]), 1.0), [0.9, special.expit(1.0)]
    )
    labels = np.array([0, 1, 1, 0])
    np.testing.assert_array_equal(
      privacy.randomized_response(labels, math.inf, rng=np.random.default_rng(0)), labels
    )
    with self.assertRaises(ValueError):
      privacy.randomized_response(np.array([0, 2]), 1.0, rng=np.random.default_rng(0))
    with self.assertRaises(ValueError):
      privacy.randomized_response(np.array([0.0, 1.0]), 1.0, rng=np.random.default_rng(0))
    with self.assertRaises(ValueError):
      privacy.randomized_response_jax(jax.random.key(0), jnp.array([0, 1]), -1.0)
    # Traced epsilon works inside jit.
    rr = jax.jit(privacy.randomized_response_jax)
    out = rr(jax.random.key(0), jnp.zeros(1000, jnp.int32), 1e6)
    self.assertEqual(int(out.sum()), 0)


if __name__ == '__main__':
  absltest.main()
