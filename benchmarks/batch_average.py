"""How much a batch-averaged release leaks, by batch size: the joint attack and the positive count.

On a trained workdir (any topology `device_top` model; typically one trained with
``--defense=batch_average``), the first ``--num_rows`` test users are grouped into batches of
``B`` rows; each batch's release is the mean of its rows' cut gradients (what ``batch_average``
sends); `splitjax.attacks.joint.joint_attack` recovers every row's private features and label
jointly and `positive_count` reads the number of positives. Printed per ``B``: each private
feature's accuracy beside its majority-prior accuracy, the label's, the share of rows with every
secret right, the share of batches where the answer explains the release worse than the truth
does (a search miss, not a lack of identifiability), the count's exact-hit rate and mean
absolute error, and seconds per batch.

  python -m experiments.train --config=adult --defense=batch_average --workdir=workdirs/avg
  python -m benchmarks.batch_average --workdir=workdirs/avg --batch_sizes=1,2,4,8,16,32

The prior over pairs is the product of the training rows' marginals (the server's public
knowledge of the population) times the label's base rate.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from experiments import pipeline
from splitjax import models
from splitjax import protocol
from splitjax.attacks import joint
from splitjax.attacks import scoring

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "2", "4", "8", "16", "32"], "Batch sizes B.")
_NUM_ROWS = flags.DEFINE_integer("num_rows", 256, "Test users attacked per batch size.")
_BEAM = flags.DEFINE_integer("beam_width", 256, "The joint attack's beam width.")
_STARTS = flags.DEFINE_integer("num_starts", 16, "Beam assignments refined by coordinate sweeps.")
_PAIR_SWEEPS = flags.DEFINE_integer("pair_sweeps", 0, "Sweeps of exact two-row moves.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON file for the table.")


def pair_prior(train, cards, table) -> np.ndarray:
  """[2 C] product of the training rows' marginals of each private feature, times P(y)."""
  p = np.ones(len(table))
  for j, k in enumerate(cards):
    freq = np.bincount(train.priv_cat[:, j], minlength=k) / len(train.priv_cat)
    p *= freq[table[:, j]]
  rate = float(np.mean(train.y))
  return np.stack([p * (1 - rate), p * rate], axis=1).reshape(-1)


def _index(table: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """Each row's index in the candidate table (rows [n, P] -> [n])."""
  lookup = {tuple(r): i for i, r in enumerate(table.tolist())}
  return np.asarray([lookup[tuple(r)] for r in rows.tolist()], np.int32)


def main(argv):
  del argv
  restored = pipeline.Restored(flags.FLAGS.workdir)  # --workdir: experiments.common's flag
  model, state, data = restored.model, restored.state, restored.dataset
  if model.spec.num_priv_dense:
    raise app.UsageError("the joint attack enumerates categorical private features only")
  theta = jax.tree.map(jnp.asarray, state.server_params)
  phi = jax.tree.map(jnp.asarray, state.device_params)
  cards = tuple(data.priv_cardinalities)
  table = scoring.candidate_table(cards)
  prior = pair_prior(data.train, cards, table)
  test = data.test
  n = _NUM_ROWS.value
  h = np.asarray(model.encode_batch(theta, test.pub_cat[:n], test.pub_dense[:n]))
  rows = np.asarray(
    protocol.top_step(
      model, phi, h, test.priv_cat[:n], test.priv_dense[:n], test.y[:n], np.ones(n, np.float32)
    ).cut_grads
  )
  x_true, y_true = test.priv_cat[:n], np.asarray(test.y[:n], np.int32)
  majority = [np.bincount(data.train.priv_cat[:, j]).argmax() for j in range(len(cards))]
  prior_acc = [float(np.mean(x_true[:, j] == majority[j])) for j in range(len(cards))]
  label_prior = float(max(np.mean(y_true), 1 - np.mean(y_true)))
  apply = models.device_logit_fn(model)
  simulate = jax.jit(joint.pair_gradients, static_argnums=0)
  attack = jax.jit(joint.joint_attack, static_argnames=("beam_width", "num_starts", "pair_sweeps"))
  count = jax.jit(joint.positive_count)
  table_j = jnp.asarray(table)
  print(
    f"{n} test users; {len(table)} candidates; priors: features {prior_acc}, "
    f"label {label_prior:.3f}"
  )
  print(
    "B | feature acc (prior) | label acc | all secrets | search misses | count exact | "
    "count MAE | s/batch"
  )
  out = []
  for b in map(int, _BATCH_SIZES.value):
    num_batches = n // b
    feats, labels, counts, errs, seconds, misses = [], [], [], [], [], []
    for i in range(num_batches):
      sl = slice(i * b, (i + 1) * b)
      G = simulate(apply, phi, jnp.asarray(h[sl]), table_j)
      g_bar = jnp.asarray(rows[sl].mean(0))
      if i == 0:  # compile outside the timing
        jax.block_until_ready(
          attack(
            G,
            g_bar,
            table_j,
            jax.random.key(0),
            pair_prior=prior,
            beam_width=_BEAM.value,
            num_starts=_STARTS.value,
            pair_sweeps=_PAIR_SWEEPS.value,
          )
        )
      start = time.perf_counter()
      G = jax.block_until_ready(simulate(apply, phi, jnp.asarray(h[sl]), table_j))
      res = attack(
        G,
        g_bar,
        table_j,
        jax.random.key(i),
        pair_prior=prior,
        beam_width=_BEAM.value,
        num_starts=_STARTS.value,
        pair_sweeps=_PAIR_SWEEPS.value,
      )
      k, raw = count(G, g_bar, prior)
      jax.block_until_ready((res, k))
      seconds.append(time.perf_counter() - start)
      feats.append(np.asarray(res.features) == x_true[sl])
      labels.append(np.asarray(res.labels) == y_true[sl])
      counts.append(int(k) == int(y_true[sl].sum()))
      # Search or identifiability: the truth's own residual against the answer's.
      truth = jnp.asarray(2 * _index(table, x_true[sl]) + y_true[sl])
      truth_res = float(jnp.sum(jnp.square(b * g_bar - G[jnp.arange(b), truth].sum(0))))
      misses.append(float(res.residual) > truth_res * (1 + 1e-3) + 1e-9)
      errs.append(abs(float(raw) - y_true[sl].sum()))
    f = np.concatenate(feats)
    lab = np.concatenate(labels)
    row = dict(
      batch_size=b,
      rows=int(len(lab)),
      feature_accuracy=[float(a) for a in f.mean(0)],
      feature_prior=prior_acc,
      label_accuracy=float(lab.mean()),
      label_prior=label_prior,
      all_secrets=float(np.mean(f.all(1) & lab)),
      search_misses=float(np.mean(misses)),
      count_exact=float(np.mean(counts)),
      count_mae=float(np.mean(errs)),
      seconds_per_batch=float(np.median(seconds)),
    )
    out.append(row)
    print(
      f"{b} | "
      + ", ".join(
        f"{a:.3f} ({p:.3f})" for a, p in zip(row["feature_accuracy"], prior_acc, strict=True)
      )
      + f" | {row['label_accuracy']:.3f} | {row['all_secrets']:.3f} | "
      f"{row['count_exact']:.3f} | {row['count_mae']:.2f} | {row['seconds_per_batch']:.3f}"
    )
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
