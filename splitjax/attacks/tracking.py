"""FSL attackers that follow each device through its local steps, and its returned update.

In FSL (DESIGN.md §3) a device trains the head on all of its examples for `T` local steps from the
round-start parameters `phi_0` and optimiser state `s_0` the server broadcast, sending the cut
gradient of every example at every step, and then returns its parameters `phi_T`. EXACT scores a
row with known parameters; after the first local step the device's parameters depend on its own
private data, so scoring those rows with `phi_0` (the *stale model*) loses accuracy. Two attackers
use what the server has besides:

* `fsl_tracking`: decode the device's step-0 rows under `phi_0`, recompute its local update
  `phi_{t+1} = phi_t + tx.update(grad(phi_t; h_t, decoded x, decoded y), s_t)` with the device
  optimiser and loss as trained (the decoded label is the label the device trained on: the noisy
  one under label DP), and score the step-(t+1) rows under the recomputed parameters; each
  example's answer sums its releases' log-likelihoods (the scores of `exact_releases`). A device
  whose step-0 rows are all decoded right is tracked exactly (without device DP-SGD); under
  device DP-SGD the local noise is unknown to the server, so the recomputed parameters miss it and
  tracking is exact at step 0 only.
* `device_update_match`: re-rank a device's hypotheses (each row's `top_k` pairs by the tracking
  score, changed one row at a time, greedily, for `passes` sweeps) by the joint score

      sum_t,j ||g_tj - clip(g_tj(hyp))||^2 / (2 sigma^2 C^2) - log prior(hyp)
      + ||Delta(hyp) - Delta_returned||^2 / (2 tau^2),

  where `Delta` is the device's update `phi_T - phi_0` at the recorded coordinates and every term
  is simulated through the T local steps under that hypothesis. Without device DP-SGD the update
  is a deterministic function of the device's data: `tau` is the numerical floor (`EXACT_ULPS`
  float32 ulps of the parameters' RMS per coordinate), so a hypothesis whose simulated update
  matches is certain as far as float32 resolves it (a wrong private feature value can move the
  update by less than that; a wrong label does not). With device
  DP-SGD the update carries Gaussian noise in gradient space that the optimiser maps to parameter
  space; `tau` is then the plug-in estimate from the tracked hypotheses' residuals (the median
  over devices of their mean squared residual per coordinate) unless given: an approximation of
  the noisy update's likelihood (exact in form for SGD with one local step).

Both need the FSL fields of the transcript (`device_slot`, `device_opt`, and for the match
`device_updates`), which `training.fit` records, and models without private dense features.
"""

import functools
import math
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from splitjax import models
from splitjax import protocol
from splitjax.attacks import checks
from splitjax.attacks import releases
from splitjax.attacks import scoring
from splitjax.privacy import transforms as dp_transforms

# The update channel's numerical floor without device DP-SGD: float32 parameters resolve an update
# to about one ulp of the parameters, so a simulated update whose residual per coordinate (RMS) is
# within EXACT_ULPS float32 ulps of the parameters' RMS matches exactly (module doc).
EXACT_ULPS = 4.0
_CALL_BUDGET = 1 << 24  # (rows x candidates x d) floats simulated per call, as `exact_releases`


class DeviceRows(NamedTuple):
  """The rows of a transcript grouped by device (host arrays).

  Attributes:
    rows: [G, T, S] int64, the transcript row of device g's j-th example at local step t (-1:
      the device has fewer than S examples).
    version: [G] int, the round (parameter version) of each device.
    slot: [G] int, the device's slot within its round (`Transcript.device_slot`).
  """

  rows: np.ndarray
  version: np.ndarray
  slot: np.ndarray

  @property
  def mask(self) -> np.ndarray:
    """[G, S] float32, 1 for a device's real examples."""
    return (self.rows[:, 0] >= 0).astype(np.float32)


