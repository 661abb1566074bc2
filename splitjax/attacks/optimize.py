"""Relaxed gradient matching: recover private categorical AND continuous features by optimisation.

EXACT (`splitjax.attacks.exact`) enumerates a finite domain; a private *continuous* feature (e.g.
age moved to the device) has none. Two attacks here fill the gap (DESIGN.md §3):

* `optimize`: every secret becomes a continuous variable — each categorical feature a vector of
  logits whose softmax probabilities are mixed into the embeddings (`probs @ table` instead of
  `table[x]`, see `relaxed_device_apply`), each dense feature a point of its box (projected after
  every step), the label a Bernoulli probability — and the distance between the simulated cut
  gradient `(sigmoid(z) - p_y) dz/dh` (clipped with the public C when given) and the observed one is
  minimised with an optax chain (default Adam with a cosine-decayed step). `num_restarts` restarts
  per user start from independent keys (`jax.random.split`), run in one `vmap` under a `lax.scan`
  over steps, keep their best-so-far point, are rounded (categorical argmax), polished (dense
  features re-optimised with the categorical values fixed, the label chosen exactly), and the
  restart whose rounded answer matches best is kept. Users are vmapped in chunks.
* `hybrid`: EXACT for the categorical features and the label, optimisation for the continuous
  ones. Every (candidate, label) pair is scored at `num_restarts` stratified starting points of the
  dense box; the `num_refine` most promising pairs (all of them by default) then optimise their
  dense features from their best start; the best pair wins (or, with noise, the argmax of each
  feature's marginal posterior, as in EXACT's Bayes variant, with the dense features profiled out).
  Without private dense features it reduces to EXACT.

Both see only what crosses the wire (`h`, `g`) and public knowledge (the device model, the domains,
C and sigma); the ground truth goes to `splitjax.metrics` only.

References:
  Qiu, Leontiadis, Melis, Sablayrolles, Stock. Evaluating Privacy Leakage in Split Learning.
  arXiv:2305.12997 (EXACT; relaxed matching is splitjax's extension).
  Zhu, Liu, Han. Deep Leakage from Gradients. NeurIPS 2019, arXiv:1906.08935 (gradient matching).
  Geiping, Bauermeister, Droge, Moeller. Inverting Gradients. NeurIPS 2020, arXiv:2003.14053
  (restarts, cosine objective).
"""

import functools
import importlib
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from splitjax import models
from splitjax import multihost

# The module, not the function `splitjax.attacks.exact` that shadows its name in the package.
exact_lib = importlib.import_module('splitjax.attacks.exact')

AttackError = exact_lib.AttackError

# (user, candidate-or-restart) rows vmapped together per user batch: about EXACT's CPU optimum.
TARGET_ROWS_PER_BATCH = {'cpu': 2**12}
TARGET_ROWS_PER_BATCH_DEFAULT = 2**16
# Users per jitted call (a power of two; the last call is padded).
USERS_PER_CALL = 256

DEFAULT_LEARNING_RATE = 0.05
DEFAULT_NUM_STEPS = 200
DEFAULT_NUM_RESTARTS = 16
DEFAULT_NUM_STARTS = 64  # hybrid: stratified starts of the dense box per pair


# ----------------------------------------------------------------------------------------------
# Objectives and helpers.


def _safe_norm(x: jax.Array) -> jax.Array:
  """L2 norm over the last axis whose gradient is finite (zero) at x = 0."""
  sq = jnp.sum(jnp.square(x), axis=-1)
  tiny = jnp.finfo(x.dtype).tiny
  return jnp.where(sq > tiny, jnp.sqrt(jnp.maximum(sq, tiny)), 0.0)


def squared_l2(g_obs: jax.Array, g_sim: jax.Array) -> jax.Array:
  """`||g_sim - g_obs||^2` over the last axis (broadcasting): smooth, same ranking as l2."""
  return jnp.sum(jnp.square(g_sim - g_obs), axis=-1)


def cosine_objective(g_obs: jax.Array, g_sim: jax.Array) -> jax.Array:
  """`1 - cos(g_obs, g_sim)` over the last axis with a finite gradient at zero vectors."""
  dot = jnp.sum(g_obs * g_sim, axis=-1)
  norms = _safe_norm(g_obs) * _safe_norm(g_sim)
  tiny = jnp.finfo(dot.dtype).tiny
  return 1.0 - jnp.where(norms > tiny, dot / jnp.maximum(norms, tiny), 0.0)


# Name -> pure objective `(g_obs [..., d], g_sim [..., d]) -> [...]` that the optimiser minimises.
# 'l2' minimises the squared distance (the same minimiser, smoother); results report the distance.
OBJECTIVES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
  'l2': squared_l2,
  'cosine': cosine_objective,
}


def _to_distance(distance: str, objective_value: jax.Array) -> jax.Array:
  """Objective value -> the reported distance (`exact.DISTANCES[distance]`)."""
  if distance == 'l2':
    return jnp.sqrt(jnp.maximum(objective_value, 0.0))
  return objective_value


def clip_rows(x: jax.Array, l2_clip_norm: jax.Array) -> jax.Array:
  """Scales each row (last axis) of `x` to L2 norm at most `l2_clip_norm` (inf: unchanged).

  Differentiable everywhere, including at zero rows. This is what the device's
  `clip_per_example` does to each `g_i` (or activation `a_i`); a clip-aware attacker simulates it.
  """
  norm = _safe_norm(x)
  # Both branches finite (an inf or NaN in the unselected branch would poison the gradient).
  finite_clip = jnp.where(jnp.isfinite(l2_clip_norm), l2_clip_norm, 1.0)
  factor = jnp.where(norm > l2_clip_norm, finite_clip / jnp.maximum(norm, finite_clip), 1.0)
  return x * factor[..., None]


def _where_rows(mask: jax.Array, new, old):
  """Per-row select on pytrees whose leaves have `mask`'s leading axis."""

  def sel(a, b):
    return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim)), a, b)

  return jax.tree.map(sel, new, old)


@functools.cache
def default_optimizer(
  learning_rate: float = DEFAULT_LEARNING_RATE, num_steps: int = DEFAULT_NUM_STEPS
) -> optax.GradientTransformation:
  """Adam whose step decays from `learning_rate` to 0 along a cosine over `num_steps` steps.

  Cached: the same arguments return the same object, so compiled attacks are reused.
  """
  return optax.adam(optax.cosine_decay_schedule(learning_rate, max(int(num_steps), 1)))


