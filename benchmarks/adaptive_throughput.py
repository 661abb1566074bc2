r"""The adaptive attacks' cost per candidate, against plain float32 EXACT on the same users.

Each defence's adaptive EXACT (`splitjax.attacks.exact(defense=...)`) simulates the defence on
every (candidate, label) pair: the deterministic row transforms (topk, sign, quantize) are applied
to each simulated gradient, label smoothing changes the loss factor, and the randomized defences
(max_norm, marvell, quantize_stochastic) score every pair by their likelihood. This benchmark
times each against unscreened clip-aware float32 EXACT, all on the same users and the model
`experiments.train` builds for the dataset (random parameters), in interleaved rounds (every
contender once per round; median and spread over ``--rounds``, first call with compilation
reported apart). The observed rows are the truth's gradient under the defence (the randomized
ones with their own noise), so the table also gives each contender's share of users with every
secret right. Target (issue 21): at most 3x the plain attack's time for the per-candidate
transforms.

  python -m benchmarks.adaptive_throughput
  python -m benchmarks.adaptive_throughput --dataset=bank --num_users=128 --rounds=5
"""

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from experiments import common  # --dataset: the model's shape (adult, bank, credit)
from splitjax import attacks
from splitjax import defenses
from splitjax import protocol

_USERS = flags.DEFINE_integer("num_users", 256, "Users attacked by every contender.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds (median over them).")
_CLIP = flags.DEFINE_float("clip", 1.0, "The clip norm C of the chains that clip (quantize).")
_CHAINS = flags.DEFINE_multi_string(
  "chain",
  [
    "topk:0.1",
    "sign",
    "clip,quantize:8",
    "label_smoothing:0.1",
    "max_norm",
    "marvell:4",
    "clip,quantize_stochastic:8",
  ],
  "A defence chain, its entries joined by ',' (repeatable).",
)
_JSON = flags.DEFINE_string("json", None, "Optional JSON file for the table.")


def _model(name: str):
  from experiments import pipeline  # pylint: disable=import-outside-toplevel
  from experiments.configs import base  # pylint: disable=import-outside-toplevel
  from splitjax import models  # pylint: disable=import-outside-toplevel

  config = base.TrainConfig(dataset=name)
  data = pipeline.load_data(config)
  model = pipeline.model_of(config, data)
  theta = model.server_init(jax.random.key(1))
  return model, models.device_logit_fn(model), model.device_init(jax.random.key(0)), theta, data


def main(argv):
  del argv
  model, apply, phi, theta, data = _model(common.DATASET.value)
  if model.spec.num_priv_dense:
    raise app.UsageError("EXACT enumerates categorical private features: pick adult, bank, credit")
  n = min(_USERS.value, len(data.test.y))
  test = data.test
  h = np.asarray(model.encode_batch(theta, test.pub_cat[:n], test.pub_dense[:n]))
  cards = tuple(model.spec.priv_cardinalities)
  table = attacks.candidate_table(cards)
  pairs_per_user = 2 * len(table)
  x_true, y_true = test.priv_cat[:n], np.asarray(test.y[:n], np.int32)
  mask = jnp.ones(n, jnp.float32)

  clean = protocol.top_step(model, phi, h, x_true, test.priv_dense[:n], y_true, mask).cut_grads

  merged = [("plain (clip-aware f32)", None)] + [(c, c.split(",")) for c in _CHAINS.value]
  calls = {}
  for name, parts in merged:
    if parts is None:
      obs = clean
      calls[name] = dict(g=obs, kwargs=dict(l2_clip_norm=None))
      continue
    plan = defenses.plan(parts)
    clip = _CLIP.value if "clip" in parts else math.inf
    attack_model, why = defenses.attack_model(plan, 0.0, clip)
    if attack_model is None:
      raise app.UsageError(f"{name}: not modelled ({why})")
    target = y_true * (1 - plan.label_smoothing) + 0.5 * plan.label_smoothing
    g = protocol.top_step(
      model, phi, h, x_true, test.priv_dense[:n], jnp.asarray(target, jnp.float32), mask
    ).cut_grads
    obs, _ = defenses.defended_release(
      g, mask, jax.random.key(7), clip, 0.0, plan, jnp.asarray(y_true)
    )
    kwargs = dict(defense=attack_model, l2_clip_norm=clip if math.isfinite(clip) else None)
    if attack_model.likelihood is not None and attack_model.likelihood.name in (
      defenses.NEEDS_BATCH_INFO
    ):
      info = defenses.batch_info(attack_model.likelihood, g, jnp.asarray(y_true), mask)
      kwargs["defense_info"] = np.repeat(np.asarray(info)[None], n, axis=0)
    calls[name] = dict(g=obs, kwargs=kwargs)

  def run(name):
    c = calls[name]
    return attacks.exact(apply, phi, h, c["g"], cards, **c["kwargs"])

  first, times, right = {}, {name: [] for name in calls}, {}
  for name in calls:
    t0 = time.perf_counter()
    res = jax.block_until_ready(run(name))
    first[name] = time.perf_counter() - t0
    ok = (np.asarray(res.features) == x_true).all(1) & (np.asarray(res.labels) == y_true)
    right[name] = float(ok.mean())
  for _ in range(_ROUNDS.value):
    for name in calls:
      t0 = time.perf_counter()
      jax.block_until_ready(run(name))
      times[name].append(time.perf_counter() - t0)
  base = float(np.median(times[merged[0][0]]))
  print(
    f"{common.DATASET.value}: {n} users x {pairs_per_user} pairs; {jax.devices()[0].platform}; "
    f"median of {_ROUNDS.value} interleaved rounds"
  )
  print("| chain | first call s | median s [min, max] | x plain | ns / pair | every secret |")
  print("|---|---|---|---|---|---|")
  out = []
  for name in calls:
    t = np.asarray(times[name])
    med = float(np.median(t))
    row = dict(
      chain=name,
      first_call_seconds=first[name],
      median_seconds=med,
      min_seconds=float(t.min()),
      max_seconds=float(t.max()),
      ratio_to_plain=med / base,
      ns_per_pair=med / (n * pairs_per_user) * 1e9,
      every_secret=right[name],
    )
    out.append(row)
    print(
      f"| {name} | {first[name]:.2f} | {med:.3f} [{t.min():.3f}, {t.max():.3f}] | "
      f"{med / base:.2f} | {row['ns_per_pair']:.1f} | {right[name]:.3f} |"
    )
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(
        dict(dataset=common.DATASET.value, users=n, pairs=pairs_per_user, rows=out), f, indent=1
      )


if __name__ == "__main__":
  app.run(main)
