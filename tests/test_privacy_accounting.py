"""Tests of host-side accounting: closed-form mu-GDP vs dp_accounting, calibration, report."""

import json
import math
import time

import dp_accounting
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from splitjax import privacy
from splitjax.privacy import accounting

DELTA = 1e-5
SIGMAS = (0.01, 0.1, 1.0, 2.0, 10.0)


class ClosedFormTest(parameterized.TestCase):
  def test_paper_check_value(self):
    self.assertAlmostEqual(privacy.epsilon(2.0, 1, DELTA), 4.377, places=3)
    self.assertEqual(privacy.composed_mu(2.0, 1), 1.0)
    self.assertEqual(privacy.composed_mu(0.01, 1), 200.0)
    self.assertAlmostEqual(privacy.composed_mu(1.0, 9), 6.0)

  # Cheap PLD points (composed mu <= 10; each well under a second).
  @parameterized.parameters((2.0, 1), (10.0, 10), (4.0, 1), (10.0, 1), (4.0, 4))
  def test_matches_dp_accounting_pld(self, sigma, k):
    closed = privacy.epsilon(sigma, k, DELTA)
    pld = privacy.dp_accounting_epsilon(sigma, k, DELTA, accountant='pld')
    self.assertAlmostEqual(closed / pld, 1.0, delta=1e-3)

  def test_matches_analytic_gaussian_everywhere(self):
    # mu-GDP == Gaussian of sensitivity 1 and std 1/mu (Balle & Wang's analytic epsilon).
    for sigma in SIGMAS:
      for k in (1, 10, 20):
        mu = privacy.composed_mu(sigma, k)
        ref = dp_accounting.get_epsilon_gaussian(1.0 / mu, DELTA)
        self.assertAlmostEqual(privacy.epsilon(sigma, k, DELTA) / ref, 1.0, delta=1e-9)

  def test_rdp_is_an_upper_bound(self):
    for sigma in SIGMAS:
      for k in (1, 10):
        closed = privacy.epsilon(sigma, k, DELTA)
        rdp = privacy.dp_accounting_epsilon(sigma, k, DELTA, accountant='rdp')
        self.assertGreaterEqual(rdp, closed)
        self.assertLess(rdp, 1.2 * closed)  # and not absurdly loose

  def test_paper_sigma_is_finite_and_fast(self):
    start = time.perf_counter()
    for k in range(1, 21):
      eps = privacy.epsilon(0.01, k, DELTA)
      self.assertTrue(math.isfinite(eps))
      self.assertGreater(eps, 2e4)
    self.assertLess(time.perf_counter() - start, 1.0)
    self.assertTrue(math.isfinite(privacy.epsilon(1e-6, 100, DELTA)))

  def test_safe_side_and_delta_round_trip(self):
    for mu in (1e-3, 0.1, 1.0, 3.0, 30.0, 200.0, 900.0):
      for delta in (1e-10, 1e-5, 0.1):
        eps = privacy.epsilon_for_delta(mu, delta)
        self.assertLessEqual(privacy.delta_for_epsilon(mu, eps), delta)
        if eps > 0:
          self.assertGreater(privacy.delta_for_epsilon(mu, eps * (1 - 1e-6) - 1e-9), delta)

  def test_epsilon_falls_as_sigma_grows(self):
    sigmas = np.geomspace(0.005, 100.0, 60)
    for k in (1, 10):
      eps = [privacy.epsilon(s, k, DELTA) for s in sigmas]
      self.assertTrue(np.all(np.diff(eps) < 0))
    self.assertLess(privacy.epsilon(2.0, 1, DELTA), privacy.epsilon(2.0, 10, DELTA))

  def test_limits(self):
    self.assertEqual(privacy.epsilon(0.0, 1, DELTA), math.inf)
    self.assertEqual(privacy.epsilon(math.inf, 5, DELTA), 0.0)
    self.assertEqual(privacy.epsilon(1.0, 0, DELTA), 0.0)
    self.assertEqual(privacy.delta_for_epsilon(0.0, 1.0), 0.0)
    self.assertEqual(privacy.delta_for_epsilon(math.inf, 1.0), 1.0)
    self.assertEqual(privacy.dp_accounting_epsilon(0.0, 3, DELTA), math.inf)
    self.assertEqual(privacy.dp_accounting_epsilon(math.inf, 3, DELTA, accountant='rdp'), 0.0)
    # Large delta: 0-DP already.
    self.assertEqual(privacy.epsilon_for_delta(0.01, 0.5), 0.0)

  def test_wrong_inputs_raise(self):
    bad_calls = [
      lambda: privacy.epsilon(-1.0, 1, DELTA),
      lambda: privacy.epsilon(math.nan, 1, DELTA),
      lambda: privacy.epsilon(1.0, -1, DELTA),
      lambda: privacy.epsilon(1.0, 1.5, DELTA),
      lambda: privacy.epsilon(1.0, 1, 0.0),
      lambda: privacy.epsilon(1.0, 1, 1.0),
      lambda: privacy.delta_for_epsilon(1.0, -1.0),
      lambda: privacy.dp_accounting_epsilon(1.0, 1, DELTA, accountant='moments'),
      lambda: privacy.dp_accounting_epsilon(0.1, 1, DELTA, accountant='pld'),  # mu = 20
      lambda: privacy.calibrate_noise_multiplier(
        target_epsilon=0.0, target_delta=DELTA, releases=1
      ),
      lambda: privacy.calibrate_noise_multiplier(target_epsilon=1.0, target_delta=2.0, releases=1),
    ]
    for call in bad_calls:
      with self.assertRaises(ValueError):
        call()
    with self.assertRaisesRegex(ValueError, 'rdp'):
      privacy.dp_accounting_epsilon(0.1, 1, DELTA)
    with self.assertRaises(TypeError):
      privacy.calibrate_noise_multiplier(1.0, DELTA, 1)  # keyword-only

  def test_dp_event_has_default_relation_and_half_sigma(self):
    event = privacy.dp_event(2.0, 10)
    self.assertEqual(
      event, dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 10)
    )


