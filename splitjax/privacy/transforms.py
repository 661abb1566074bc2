"""Per-example clipping and Gaussian noise as optax transforms (cut-layer DP and device DP-SGD).

All factories accept Python floats or traced jax scalars for `l2_clip_norm` and
`noise_multiplier`, so they can be built inside a jitted step and a sweep over clip/sigma does not
recompile. Values are validated (PrivacyError, a ValueError) only when they are concrete.

Typical cut-layer use, applied by the device to its rows `g: [batch, d_cut]` before sending:

    tx = cut_layer_dp(l2_clip_norm, noise_multiplier, key=key)
    state = tx.init(g)
    g_sent, state = tx.update(g, state)
"""

import functools
import math
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from splitjax.privacy import _checks


class AddGaussianNoiseState(NamedTuple):
  """State of `add_gaussian_noise`: number of updates so far and the next PRNG key."""

  count: jax.Array  # type: ignore[assignment]  # int32 scalar (the field shadows tuple.count)
  rng_key: jax.Array


class DpAggregateState(NamedTuple):
  """State of `dp_aggregate`: number of updates so far and the next PRNG key."""

  count: jax.Array  # type: ignore[assignment]  # int32 scalar (the field shadows tuple.count)
  rng_key: jax.Array


def _check_key(key) -> None:
  """Accepts a typed PRNG key scalar (`jax.random.key`) or a raw uint32[2] key, traced or not."""
  dtype, shape = getattr(key, 'dtype', None), tuple(getattr(key, 'shape', (None,)))
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
    return
  if dtype == jnp.uint32 and shape == (2,):
    return
  raise _checks.PrivacyError(
    f'key must be one PRNG key from jax.random.key(seed), got {type(key).__name__} with '
    f'dtype {dtype} and shape {shape}.'
  )


def _batch_size(leaves) -> int:
  """The common leading size of `leaves`; PrivacyError listing the shapes otherwise."""
  shapes = [tuple(x.shape) for x in leaves]
  if any(len(s) == 0 for s in shapes) or len({s[0] for s in shapes}) != 1:
    raise _checks.PrivacyError(
      f'every leaf needs the same leading batch axis, got shapes {shapes}; '
      'stack per-example values along axis 0.'
    )
  if shapes[0][0] == 0:
    raise _checks.PrivacyError(
      f'the batch is empty (leaf shapes {shapes}): per-example DP needs at least one example; '
      'skip the step instead of calling the transform on zero rows.'
    )
  return shapes[0][0]


def _check_float(leaves) -> None:
  bad = [str(x.dtype) for x in leaves if not jnp.issubdtype(x.dtype, jnp.floating)]
  if bad:
    raise _checks.PrivacyError(f'DP transforms need floating-point updates, got dtypes {bad}.')


# Rows whose largest |entry| lies in [_TYPICAL_LO, _TYPICAL_HI] are clipped by scaling with that
# largest entry (the original formula, kept bit for bit); other rows -- near the float32 maximum,
# tiny or subnormal, or non-finite -- are first scaled by an exact power of two, so that 1/m can
# neither overflow nor flush to zero, and the comparison with C is made in the scaled space.
_TYPICAL_LO, _TYPICAL_HI = 2.0**-100, 2.0**100
_SCALE_UP, _SCALE_DOWN = 2.0**126, 2.0**-126
_FLOAT32_MAX = 3.4028234663852886e38


class _RowStats(NamedTuple):
  """Per-row quantities of a pytree of `[batch, ...]` leaves, in the norm dtype."""

  dtype: jnp.dtype
  typical: jax.Array  # [batch] bool: largest |entry| in [2^-100, 2^100]
  finite: jax.Array  # [batch] bool: every entry finite
  norm: jax.Array  # [batch] L2 norms (inf where it overflows, NaN for NaN rows)
  pow2: jax.Array  # [batch] the exact power of two that scales an atypical row
  scaled: jax.Array  # [batch] L2 norm of the row times pow2 (atypical rows)