# ----------------------------------------------------------------------------------------------
# The relaxed DeepFM / MLP head of splitjax.models.


@functools.cache
def relaxed_device_apply(model: models.SplitModel) -> Callable[..., jax.Array]:
  """The device head of `model` with categorical inputs relaxed to probability vectors.

  Returns `apply(params, h [d], probs, dense [Pd]) -> scalar logit`, where `probs` is a tuple of P
  vectors `[K_j]` (each a distribution over feature j's values) and every lookup `table[x_j]` of
  `models.Head` becomes the mixture `probs_j @ table` (embeddings, the factored first DNN layer
  `T_j = E_j W_j` and the per-category linear weights alike). With one-hot `probs` it equals
  `model.head_apply(params, h, x, dense)` (a test checks it) and it is differentiable in `probs`.

  Args:
    model: a `device_top` split model (DeepFM or MLP head).

  Raises:
    AttackError: the model is not `device_top` (there the device holds the encoder, not the head).
  """
  spec = model.spec
  if spec.topology != 'device_top':
    raise AttackError(
      f'relaxed_device_apply needs a device_top model (the device runs the head); '
      f'got topology {spec.topology!r}. For device_bottom attack the activations '
      '(splitjax.attacks.activations).'
    )
  if not isinstance(spec, models.ModelSpec):
    raise AttackError(
      'relaxed_device_apply rewrites splitjax\'s own DeepFM/MLP head; a model from '
      'SplitModel.from_apply_fns needs a relaxed device_apply(params, h, probs, '
      'dense) written for it (or use attacks.exact)'
    )
  e = spec.embed_dim
  num_h_fields = len(spec.pub_cardinalities)
  num_cat = len(spec.priv_cardinalities)
  num_dense = spec.num_priv_dense
  deepfm = spec.head == 'deepfm'
  num_hidden = len(spec.hidden)

  def apply(params, h, probs, dense):
    if len(probs) != num_cat:
      raise AttackError(
        f'probs must hold {num_cat} vectors (one per private categorical '
        f'feature), got {len(probs)}.'
      )
    pre = h @ params['dnn0_w_h'] + params['dnn0_b']
    fields = []
    lin = jnp.zeros((), h.dtype)
    for j in range(num_cat):
      table = params[f'emb_{j}']
      pre = pre + probs[j] @ (table @ params[f'dnn0_w_{j}'])
      fields.append((probs[j] @ table)[None])
      if deepfm:
        lin = lin + probs[j] @ params[f'lin_{j}']
    if num_dense:
      dense = dense.astype(h.dtype)
      pre = pre + dense @ params['dnn0_w_dense']
      if deepfm:
        fields.append(dense[:, None] * params['emb_dense'])
        lin = lin + dense @ params['lin_dense']
    x = jax.nn.relu(pre)
    for i in range(1, num_hidden):
      layer = params[f'dnn{i}']
      x = jax.nn.relu(x @ layer['kernel'] + layer['bias'])
    out = (x @ params['dnn_out']['kernel'] + params['dnn_out']['bias'])[0]
    if not deepfm:
      return out
    lin = lin + (h @ params['lin_h']['kernel'] + params['lin_h']['bias'])[0]
    v = jnp.concatenate([h[: num_h_fields * e].reshape(num_h_fields, e)] + fields, axis=0)
    s = v.sum(0)
    fm = 0.5 * (s @ s - jnp.sum(v * v))
    return out + lin + fm

  return apply


# ----------------------------------------------------------------------------------------------
# Simulators: what the device would have sent for an integer candidate and dense values.


class GradientSimulator:
  """`(params, h [d], x [P] int32, dense [Pd]) -> [2, d]`: the cut gradient for labels 0 and 1.

  `(sigmoid(z) - y) dz/dh` with `z = device_apply(params, h, x, dense)` (binary cross-entropy), one
  reverse pass for both labels. Hashable by `device_apply`, so compiled attacks are cached.
  """

  num_labels = 2

  def __init__(self, device_apply: Callable[..., jax.Array]):
    self.device_apply = device_apply

  def __call__(self, params, h, x, dense):
    z, v = jax.value_and_grad(lambda hh: self.device_apply(params, hh, x, dense))(h)
    a = exact_lib.loss_factors(z)  # l'(z, 0), l'(z, 1)
    return a[:, None] * v[None, :]

  def __hash__(self):
    return hash((GradientSimulator, self.device_apply))

  def __eq__(self, other):
    return isinstance(other, GradientSimulator) and other.device_apply is self.device_apply


# ----------------------------------------------------------------------------------------------
# Results.


class OptimizeResult(NamedTuple):
  """What `optimize` recovers for each of N users (numpy arrays on the host).

  Attributes:
    features: [N, P] int32, argmax of the best restart's categorical probabilities.
    dense: [N, Pd] float32, the best restart's dense features after polishing (in the box).
    labels: [N] int32, the label whose simulated gradient matches best given features and dense.
    distances: [N] float32, distance (`distance`) between the observed gradient and the one the
      rounded answer (features, dense, label) simulates.
    best_restart: [N] int32, index of the kept restart.
    restart_distances: [N, R] float32, the same distance for every restart's rounded answer.
    restart_relaxed: [N, R] float32, every restart's best relaxed objective (before rounding).
    restart_features: [N, R, P] int32, every restart's rounded categorical answer.
    restart_dense: [N, R, Pd] float32, every restart's polished dense answer.
  """

  features: np.ndarray
  dense: np.ndarray
  labels: np.ndarray
  distances: np.ndarray
  best_restart: np.ndarray
  restart_distances: np.ndarray
  restart_relaxed: np.ndarray
  restart_features: np.ndarray
  restart_dense: np.ndarray


class HybridResult(NamedTuple):
  """What `hybrid` recovers for each of N users (numpy arrays on the host).

  Attributes:
    features: [N, P] int32, the best pair's categorical features (with noise: the argmax of each
      feature's marginal posterior, as `exact`).
    dense: [N, Pd] float32, the optimised dense features of the best pair (joint MAP with noise).
    labels: [N] int32, the label, chosen like `features`.
    distances: [N] float32, distance of the best pair (l2 in the Bayes variant).
    num_ties: [N] int32, pairs whose score is within exact's tie tolerance of the best (1 = unique).
    gap: [N] float32, second-best minus best score.
    map_features: [N, P] int32, the single best pair's features.
    map_labels: [N] int32, the single best pair's label.
    feature_posteriors: None, or a tuple of P arrays [N, K_j] (Bayes variant).
    label_posterior: None, or [N, num_labels] (Bayes variant).
  """

  features: np.ndarray
  dense: np.ndarray
  labels: np.ndarray
  distances: np.ndarray
  num_ties: np.ndarray
  gap: np.ndarray
  map_features: np.ndarray
  map_labels: np.ndarray
  feature_posteriors: tuple[np.ndarray, ...] | None = None
  label_posterior: np.ndarray | None = None


