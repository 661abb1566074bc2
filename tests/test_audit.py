"""splitjax.audit: valid statistics, the cut and label channels through the real code paths, and
sabotaged mechanisms or accountants caught (less noise, the wrong sensitivity, shared noise, a
fresh label draw per epoch)."""

import json
import math

import numpy as np
import pytest
import splits
from absl.testing import flagsaver
from scipy import special

from experiments import audit as audit_bin
from splitjax import audit
from splitjax import training
from splitjax.privacy import accounting
from splitjax.privacy import label_dp

SIGMA = 2.0  # mu = 1 per release, epsilon 4.377 at delta 1e-5
N_REPLAY = 100_000  # trials per label of the replay tests (the binary's default is 1e6)
N_TRAIN = 20_000  # canaries per label through the training loop


# --- the statistics ----------------------------------------------------------------------------


def test_clopper_pearson_edges_and_coverage():
  lo, hi = audit.clopper_pearson(0, 1000, 0.05)
  assert lo == 0.0 and hi == pytest.approx(1 - 0.05 ** (1 / 1000), rel=1e-9)
  lo, hi = audit.clopper_pearson(1000, 1000, 0.05)
  assert hi == 1.0 and lo == pytest.approx(0.05 ** (1 / 1000), rel=1e-9)
  # Coverage: over 2,000 binomial draws the one-sided 5 % bounds miss p about 5 % of the time.
  rng = np.random.default_rng(0)
  k = rng.binomial(200, 0.3, 2000)
  lo, hi = audit.clopper_pearson(k, 200, 0.05)
  assert 0.02 < np.mean(lo > 0.3) <= 0.06 and 0.02 < np.mean(hi < 0.3) <= 0.06


def test_bounds_of_an_exact_gaussian_approach_mu_from_below():
  c = audit.gaussian_counts(1.0, 10**6)
  m, e = audit.mu_lower(c), audit.epsilon_lower(c, 1e-5)
  assert 0.97 <= m < 1.0
  assert 0.65 * 4.377 <= e < accounting.epsilon_for_delta(1.0, 1e-5)
  # Fewer trials: weaker but still valid bounds, in order.
  small = [audit.mu_lower(audit.gaussian_counts(1.0, n)) for n in (10**4, 10**5, 10**6)]
  assert small[0] < small[1] < small[2] < 1.0


def test_bounds_are_valid_on_sampled_gaussian_tests():
  rng = np.random.default_rng(1)
  for mu in (0.5, 1.0, 2.0):
    stat = np.concatenate([rng.normal(0, 1, 50_000), rng.normal(mu, 1, 50_000)])
    bits = np.repeat([0, 1], 50_000)
    c = audit.count(stat, bits)
    assert audit.mu_lower(c) <= mu
    assert audit.epsilon_lower(c, 1e-5) <= accounting.epsilon_for_delta(mu, 1e-5)
    assert audit.mu_lower(c) > 0.85 * mu


def test_epsilon_lower_uses_both_inequalities():
  # TPR 0.99, FPR 0.5: TPR <= e^eps FPR gives log 1.98; TNR <= e^eps FNR gives log 50.
  n = 10**7
  c = audit.Counts(np.array([1.0]), np.array([0.99 * n]), np.array([0.5 * n]), n, n)
  tpr_lo, fpr_hi = (
    audit.clopper_pearson(np.array([0.99 * n, 0.5 * n]), n, 0.025)[0][0],
    (audit.clopper_pearson(0.5 * n, n, 0.025)[1]),
  )
  second = math.log((1 - fpr_hi - 1e-5) / (1 - tpr_lo))
  assert audit.epsilon_lower(c, 1e-5) == pytest.approx(second, rel=1e-9)
  assert second > 3.8


