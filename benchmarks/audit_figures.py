r"""The cut-channel audit's figures: expected vs reached bounds, and three sabotages caught.

  python -m benchmarks.audit_figures                 # adult's model, sigma 2 (mu 1), seed 0
  python -m benchmarks.audit_figures --dataset=synthetic --trials=100000

Prints Markdown tables (figures for BUILD_NOTES.md):

1. expected (an exact mu-GDP Gaussian test's expected counts) vs reached (the test replay) mu and
   epsilon lower bounds at 1e4, 1e5 and 1e6 trials per label;
2. sabotage at the default trials: (A) the mechanism adds half the accounted noise; (B) an
   accountant with sensitivity C instead of 2C; (C) one noise draw shared by two releases (the
   training loop's epoch run twice from the same key), caught by the two-sided check of the
   k = 2 training-path audit.
"""

import dataclasses
import sys
import time

import numpy as np
from absl import app
from absl import flags

from experiments import common
from experiments import pipeline
from experiments.configs import base
from splitjax import audit
from splitjax import training
from splitjax.privacy import accounting

_SIGMA = flags.DEFINE_float("sigma", 2.0, "Accounted noise multiplier.")
_TRIALS = flags.DEFINE_integer("trials", 1_000_000, "Replays per label at the default.")
_TRAIN_TRIALS = flags.DEFINE_integer("training_trials", 100_000, "Canaries per label, k = 2.")


def _row(*cells) -> str:
  return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv):
  del argv
  cfg = dataclasses.replace(base.TrainConfig(), dataset=common.DATASET.value)
  data = pipeline.load_data(cfg)
  model = pipeline.model_of(cfg, data)
  state = audit.audit_state(model, 4096, 2, 0)
  canary = audit.find_cut_canary(model, state, data.train)
  sigma = _SIGMA.value
  mu, eps = audit.cut_accounting(sigma, 1, audit.DELTA)

  def replay(sigma_sent, trials):
    dp = training.DPConfig(np.float32(canary.l2_clip_norm), np.float32(sigma_sent)).as_arrays()
    t0 = time.perf_counter()
    c = audit.audit_replay(
      model,
      state,
      data.train,
      canary,
      dp,
      noise_multiplier=sigma,
      trials=trials,
      thresholds=audit.check_thresholds(mu),
    )
    return c, time.perf_counter() - t0

  print(f"{common.DATASET.value} model, canary row {canary.row}, C = {canary.l2_clip_norm:.4g}; ")
  print(f"accounted sigma {sigma:g}: mu {mu:.4f}, epsilon {eps:.4f} at delta {audit.DELTA:g}\n")
  print(
    _row(
      "trials per label",
      "mu lower expected",
      "mu lower reached",
      "eps lower expected",
      "eps lower reached",
      "two-sided mu [CI]",
      "replay s",
    )
  )
  print(_row(*["---"] * 7))
  for n in (10_000, 100_000, 1_000_000):
    e = audit.gaussian_counts(mu, n)
    c, secs = replay(sigma, n)
    t = audit.two_sided(c, mu)
    print(
      _row(
        f"{n:,}",
        f"{audit.mu_lower(e):.4f}",
        f"{audit.mu_lower(c):.4f}",
        f"{audit.epsilon_lower(e):.3f}",
        f"{audit.epsilon_lower(c):.3f}",
        f"{t['mu_estimate']:.4f} [{t['mu_interval'][0]:.4f}, {t['mu_interval'][1]:.4f}]",
        f"{secs:.1f}",
      )
    )
  n = _TRIALS.value
  print("\n" + _row("sabotage", "mu accounted", "mu lower", "eps accounted", "eps lower", "caught"))
  print(_row(*["---"] * 6))
  c, _ = replay(sigma / 2, n)
  s = audit.summary(c, mu_accounted=mu, epsilon_accounted=eps)
  print(
    _row(
      "(A) half the noise sent",
      f"{mu:.3f}",
      f"{s['mu_lower']:.3f}",
      f"{eps:.3f}",
      f"{s['epsilon_lower']:.3f}",
      not s["consistent"],
    )
  )
  c, _ = replay(sigma, n)
  wrong_mu = 1.0 / sigma
  wrong_eps = accounting.epsilon_for_delta(wrong_mu, audit.DELTA)
  s = audit.summary(c, mu_accounted=wrong_mu, epsilon_accounted=wrong_eps)
  print(
    _row(
      "(B) accountant with sensitivity C",
      f"{wrong_mu:.3f}",
      f"{s['mu_lower']:.3f}",
      f"{wrong_eps:.3f}",
      f"{s['epsilon_lower']:.3f}",
      not s["consistent"],
    )
  )
  m = _TRAIN_TRIALS.value
  bits = np.arange(2 * m, dtype=np.int32) % 2
  split = audit.repeat_row(data.train, canary.row, bits)
  dp = training.DPConfig(np.float32(canary.l2_clip_norm), np.float32(sigma)).as_arrays()
  mu2, eps2 = audit.cut_accounting(sigma, 2, audit.DELTA)
  for name, epochs in (
    (
      "(C) control: two epochs of the training loop",
      audit.training_transcripts(model, split, dp, epochs=2, seed=0),
    ),
    (
      "(C) one noise draw in both releases",
      [audit.training_transcripts(model, split, dp, epochs=1, seed=0)[0] for _ in range(2)],
    ),
  ):
    stat, _ = audit.release_statistics(epochs, canary, sigma, len(bits))
    c = audit.count(stat, bits, audit.check_thresholds(mu2))
    s = audit.summary(c, mu_accounted=mu2, epsilon_accounted=eps2)
    t = audit.two_sided(c, mu2)
    lo, hi = t["mu_interval"]
    print(
      _row(
        f"{name} ({m:,} per label)",
        f"{mu2:.3f}",
        f"{s['mu_lower']:.3f}",
        f"{eps2:.3f}",
        f"{s['epsilon_lower']:.3f}",
        f"{not t['passed']} (mu at t = mu/2: {t['mu_estimate']:.3f} [{lo:.3f}, {hi:.3f}])",
      )
    )
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