def _row_stats(leaves) -> _RowStats:
  _batch_size(leaves)
  dtype = jnp.result_type(jnp.float32, *[x.dtype for x in leaves])
  rows = [x.astype(dtype).reshape(x.shape[0], -1) for x in leaves]
  m = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(r), axis=1) for r in rows])  # NaN stays NaN
  finite = functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(r), axis=1) for r in rows])
  typical = (m >= _TYPICAL_LO) & (m <= _TYPICAL_HI)
  # Typical rows: scale by the largest magnitude, so squares of small entries do not underflow.
  safe = jnp.where(typical, m, 1.0)
  sq = sum(jnp.sum(jnp.square(r / safe[:, None]), axis=1) for r in rows)
  # Other rows: an exact power of two brings the largest entry into [2^-26, 4] (float32), so
  # squares neither overflow nor vanish; entries below 2^-23 of the largest may flush (negligible).
  pow2 = jnp.where(m < _TYPICAL_LO, _SCALE_UP, _SCALE_DOWN).astype(dtype)
  scaled = jnp.sqrt(sum(jnp.sum(jnp.square(r * pow2[:, None]), axis=1) for r in rows))
  norm = jnp.where(typical, safe * jnp.sqrt(sq), scaled * (1.0 / pow2))
  norm = jnp.where(m > 0, norm, jnp.where(jnp.isnan(m), m, 0.0))
  return _RowStats(dtype, typical, finite, norm, pow2, scaled)


def per_example_global_norm(updates: Any) -> jax.Array:
  """The L2 norm of each example's row over all leaves.

  Exact up to rounding for every finite input (no overflow for entries near the float32 maximum
  other than a norm that itself exceeds it, which is inf; no underflow for tiny entries).

  Args:
    updates: a pytree (optax updates) whose leaves are `[batch, ...]`.

  Returns:
    `[batch]` norms, in float32 (or the widest leaf dtype if wider); inf for rows with an
    infinite entry, NaN for rows with a NaN.

  Raises:
    PrivacyError: leaves without a common leading batch axis.
  """
  return _row_stats(jax.tree.leaves(updates)).norm


def nonfinite_rows(updates: Any) -> jax.Array:
  """`[batch]` bool: rows holding an inf or NaN in any leaf (`clip_per_example` zeroes them)."""
  leaves = jax.tree.leaves(updates)
  _batch_size(leaves)
  return ~_row_stats(leaves).finite


def clip_rows(updates: Any, l2_clip_norm: jax.typing.ArrayLike) -> Any:
  """The pure clip behind `clip_per_example`: each example's row to L2 norm at most C.

  Args:
    updates: a pytree whose leaves are `[batch, ...]` floats; row i is the i-th slice of every
      leaf together (global norm over the leaves).
    l2_clip_norm: C >= 0 (traced or concrete; not checked here, see `clip_per_example`).

  Returns:
    The pytree with row i multiplied by min(1, C / ||row_i||); non-finite rows become zero
    rows. The same robust computation as `clip_per_example` (its Formal guarantees hold).
    (`splitjax.attacks.clip_rows` is the attacker's simulation of it on candidate rows `[..., d]`:
    the same result on every row whose squared norm is representable, differentiable at zero
    rows.)
  """
  leaves, treedef = jax.tree.flatten(updates)
  st = _row_stats(leaves)
  clip = jnp.asarray(l2_clip_norm, dtype=st.dtype)
  # Typical rows: the original formula (over is False for clip = inf and zero rows).
  over = st.norm > clip
  scale = jnp.where(over, clip / jnp.where(over, st.norm, 1.0), 1.0)
  # Atypical rows: compare in the scaled space, where ~(a <= b) also counts NaN as over;
  # rows whose scaled norm is 0 (zero rows, or subnormals flushed by the backend) become +-0.
  atyp_over = ~(st.scaled <= clip * st.pow2)
  atyp_post = jnp.where(
    st.scaled > 0, jnp.where(atyp_over, clip / jnp.where(st.scaled > 0, st.scaled, 1.0), 1.0), 0.0
  )
  # Every row is output as (x * pre) * post; pre = 1 except on atypical rows that are clipped,
  # so typical rows get exactly the original x * scale (and the same rounding where a backend
  # fuses that product with the noise that follows) and unclipped rows pass unchanged.
  pre = jnp.where(~st.typical & st.finite & (st.scaled > 0) & atyp_over, st.pow2, 1.0)
  post = jnp.where(st.typical, scale, atyp_post)

  def apply(x):
    b = lambda v: v.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    x = jnp.where(b(st.finite) > 0, x, jnp.zeros_like(x))  # non-finite rows: zero rows
    return (x * b(pre)) * b(post)

  return jax.tree.unflatten(treedef, [apply(x) for x in leaves])