def test_post_hoc_threshold_would_inflate_and_the_grid_does_not():
  # Choosing the best of 2,000 thresholds on the same data and bounding at that threshold alone
  # overshoots the true epsilon; the pre-registered grid with Bonferroni does not.
  rng = np.random.default_rng(2)
  n, mu = 5000, 1.0
  eps_true = accounting.epsilon_for_delta(mu, 1e-5)
  stat = np.concatenate([rng.normal(0, 1, n), rng.normal(mu, 1, n)])
  bits = np.repeat([0, 1], n)
  fine = np.linspace(0, 6, 2000)
  c = audit.count(stat, bits, fine)
  tpr_lo, _ = audit.clopper_pearson(c.positives, n, 0.025)
  _, fpr_hi = audit.clopper_pearson(c.negatives, n, 0.025)
  with np.errstate(divide="ignore", invalid="ignore"):
    naive = np.nanmax(np.where(c.negatives > 0, np.log((tpr_lo - 1e-5) / fpr_hi), np.nan))
  assert audit.epsilon_lower(audit.count(stat, bits), 1e-5) < eps_true
  assert naive > audit.epsilon_lower(audit.count(stat, bits), 1e-5)


def test_pure_randomized_response_bound():
  q = label_dp.flip_probability(1.0)
  n = 10**6
  c = audit.Counts(np.array([0.5]), np.array([n * (1 - q)]), np.array([n * q]), n, n)
  assert 0.98 < audit.epsilon_lower(c, 0.0) < 1.0


def test_one_run_bound_saturation_and_monotone():
  assert audit.one_run_saturation(1000) == pytest.approx(5.78, abs=0.01)
  assert audit.one_run_saturation(10_000) == pytest.approx(7.83, abs=0.01)
  # Without delta the p-value is the binomial tail; more correct guesses give a higher bound.
  assert audit.one_run_p_value(100, 100, 80, 1.0, 0.0) == pytest.approx(
    float(special.bdtrc(79, 100, special.expit(1.0))), rel=1e-9
  )
  bounds = [audit.one_run_epsilon_lower(1000, 200, v) for v in (120, 150, 180, 200)]
  assert bounds == sorted(bounds) and bounds[0] < bounds[-1]
  # Chance-level guessing gives nothing.
  assert audit.one_run_epsilon_lower(1000, 1000, 500) == 0.0


# --- the cut channel through the code paths ---------------------------------------------------


@pytest.fixture(scope="module")
def cut():
  split = splits.split(256, seed=3)
  state = audit.audit_state(splits.MODEL, 4096, 2, 0)
  canary = audit.find_cut_canary(splits.MODEL, state, split)
  return split, state, canary


def _dp(canary, sigma):
  return training.DPConfig(np.float32(canary.l2_clip_norm), np.float32(sigma)).as_arrays()


def test_canary_is_the_worst_case_pair(cut):
  split, state, canary = cut
  assert np.linalg.norm(canary.clip0) == pytest.approx(canary.l2_clip_norm, rel=1e-5)
  assert np.linalg.norm(canary.clip1 - canary.clip0) == pytest.approx(
    2 * canary.l2_clip_norm, rel=1e-5
  )
  with pytest.raises(audit.AuditError, match="--dp_clip"):
    audit.find_cut_canary(splits.MODEL, state, split, 2 * canary.margin)


def _replay(cut, sigma_mechanism, trials=N_REPLAY):
  split, state, canary = cut
  return audit.audit_replay(
    splits.MODEL,
    state,
    split,
    canary,
    _dp(canary, sigma_mechanism),
    noise_multiplier=SIGMA,
    trials=trials,
    thresholds=audit.check_thresholds(2 / SIGMA),
  )


def test_replay_audit_is_tight_and_two_sided(cut):
  c = _replay(cut, SIGMA)
  s = audit.summary(c, mu_accounted=1.0, epsilon_accounted=accounting.epsilon(SIGMA, 1, 1e-5))
  assert s["consistent"] and 0.95 <= s["mu_lower"] <= 1.0
  assert audit.two_sided(c, 1.0)["passed"]
  # Too much noise (sigma 3 sent, 2 accounted) is valid but fails the two-sided check.
  c3 = _replay(cut, 3.0)
  assert audit.mu_lower(c3) < 1.0 and not audit.two_sided(c3, 1.0)["passed"]