def device_rows(transcript: protocol.Transcript) -> DeviceRows:
  """Groups an FSL transcript's rows by device: `(param_index, device_slot)`.

  Raises:
    AttackError: the transcript has no device slots (an SL transcript, or an FSL one recorded
      before the tracking attacks), or a device lacks a local step or sent other examples at
      other steps (the transcript was cut inside a device: take whole rounds).
  """
  if transcript.device_slot is None:
    raise checks.AttackError(
      "the transcript has no device slots: tracking needs an FSL transcript recorded by this "
      "splitjax (retrain with experiments.train --overwrite)"
    )
  pidx = np.asarray(transcript.param_index, np.int64)
  slot = np.asarray(transcript.device_slot, np.int64)
  step = np.asarray(transcript.local_step, np.int64)
  num_rows = len(pidx)
  if num_rows == 0:
    return DeviceRows(np.zeros((0, 1, 1), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
  num_steps = int(step.max()) + 1
  groups, group_of = np.unique(np.stack([pidx, slot], 1), axis=0, return_inverse=True)
  group_of = group_of.reshape(-1)
  order = np.lexsort((np.arange(num_rows), step, group_of))
  key = group_of[order] * num_steps + step[order]
  starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
  counts = np.diff(np.r_[starts, num_rows])
  position = np.arange(num_rows) - np.repeat(starts, counts)
  width = int(counts.max())
  rows = np.full((len(groups), num_steps, width), -1, np.int64)
  rows[group_of[order], step[order], position] = order
  present = rows >= 0
  ex = np.where(present, np.asarray(transcript.example_index)[np.maximum(rows, 0)], -1)
  if not (present == present[:, :1]).all() or not (ex == ex[:, :1]).all():
    raise checks.AttackError(
      "a device of the transcript lacks a local step or sent other examples at other steps: "
      "pass whole rounds (every row of a param_index)"
    )
  return DeviceRows(rows, groups[:, 0], groups[:, 1])


class TrackingResult(NamedTuple):
  """What the FSL tracking attackers recover, per device and example (host arrays).

  Pair codes index the (candidate, label) pairs: `candidate * 2 + label`, candidates in
  `scoring.candidate_table` order; -1 where a device has no example.

  Attributes:
    devices: the `DeviceRows` attacked (G devices, T local steps, S examples at most).
    stale: [G, T, S] pair code of each release scored alone under the round-start parameters
      (what `exact` does with an FSL transcript).
    tracked: [G, T, S] pair code of each release scored alone under the tracked parameters
      (equal to `stale` at step 0).
    features: [G, S, P] int32, `fsl_tracking`'s answer per feature from all T releases (with
      noise: each feature's marginal-posterior argmax; else the nearest pair's).
    labels: [G, S] int32, likewise.
    tracking: [G, S] pair code of the joint best pair of `fsl_tracking`.
    first_step: [G, S] pair code decoded from the step-0 rows alone (what tracking starts from).
    match: [G, S] pair code of `device_update_match`'s hypothesis, or None without updates.
    match_features: [G, S, P] int32, `device_update_match`'s answer: its hypothesis where the
      search found a certain one (without device DP-SGD: an exact match, `exact_match`;
      with device DP-SGD: always, the joint score being the approximate posterior), else the
      tracking answer (an inexact match without device DP-SGD says only that the true
      hypothesis was not among those tried), or None.
    match_labels: [G, S] int32, likewise.
    exact_match: [G] bool, the match's simulated update is the returned one to float32
      resolution (`EXACT_ULPS`), or None.
    update_distance: [G] relative distance `||Delta(hyp) - Delta_returned|| / ||Delta_returned||`
      of the match's hypothesis, or None.
    tracking_update_distance: [G] the same for `tracking`'s joint best pairs, or None.
    update_stddev: the `tau` (per coordinate) the match used: a number, or [G] floors, or None.
  """

  devices: DeviceRows
  stale: np.ndarray
  tracked: np.ndarray
  features: np.ndarray
  labels: np.ndarray
  tracking: np.ndarray
  first_step: np.ndarray
  match: np.ndarray | None = None
  match_features: np.ndarray | None = None
  match_labels: np.ndarray | None = None
  exact_match: np.ndarray | None = None
  update_distance: np.ndarray | None = None
  tracking_update_distance: np.ndarray | None = None
  update_stddev: Any = None


def pair_features(codes: np.ndarray, cardinalities: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """`(features [..., P] int32, labels [...] int32)` of pair codes (-1 codes give -1)."""
  codes = np.asarray(codes, np.int64)
  table = scoring.candidate_table(cardinalities)
  feats = np.where(codes[..., None] >= 0, table[np.maximum(codes, 0) // 2], -1)
  labels = np.where(codes >= 0, np.maximum(codes, 0) % 2, -1)
  return feats.astype(np.int32), labels.astype(np.int32)


def _device_grads(model, phi, h, cat, y, mask, device_clip):
  """One device's head step: (parameter gradient as trained without the noise, cut gradients)."""
  dense = jnp.zeros(cat.shape[:1] + (model.spec.num_priv_dense,), h.dtype)
  if device_clip is None:
    out = protocol.top_step(model, phi, h, cat, dense, y, mask)
    return out.param_grads, out.cut_grads
  out = protocol.top_step_per_example(model, phi, h, cat, dense, y, mask)
  clipped = dp_transforms.clip_rows(out.param_grads, device_clip)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  return jax.tree.map(lambda x: jnp.sum(x, axis=0) / n, clipped), out.cut_grads


def _local_step(model, tx, phi, opt, h, cat, y, mask, device_clip):
  grads, cut = _device_grads(model, phi, h, cat, y, mask, device_clip)
  upd, opt = tx.update(grads, opt, phi)
  return optax.apply_updates(phi, upd), opt, cut


@functools.partial(jax.jit, static_argnames=("model", "tx", "dp_sgd"))
def _track_step(model, tx, dp_sgd: bool, phis, opts, h, codes, table, mask, device_clip):
  """Every device's next parameters from decoded pairs: leaves [G, ...]; h [G, S, d]."""
  cat = table[jnp.maximum(codes, 0) // 2]
  y = jnp.maximum(codes, 0) % 2
  clip = device_clip if dp_sgd else None
  step = lambda p, o, hh, c, yy, m: _local_step(model, tx, p, o, hh, c, yy, m, clip)[:2]
  return jax.vmap(step)(phis, opts, h, cat, y, mask)


@functools.partial(jax.jit, static_argnames=("model", "tx", "dp_sgd"))
def _simulate(
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
      p, o, cg = _local_step(model, tx, p, o, hh[t], cat, y, m, clip)
      sim = scoring.clip_rows(cg, cut_clip)
      cut = cut + jnp.sum(m * jnp.sum(jnp.square(gg[t] - sim), axis=-1))
    delta = ravel_pytree(p)[0] - ravel_pytree(p0)[0]
    return delta[coords], cut

  over_k = jax.vmap(one, in_axes=(None, None, None, None, 0, None))
  return jax.vmap(over_k)(phi0, opt0, h, g, codes, mask)


def _block(dev: DeviceRows, sel, block: int, transcript, h_all, g_all, dtype):
  """A block of devices padded to ``block`` (repeating the first; padded devices masked out):
  (mask [B, S], h [B, T, S, d], g [B, T, S, d], round-start params and optimiser states
  (leaves [B, ...]), the device indices [B])."""
  idx = np.concatenate([sel, np.full(block - len(sel), sel[0])])
  rows = dev.rows[idx]
  mask = (rows[:, 0] >= 0).astype(np.float32)
  mask[len(sel) :] = 0.0
  hb = np.where(rows[..., None] >= 0, h_all[np.maximum(rows, 0)], 0).astype(dtype)
  gb = np.where(rows[..., None] >= 0, g_all[np.maximum(rows, 0)], 0).astype(dtype)
  version = dev.version[idx]
  gather = functools.partial(_gather, version)
  return mask, hb, gb, gather(transcript.device_params), gather(transcript.device_opt), idx


def _gather(version, tree):
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[version]), tree)


def _pair_d2(apply, opts, params, h, g, owner, table, clip_value, shape):
  """[B, S, Q] squared distance of each row to every pair's clipped gradient (float64)."""
  d2 = releases._squared_distances(apply, opts, params, h, g, owner, table, clip_value)
  return np.asarray(d2, np.float64).reshape(shape)


def fsl_tracking(
  model: models.SplitModel,
  tx_device: optax.GradientTransformation,
  transcript: protocol.Transcript,
  cardinalities: Sequence[int],
  *,
  l2_clip_norm: float | None = None,
  noise_stddev: float | None = None,
  log_prior: jax.typing.ArrayLike | None = None,
  device_clip: float | None = None,
  match: bool = True,
  top_k: int = 4,
  passes: int = 2,
  update_stddev: float | None = None,
  devices_per_call: int | None = None,
) -> TrackingResult:
  """`fsl_tracking` and `device_update_match` (module doc) on every device of `transcript`.

  Args:
    model: the split model (`device_top`, no private dense features).
    tx_device: the device optimiser as trained (`training.make_optimizer(recipe)`).
    transcript: whole FSL rounds with their FSL fields (`training.fit` records them).
    cardinalities: P ints, the private categorical domains.
    l2_clip_norm: the public cut-layer clip norm C, or None.
    noise_stddev: the cut-layer noise per coordinate (sigma * C), or None (ranked by distance).
    log_prior: [C*2] shared, or [N, C*2] / [N, C, 2] per transcript row (each example's prior
      is read at its step-0 row); noise only.
    device_clip: device DP-SGD's per-example clip norm, or None when the device trained without.
    match: also run `device_update_match` (needs `device_updates`).
    top_k: the pairs per row the match tries.
    passes: the match's greedy sweeps over a device's rows.
    update_stddev: tau per coordinate of the update (default: module doc).
    devices_per_call: devices per jitted call (default: from the head's size).

  Returns:
    A `TrackingResult`.

  Raises:
    AttackError: bad inputs (a transcript without the FSL fields, a model with private dense
      features, shapes).
  """
  if model.spec.topology != "device_top":
    raise checks.AttackError("fsl_tracking needs a device_top model (FSL trains the head)")
  if model.spec.num_priv_dense:
    raise checks.AttackError(
      "fsl_tracking recomputes the device's update from decoded private features: the model "
      "has private dense features, which EXACT does not decode (use a model without them)"
    )
  cards = checks.cardinalities(cardinalities)
  stddev, bayes = checks.noise(
    checks.noise_stddev(noise_stddev, None, l2_clip_norm), "l2", log_prior
  )
  clip = checks.clip_norm(l2_clip_norm)
  if transcript.device_opt is None:
    raise checks.AttackError(
      "the transcript has no round-start optimiser states: retrain with this splitjax"
    )
  if match and (transcript.device_updates is None or transcript.update_coords is None):
    raise checks.AttackError("device_update_match needs the transcript's device_updates")
  if top_k < 1 or passes < 0:
    raise checks.AttackError(f"top_k={top_k} must be >= 1 and passes={passes} >= 0")
  dev = device_rows(transcript)
  num_dev, num_steps, width = dev.rows.shape
  num_cand = math.prod(cards)
  num_pairs = num_cand * 2
  h_all, g_all, dtype = checks.observations(transcript.h, transcript.g)
  d = h_all.shape[1]
  table = jnp.asarray(scoring.candidate_table(cards))
  clip_value = jnp.asarray(np.inf if clip is None else clip, dtype)
  dev_clip = jnp.asarray(0.0 if device_clip is None else device_clip, dtype)
  dp_sgd = device_clip is not None
  opts = releases.pair_options(
    cards, clip=clip is not None and math.isfinite(clip), clip_aware=True, per_user_params=True
  )
  apply = models.device_logit_fn(model)
  prior = np.zeros((num_dev, width, num_pairs), np.float32)
  if log_prior is not None:
    lp = np.asarray(log_prior, np.float32)
    if lp.ndim <= 1 or lp.shape == (num_cand, 2):
      prior[:] = lp.reshape(num_pairs)
    else:
      lp = lp.reshape(transcript.num_rows, num_pairs)
      prior = np.where(dev.rows[:, 0, :, None] >= 0, lp[np.maximum(dev.rows[:, 0], 0)], 0.0)
  inv2var = 1.0 / (2.0 * float(stddev) ** 2) if bayes and stddev is not None else 1.0
  if devices_per_call is None:
    devices_per_call = max(1, min(64, _CALL_BUDGET // max(1, width * num_cand * d)))
  block = max(1, min(devices_per_call, num_dev))

  out = {k: np.full((num_dev, num_steps, width), -1, np.int64) for k in ("stale", "tracked")}
  out.update(
    features=np.full((num_dev, width, len(cards)), -1, np.int32),
    labels=np.full((num_dev, width), -1, np.int32),
    tracking=np.full((num_dev, width), -1, np.int64),
    first_step=np.full((num_dev, width), -1, np.int64),
  )
  cum_all = np.zeros((num_dev, width, num_pairs), np.float64)
  owner = jnp.asarray(np.repeat(np.arange(block), width).astype(np.int32))

  for start in range(0, num_dev, block):
    sel = np.arange(start, min(start + block, num_dev))
    m, hb, gb, phi0, opt0, idx = _block(dev, sel, block, transcript, h_all, g_all, dtype)
    lp = prior[idx] if bayes else np.zeros_like(prior[idx])
    phis, optst = phi0, opt0
    cum = np.zeros((block, width, num_pairs), np.float64)
    for t in range(num_steps):
      ht, gt = jnp.asarray(hb[:, t].reshape(-1, d)), jnp.asarray(gb[:, t].reshape(-1, d))
      d2 = _pair_d2(apply, opts, phis, ht, gt, owner, table, clip_value, cum.shape)
      stale = (
        d2 if t == 0 else _pair_d2(apply, opts, phi0, ht, gt, owner, table, clip_value, cum.shape)
      )
      cum += d2
      out["tracked"][sel, t] = np.argmin(d2 * inv2var - lp, axis=-1)[: len(sel)]
      out["stale"][sel, t] = np.argmin(stale * inv2var - lp, axis=-1)[: len(sel)]
      decoded = np.argmin(cum * inv2var - lp, axis=-1)
      if t == 0:
        out["first_step"][sel] = decoded[: len(sel)]
      if t + 1 < num_steps:
        phis, optst = _track_step(
          model,
          tx_device,
          dp_sgd,
          phis,
          optst,
          jnp.asarray(hb[:, t]),
          jnp.asarray(decoded),
          table,
          jnp.asarray(m),
          dev_clip,
        )
    cum_all[sel] = cum[: len(sel)]
    out["tracking"][sel] = np.argmin(cum * inv2var - lp, axis=-1)[: len(sel)]
    sel_out = releases._select(
      jnp.asarray(cum.reshape(block * width, num_pairs), dtype),
      jnp.asarray(np.sum(np.square(gb, dtype=np.float64), axis=(1, 3)).reshape(-1), dtype),
      jnp.asarray(lp.reshape(block * width, num_pairs), dtype),
      table,
      jnp.asarray(1.0 if stddev is None else stddev, dtype),
      cards,
      bayes,
    )
    out["features"][sel] = np.asarray(sel_out["features"]).reshape(block, width, -1)[: len(sel)]
    out["labels"][sel] = np.asarray(sel_out["labels"]).reshape(block, width)[: len(sel)]

  present = dev.rows >= 0
  for k in ("stale", "tracked"):
    out[k] = np.where(present, out[k], -1)
  for k in ("tracking", "first_step"):
    out[k] = np.where(present[:, 0], out[k], -1)
  out["features"] = np.where(present[:, 0, :, None], out["features"], -1)
  out["labels"] = np.where(present[:, 0], out["labels"], -1)
  result = TrackingResult(devices=dev, **out)
  if not match or num_dev == 0:
    return result
  return _update_match(
    result,
    model,
    tx_device,
    transcript,
    cum_all,
    prior,
    cards,
    dtype,
    inv2var=inv2var,
    bayes=bayes,
    clip_value=clip_value,
    dev_clip=dev_clip,
    dp_sgd=dp_sgd,
    top_k=min(top_k, num_pairs),
    passes=passes,
    update_stddev=update_stddev,
    block=max(1, min(block, 16)),
  )


def _update_match(
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
    _block(dev, np.arange(b, min(b + block, num_dev)), block, transcript, h_all, g_all, dtype)
    for b in range(0, num_dev, block)
  ]

  def simulate(codes):  # codes [G, K, S] -> (update [G, K, M], cut [G, K]) over blocks
    ups, cuts = [], []
    for start, (mask, hb, gb, phi0, opt0, idx) in zip(
      range(0, num_dev, block), blocks, strict=True
    ):
      sel = np.arange(start, min(start + block, num_dev))
      up, cut = _simulate(
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
  up0, _ = simulate(start)
  resid0 = np.sum(np.square(up0[:, 0] - returned), axis=1)
  num_coords = returned.shape[1]
  if update_stddev is not None:
    tau = np.full(num_dev, float(update_stddev))
  elif dp_sgd:
    tau = np.full(num_dev, math.sqrt(max(float(np.median(resid0)) / num_coords, 1e-30)))
  else:
    tau = floor

  def objective(codes):
    up, cut = simulate(codes)
    upd = np.sum(np.square(up - returned[:, None]), axis=-1)
    return cut * inv2var - prior_sum(codes) + upd / (2.0 * tau[:, None] ** 2), upd

  best, best_upd = objective(start)
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
  feats, labels = pair_features(codes, cards)
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