def clip_per_example(l2_clip_norm: jax.typing.ArrayLike) -> optax.GradientTransformation:
  """Scales each example's row (global L2 norm over all leaves) to norm at most C.

  Row i of every leaf (axis 0 is the batch axis) is multiplied by min(1, C / ||row_i||), where
  ||row_i|| is the L2 norm over all leaves together. C = 0 gives zeros; C = inf is the identity
  on finite rows; zero rows stay zero (no NaN). A row with an inf or NaN in any leaf becomes a
  zero row (count them with `nonfinite_rows` and report the count). Rows with entries near the
  float32 maximum or below 2^-100 are scaled by an exact power of two before the norm is taken,
  so no entry can slip through unclipped; rows whose largest |entry| lies in [2^-100, 2^100] are
  computed exactly as in splitjax 0.1.

  Args:
    l2_clip_norm: C >= 0, a Python/numpy float or a traced jax scalar (inf allowed).

  Returns:
    A stateless `optax.GradientTransformation` (state `optax.EmptyState`).

  Raises:
    PrivacyError: C negative or NaN (when concrete); at update, leaves without a common
      leading batch axis or non-float dtypes. A traced C is not checked: keep it >= 0.

  Formal guarantees:
    Each output row has L2 norm <= C (up to rounding in the leaf dtype: relative ~1e-7 in
    float32, ~4e-3 in bfloat16) for every input, finite or not (subnormal, near the float32
    maximum, +-inf, NaN), on backends that flush subnormals too; it depends only on that
    example's input row. Hence replacing one example changes the output
    by at most 2C in L2 norm (adding or removing one: C) -- the sensitivity used by accounting.

  References:
    Abadi et al., "Deep Learning with Differential Privacy", arXiv 1607.00133.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = clip_per_example(1.0)
    >>> out, _ = tx.update(jnp.array([[3.0, 4.0], [0.3, 0.4]]), tx.init(None))
    >>> [round(float(n), 4) for n in jnp.linalg.norm(out, axis=1)]
    [1.0, 0.5]
  """
  _checks.nonnegative(l2_clip_norm, 'l2_clip_norm')

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    if not leaves:
      return updates, state
    _batch_size(leaves)
    _check_float(leaves)
    return clip_rows(updates, l2_clip_norm), state

  return optax.GradientTransformation(init_fn, update_fn)


def _noise_stddev(noise_multiplier, l2_clip_norm):
  """(stddev as a jax scalar, True if statically zero); checks sigma > 0 with C = inf."""
  sigma = _checks.nonnegative(noise_multiplier, 'noise_multiplier')
  clip = _checks.nonnegative(l2_clip_norm, 'l2_clip_norm')
  if sigma is not None and clip is not None and sigma > 0 and math.isinf(clip):
    raise _checks.PrivacyError(
      f'noise_multiplier={sigma} > 0 needs a finite l2_clip_norm (noise std is sigma * C); '
      'clip first or set noise_multiplier=0.'
    )
  if (
    sigma is not None
    and clip is not None
    and math.isfinite(sigma)
    and math.isfinite(clip)
    and sigma * clip > _FLOAT32_MAX
  ):
    raise _checks.PrivacyError(
      f'noise std noise_multiplier * l2_clip_norm = {sigma * clip:.3g} overflows float32 '
      f'(max {_FLOAT32_MAX:.3g}): lower the noise multiplier or the clip norm.'
    )
  static_zero = sigma == 0.0 or clip == 0.0
  return sigma, clip, static_zero