def test_sabotage_half_noise_and_wrong_sensitivity_are_caught(cut):
  eps = accounting.epsilon(SIGMA, 1, 1e-5)
  # (A) the mechanism adds half the accounted noise.
  c = _replay(cut, SIGMA / 2)
  s = audit.summary(c, mu_accounted=1.0, epsilon_accounted=eps)
  assert s["mu_lower"] > 1.0 and s["epsilon_lower"] > eps and not s["consistent"]
  # (B) an accountant with sensitivity C instead of 2C: mu 1 / sigma.
  c = _replay(cut, SIGMA)
  wrong_mu = 1.0 / SIGMA
  wrong_eps = accounting.epsilon_for_delta(wrong_mu, 1e-5)
  s = audit.summary(c, mu_accounted=wrong_mu, epsilon_accounted=wrong_eps)
  assert s["mu_lower"] > wrong_mu and s["epsilon_lower"] > wrong_eps and not s["consistent"]


def test_training_loop_releases_and_shared_noise_caught(cut):
  split, _, canary = cut
  bits = np.arange(2 * N_TRAIN, dtype=np.int32) % 2
  canaries = audit.repeat_row(split, canary.row, bits)
  dp = _dp(canary, SIGMA)
  mu2 = accounting.composed_mu(SIGMA, 2)
  epochs = audit.training_transcripts(splits.MODEL, canaries, dp, epochs=2, seed=0)
  stat, k = audit.release_statistics(epochs, canary, SIGMA, len(bits))
  assert np.all(k == 2)
  c = audit.count(stat, bits, audit.check_thresholds(mu2))
  assert audit.two_sided(c, mu2)["passed"] and audit.mu_lower(c) <= mu2
  # (C) the same noise in both releases (one epoch run twice from the same key).
  once = [
    audit.training_transcripts(splits.MODEL, canaries, dp, epochs=1, seed=0)[0] for _ in range(2)
  ]
  np.testing.assert_array_equal(once[0].g, once[1].g)
  stat, _ = audit.release_statistics(once, canary, SIGMA, len(bits))
  c = audit.count(stat, bits, audit.check_thresholds(mu2))
  check = audit.two_sided(c, mu2)
  assert not check["passed"] and check["mu_interval"][1] < mu2


def test_label_channel_catches_a_fresh_draw_per_epoch(cut):
  split, state, canary = cut
  n = 2 * N_TRAIN
  bits = audit.key_bits(5, n)
  canaries = audit.repeat_row(split, canary.row, bits)
  nodp = training.no_dp()
  draw = lambda seed: label_dp.randomized_response(bits, 1.0, rng=np.random.default_rng(seed))
  once = draw(0)
  epochs = audit.training_transcripts(splits.MODEL, canaries, nodp, epochs=2, seed=0, labels=once)
  reads = audit.label_reads(epochs, canary.clip0, n)
  assert np.array_equal(reads == 2, once == 1) and np.all((reads == 0) | (reads == 2))
  good = audit.epsilon_lower(audit.count(reads, bits, audit.label_thresholds(2)), 0.0)
  assert 0.85 < good <= 1.0
  # A fresh draw per epoch composes to 2 epsilon: the joint test sees it.
  fresh = [
    audit.training_transcripts(splits.MODEL, canaries, nodp, epochs=1, seed=0, labels=draw(s))[0]
    for s in (0, 1)
  ]
  reads = audit.label_reads(fresh, canary.clip0, n)
  bad = audit.epsilon_lower(audit.count(reads, bits, audit.label_thresholds(2)), 0.0)
  assert bad > 1.2


# --- the binary -------------------------------------------------------------------------------


