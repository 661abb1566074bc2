"""The whole pipeline audited in one training run (Steinke, Nasr and Jagielski 2023).

m canaries are training rows whose label is replaced by a bit drawn from the audit's own key
(`pipeline.canaries`; ``TrainConfig.audit_canaries``), so neither the data nor the model's prior
predicts it. The run trains through `pipeline.train_workdir` with every release recorded
(``--releases=all``), exactly as ``experiments.train`` would with the same flags. The auditor sees
what the server sees -- each canary's ``h`` and released ``g`` and, in FSL, each device's returned
update -- plus the device parameters under one of two readings in SL (the final phi only, or phi
at every step; in FSL the round-start parameters are what the server broadcast, so it knows them)
and the rest of the training data (the canaries' bits are the only unknowns, the worst case DP
covers). It scores each canary (a log-likelihood ratio of its releases under its two labels, with
FSL's returned update matched against both simulated local updates), guesses the top and bottom
scores with abstention at numbers of guesses fixed in advance, and converts the count of correct
guesses into an epsilon lower bound with `splitjax.audit.one_run_epsilon_lower`, Bonferroni over
the readings and guess counts tried.
"""

import dataclasses
import functools
import io
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from experiments import pipeline
from splitjax import audit
from splitjax import protocol
from splitjax import results
from splitjax.attacks import devices
from splitjax.attacks import update_match
from splitjax.privacy import transforms as dp_transforms

# Guesses as fractions of m, fixed before the run (the bound is Bonferroni-corrected over them).
GUESS_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)
DEFAULT_CANARIES = {"sl": 1000, "fsl": 500}
SCORES = "scores.npz"  # each canary's row, secret bit and score per reading (in the audit workdir)


@functools.partial(jax.jit, static_argnames=("model",))
def _clipped_pair(model, params, h, cat, dense, clip):
  """Both labels' clipped cut gradients of rows ``[B]`` under one parameter version."""
  ones = jnp.ones(h.shape[0], jnp.float32)
  out = []
  for label in (0, 1):
    y = jnp.full(h.shape[0], label, jnp.int32)
    g = protocol.top_step(model, params, h, cat, dense, y, ones).cut_grads
    out.append(dp_transforms.clip_rows(g, clip))
  return out[0], out[1]


def _release_llr(g, c0, c1, sigma: float, clip: float) -> np.ndarray:
  """Per release: log p(g | label 1) - log p(g | label 0) under the accounted Gaussian (a plain
  squared-distance difference without noise)."""
  d0 = np.sum(np.square(g - c0), axis=-1, dtype=np.float64)
  d1 = np.sum(np.square(g - c1), axis=-1, dtype=np.float64)
  if sigma > 0 and math.isfinite(clip):
    return (d0 - d1) / (2 * (sigma * clip) ** 2)
  return d0 - d1


def _block(n: int) -> int:
  return max(8, 1 << (max(n, 1) - 1).bit_length())


def sl_scores(run, tr, rows: np.ndarray, *, every_step: bool) -> np.ndarray:
  """Each canary's summed release log-likelihood ratio ``[m]`` (SL, under one reading)."""
  train = run.dataset.train
  pos = {int(r): i for i, r in enumerate(rows)}
  idx = np.asarray(tr.example_index)
  sel = np.flatnonzero(np.isin(idx, rows))
  owner = np.array([pos[int(i)] for i in idx[sel]], np.int64)
  versions = np.asarray(tr.param_index)[sel] if every_step else np.zeros(len(sel), np.int64)
  clip, sigma = float(tr.l2_clip_norm), float(tr.noise_multiplier)
  llr = np.zeros(len(sel), np.float64)
  for v in np.unique(versions):
    part = np.flatnonzero(versions == v)
    if every_step:
      params = jax.tree.map(lambda x, v=v: jnp.asarray(np.asarray(x)[v]), tr.device_params)
    else:
      params = run.state.device_params
    for start in range(0, len(part), 256):
      chunk = part[start : start + 256]
      r = sel[chunk]
      ex = idx[r]
      size = _block(len(chunk))
      pad = lambda a, size=size: np.concatenate([a, np.repeat(a[:1], size - len(a), 0)])
      c0, c1 = _clipped_pair(
        run.model,
        params,
        pad(np.asarray(tr.h[r], np.float32)),
        pad(train.priv_cat[ex]),
        pad(train.priv_dense[ex]),
        np.float32(clip),
      )
      c0, c1 = np.asarray(c0)[: len(chunk)], np.asarray(c1)[: len(chunk)]
      llr[chunk] = _release_llr(np.asarray(tr.g[r]), c0, c1, sigma, clip)
  return np.bincount(owner, weights=llr, minlength=len(rows))