def _stddev_value(noise_multiplier, l2_clip_norm):
  sigma = jnp.asarray(noise_multiplier, jnp.float32)
  clip = jnp.asarray(l2_clip_norm, jnp.float32)
  # 0 * inf would be NaN: no noise whenever either factor is 0.
  return jnp.where((sigma == 0) | (clip == 0), 0.0, sigma * jnp.where(clip == 0, 1.0, clip))


def add_noise(updates: Any, key: jax.Array, stddev: jax.typing.ArrayLike) -> Any:
  """The pure noise behind `add_gaussian_noise`: `stddev * N(0, 1)` added to every element.

  One draw of `jax.random.normal(key, (total size,))` serves all leaves in `tree.flatten` order
  (one PRNG kernel), in float32 or the widest leaf dtype; each leaf keeps its dtype. The same key
  gives the same noise: derive per-step keys with `jax.random.fold_in(key, step)`.

  Args:
    updates: a pytree of float leaves.
    key: a PRNG key.
    stddev: the standard deviation (scalar, traced or concrete).
  """
  leaves, treedef = jax.tree.flatten(updates)
  ndtype = jnp.result_type(jnp.float32, *[x.dtype for x in leaves])
  sizes = [x.size for x in leaves]
  noise = jax.random.normal(key, (sum(sizes),), ndtype) * jnp.asarray(stddev).astype(ndtype)
  offsets = [0]
  for size in sizes:
    offsets.append(offsets[-1] + size)
  noised = [
    (x.astype(ndtype) + noise[lo:hi].reshape(x.shape)).astype(x.dtype)
    for x, lo, hi in zip(leaves, offsets[:-1], offsets[1:], strict=False)
  ]
  return jax.tree.unflatten(treedef, noised)


def add_gaussian_noise(
  noise_multiplier: jax.typing.ArrayLike, l2_clip_norm: jax.typing.ArrayLike, *, key: jax.Array
) -> optax.GradientTransformation:
  """Adds i.i.d. N(0, (noise_multiplier * l2_clip_norm)^2) to every element of the updates.

  Apply after `clip_per_example`: on rows `g: [batch, d]` this is independent noise per row.
  Each update splits the key in the state, uses one half and returns the other in the new
  state, so the same state gives the same output and successive updates get fresh noise.
  noise_multiplier = 0 (or C = 0) is the identity, also with C = inf.

  Args:
    noise_multiplier: sigma >= 0 (Python/numpy float or traced jax scalar).
    l2_clip_norm: C >= 0, the clip norm used before this transform (inf allowed only with
      sigma = 0).
    key: a PRNG key (`jax.random.key(seed)` or a raw uint32[2] key).

  Returns:
    `optax.GradientTransformation` with state `AddGaussianNoiseState(count, rng_key)`.

  Raises:
    PrivacyError: negative/NaN sigma or C, or sigma > 0 with C = inf (when concrete); a bad
      key; at update, non-float leaves. (With traced sigma > 0 and C = inf the output is inf.)

  Formal guarantees:
    With rows clipped to C (replace-one sensitivity 2C), each row released through this
    transform is a Gaussian mechanism that is mu-GDP with mu = 2 / sigma (Dong, Roth, Su 2019);
    k releases of an example are 2 sqrt(k) / sigma-GDP. The noise is independent of the data.

  References:
    Dong, Roth, Su, "Gaussian Differential Privacy", arXiv 1905.02383.
  """
  sigma, _, static_zero = _noise_stddev(noise_multiplier, l2_clip_norm)
  del sigma
  _check_key(key)

  def init_fn(params):
    del params
    return AddGaussianNoiseState(count=jnp.zeros([], jnp.int32), rng_key=key)

  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    new_key, noise_key = jax.random.split(state.rng_key)
    new_state = AddGaussianNoiseState(count=optax.safe_increment(state.count), rng_key=new_key)
    if not leaves or static_zero:
      return updates, new_state
    _check_float(leaves)
    stddev = _stddev_value(noise_multiplier, l2_clip_norm)
    return add_noise(updates, noise_key, stddev), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def cut_layer_dp(
  l2_clip_norm: jax.typing.ArrayLike, noise_multiplier: jax.typing.ArrayLike, *, key: jax.Array
) -> optax.GradientTransformation:
  """Cut-layer DP: `clip_per_example` then `add_gaussian_noise`, as a named chain.

  Args:
    l2_clip_norm: C >= 0 (float or traced scalar).
    noise_multiplier: sigma >= 0 (float or traced scalar).
    key: PRNG key for the noise.

  Returns:
    `optax.named_chain(('clip', ...), ('noise', ...))`; the state is a dict with keys
    'clip' and 'noise'.

  Raises:
    PrivacyError: as `clip_per_example` and `add_gaussian_noise`.

  Formal guarantees:
    Each output row is mu-GDP with mu = 2 / sigma with respect to replacing that example
    (sensitivity 2C); rows of different examples are independent. k releases: 2 sqrt(k)/sigma.

  References:
    Qiu et al., "Evaluating Privacy Leakage in Split Learning", arXiv 2305.12997.
  """
  return optax.named_chain(
    ('clip', clip_per_example(l2_clip_norm)),
    ('noise', add_gaussian_noise(noise_multiplier, l2_clip_norm, key=key)),
  )


