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

from splitjax import models
from splitjax import protocol
from splitjax.attacks import checks
from splitjax.attacks import releases
from splitjax.attacks import scoring
from splitjax.attacks.devices import DeviceRows
from splitjax.attacks.devices import device_block
from splitjax.attacks.devices import device_rows
from splitjax.attacks.devices import local_step
from splitjax.attacks.devices import pair_features
from splitjax.attacks.update_match import EXACT_ULPS
from splitjax.attacks.update_match import device_update_match

_CALL_BUDGET = 1 << 24  # (rows x candidates x d) floats simulated per call, as `exact_releases`

__all__ = [
  "EXACT_ULPS",
  "DeviceRows",
  "TrackingResult",
  "device_rows",
  "device_update_match",
  "fsl_tracking",
  "pair_features",
]


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


@functools.partial(jax.jit, static_argnames=("model", "tx", "dp_sgd"))
def _track_step(model, tx, dp_sgd: bool, phis, opts, h, codes, table, mask, device_clip):
  """Every device's next parameters from decoded pairs: leaves [G, ...]; h [G, S, d]."""
  cat = table[jnp.maximum(codes, 0) // 2]
  y = jnp.maximum(codes, 0) % 2
  clip = device_clip if dp_sgd else None
  step = lambda p, o, hh, c, yy, m: local_step(model, tx, p, o, hh, c, yy, m, clip)[:2]
  return jax.vmap(step)(phis, opts, h, cat, y, mask)


def _pair_d2(apply, opts, params, h, g, owner, table, clip_value, shape):
  """[B, S, Q] squared distance of each row to every pair's clipped gradient (float64)."""
  d2 = releases.squared_distances(apply, opts, params, h, g, owner, table, clip_value)
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
    lp, per_row = checks.log_prior(log_prior, transcript.num_rows, num_cand, 2)
    lp = lp.reshape(lp.shape[0], num_pairs)
    if not per_row:
      prior[:] = lp[0]
    else:
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
    m, hb, gb, phi0, opt0, idx = device_block(dev, sel, block, transcript, h_all, g_all, dtype)
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
    out["tracking"][sel] = decoded[: len(sel)]  # the decode from all T releases
    sel_out = releases.select_answers(
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
  return device_update_match(
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