class CalibrateTest(parameterized.TestCase):
  @parameterized.product(target_epsilon=(0.5, 1.0, 4.0, 16.0, 1e4), releases=(1, 10, 100))
  def test_round_trip_at_or_under_target(self, target_epsilon, releases):
    sigma = privacy.calibrate_noise_multiplier(
      target_epsilon=target_epsilon, target_delta=DELTA, releases=releases
    )
    eps = privacy.epsilon(sigma, releases, DELTA)
    self.assertLessEqual(eps, target_epsilon)
    self.assertGreaterEqual(eps, 0.99 * target_epsilon)

  def test_recovers_sigma_two(self):
    target = privacy.epsilon(2.0, 1, DELTA)
    sigma = privacy.calibrate_noise_multiplier(
      target_epsilon=target, target_delta=DELTA, releases=1
    )
    self.assertAlmostEqual(sigma, 2.0, delta=1e-4)
    self.assertGreaterEqual(sigma, 2.0 * (1 - 1e-9))

  def test_limits(self):
    kw = dict(target_delta=DELTA)
    self.assertEqual(
      privacy.calibrate_noise_multiplier(target_epsilon=math.inf, releases=3, **kw), 0.0
    )
    self.assertEqual(privacy.calibrate_noise_multiplier(target_epsilon=1.0, releases=0, **kw), 0.0)


class PrivacyReportTest(absltest.TestCase):
  def test_keys_values_and_json(self):
    report = privacy.privacy_report(noise_multiplier=2.0, l2_clip_norm=0.5, releases=1, delta=DELTA)
    for key in (
      'noise_multiplier',
      'l2_clip_norm',
      'releases',
      'sensitivity',
      'neighbouring_relation',
      'mu',
      'epsilon',
      'attack_epsilon',
      'device_epsilon',
      'total_epsilon',
      'delta',
      'accountant',
      'ledger',
    ):
      self.assertIn(key, report)
    self.assertNotIn('label_epsilon', report)
    self.assertEqual(report['sensitivity'], 1.0)
    self.assertEqual(report['neighbouring_relation'], 'replace-one')
    self.assertEqual(report['accountant'], 'closed-form mu-GDP')
    self.assertAlmostEqual(report['epsilon'], 4.377, places=3)
    self.assertEqual(report['epsilon'], report['attack_epsilon'])
    self.assertEqual(report['device_epsilon'], 'inf')
    self.assertEqual(report['total_epsilon'], 'inf')
    json.dumps(report, allow_nan=False)

  def test_training_vs_attack_and_device_composition(self):
    report = privacy.privacy_report(
      noise_multiplier=2.0,
      l2_clip_norm=1.0,
      releases=10,
      delta=DELTA,
      device_noise_multiplier=4.0,
      label_epsilon=1.0,
    )
    self.assertAlmostEqual(report['epsilon'], privacy.epsilon(2.0, 10, DELTA))
    self.assertAlmostEqual(report['attack_epsilon'], privacy.epsilon(2.0, 1, DELTA))
    self.assertAlmostEqual(report['device_epsilon'], privacy.epsilon(4.0, 10, DELTA))
    mu_total = math.hypot(privacy.composed_mu(2.0, 10), privacy.composed_mu(4.0, 10))
    self.assertAlmostEqual(report['total_epsilon'], privacy.epsilon_for_delta(mu_total, DELTA))
    self.assertGreater(report['total_epsilon'], report['epsilon'])
    self.assertEqual(report['label_epsilon'], 1.0)
    json.dumps(report, allow_nan=False)

  def test_no_noise_is_inf_strings(self):
    report = privacy.privacy_report(
      noise_multiplier=0.0, l2_clip_norm=math.inf, releases=2, delta=DELTA, label_epsilon=math.inf
    )
    for key in (
      'l2_clip_norm',
      'sensitivity',
      'mu',
      'epsilon',
      'attack_epsilon',
      'total_epsilon',
      'label_epsilon',
    ):
      self.assertEqual(report[key], 'inf', key)
    json.dumps(report, allow_nan=False)
    with self.assertRaises(ValueError):
      privacy.privacy_report(noise_multiplier=1.0, l2_clip_norm=math.inf, releases=1, delta=DELTA)
    with self.assertRaises(ValueError):
      privacy.privacy_report(
        noise_multiplier=1.0, l2_clip_norm=1.0, releases=1, delta=DELTA, device_releases=3
      )
    self.assertEqual(accounting.NEIGHBOURING_RELATION, 'replace-one')


if __name__ == '__main__':
  absltest.main()
