"""``experiments.attack`` on a workdir trained with ``--defense=batch_average``: the joint attack.

Under ``batch_average`` every row of a device's batch carries the batch's mean cut gradient, so
the per-row attacks have nothing row-specific to match. The adaptive attack here solves each
batch jointly (`splitjax.attacks.joint.attack_batches`): test users are replayed in consecutive
batches of ``--joint_batch_size`` rows (0: the workdir's training batch size, the batch the
device actually averages over), the server knows which rows shared a release, and a batch whose
best answer does not fit its release is answered from the prior (its features at the informed
prior's mode, its label by the batch's positive count). The record is EXACT's (per-secret
accuracy, baselines, the informed prior's paired gain) plus a ``joint`` block: the batch size,
the share of batches that fit, and the positive count's exact-hit rate and mean absolute error
(the trivial leak of an average).
"""

import time

import jax
import numpy as np

from experiments import common
from experiments import pipeline
from splitjax import attacks
from splitjax import evaluation

NAME = "joint"


def has_batch_average(restored) -> bool:
  chain = pipeline.defense_plan(restored.config)
  if chain is None:
    return False
  return any(d.name == "batch_average" for d in chain.pre + chain.between + chain.post)


def batch_size_of(restored, config) -> int:
  """The rows per release the attack assumes: ``--joint_batch_size`` or the training batch."""
  if config.joint_batch_size:
    return int(config.joint_batch_size)
  recipe, _, _ = pipeline.clamped_sizes(restored.config, len(restored.dataset.train.y))
  return int(recipe.batch_size)


def check(restored, config) -> None:
  """UsageError unless the joint attack applies to this workdir and configuration."""
  if not has_batch_average(restored):
    raise pipeline.ConfigError(
      "--attack=joint attacks batch-averaged releases: train the workdir with "
      "--defense=batch_average"
    )
  if config.users != "test":
    raise pipeline.ConfigError(
      "--attack=joint replays test users in batches of --joint_batch_size: use --users=test"
    )
  if restored.config.protocol != "sl":
    raise pipeline.ConfigError("--attack=joint is implemented for SL workdirs (--protocol=sl)")
  if restored.dataset.train.priv_dense.shape[1]:
    raise pipeline.ConfigError("--attack=joint enumerates categorical private features only")


def attack(restored, config, clip: float, sigma: float, *, progress=common.progress) -> dict:
  """Runs the joint attack on the workdir's test users -> the attack record (without config)."""
  from experiments import attacking

  check(restored, config)
  dataset = restored.dataset
  batch = batch_size_of(restored, config)
  transcript, _ = attacking.observed_transcript(restored, config, clip, sigma, batch)
  n = transcript.num_rows
  informed = attacking.informed_prior(restored, config, transcript, "test")
  public = attacking.public_of(
    restored,
    clip,
    sigma,
    log_prior=evaluation.marginal_log_prior(dataset),
    user_log_prior=attacks.pair_log_prior(informed.fit.probs, informed.label_noisy_p1),
  )
  bar = common.ProgressPrinter(n, f"attack joint (batches of {batch})", printer=progress)
  t0 = time.time()
  res = attacks.run(
    NAME,
    transcript,
    public,
    batch_size=batch,
    key=jax.random.key(config.seed),
    progress=bar if progress else None,
  )
  seconds = time.time() - t0
  rows = transcript.example_index
  split = dataset.test
  true_feats, true_y = split.priv_cat[rows], split.y[rows]
  record = evaluation.score(
    dataset,
    attacking.setting_of(restored, config),
    restored.model,
    restored.state.server_params,
    transcript,
    res.features,
    res.labels,
    np.ones(n, np.int32),
    true_feats,
    true_y,
    prior="informed",  # the fallback's prior: the prior-only answer and gain are against it
    informed=informed,
  )
  first = np.flatnonzero(np.r_[True, np.diff(res.batch) > 0])  # one row per batch
  truth_count = np.bincount(res.batch, weights=np.asarray(true_y, np.float64))
  record["attack"] = NAME
  record["defense_model"] = "adaptive (joint: the batch's rows solved together)"
  record["joint"] = {
    "batch_size": batch,
    "batches": int(len(first)),
    "fitted_batches": float(np.mean(res.fitted[first])),
    "positive_count_exact": float(np.mean(res.positives[first] == truth_count)),
    "positive_count_mae": float(np.mean(np.abs(res.positives[first] - truth_count))),
    "note": (
      "batches whose answer does not fit the release (relative residual > 1e-6) are answered "
      "from the informed prior (features) and the positive count (label)"
    ),
  }
  record.update({"attack_seconds": seconds, "users_per_second": n / max(seconds, 1e-9)})
  return record