@functools.partial(jax.jit, static_argnames=("model", "tx", "device_clip", "steps"))
def _simulate_device(
  model, tx, device_clip, steps, phi0, opt0, h, g, cat, y, mask, cpos, coords, cut_clip
):
  """One device's T local steps under both labels of its canary at slot ``cpos``.

  Returns ``(update at coords [2, M], cut squared distance over its rows and steps [2])``."""

  def one(bit):
    yy = y.at[cpos].set(bit)
    p, o, cut = phi0, opt0, jnp.zeros((), jnp.float32)
    for t in range(steps):
      p, o, cg = devices.local_step(model, tx, p, o, h[t], cat, yy, mask, device_clip)
      sim = dp_transforms.clip_rows(cg, cut_clip)
      cut = cut + jnp.sum(mask * jnp.sum(jnp.square(g[t] - sim), axis=-1))
    delta = ravel_pytree(p)[0] - ravel_pytree(phi0)[0]
    return delta[coords], cut

  return jax.vmap(one)(jnp.arange(2, dtype=jnp.int32))


def fsl_scores(run, tr, rows: np.ndarray, labels: np.ndarray, device_clip) -> dict:
  """Each canary's score ``[m]`` from its device's cut releases and returned update (FSL).

  ``labels``: what training used for every row (the canaries' entries are replaced by both
  hypotheses). The update term is a Gaussian log-likelihood ratio whose per-coordinate variance
  is estimated from the better hypothesis's residual (exact matches give certainty).
  """
  if tr.device_updates is None:
    raise pipeline.ConfigError("the FSL transcript has no returned updates: retrain")
  train = run.dataset.train
  if train.priv_dense.shape[1]:
    raise pipeline.ConfigError(
      "the FSL pipeline audit simulates heads with private categorical features only: drop "
      "--private_dense"
    )
  dev = devices.device_rows(tr)
  idx = np.asarray(tr.example_index)
  ex = np.where(dev.rows >= 0, idx[np.maximum(dev.rows, 0)], -1)  # [G, T, S]
  pos = {int(r): i for i, r in enumerate(rows)}
  clip, sigma = float(tr.l2_clip_norm), float(tr.noise_multiplier)
  coords = jnp.asarray(tr.update_coords)
  tx = run.state.tx_device
  cut_score = np.zeros(len(rows))
  upd_score = np.zeros(len(rows))
  exact = np.zeros(len(rows), bool)
  steps = dev.rows.shape[1]
  for gi in range(dev.rows.shape[0]):
    slots = [j for j, e in enumerate(ex[gi, 0]) if int(e) in pos]
    if not slots:
      continue
    (j,) = slots  # one canary per device (pipeline.canaries)
    c = pos[int(ex[gi, 0, j])]
    r = dev.rows[gi]  # [T, S]
    mask = (r[0] >= 0).astype(np.float32)
    safe = np.maximum(r, 0)
    e0 = np.maximum(ex[gi, 0], 0)
    v = int(dev.version[gi])
    phi0 = jax.tree.map(lambda x, v=v: jnp.asarray(np.asarray(x)[v]), tr.device_params)
    opt0 = jax.tree.map(lambda x, v=v: jnp.asarray(np.asarray(x)[v]), tr.device_opt)
    upd, cut = _simulate_device(
      run.model,
      tx,
      device_clip,
      steps,
      phi0,
      opt0,
      jnp.asarray(np.asarray(tr.h)[safe], jnp.float32),
      jnp.asarray(np.asarray(tr.g)[safe], jnp.float32),
      jnp.asarray(train.priv_cat[e0]),
      jnp.asarray(labels[e0].astype(np.int32)),
      jnp.asarray(mask),
      j,
      coords,
      np.float32(clip),
    )
    upd, cut = np.asarray(upd, np.float64), np.asarray(cut, np.float64)
    returned = np.asarray(tr.device_updates[v, int(dev.slot[gi])], np.float64)
    resid = np.sum(np.square(upd - returned[None]), axis=1)
    if sigma > 0 and math.isfinite(clip):
      cut_score[c] += (cut[0] - cut[1]) / (2 * (sigma * clip) ** 2)
    else:
      cut_score[c] += cut[0] - cut[1]
    var = max(float(resid.min()) / len(returned), 1e-30)
    upd_score[c] += (resid[0] - resid[1]) / (2 * var)
    # Exact as update_match judges it: residual RMS within EXACT_ULPS float32 ulps of the
    # parameters' RMS at the recorded coordinates.
    start = np.asarray(ravel_pytree(phi0)[0])[np.asarray(coords)]
    scale = float(np.sqrt(np.mean(np.square(start)))) or 1.0
    ulp = update_match.EXACT_ULPS * np.finfo(np.float32).eps * scale
    exact[c] |= bool(np.sqrt(resid.min() / len(returned)) <= ulp)
  return {"score": cut_score + upd_score, "exact_match_fraction": float(np.mean(exact))}