def test_binary_cut_and_label_records(tmp_path, capsys):
  work = tmp_path / "cut"
  with flagsaver.flagsaver(
    workdir=str(work),
    config="synthetic_tiny",
    channel="cut",
    dp_noise_multiplier=SIGMA,
    trials=20_000,
    training_trials=5_000,
  ):
    audit_bin.main([])
  rec = json.loads((work / "audit.json").read_text())
  for key in (
    "channel",
    "epsilon_accounted",
    "epsilon_lower",
    "mu_accounted",
    "mu_lower",
    "delta",
    "confidence",
    "trials",
    "saturation",
    "environment",
    "training",
    "two_sided",
  ):
    assert key in rec, key
  assert rec["trials"] == 20_000 and rec["mu_accounted"] == 1.0 and rec["consistent"]
  assert rec["training"]["releases"] == 2 and rec["training"]["consistent"]
  assert "two-sided check" in capsys.readouterr().out
  # Another request in the same workdir is refused; the record stays.
  with flagsaver.flagsaver(
    workdir=str(work),
    config="synthetic_tiny",
    channel="cut",
    dp_noise_multiplier=1.0,
    trials=20_000,
    training_trials=5_000,
  ):
    with pytest.raises(ValueError, match="another configuration"):
      audit_bin.main([])
  assert json.loads((work / "audit.json").read_text())["mu_accounted"] == 1.0

  work = tmp_path / "label"
  with flagsaver.flagsaver(
    workdir=str(work), config="synthetic_tiny", channel="label", label_dp_epsilon=1.0, trials=20_000
  ):
    audit_bin.main([])
  rec = json.loads((work / "audit.json").read_text())
  assert rec["mu_lower"] is None and rec["epsilon_accounted"] == 1.0
  assert 0.8 < rec["epsilon_lower_pure"] <= 1.0 and rec["reads_agree_with_trained_labels"] == 1.0


@pytest.mark.parametrize(
  "flags_, message",
  [
    (dict(channel="label"), "--label_dp_epsilon"),
    (dict(channel="cut", dp_noise_multiplier=0.0), "finite positive noise"),
    (dict(channel="label", label_dp_epsilon=1.0, audit_epochs=1), "at least 2 epochs"),
    (dict(channel="cut", dp_noise_multiplier=1.0, confidence=1.5), "--confidence"),
    (dict(channel="pipeline", protocol="fsl", trials=1000), "lower --trials"),
  ],
)
def test_binary_bad_flags_one_line_nothing_written(tmp_path, flags_, message):
  work = tmp_path / "w"
  with flagsaver.flagsaver(workdir=str(work), config="synthetic_tiny", **flags_):
    with pytest.raises(ValueError, match=message):
      audit_bin.main([])
  assert not work.exists()


def test_epsilon_accounted_note_where_infinite():
  c = audit.gaussian_counts(1.0, 1000)
  s = audit.summary(c, mu_accounted=math.inf, epsilon_accounted=math.inf)
  assert s["epsilon_accounted"] is None and "infinite" in s["epsilon_accounted_note"]


# --- the pipeline (one run, m canaries) ---------------------------------------------------------


def test_canaries_one_per_fsl_device_and_bits_from_the_audit_key():
  import dataclasses

  from experiments import pipeline
  from experiments.configs import base

  cfg = dataclasses.replace(base.TrainConfig(), protocol="fsl", audit_canaries=20)
  rows, bits = pipeline.canaries(cfg, 400)
  part = training.device_partition(400, cfg.samples_per_device, cfg.seed)
  device_of = {int(e): d for d, row in enumerate(part) for e in row if e >= 0}
  assert len({device_of[int(r)] for r in rows}) == 20
  assert set(np.unique(bits)) == {0, 1}
  np.testing.assert_array_equal(bits, audit.canary_bits(cfg.seed, 20))
  with pytest.raises(ValueError, match="lower --trials"):
    pipeline.canaries(dataclasses.replace(cfg, audit_canaries=26), 400)


@pytest.mark.parametrize("protocol", ["sl", "fsl"])
def test_pipeline_audit_without_dp_reaches_saturation(tmp_path, protocol):
  work = tmp_path / protocol
  with flagsaver.flagsaver(
    workdir=str(work), config="synthetic_tiny", channel="pipeline", protocol=protocol, trials=20
  ):
    audit_bin.main([])
  rec = json.loads((work / "audit.json").read_text())
  assert rec["trials"] == 20 and rec["epsilon_accounted"] is None
  assert "infinite" in rec["epsilon_accounted_note"]
  full = [t for t in rec["tried"] if t["guesses"] == 20]
  # Without any DP every canary's label is read exactly (SL: the releases; FSL: the update too).
  assert all(t["correct"] == 20 for t in full)
  assert rec["epsilon_lower"] == pytest.approx(rec["saturation"]["epsilon_lower"], rel=1e-6)
  if protocol == "fsl":
    assert rec["update_matched_exactly"] == 1.0
