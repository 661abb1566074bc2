"""`optimize`: recover private categorical AND continuous features by relaxed gradient matching.

EXACT (`splitjax.attacks.exact`) enumerates a finite domain; a private *continuous* feature (e.g.
age moved to the device) has none (DESIGN.md §3). Here every secret becomes a continuous
variable — each categorical feature a vector of logits whose softmax probabilities are mixed into
the embeddings (`probs @ table` instead of `table[x]`, the soft form of the head,
`models.soft_device_apply`), each dense feature a point of its box (projected after every step),
the label a Bernoulli probability — and the distance between the simulated cut gradient
`(sigmoid(z) - p_y) dz/dh` (clipped with the public C when given) and the observed one is
minimised with an optax chain (default Adam with a cosine-decayed step). `num_restarts` restarts
per user start from independent keys (`jax.random.split`), run in one `vmap` under a `lax.scan`
over steps, keep their best-so-far point, are rounded (categorical argmax), polished (dense
features re-optimised with the categorical values fixed, the label chosen exactly), and the
restart whose rounded answer matches best is kept. Users go through `runner.run_users`.

The attack sees only what crosses the wire (`h`, `g`) and public knowledge (the device model, the
domains, C and sigma); the ground truth goes to `splitjax.metrics` only.

References:
  Qiu, Leontiadis, Melis, Sablayrolles, Stock. Evaluating Privacy Leakage in Split Learning.
  arXiv:2305.12997 (EXACT; relaxed matching is splitjax's extension).
  Zhu, Liu, Han. Deep Leakage from Gradients. NeurIPS 2019, arXiv:1906.08935 (gradient matching).
  Geiping, Bauermeister, Droge, Moeller. Inverting Gradients. NeurIPS 2020, arXiv:2003.14053
  (restarts, cosine objective).
"""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from splitjax.attacks import checks
from splitjax.attacks import matching
from splitjax.attacks import runner
from splitjax.attacks import scoring

AttackError = checks.AttackError

DEFAULT_NUM_RESTARTS = 16


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
  objective = matching.OBJECTIVES[opts.distance]
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
    return objective(g, scoring.clip_rows(g_sim, clip))

  vars0 = jax.vmap(init)(keys)
  vg = jax.vmap(jax.value_and_grad(relaxed_loss), in_axes=(0, None))

  def step(carry, t):
    v, st, best_l, best_v = carry
    # Temperature annealed geometrically from 1 to final_temperature: probabilities move to the
    # vertices of the simplex (valid values) as the descent ends.
    temp = opts.final_temperature ** (t / max(opts.num_steps - 1, 1))
    obj, grads = vg(v, temp)
    better = obj < best_l
    best_v = matching.where_rows(better, v, best_v)
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
    best_v = matching.where_rows(better, v, best_v)
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
    extra = matching.stratified_starts(k_polish, opts.polish_starts, lo, hi)  # [Q, Pd]

    def pick_start(x, li, d_relaxed):
      cands = jnp.concatenate([d_relaxed[None], extra])  # [Q+1, Pd]
      obs = jax.vmap(lambda d: scoring.clip_rows(simulate(params, h, x, d), clip)[li])(cands)
      return cands[jnp.argmin(objective(g, obs))]

    d_pairs = jax.vmap(pick_start)(x_pairs, l_pairs, d_pairs)
  d_ref, obj = matching.refine_pairs(
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
    distances=matching.to_distance(opts.distance, rounded[best]),
    best_restart=best,
    restart_distances=matching.to_distance(opts.distance, rounded),
    restart_relaxed=best_l,
    restart_features=feats,
    restart_dense=dense,
  )


def _optimize_users(soft_apply, simulate, opts, tx, tx_polish, batch, shared, per_user):
  """The runner's body: `_optimize_user` mapped over a block of users, `batch` at a time."""
  params, clip, lo, hi = shared

  def one(args):
    hh, gg, kk = args
    return _optimize_user(
      soft_apply,
      simulate,
      opts,
      tx,
      tx_polish,
      params,
      hh,
      gg,
      jax.random.wrap_key_data(kk),
      clip,
      lo,
      hi,
    )

  return runner.map_users(one, per_user, batch)


def optimize(
  device_apply_relaxed: Callable[..., jax.Array],
  device_params: Any,
  h: jax.typing.ArrayLike,
  g_obs: jax.typing.ArrayLike,
  cardinalities: Sequence[int],
  num_dense: int,
  *,
  optimizer: optax.GradientTransformation | None = None,
  num_steps: int = matching.DEFAULT_NUM_STEPS,
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
      `models.soft_device_apply(model)` (the soft form of the head; for your own model see
      `SplitModel.from_apply_fns`); with one-hot `probs` it must equal the device model. Pass
      the same object across calls to reuse the compiled attack.
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
  cards = checks.cardinalities(cardinalities)
  devices = checks.devices(devices)
  h_np, g_np, dtype = checks.observations(h, g_obs)
  checks.same_shape(h_np, g_np)
  num_dense, lo, hi, clip = matching.check_fit(
    num_dense, dense_bounds, l2_clip_norm, distance, num_steps, num_restarts, dtype
  )
  if not cards and not num_dense:
    raise AttackError('nothing to recover: cardinalities is empty and num_dense is 0.')
  polish_steps = num_steps // 2 if polish_steps is None else int(polish_steps)
  tx = (
    optimizer
    if optimizer is not None
    else matching.default_optimizer(matching.DEFAULT_LEARNING_RATE, int(num_steps))
  )
  tx_polish = (
    polish_optimizer
    if polish_optimizer is not None
    else matching.default_optimizer(0.02, max(polish_steps, 1))
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
  simulate = matching.GradientSimulator(matching.OneHotApply(device_apply_relaxed, cards))
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

  batch, users_per_call = runner.call_size(
    num_users, len(devices), runner.users_per_batch(int(num_restarts) * 4, users_per_batch)
  )
  body = runner.Static(
    _optimize_users, (device_apply_relaxed, simulate, opts, tx, tx_polish, batch)
  )
  out = runner.run_users(
    body,
    (device_params, clip, lo, hi),
    (h_np, g_np, runner.user_keys(key, num_users)),
    num_users=num_users,
    users_per_call=users_per_call,
    devices=devices,
  )
  return OptimizeResult(**out)