def guesses(score: np.ndarray, bits: np.ndarray, num: int) -> int:
  """Correct guesses among the ``num`` canaries of largest ``|score|``, each guessed by its sign
  (a score is a log-likelihood ratio of label 1 over label 0); the others abstain."""
  order = np.argsort(-np.abs(score), kind="stable")[:num]
  return int(np.sum((score[order] > 0).astype(np.int32) == bits[order]))


def canary_config(config, request):
  """The training config of the pipeline audit: ``config`` with m canaries and every release
  recorded. ConfigError (before anything is written) when the data cannot hold m canaries."""
  m = request.trials or DEFAULT_CANARIES[config.protocol]
  cfg = dataclasses.replace(config, audit_canaries=m, releases="all", record_device_params=True)
  pipeline.canaries(cfg, len(pipeline.load_data(config).train))  # raises if m does not fit
  return cfg


def max_canaries(config) -> int:
  """The most canaries ``config``'s data holds: the FSL devices (one canary each), or the rows."""
  num_train = len(pipeline.load_data(config).train)
  if config.protocol != "fsl":
    return num_train
  _, sizes, _ = pipeline.clamped_sizes(config, num_train)
  return math.ceil(num_train / sizes["samples_per_device"])


def audit_pipeline(config, request, workdir: pathlib.Path, progress=None) -> dict:
  """Trains with m canaries in ``workdir/train`` (resumable) and audits it; returns the record."""
  fsl = config.protocol == "fsl"
  cfg = canary_config(config, request)
  m = cfg.audit_canaries
  if progress:
    progress(f"pipeline audit: training with {m:,} canaries ({config.protocol})")
  metrics = pipeline.train_workdir(
    cfg, workdir / "train", resume=True, keep_identical=True, progress=progress
  )
  run = pipeline.Restored(workdir / "train")
  rows, bits = pipeline.canaries(cfg, len(run.dataset.train))
  tr = run.releases()
  readings: dict = {}
  extra: dict = {}
  if fsl:
    labels = pipeline.train_labels(cfg, run.dataset.train.y)
    labels = run.dataset.train.y if labels is None else labels
    out = fsl_scores(run, tr, rows, labels, cfg.device_dp_clip or None)
    readings["returned updates and cut releases (round-start phi broadcast)"] = out["score"]
    extra["update_matched_exactly"] = out["exact_match_fraction"]
  else:
    readings["cut releases, final phi only"] = sl_scores(run, tr, rows, every_step=False)
    readings["cut releases, phi at every step"] = sl_scores(run, tr, rows, every_step=True)
  buf = io.BytesIO()
  np.savez(buf, rows=rows, bits=bits, **{f"score_{i}": v for i, v in enumerate(readings.values())})
  results.atomic_write_bytes(workdir / SCORES, buf.getvalue())
  delta, conf = cfg.target_delta, request.confidence
  tests = len(readings) * len(GUESS_FRACTIONS)
  each = 1.0 - (1.0 - conf) / tests
  tried = []
  for name, score in readings.items():
    for frac in GUESS_FRACTIONS:
      num = max(1, int(round(frac * m)))
      right = guesses(score, bits, num)
      tried.append(
        {
          "reading": name,
          "guesses": num,
          "correct": right,
          "epsilon_lower": audit.one_run_epsilon_lower(m, num, right, delta, each),
        }
      )
  best = max(tried, key=lambda t: t["epsilon_lower"])
  total = _num(metrics.get("total_epsilon"))
  record = {
    "channel": "pipeline",
    "dataset": cfg.dataset,
    "protocol": cfg.protocol,
    "trials": m,
    "guesses": best["guesses"],
    "correct": best["correct"],
    "reading": best["reading"],
    "epsilon_lower": best["epsilon_lower"],
    "epsilon_accounted": total if math.isfinite(total) else None,
    "epsilon_cut_only": _num(metrics.get("epsilon")),
    "epsilon_label": metrics.get("label_epsilon"),
    "epsilon_device": _num(metrics.get("device_epsilon")),
    "mu_accounted": None,
    "mu_lower": None,
    "delta": delta,
    "confidence": conf,
    "confidence_each": each,
    "saturation": {"epsilon_lower": audit.one_run_saturation(m, delta, each), "mu_lower": None},
    "tried": tried,
    "test_auc": metrics.get("test_auc"),
    "train_workdir": "train",
    "scores": SCORES,
    "readings": list(readings),
    **extra,
  }
  if not math.isfinite(total):
    record["epsilon_accounted_note"] = (
      "infinite: without device DP-SGD nothing bounds the device parameters, whose updates "
      "depend on every label"
    )
  record["consistent"] = record["epsilon_accounted"] is None or (
    record["epsilon_lower"] <= record["epsilon_accounted"]
  )
  return record


def _num(x) -> float:
  if x is None:
    return math.nan
  return float(x)