# ----------------------------------------------------------------------------------------------
# Dense refinement with integer candidates fixed (shared by the polish of `optimize` and `hybrid`).


def _refine_pairs(
  simulate, objective, tx, num_steps: int, params, h, g, x, label, dense0, clip, lo, hi
):
  """Optimises the dense features of M fixed (candidate, label) pairs of one user.

  Args:
    x: [M, P] int32; label: [M] int32 (index into the simulator's labels); dense0: [M, Pd].

  Returns:
    (dense [M, Pd], objective [M]) at each pair's best-so-far point (the start included).
  """

  def loss(d, xi, li):
    obs = clip_rows(simulate(params, h, xi, d), clip)[li]
    return objective(g, obs)

  if num_steps == 0 or dense0.shape[-1] == 0:
    return dense0, jax.vmap(loss)(dense0, x, label)
  vg = jax.vmap(jax.value_and_grad(loss))
  state0 = jax.vmap(tx.init)(dense0)

  def step(carry, _):
    d, st, best_l, best_d = carry
    obj, grads = vg(d, x, label)
    better = obj < best_l
    best_d = _where_rows(better, d, best_d)
    best_l = jnp.where(better, obj, best_l)
    upd, st = jax.vmap(tx.update)(grads, st, d)
    d = jnp.clip(optax.apply_updates(d, upd), lo, hi)
    return (d, st, best_l, best_d), None

  init = (dense0, state0, jnp.full(dense0.shape[:1], jnp.inf, g.dtype), dense0)
  (d, _, best_l, best_d), _ = jax.lax.scan(step, init, None, length=num_steps)
  last = jax.vmap(loss)(d, x, label)
  better = last < best_l
  return _where_rows(better, d, best_d), jnp.where(better, last, best_l)


# ----------------------------------------------------------------------------------------------
# optimize: the per-user computation.


class _RelaxedVars(NamedTuple):
  logits: tuple[jax.Array, ...]  # P x [K_j]
  dense: jax.Array  # [Pd], inside the box
  label_logit: jax.Array  # scalar


class _OptOptions(NamedTuple):
  cardinalities: tuple[int, ...]
  num_dense: int
  num_restarts: int
  num_steps: int
  polish_steps: int
  distance: str
  init_scale: float
  final_temperature: float
  keep_best: bool
  polish_starts: int


def _optimize_user(
  relaxed_apply, simulate, opts: _OptOptions, tx, tx_polish, params, h, g, key, clip, lo, hi
):
  """One user's restarts: relaxed descent, rounding, polish; returns a dict of arrays."""
  objective = OBJECTIVES[opts.distance]
  num_restarts = opts.num_restarts
  k_restarts, k_polish = jax.random.split(key)
  keys = jax.random.split(k_restarts, num_restarts)  # one independent key per restart

  def init(k):
    k_cat, k_dense, k_label = jax.random.split(k, 3)
    cat_keys = jax.random.split(k_cat, max(len(opts.cardinalities), 1))
    logits = tuple(
      opts.init_scale * jax.random.normal(cat_keys[j], (kj,), g.dtype)
      for j, kj in enumerate(opts.cardinalities)
    )
    dense = lo + (hi - lo) * jax.random.uniform(k_dense, (opts.num_dense,), g.dtype)
    return _RelaxedVars(logits, dense, opts.init_scale * jax.random.normal(k_label, (), g.dtype))

  def relaxed_loss(v: _RelaxedVars, temperature=1.0):
    probs = tuple(jax.nn.softmax(lg / temperature) for lg in v.logits)
    z, dz = jax.value_and_grad(lambda hh: relaxed_apply(params, hh, probs, v.dense))(h)
    g_sim = (jax.nn.sigmoid(z) - jax.nn.sigmoid(v.label_logit)) * dz
    return objective(g, clip_rows(g_sim, clip))

  vars0 = jax.vmap(init)(keys)
  vg = jax.vmap(jax.value_and_grad(relaxed_loss), in_axes=(0, None))

  def step(carry, t):
    v, st, best_l, best_v = carry
    # Temperature annealed geometrically from 1 to final_temperature: probabilities move to the
    # vertices of the simplex (valid values) as the descent ends.
    temp = opts.final_temperature ** (t / max(opts.num_steps - 1, 1))
    obj, grads = vg(v, temp)
    better = obj < best_l
    best_v = _where_rows(better, v, best_v)
    best_l = jnp.where(better, obj, best_l)
    upd, st = jax.vmap(tx.update)(grads, st, v)
    v = optax.apply_updates(v, upd)
    v = v._replace(dense=jnp.clip(v.dense, lo, hi))
    return (v, st, best_l, best_v), None

  init_carry = (vars0, jax.vmap(tx.init)(vars0), jnp.full((num_restarts,), jnp.inf, g.dtype), vars0)
  (v, _, best_l, best_v), _ = jax.lax.scan(
    step, init_carry, jnp.arange(opts.num_steps, dtype=g.dtype)
  )
  last = jax.vmap(relaxed_loss, in_axes=(0, None))(v, opts.final_temperature)
  if opts.keep_best:
    better = last < best_l
    best_v = _where_rows(better, v, best_v)
    best_l = jnp.where(better, last, best_l)
  else:
    best_v, best_l = v, last

  # Round: categorical argmax; then polish the dense features for each label with them fixed and
  # keep the better label.
  if opts.cardinalities:
    feats = jnp.stack([jnp.argmax(lg, axis=-1) for lg in best_v.logits], axis=-1).astype(jnp.int32)
  else:
    feats = jnp.zeros((num_restarts, 0), jnp.int32)
  num_labels = simulate.num_labels
  x_pairs = jnp.repeat(feats, num_labels, axis=0)  # [R*L, P]
  l_pairs = jnp.tile(jnp.arange(num_labels, dtype=jnp.int32), num_restarts)
  d_pairs = jnp.repeat(best_v.dense, num_labels, axis=0)
  if opts.num_dense and opts.polish_starts:
    # The loss is discontinuous in the dense features (ReLU kinks switch dz/dh): also try
    # stratified starting points of the box and polish from the best one.
    extra = stratified_starts(k_polish, opts.polish_starts, lo, hi)  # [Q, Pd]

    def pick_start(x, li, d_relaxed):
      cands = jnp.concatenate([d_relaxed[None], extra])  # [Q+1, Pd]
      obs = jax.vmap(lambda d: clip_rows(simulate(params, h, x, d), clip)[li])(cands)
      return cands[jnp.argmin(objective(g, obs))]

    d_pairs = jax.vmap(pick_start)(x_pairs, l_pairs, d_pairs)
  d_ref, obj = _refine_pairs(
    simulate,
    objective,
    tx_polish,
    opts.polish_steps,
    params,
    h,
    g,
    x_pairs,
    l_pairs,
    d_pairs,
    clip,
    lo,
    hi,
  )
  obj = obj.reshape(num_restarts, num_labels)
  d_ref = d_ref.reshape(num_restarts, num_labels, opts.num_dense)
  labels = jnp.argmin(obj, axis=-1).astype(jnp.int32)  # [R]
  rounded = jnp.take_along_axis(obj, labels[:, None], axis=1)[:, 0]
  dense = jnp.take_along_axis(d_ref, labels[:, None, None], axis=1)[:, 0]
  best = jnp.argmin(rounded).astype(jnp.int32)
  return dict(
    features=feats[best],
    dense=dense[best],
    labels=labels[best],
    distances=_to_distance(opts.distance, rounded[best]),
    best_restart=best,
    restart_distances=_to_distance(opts.distance, rounded),
    restart_relaxed=best_l,
    restart_features=feats,
    restart_dense=dense,
  )


