"""`device_update_match`: a device's hypotheses re-ranked by the update it returned (FSL).

See `splitjax.attacks.tracking` for the score and `EXACT_ULPS`: each hypothesis (a pair per row)
is simulated through the device's T local steps from the broadcast parameters and optimiser state;
its score adds the cut releases' Gaussian log-likelihoods, the prior and the distance of the
simulated update to the returned one at the recorded coordinates.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from splitjax import protocol
from splitjax.attacks import devices
from splitjax.attacks import scoring

# The update channel's numerical floor without device DP-SGD: float32 parameters resolve an update
# to about one ulp of the parameters, so a simulated update whose residual per coordinate (RMS) is
# within EXACT_ULPS float32 ulps of the parameters' RMS matches exactly (module doc).
EXACT_ULPS = 4.0


@functools.partial(jax.jit, static_argnames=("model", "tx", "dp_sgd"))
def simulate_updates(
  model, tx, dp_sgd: bool, phi0, opt0, h, g, codes, table, mask, cut_clip, dev_clip, coords
):
  """Hypotheses [G, K, S] of pair codes through the T local steps of each device.

  Returns (update [G, K, M] at `coords`, cut squared distance [G, K] summed over steps and rows).
  phi0/opt0 leaves [G, ...]; h, g [G, T, S, d]; mask [G, S].
  """
  clip = dev_clip if dp_sgd else None

  def one(p0, o0, hh, gg, cc, m):
    cat, y = table[jnp.maximum(cc, 0) // 2], jnp.maximum(cc, 0) % 2
    p, o, cut = p0, o0, jnp.zeros((), hh.dtype)
    for t in range(hh.shape[0]):
      p, o, cg = devices.local_step(model, tx, p, o, hh[t], cat, y, m, clip)
      sim = scoring.clip_rows(cg, cut_clip)
      cut = cut + jnp.sum(m * jnp.sum(jnp.square(gg[t] - sim), axis=-1))
    delta = ravel_pytree(p)[0] - ravel_pytree(p0)[0]
    return delta[coords], cut

  over_k = jax.vmap(one, in_axes=(None, None, None, None, 0, None))
  return jax.vmap(over_k)(phi0, opt0, h, g, codes, mask)


def device_update_match(
  result,
  model,
  tx,
  transcript,
  cum,
  prior,
  cards,
  dtype,
  *,
  inv2var,
  bayes,
  clip_value,
  dev_clip,
  dp_sgd,
  top_k,
  passes,
  update_stddev,
  block,
):
  dev = result.devices
  num_dev, num_steps, width = dev.rows.shape
  h_all, g_all = np.asarray(transcript.h, dtype), np.asarray(transcript.g, dtype)
  coords = jnp.asarray(np.asarray(transcript.update_coords, np.int64))
  returned = np.asarray(transcript.device_updates, np.float64)[dev.version, dev.slot]  # [G, M]
  table = jnp.asarray(scoring.candidate_table(cards))
  score = cum * inv2var - (prior if bayes else 0.0)  # [G, S, Q], the tracking score
  cands = np.argsort(score, axis=-1, kind="stable")[..., :top_k]  # [G, S, K]
  start_at = protocol.flatten_params(transcript.device_params, batch_dims=1)
  start_at = start_at[:, np.asarray(transcript.update_coords)][dev.version]  # [G, M]
  floor = EXACT_ULPS * float(np.finfo(np.float32).eps) * np.sqrt(np.mean(np.square(start_at), 1))
  floor = np.maximum(floor, 1e-30)
  hyp = np.where(dev.rows[:, 0] >= 0, cands[..., 0], 0).astype(np.int32)

  blocks = [
    devices.device_block(
      dev, np.arange(b, min(b + block, num_dev)), block, transcript, h_all, g_all, dtype
    )
    for b in range(0, num_dev, block)
  ]

  def simulate(codes):  # codes [G, K, S] -> (update [G, K, M], cut [G, K]) over blocks
    ups, cuts = [], []
    for start, (mask, hb, gb, phi0, opt0, idx) in zip(
      range(0, num_dev, block), blocks, strict=True
    ):
      sel = np.arange(start, min(start + block, num_dev))
      up, cut = simulate_updates(
        model,
        tx,
        dp_sgd,
        phi0,
        opt0,
        jnp.asarray(hb),
        jnp.asarray(gb),
        jnp.asarray(codes[idx]),
        table,
        jnp.asarray(mask),
        clip_value,
        dev_clip,
        coords,
      )
      ups.append(np.asarray(up, np.float64)[: len(sel)])
      cuts.append(np.asarray(cut, np.float64)[: len(sel)])
    return np.concatenate(ups), np.concatenate(cuts)

  def prior_sum(codes):  # [G, K, S] -> [G, K]
    if not bayes:
      return 0.0
    lp = np.take_along_axis(prior[:, None], codes[..., None].astype(np.int64), axis=-1)[..., 0]
    return np.sum(lp * (dev.rows[:, None, 0] >= 0), axis=-1)

  start = np.repeat(hyp[:, None], top_k, axis=1)  # the shape of every later call (one compile)
  simulated = simulate(start)
  resid0 = np.sum(np.square(simulated[0][:, 0] - returned), axis=1)
  num_coords = returned.shape[1]
  if update_stddev is not None:
    tau = np.full(num_dev, float(update_stddev))
  elif dp_sgd:
    tau = np.full(num_dev, math.sqrt(max(float(np.median(resid0)) / num_coords, 1e-30)))
  else:
    tau = floor

  def objective(codes, simulated=None):
    up, cut = simulate(codes) if simulated is None else simulated
    upd = np.sum(np.square(up - returned[:, None]), axis=-1)
    return cut * inv2var - prior_sum(codes) + upd / (2.0 * tau[:, None] ** 2), upd

  best, best_upd = objective(start, simulated)  # the tracking hypotheses, simulated above
  best, best_upd = best[:, 0], best_upd[:, 0]
  real = dev.rows[:, 0] >= 0
  for _ in range(passes):
    for j in range(width):
      if not real[:, j].any():
        continue
      trial = np.repeat(hyp[:, None], top_k, axis=1)
      trial[:, :, j] = np.where(real[:, j, None], cands[:, j], hyp[:, None, j])
      obj, upd = objective(trial)
      k = np.argmin(obj, axis=1)
      better = obj[np.arange(num_dev), k] < best
      hyp = np.where(better[:, None], trial[np.arange(num_dev), k], hyp)
      best = np.where(better, obj[np.arange(num_dev), k], best)
      best_upd = np.where(better, upd[np.arange(num_dev), k], best_upd)
  norm = np.sqrt(np.maximum(np.sum(np.square(returned), axis=1), 1e-300))
  codes = np.where(real, hyp, -1).astype(np.int64)
  exact = np.sqrt(best_upd / num_coords) <= floor
  certain = np.ones_like(exact) if dp_sgd and update_stddev is None else exact
  feats, labels = devices.pair_features(codes, cards)
  feats = np.where(certain[:, None, None], feats, result.features)
  labels = np.where(certain[:, None], labels, result.labels)
  return result._replace(
    match=codes,
    match_features=feats,
    match_labels=labels,
    exact_match=exact,
    update_distance=np.sqrt(best_upd) / norm,
    tracking_update_distance=np.sqrt(resid0) / norm,
    update_stddev=float(tau[0]) if dp_sgd or update_stddev is not None else tau,
  )
