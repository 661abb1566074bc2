"""What the adaptive attack knows of a randomized defence's batches (``--defense_model``).

``max_norm`` and ``marvell`` draw each row's noise from statistics of its whole batch (the
batch's largest row norm; the class means' difference and Marvell's four scalars), so their
likelihood (`splitjax.attacks.likelihoods`) needs them per user. Test users are replayed in
consecutive batches of `BATCH` rows (`splitjax.training.replay_chunks`), which the server sees
arrive, so it knows which rows shared a batch. Two knowledge levels:

- ``adaptive`` (estimated, what the server can compute): max_norm's ``G^2`` is the batch's mean
  observed squared norm (unbiased: max_norm gives every row the expected squared norm ``G^2``);
  Marvell's statistics are computed like the device's, on the gradients the attack's own
  answers simulate (a first pass ignores the defence, then `ESTIMATE_ROUNDS` passes refine them).
- ``white_box``: the statistics the device computed from the true clean gradients and labels
  (an upper bound on any attacker of this defence).
"""

import jax
import jax.numpy as jnp
import numpy as np

from splitjax import attacks
from splitjax import defenses as defenses_lib
from splitjax import models
from splitjax import training

BATCH = 1024  # replay_chunks' default: the test replay's batches
ESTIMATE_ROUNDS = 2  # refinements of the estimated Marvell statistics after the naive pass


def _chunks(n: int):
  return [np.arange(s, min(s + BATCH, n)) for s in range(0, n, BATCH)]


def _per_batch(likelihood, g, y, n: int) -> np.ndarray:
  """`defenses.batch_info` of each replay batch of rows ``g [n, d]`` (labels ``y``), per row."""
  rows = []
  for part in _chunks(n):
    info = defenses_lib.batch_info(
      likelihood, jnp.asarray(g[part]), jnp.asarray(y[part]), jnp.ones(len(part), jnp.float32)
    )
    rows.append(np.repeat(np.asarray(info, np.float32)[None], len(part), axis=0))
  return np.concatenate(rows)


def white_box(restored, test_split, transcript, likelihood) -> np.ndarray:
  """The device's own batch statistics of the attacked test rows: [n, k]."""
  n = transcript.num_rows
  clean = np.concatenate(
    [
      g
      for _, _, g in training.replay_chunks(
        restored.model, restored.state, test_split, num_examples=n, batch_size=BATCH
      )
    ]
  )
  return _per_batch(likelihood, clean, np.asarray(test_split.y[:n]), n)


def simulated_gradients(restored, transcript, features, labels, label_smoothing: float):
  """The clean gradients ``[n, d]`` the device would send for the answers (features, labels)."""
  apply = models.device_logit_fn(restored.model)
  params = jax.tree.map(jnp.asarray, transcript.params_at(0))

  def one(h, x, y):
    z, v = jax.value_and_grad(apply, argnums=1)(params, h, x)
    target = y * (1 - label_smoothing) + 0.5 * label_smoothing
    return (jax.nn.sigmoid(z) - target) * v

  fn = jax.jit(jax.vmap(one))
  return np.asarray(
    fn(
      jnp.asarray(transcript.h),
      jnp.asarray(features, jnp.int32),
      jnp.asarray(labels, jnp.float32),
    )
  )


def estimated(transcript, likelihood, answers=None, restored=None, label_smoothing=0.0):
  """What the server estimates per test row: [n, k] (`answers`: (features, labels) of an earlier
  pass, needed for Marvell)."""
  n = transcript.num_rows
  g = np.asarray(transcript.g, np.float64)
  if likelihood.name == "max_norm":
    out = np.zeros((n, 1), np.float32)
    for part in _chunks(n):
      out[part, 0] = np.mean(np.sum(np.square(g[part]), axis=1))
    return out
  features, labels = answers
  g_hat = simulated_gradients(restored, transcript, features, labels, label_smoothing)
  out = _per_batch(likelihood, g_hat, np.asarray(labels), n)
  for part in _chunks(n):
    out[part] = defenses_lib.marvell_estimate(g[part], out[part[0]])
  return out


def side_info(restored, transcript, test_split, public, model, knowledge: str, variant, options):
  """``(defense_info [n, k], note)`` for the attack of `transcript` under `model` (an
  `AttackModel` whose likelihood is in `defenses.NEEDS_BATCH_INFO`) at `knowledge`
  ('adaptive': estimated, 'white_box'). The estimated Marvell statistics run the attack itself
  (`options`) first."""
  d = model.likelihood
  if knowledge == "white_box":
    return white_box(restored, test_split, transcript, d), "the device's batch statistics"
  if d.name == "max_norm":
    return estimated(transcript, d), "G^2 estimated as each batch's mean observed squared norm"
  naive = {k: v for k, v in options.items() if k != "defense"}
  res = attacks.run("exact", transcript, public, variant=variant, **naive)
  info = None
  for _ in range(ESTIMATE_ROUNDS):
    info = estimated(transcript, d, (res.features, res.labels), restored, model.label_smoothing)
    res = attacks.run(
      "exact", transcript, public._replace(defense_info=info), variant=variant, **options
    )
  info = estimated(transcript, d, (res.features, res.labels), restored, model.label_smoothing)
  return info, (
    "Marvell's direction u from the observed batch's top principal axis, its lambdas from the "
    f"attack's own answers ({ESTIMATE_ROUNDS} refinements after a pass that ignores the defence)"
  )