# ----------------------------------------------------------------------------------------------
# hybrid: the per-user computation.


class _HybridOptions(NamedTuple):
  cardinalities: tuple[int, ...]
  num_dense: int
  num_restarts: int
  num_steps: int
  num_refine: int
  refine_starts: int
  distance: str
  bayes: bool
  per_user_prior: bool


def stratified_starts(key: jax.Array, num: int, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """`num` points of the box `[lo, hi]^Pd`, one per stratum of each axis (Latin hypercube).

  Returns [num, Pd]: along every axis the points fall in distinct slices `[i/num, (i+1)/num)`.
  """
  pd = lo.shape[0]
  k_perm, k_u = jax.random.split(key)
  perms = jax.vmap(lambda k: jax.random.permutation(k, num))(jax.random.split(k_perm, max(pd, 1)))
  u = jax.random.uniform(k_u, (num, pd), lo.dtype)
  frac = (perms[:pd].T.astype(lo.dtype) + u) / num
  return lo + (hi - lo) * frac


def _hybrid_user(
  simulate,
  opts: _HybridOptions,
  tx,
  params,
  h,
  g,
  key,
  log_prior,
  table,
  clip,
  noise_stddev,
  lo,
  hi,
):
  """One user: score every (candidate, label) pair at the starts, refine the best, answer."""
  objective = OBJECTIVES['l2' if opts.bayes else opts.distance]
  num_labels = simulate.num_labels
  k_starts, k_refine = jax.random.split(key)
  starts = stratified_starts(k_starts, opts.num_restarts, lo, hi)  # [R, Pd]

  def pair_losses(x, d):  # -> [L]
    return objective(g, clip_rows(simulate(params, h, x, d), clip))

  # Inner vmap: starts (h and x unbatched), outer: candidates -> [C, R, L].
  coarse = jax.vmap(lambda x: jax.vmap(lambda d: pair_losses(x, d))(starts))(table)
  best_start = jnp.argmin(coarse, axis=1)  # [C, L]
  obj = jnp.take_along_axis(coarse, best_start[:, None, :], axis=1)[:, 0]  # [C, L]
  obj = obj.reshape(-1)  # [C*L], label fastest
  dense = starts[best_start.reshape(-1)]  # [C*L, Pd]

  def score_of(o):
    if opts.bayes:
      return o / (2.0 * jnp.square(noise_stddev)) - log_prior
    return _to_distance(opts.distance, o)

  if opts.num_dense and opts.num_refine:
    _, idx = jax.lax.top_k(-score_of(obj), opts.num_refine)
    x_ref, l_ref, d_ref = table[idx // num_labels], (idx % num_labels).astype(jnp.int32), dense[idx]
    if opts.refine_starts:
      # Second stage: the short-listed pairs try a finer set of fresh stratified starts (the loss
      # jumps at ReLU kinks, so a pair's basin can be narrower than the first stage's spacing).
      more = stratified_starts(k_refine, opts.refine_starts, lo, hi)  # [R2, Pd]

      def best_of(x, li, d0):
        cands = jnp.concatenate([d0[None], more])
        o = jax.vmap(lambda d: pair_losses(x, d)[li])(cands)
        return cands[jnp.argmin(o)]

      d_ref = jax.vmap(best_of)(x_ref, l_ref, d_ref)
    d_ref, o_ref = _refine_pairs(
      simulate, objective, tx, opts.num_steps, params, h, g, x_ref, l_ref, d_ref, clip, lo, hi
    )
    obj = obj.at[idx].set(o_ref)
    dense = dense.at[idx].set(d_ref)

  score = score_of(obj)
  best_idx = jnp.argmin(score)
  best = score[best_idx]
  is_best = jnp.arange(score.shape[0]) == best_idx
  gap = jnp.min(jnp.where(is_best, jnp.inf, score)) - best
  if opts.bayes:
    scale = jnp.sum(jnp.square(g)) / (2.0 * jnp.square(noise_stddev))
  else:
    scale = exact_lib.DISTANCES[opts.distance](g, jnp.zeros_like(g))
  tol = exact_lib.TIE_RTOL * scale + exact_lib.TIE_ATOL
  out = dict(
    map_features=table[best_idx // num_labels],
    map_labels=(best_idx % num_labels).astype(jnp.int32),
    num_ties=jnp.sum(score <= best + tol).astype(jnp.int32),
    gap=gap,
    dense=dense[best_idx],
    distances=jnp.sqrt(jnp.maximum(obj[best_idx], 0.0)) if opts.bayes else score[best_idx],
  )
  if opts.bayes:
    lp = (-score).reshape(opts.cardinalities + (num_labels,))
    total = jax.scipy.special.logsumexp(lp)
    all_axes = set(range(lp.ndim))
    posts = [
      jnp.exp(jax.scipy.special.logsumexp(lp, axis=tuple(sorted(all_axes - {j}))) - total)
      for j in range(lp.ndim)
    ]
    out['feature_posteriors'] = tuple(posts[:-1])
    out['label_posterior'] = posts[-1]
    out['features'] = jnp.array([jnp.argmax(p) for p in posts[:-1]], jnp.int32).reshape(-1)
    out['labels'] = jnp.argmax(posts[-1]).astype(jnp.int32)
  else:
    out['features'], out['labels'] = out['map_features'], out['map_labels']
  return out


# ----------------------------------------------------------------------------------------------
# Batching over users, compilation cache.

_CACHE: dict[Any, Any] = {}


def _next_pow2(x: int) -> int:
  return 1 << max(0, x - 1).bit_length()


def _users_per_batch(rows_per_user: int, users_per_batch: int | None) -> int:
  if users_per_batch is not None:
    return users_per_batch
  target = TARGET_ROWS_PER_BATCH.get(jax.default_backend(), TARGET_ROWS_PER_BATCH_DEFAULT)
  return 1 << max(0, (max(1, target // max(rows_per_user, 1))).bit_length() - 1)


def _map_users(one, xs, batch: int):
  """`lax.map` of `vmap(one)` over blocks of `batch` users (the number of users a multiple of it).

  Written out instead of `lax.map(..., batch_size=)`, whose reshape fails on zero-size outputs
  (e.g. no categorical feature).
  """
  n = jax.tree.leaves(xs)[0].shape[0]
  blocks = jax.tree.map(lambda x: x.reshape((n // batch, batch) + x.shape[1:]), xs)
  out = jax.lax.map(jax.vmap(one), blocks)
  return jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), out)


def _check_devices(devices) -> tuple:
  devices = tuple(jax.devices() if devices is None else devices)
  if not devices:
    raise AttackError('devices is empty; pass None (all devices) or at least one device.')
  return devices


def _compiled(kind: str, key, make_body, devices: tuple, num_shared: int, num_per_user: int):
  """`jit` of a body mapping a per-user function over users, cached under (kind, key, devices).

  `body(*shared, *per_user, batch=b)`: the shared arguments (parameters, tables, scalars) are
  replicated; the per-user arrays and every output are split along their leading axis over a 1-D
  mesh 'users' of `devices` (`shard_map`: each device attacks its own block of users, no
  communication). Returns `(fn, mesh)`.
  """
  entry = _CACHE.get((kind, key, devices))
  if entry is None:
    body = make_body()
    mesh = jax.sharding.Mesh(np.asarray(devices), ('users',))
    if len(devices) > 1:
      spec = jax.sharding.PartitionSpec
      in_specs = (spec(),) * num_shared + (spec('users'),) * num_per_user

      def sharded(*args, batch):
        return jax.shard_map(
          functools.partial(body, batch=batch),
          mesh=mesh,
          in_specs=in_specs,
          out_specs=spec('users'),
          check_vma=False,
        )(*args)

      fn = jax.jit(sharded, static_argnames=('batch',))
    else:
      fn = jax.jit(body, static_argnames=('batch',))
    entry = _CACHE[(kind, key, devices)] = (fn, mesh)
  return entry


def _run_users(compiled, shared: tuple, per_user: tuple, num_users: int, batch: int) -> dict:
  """Calls `fn(*shared, *per_user_block, batch=b)` on padded blocks of users; concatenates.

  Each call takes `USERS_PER_CALL` users per device (fewer for small problems), a multiple of the
  vmapped `batch`; the last call is padded with copies of the first user (dropped at the end).
  """
  fn, mesh = compiled
  num_devices = mesh.devices.size
  per_device = min(USERS_PER_CALL, _next_pow2(-(-num_users // num_devices)))
  batch = max(1, min(batch, per_device))
  per_device = max(per_device, batch) // batch * batch
  per_call = per_device * num_devices
  num_calls = -(-num_users // per_call)
  pad = num_calls * per_call - num_users
  spec = jax.sharding.PartitionSpec
  replicated = jax.sharding.NamedSharding(mesh, spec())
  users = jax.sharding.NamedSharding(mesh, spec('users'))

  def padded(x):
    return np.concatenate([x, np.repeat(x[:1], pad, axis=0)]) if pad else x

  shared = multihost.put_global(shared, replicated)
  per_user = tuple(padded(np.asarray(x)) for x in per_user)
  outs = [
    fn(
      *shared,
      *(multihost.put_global(x[i * per_call : (i + 1) * per_call], users) for x in per_user),
      batch=batch,
    )
    for i in range(num_calls)
  ]
  return jax.tree.map(
    lambda *parts: np.concatenate([multihost.to_host(p) for p in parts])[:num_users], *outs
  )


def _check_observations(h, g_obs, name_h='h', name_g='g_obs'):
  h_np = np.asarray(h)
  g_np = np.asarray(g_obs)
  if h_np.ndim != 2 or g_np.ndim != 2:
    raise AttackError(
      f'{name_h} and {name_g} must be [N, d] matrices, got {name_h} {h_np.shape} '
      f'and {name_g} {g_np.shape}.'
    )
  if h_np.shape[0] != g_np.shape[0]:
    raise AttackError(
      f'{name_h} {h_np.shape} and {name_g} {g_np.shape} must have the same number of rows N.'
    )
  dtype = jax.dtypes.canonicalize_dtype(
    g_np.dtype if np.issubdtype(g_np.dtype, np.floating) else np.float32
  )
  h_np, g_np = h_np.astype(dtype), g_np.astype(dtype)
  exact_lib._check_finite_matrix(h_np, name_h)  # pylint: disable=protected-access
  exact_lib._check_finite_matrix(g_np, name_g)  # pylint: disable=protected-access
  return h_np, g_np, dtype


def _check_common(num_dense, dense_bounds, l2_clip_norm, distance, num_steps, num_restarts, dtype):
  if isinstance(num_dense, bool) or not isinstance(num_dense, (int, np.integer)) or num_dense < 0:
    raise AttackError(f'num_dense must be an int >= 0, got {num_dense!r}.')
  if distance not in OBJECTIVES:
    raise AttackError(f'unknown distance {distance!r}; valid names: {sorted(OBJECTIVES)}.')
  for name, v in (('num_steps', num_steps), ('num_restarts', num_restarts)):
    if (
      isinstance(v, bool)
      or not isinstance(v, (int, np.integer))
      or v < (1 if name == 'num_restarts' else 0)
    ):
      raise AttackError(
        f'{name} must be an int >= {1 if name == "num_restarts" else 0}, got {v!r}.'
      )
  try:
    lo, hi = dense_bounds
  except (TypeError, ValueError):
    raise AttackError(
      f'dense_bounds must be a pair (lo, hi) of scalars or [Pd] arrays, got {dense_bounds!r}.'
    ) from None
  lo = np.broadcast_to(np.asarray(lo, dtype), (int(num_dense),)).copy()
  hi = np.broadcast_to(np.asarray(hi, dtype), (int(num_dense),)).copy()
  if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo <= hi)):
    raise AttackError(f'dense_bounds must be finite with lo <= hi, got lo={lo}, hi={hi}.')
  clip = exact_lib._check_scalar(l2_clip_norm, 'l2_clip_norm')  # pylint: disable=protected-access
  if clip == 0:
    raise AttackError('l2_clip_norm must be > 0 (or None / inf for no clipping), got 0.')
  clip = np.asarray(math.inf if clip is None else clip, dtype)
  return int(num_dense), lo, hi, clip


def _user_keys(key, num_users: int) -> np.ndarray:
  """One key per user (`fold_in(key, user)`), as raw key data for host-side padding."""
  if key is None:
    key = jax.random.key(0)
  if not jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_users))
  return np.asarray(jax.random.key_data(keys))


# ----------------------------------------------------------------------------------------------
# Public API.


def optimize(
  device_apply_relaxed: Callable[..., jax.Array],
  device_params: Any,
  h: jax.typing.ArrayLike,
  g_obs: jax.typing.ArrayLike,
  cardinalities: Sequence[int],
  num_dense: int,
  *,
  optimizer: optax.GradientTransformation | None = None,
  num_steps: int = DEFAULT_NUM_STEPS,
  num_restarts: int = DEFAULT_NUM_RESTARTS,
  key: jax.Array | None = None,
  l2_clip_norm: float | None = None,
  dense_bounds=(0.0, 1.0),
  distance: str = 'l2',
  polish_steps: int | None = None,
  polish_optimizer: optax.GradientTransformation | None = None,
  init_scale: float = 1.0,
  final_temperature: float = 1.0,
  keep_best: bool = True,
  polish_starts: int = 64,
  users_per_batch: int | None = None,
  devices: Sequence[jax.Device] | None = None,
) -> OptimizeResult:
  """Recovers private categorical and dense features and the label by relaxed gradient matching.

  Per user and restart the variables are logits `[K_j]` per categorical feature (softmax mixed into
  the embeddings by `device_apply_relaxed`), dense features in the box `dense_bounds` (projected
  after each step) and a label logit (Bernoulli probability `p_y`). The loss is
  `OBJECTIVES[distance](g_obs, clip(g_sim))` with `g_sim = (sigmoid(z) - p_y) dz/dh`, the clip being
  the device's (`l2_clip_norm`; clip-aware). `num_restarts` restarts from independent keys
  run vmapped under `lax.scan` for `num_steps`
  steps of `optimizer`; each keeps its best-so-far point, which is rounded (argmax per categorical
  feature), polished (`polish_steps` steps on the dense features with the categorical values fixed,
  for each label, from the best of the relaxed point and `polish_starts` stratified points; the
  better label is kept) and scored by the distance of the rounded answer; the restart with the
  smallest distance is returned. The restart keys come from `split(k, num_restarts)` where
  `k, k_polish = split(fold_in(key, user))`.

  Args:
    device_apply_relaxed: `(params, h [d], probs (P x [K_j]), dense [Pd]) -> scalar logit`, e.g.
      `relaxed_device_apply(model)`; with one-hot `probs` it must equal the device model. Pass the
      same object across calls to reuse the compiled attack.
    device_params: the device parameters that produced `g_obs`.
    h: [N, d] cut activations; g_obs: [N, d] the gradients the server received.
    cardinalities: P ints >= 1 (may be empty when every private feature is dense).
    num_dense: Pd, the number of private dense features.
    optimizer: any optax chain for the relaxed variables (default `default_optimizer(0.05,
      num_steps)`: Adam with a cosine-decayed step).
    num_steps: optimisation steps per restart (>= 0).
    num_restarts: restarts per user (>= 1).
    key: PRNG key (default `jax.random.key(0)`); user i uses `fold_in(key, i)`.
    l2_clip_norm: the public clip norm C, or None.
    dense_bounds: `(lo, hi)`, scalars or [Pd] arrays: the box of the dense features (the scaled
      domain; [0, 1] for splitjax's min-max scaling of train values).
    distance: a name in OBJECTIVES ('l2' minimises the squared distance; 'cosine').
    polish_steps: steps of the dense-only polish after rounding (default `num_steps // 2`; 0 off).
    polish_optimizer: optax chain of the polish (default `default_optimizer(0.02, polish_steps)`).
    init_scale: standard deviation of the initial logits (and of the initial label logit).
    final_temperature: the softmax temperature is annealed geometrically from 1 to this value over
      the steps (1: no annealing); < 1 pushes the probabilities to the simplex's vertices.
    keep_best: keep each restart's best-so-far relaxed point (default) rather than its last one.
    polish_starts: before polishing, the dense features also try this many stratified points of
      the box and start from the best (the matching loss jumps at ReLU kinks, so local descent
      alone can stall on a plateau); 0 polishes from the relaxed solution only.
    users_per_batch: users vmapped together on each device (None: about 4k restart rows on CPU).
    devices: devices to shard users across (default: all of `jax.devices()`; a 1-D mesh 'users',
      each device runs its own users); pass one device to force a single-device run. The answer
      of a user does not depend on the number of devices (its key is `fold_in(key, user)`).

  Returns:
    An `OptimizeResult` of numpy arrays, rows in the order of `h`.

  Raises:
    AttackError (a ValueError): bad shapes, NaN/inf inputs, an unknown distance, bad counts/bounds.

  References:
    Zhu et al., Deep Leakage from Gradients, arXiv:1906.08935; Geiping et al., Inverting Gradients,
    arXiv:2003.14053; Qiu et al., arXiv:2305.12997 (the split-learning threat model).
  """
  cards = exact_lib._check_cardinalities(cardinalities)  # pylint: disable=protected-access
  devices = _check_devices(devices)
  h_np, g_np, dtype = _check_observations(h, g_obs)
  if h_np.shape != g_np.shape:
    raise AttackError(f'h {h_np.shape} and g_obs {g_np.shape} must have the same shape [N, d].')
  num_dense, lo, hi, clip = _check_common(
    num_dense, dense_bounds, l2_clip_norm, distance, num_steps, num_restarts, dtype
  )
  if not cards and not num_dense:
    raise AttackError('nothing to recover: cardinalities is empty and num_dense is 0.')
  polish_steps = num_steps // 2 if polish_steps is None else int(polish_steps)
  tx = (
    optimizer if optimizer is not None else default_optimizer(DEFAULT_LEARNING_RATE, int(num_steps))
  )
  tx_polish = (
    polish_optimizer
    if polish_optimizer is not None
    else default_optimizer(0.02, max(polish_steps, 1))
  )
  opts = _OptOptions(
    cards,
    num_dense,
    int(num_restarts),
    int(num_steps),
    polish_steps,
    distance,
    float(init_scale),
    float(final_temperature),
    bool(keep_best),
    int(polish_starts),
  )
  simulate = GradientSimulator(_OneHotApply(device_apply_relaxed, cards))
  num_users = h_np.shape[0]
  if num_users == 0:
    r, p = int(num_restarts), len(cards)
    return OptimizeResult(
      np.zeros((0, p), np.int32),
      np.zeros((0, num_dense), dtype),
      np.zeros(0, np.int32),
      np.zeros(0, dtype),
      np.zeros(0, np.int32),
      np.zeros((0, r), dtype),
      np.zeros((0, r), dtype),
      np.zeros((0, r, p), np.int32),
      np.zeros((0, r, num_dense), dtype),
    )

  def make_body():
    def body(params, clip_, lo_, hi_, h_, g_, keys_, *, batch):
      def one(args):
        hh, gg, kk = args
        return _optimize_user(
          device_apply_relaxed,
          simulate,
          opts,
          tx,
          tx_polish,
          params,
          hh,
          gg,
          jax.random.wrap_key_data(kk),
          clip_,
          lo_,
          hi_,
        )

      return _map_users(one, (h_, g_, keys_), batch)

    return body

  fn = _compiled('optimize', (device_apply_relaxed, opts, tx, tx_polish), make_body, devices, 4, 3)
  batch = _users_per_batch(int(num_restarts) * 4, users_per_batch)
  out = _run_users(
    fn, (device_params, clip, lo, hi), (h_np, g_np, _user_keys(key, num_users)), num_users, batch
  )
  return OptimizeResult(**out)


class _OneHotApply:
  """`(params, h, x [P] int32, dense) -> logit` from a relaxed apply (one-hot probabilities)."""

  def __init__(self, relaxed, cards):
    self.relaxed, self.cards = relaxed, cards

  def __call__(self, params, h, x, dense):
    probs = tuple(jax.nn.one_hot(x[j], k, dtype=h.dtype) for j, k in enumerate(self.cards))
    return self.relaxed(params, h, probs, dense)

  def __hash__(self):
    return hash((_OneHotApply, self.relaxed, self.cards))

  def __eq__(self, other):
    return (
      isinstance(other, _OneHotApply)
      and other.relaxed is self.relaxed
      and other.cards == self.cards
    )


def hybrid_core(
  simulate,
  device_params,
  h,
  obs,
  cardinalities,
  num_dense,
  *,
  optimizer=None,
  num_steps: int = DEFAULT_NUM_STEPS,
  num_restarts: int = DEFAULT_NUM_STARTS,
  num_refine: int | None = None,
  refine_starts: int = 256,
  key=None,
  l2_clip_norm=None,
  noise_stddev=None,
  log_prior=None,
  dense_bounds=(0.0, 1.0),
  distance='l2',
  users_per_batch=None,
  devices=None,
) -> HybridResult:
  """`hybrid` for any simulator `(params, h, x [P] int32, dense [Pd]) -> [L, d]` (see `hybrid`).

  `simulate.num_labels` is L (2 for gradients, 1 for activations, which carry no label; then the
  labels returned are all 0). `h` may have zero columns when the simulator ignores it.
  """
  cards = exact_lib._check_cardinalities(cardinalities)  # pylint: disable=protected-access
  devices = _check_devices(devices)
  h_np, g_np, dtype = _check_observations(h, obs, 'h', 'observations')
  num_dense, lo, hi, clip = _check_common(
    num_dense, dense_bounds, l2_clip_norm, distance, num_steps, num_restarts, dtype
  )
  noise, bayes = exact_lib.check_noise(noise_stddev, distance, log_prior)
  num_labels = simulate.num_labels
  num_cand = math.prod(cards)
  num_pairs = num_cand * num_labels
  num_users = h_np.shape[0]
  if num_dense == 0:
    num_restarts = 1
  refine = num_pairs if num_refine is None else int(num_refine)
  if refine < 0:
    raise AttackError(f'num_refine must be >= 0 or None (all pairs), got {num_refine!r}.')
  refine = min(refine, num_pairs)
  prior, per_user = np.zeros((1, num_pairs), dtype), False
  if log_prior is not None:
    p3, per_user = exact_lib._check_log_prior(  # pylint: disable=protected-access
      log_prior, num_users, num_cand, num_labels
    )
    prior = p3.reshape(p3.shape[0], num_pairs).astype(dtype)
  tx = (
    optimizer
    if optimizer is not None
    else default_optimizer(DEFAULT_LEARNING_RATE, max(int(num_steps), 1))
  )
  if (
    isinstance(refine_starts, bool)
    or not isinstance(refine_starts, (int, np.integer))
    or refine_starts < 0
  ):
    raise AttackError(f'refine_starts must be an int >= 0, got {refine_starts!r}.')
  opts = _HybridOptions(
    cards,
    num_dense,
    int(num_restarts),
    int(num_steps),
    refine,
    int(refine_starts) if num_dense else 0,
    distance,
    bayes,
    per_user,
  )
  if num_users == 0:
    p = len(cards)
    posts = labpost = None
    if bayes:
      posts = tuple(np.zeros((0, k), dtype) for k in cards)
      labpost = np.zeros((0, num_labels), dtype)
    z_i, z_f = np.zeros(0, np.int32), np.zeros(0, dtype)
    return HybridResult(
      np.zeros((0, p), np.int32),
      np.zeros((0, num_dense), dtype),
      z_i,
      z_f,
      z_i,
      z_f,
      np.zeros((0, p), np.int32),
      z_i,
      posts,
      labpost,
    )
  table = exact_lib.candidate_table(cards)
  noise_arg = np.asarray(noise if bayes else 1.0, dtype)

  def make_body():
    def body(
      params, table_, clip_, noise_, lo_, hi_, shared_prior, h_, g_, keys_, prior_, *, batch
    ):
      def one(args):
        hh, gg, kk, pp = args
        lp = pp if opts.per_user_prior else shared_prior[0]
        return _hybrid_user(
          simulate,
          opts,
          tx,
          params,
          hh,
          gg,
          jax.random.wrap_key_data(kk),
          lp,
          table_,
          clip_,
          noise_,
          lo_,
          hi_,
        )

      return _map_users(one, (h_, g_, keys_, prior_), batch)

    return body

  fn = _compiled('hybrid', (simulate, opts, tx), make_body, devices, 7, 4)
  batch = _users_per_batch(num_pairs * opts.num_restarts, users_per_batch)
  per_user_prior = prior if per_user else np.zeros((num_users, 0), dtype)
  out = _run_users(
    fn,
    (device_params, table, clip, noise_arg, lo, hi, prior),
    (h_np, g_np, _user_keys(key, num_users), per_user_prior),
    num_users,
    batch,
  )
  return HybridResult(
    features=out['features'],
    dense=out['dense'],
    labels=out['labels'],
    distances=out['distances'],
    num_ties=out['num_ties'],
    gap=out['gap'],
    map_features=out['map_features'],
    map_labels=out['map_labels'],
    feature_posteriors=out.get('feature_posteriors'),
    label_posterior=out.get('label_posterior'),
  )


def hybrid(
  device_apply: Callable[..., jax.Array],
  device_params: Any,
  h: jax.typing.ArrayLike,
  g_obs: jax.typing.ArrayLike,
  cardinalities: Sequence[int],
  num_dense: int,
  *,
  optimizer: optax.GradientTransformation | None = None,
  num_steps: int = DEFAULT_NUM_STEPS,
  num_restarts: int = DEFAULT_NUM_STARTS,
  num_refine: int | None = None,
  refine_starts: int = 256,
  key: jax.Array | None = None,
  l2_clip_norm: float | None = None,
  noise_stddev: float | None = None,
  log_prior: jax.typing.ArrayLike | None = None,
  dense_bounds=(0.0, 1.0),
  distance: str = 'l2',
  users_per_batch: int | None = None,
  devices: Sequence[jax.Device] | None = None,
) -> HybridResult:
  """EXACT over the categorical features and the label, optimisation over the dense features.

  For every user, every candidate `x` of `candidate_table(cardinalities)` and every label `y`, the
  pair's dense features are fitted: the simulated gradient `clip((sigmoid(z) - y) dz/dh)` with
  `z = device_apply(params, h, x, dense)` is scored against `g_obs` at `num_restarts` stratified
  starting points of the box (one reverse pass per (candidate, start) serves both labels); the
  `num_refine` best pairs (None: all) then run `num_steps` steps of `optimizer` on their dense
  features from their best start (vmapped, best-so-far kept). The answer is the best pair, or with
  `noise_stddev` the argmax of each marginal posterior of `-||g_obs - g_pair||^2 / (2 s^2) +
  log_prior` (dense features profiled out, i.e. set to their fitted values). With `num_dense = 0`
  this is EXACT (same candidates, same clip-aware scoring).

  Args:
    device_apply: `(params, h [d], x_priv [P] int32, dense [Pd]) -> scalar logit` (for splitjax
      models: `model.head_apply`). Pass the same object across calls to reuse compilations.
    device_params: the device parameters that produced `g_obs`.
    h: [N, d]; g_obs: [N, d].
    cardinalities: P ints >= 1.
    num_dense: Pd >= 0.
    optimizer: optax chain of the dense refinement (default Adam, cosine-decayed from 0.05).
    num_steps: refinement steps (0: keep the best start).
    num_restarts: starting points per pair (Latin hypercube of the box; 1 when num_dense = 0).
    num_refine: pairs refined per user (None: all; a few dozen is usually enough, since the
      starts already rank the pairs).
    refine_starts: fresh stratified starts tried by each refined pair before its descent (a
      finer second stage; 0 off).
    key: PRNG key of the starts (default `jax.random.key(0)`); user i uses `fold_in(key, i)`.
    l2_clip_norm: the public clip norm C (clip-aware scoring), or None.
    noise_stddev: public noise std per coordinate (sigma C): Bayes scoring; None / 0 off.
    log_prior: optional log prior over pairs (exact's layout: [C*L], [C, L] or per user).
    dense_bounds: `(lo, hi)` box of the dense features (scalars or [Pd]).
    distance: 'l2' or 'cosine' (without noise).
    users_per_batch: users vmapped together on each device (None: about 4k (pair, start) rows on
      CPU).
    devices: devices to shard users across (default: all; see `optimize`).

  Returns:
    A `HybridResult` of numpy arrays.

  Raises:
    AttackError (a ValueError): as `exact` and `optimize`.

  References:
    Qiu et al., Evaluating Privacy Leakage in Split Learning, arXiv:2305.12997 (EXACT).
  """
  if np.shape(h) != np.shape(g_obs):
    raise AttackError(
      f'h {np.shape(h)} and g_obs {np.shape(g_obs)} must have the same shape [N, d].'
    )
  return hybrid_core(
    GradientSimulator(device_apply),
    device_params,
    h,
    g_obs,
    cardinalities,
    num_dense,
    optimizer=optimizer,
    num_steps=num_steps,
    num_restarts=num_restarts,
    num_refine=num_refine,
    refine_starts=refine_starts,
    key=key,
    l2_clip_norm=l2_clip_norm,
    noise_stddev=noise_stddev,
    log_prior=log_prior,
    dense_bounds=dense_bounds,
    distance=distance,
    users_per_batch=users_per_batch,
    devices=devices,
  )


def clear_cache() -> None:
  """Forgets every cached compiled function."""
  _CACHE.clear()