def dp_aggregate(
  l2_clip_norm: jax.typing.ArrayLike,
  noise_multiplier: jax.typing.ArrayLike,
  *,
  key: jax.Array,
  normalize_by: jax.typing.ArrayLike | None = None,
) -> optax.GradientTransformation:
  """Device DP-SGD: clip each example, sum over the batch, add N(0, (sigma C)^2), divide by N.

  Input leaves are per-example device-parameter gradients `[batch, ...]`; output leaves drop
  the batch axis (`[...]`): the noisy mean. N is `normalize_by` when given (e.g. the number of
  real rows of a padded batch; padded rows must be zero, so they add nothing to the sum), else
  the static batch size. State carries the PRNG key, split on every update.

  Args:
    l2_clip_norm: C >= 0 (float or traced scalar).
    noise_multiplier: sigma >= 0 (float or traced scalar; 0 gives the clipped mean).
    key: a PRNG key.
    normalize_by: N > 0, a public count (float or traced scalar), or None (the batch size).

  Returns:
    `optax.GradientTransformation` with state `DpAggregateState(count, rng_key)`.

  Raises:
    PrivacyError: as `add_gaussian_noise`; at update, leaves without a common batch axis.

  Formal guarantees:
    The clipped sum has sensitivity 2C under replace-one (C under add/remove) in L2 over all
    leaves together; the Gaussian noise of std sigma C on the sum makes each update mu-GDP with
    mu = 2 / sigma for every example in the batch (no amplification by sampling is claimed);
    dividing by N is post-processing when N is public: the batch size, or `normalize_by` if the
    caller passes a count that does not depend on the private data (the number of real rows of
    a fixed-size padded batch is fixed by the public dataset size and batch size). k updates
    that use an example: 2 sqrt(k)/sigma.

  References:
    Abadi et al., "Deep Learning with Differential Privacy", arXiv 1607.00133.
  """
  _, _, static_zero = _noise_stddev(noise_multiplier, l2_clip_norm)
  _check_key(key)

  def init_fn(params):
    del params
    return DpAggregateState(count=jnp.zeros([], jnp.int32), rng_key=key)

  def update_fn(updates, state, params=None):
    del params
    new_key, noise_key = jax.random.split(state.rng_key)
    new_state = DpAggregateState(count=optax.safe_increment(state.count), rng_key=new_key)
    leaves = jax.tree.leaves(updates)
    if not leaves:
      return updates, new_state
    n = _batch_size(leaves)
    _check_float(leaves)
    clipped = clip_rows(updates, l2_clip_norm)
    summed = jax.tree.map(lambda x: jnp.sum(x, axis=0), clipped)
    if not static_zero:
      summed = add_noise(summed, noise_key, _stddev_value(noise_multiplier, l2_clip_norm))
    denom = n if normalize_by is None else normalize_by
    return jax.tree.map(lambda x: x / jnp.asarray(denom, x.dtype), summed), new_state

  return optax.GradientTransformation(init_fn, update_fn)
