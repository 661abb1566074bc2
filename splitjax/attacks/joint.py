"""The joint attack on a batch-averaged release (``batch_average``: SecretFlow's averaging).

Under ``batch_average`` the device sends, for a batch of ``B`` rows whose cut activations
``h [B, d]`` the server computed, one vector: the mean of the rows' cut gradients,
``g_bar = (1/B) sum_j l'(z_j, y_j) dz_j/dh_j``. No row is released alone, so the per-row attack
cannot be applied; the secrets are the ``B`` rows' (private features, label) pairs jointly.
Enumerating every assignment costs ``M^B`` sums (``M`` pairs per row: 840 on adult, so
``B <= 2``; `exact_pairs` is that enumeration, the reference of the tests), so the attack here is
a coordinate search:

- every row's pair gradients ``G [B, M, d]`` are simulated once (`pair_gradients`: one reverse
  pass per private candidate, as EXACT's core does);
- a beam search goes row by row and keeps the ``beam_width`` partial assignments that best
  explain ``B g_bar`` when the rows not yet chosen are replaced by their prior-mean gradient (a
  width of ``M^(B-1)`` would make it exact); its best ``num_starts`` assignments, and optionally
  starts drawn from the prior, are the starts;
- sweeps then replace each row's pair by the one that minimises the residual
  ``||B g_bar - sum_j G[j, c_j]||^2`` given the other rows (the exact minimiser along that
  coordinate), until a sweep changes nothing or ``num_sweeps`` run out;
- the start with the smallest final residual is the answer, optionally refined by sweeps of
  exact two-row moves (``pair_sweeps``).

The beam costs ``beam_width B M d`` multiply-adds and each sweep ``B M d``, on top of the ``B M``
reverse passes of the simulation. `positive_count` is the trivial leak: the number of positive rows
in the batch read along the mean label direction, without any search.

All functions are pure JAX (jit, vmap over batches): ``device_apply(params, h [d], x_priv [P])
-> logit``, the same device function EXACT takes.
"""

import functools
import itertools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from splitjax.attacks import scoring


class JointResult(NamedTuple):
  """The joint attack's answer for one batch.

  Attributes:
    pairs: [B] int32 index into the ``M = C * 2`` pairs of each row (candidate ``pairs // 2``,
      label ``pairs % 2``).
    features: [B, P] int32 the rows' private features (``table[pairs // 2]``).
    labels: [B] int32 the rows' labels.
    residual: scalar, ``||B g_bar - sum_j G[j, pairs_j]||^2`` of the answer.
    sweeps: scalar int32, the sweeps the winning start ran before it stopped changing.
  """

  pairs: jax.Array
  features: jax.Array
  labels: jax.Array
  residual: jax.Array
  sweeps: jax.Array


def pair_gradients(device_apply: Callable[..., jax.Array], params, h, table) -> jax.Array:
  """The cut gradient each row would send for each (candidate, label) pair.

  Args:
    device_apply: ``(params, h [d], x_priv [P]) -> logit``.
    params: the device's parameters.
    h: [B, d] the rows' cut activations.
    table: [C, P] int32 the private candidates (`scoring.candidate_table`).

  Returns:
    [B, C * 2, d]: pair ``m`` is candidate ``m // 2`` with label ``m % 2``.
  """
  val_grad = jax.value_and_grad(device_apply, argnums=1)
  per_row = jax.vmap(val_grad, in_axes=(None, None, 0))  # over candidates, h shared
  z, v = jax.vmap(per_row, in_axes=(None, 0, None))(params, h, table)  # [B, C], [B, C, d]
  factors = scoring.loss_factors(z)  # [B, C, 2]
  grads = factors[..., None] * v[:, :, None, :]  # [B, C, 2, d]
  return grads.reshape(h.shape[0], -1, h.shape[1])


def _sq_distances(rest, rows):
  """[W, M] ``||rest[w] - rows[m]||^2`` in the expanded form (one matmul; it cancels near 0)."""
  return (
    jnp.sum(jnp.square(rest), -1)[:, None]
    - 2.0 * rest @ rows.T
    + jnp.sum(jnp.square(rows), -1)[None, :]
  )


def _residuals(G, pairs):
  return jnp.take_along_axis(G, pairs[:, None, None], axis=1)[:, 0].sum(0)


def _coordinate_search(G, target, start, num_sweeps: int):
  """Sweeps of exact row-wise minimisation from ``start`` [B]; (pairs, residual, sweeps run)."""
  num_rows = G.shape[0]
  g_sq = jnp.sum(jnp.square(G), axis=-1)  # [B, M]

  def row(j, carry):
    pairs, total = carry
    rest = target - total + G[j, pairs[j]]  # what row j has to explain
    d2 = g_sq[j] - 2.0 * G[j] @ rest  # ||rest - G[j, m]||^2 minus ||rest||^2
    best = jnp.argmin(d2).astype(pairs.dtype)
    return pairs.at[j].set(best), total - G[j, pairs[j]] + G[j, best]

  def sweep(carry):
    pairs, total, _, count = carry
    new_pairs, new_total = jax.lax.fori_loop(0, num_rows, row, (pairs, total))
    # Re-sum: the running total drifts by rounding over many updates.
    new_total = _residuals(G, new_pairs)
    return new_pairs, new_total, jnp.any(new_pairs != pairs), count + 1

  def cond(carry):
    return carry[2] & (carry[3] < num_sweeps)

  total = _residuals(G, start)
  pairs, total, _, count = jax.lax.while_loop(
    cond, sweep, (start, total, jnp.bool_(True), jnp.int32(0))
  )
  return pairs, jnp.sum(jnp.square(target - total)), count


def _beam_starts(G, target, weights, beam_width: int):
  """Beam search row by row: [beam_width, B] assignments, best first.

  Each partial assignment of rows ``< j`` is scored by how well it, plus the later rows at their
  prior-mean gradient, explains ``target``; the ``beam_width`` best of every extension by one
  pair of row ``j`` are kept. A width of at least ``M^(B-1)`` makes it the exact enumeration.
  """
  num_rows, num_pairs, _ = G.shape
  mean = jnp.einsum("bmd,m->bd", G, weights)  # [B, d] each row's prior-mean gradient
  after = jnp.concatenate([jnp.cumsum(mean[::-1], axis=0)[::-1][1:], jnp.zeros_like(mean[:1])])
  # after[j] = sum of mean[j + 1:]
  width = beam_width
  totals = jnp.zeros((width,) + target.shape, G.dtype)
  alive = jnp.arange(width) == 0  # one empty assignment at the start (no duplicates)
  choices = jnp.zeros((width, num_rows), jnp.int32)

  def row(carry, j):
    totals, alive, choices = carry
    rest = target - after[j] - totals  # [W, d]
    d2 = jnp.where(alive[:, None], _sq_distances(rest, G[j]), jnp.inf)  # [W, M]
    neg, flat = jax.lax.top_k(-d2.reshape(-1), width)
    parent, pair = flat // num_pairs, (flat % num_pairs).astype(jnp.int32)
    choices = choices[parent].at[:, j].set(pair)
    return (totals[parent] + G[j, pair], jnp.isfinite(neg), choices), None

  (_, alive, choices), _ = jax.lax.scan(row, (totals, alive, choices), jnp.arange(num_rows))
  # A beam narrower than its width at the end (tiny M^B) repeats its first assignment.
  return jnp.where(alive[:, None], choices, choices[:1])


def joint_attack(
  G: jax.Array,
  g_bar: jax.Array,
  table: jax.Array,
  key: jax.Array,
  *,
  beam_width: int = 256,
  num_starts: int = 16,
  num_random_starts: int = 0,
  num_sweeps: int = 20,
  pair_sweeps: int = 0,
  pair_prior: jax.Array | None = None,
  mask: jax.Array | None = None,
) -> JointResult:
  """The rows' pairs that best explain one batch-averaged release.

  Args:
    G: [B, M, d] the rows' pair gradients (`pair_gradients`).
    g_bar: [d] the release: the mean of the batch's real rows' cut gradients.
    table: [C, P] int32 the candidates (``M = 2 C``).
    key: PRNG key of the random starts.
    beam_width: assignments kept per row by the beam search.
    num_starts: the beam's best assignments each refined by coordinate sweeps (at most
      ``beam_width``).
    num_random_starts: further starts drawn from the prior.
    num_sweeps: most sweeps per start.
    pair_sweeps: sweeps of exact two-row moves on the best start's answer (``B (B - 1) / 2``
      moves of ``M^2 d`` multiply-adds each per sweep; 0: none).
    pair_prior: [M] prior probabilities of the pairs (the random starts' distribution and the
      beam's stand-in for the rows not yet chosen; None: uniform).
    mask: [B] 1 for a real row, 0 for padding (padding rows are fixed at a zero gradient and
      answered with pair 0; None: every row is real).

  Returns:
    `JointResult`.
  """
  num_rows, num_pairs, _ = G.shape
  if mask is None:
    mask = jnp.ones(num_rows, G.dtype)
  mask = mask.astype(G.dtype)
  G = G * mask[:, None, None]  # a padding row contributes nothing whatever its pair
  target = jnp.sum(mask) * g_bar
  weights = (
    jnp.full((num_pairs,), 1.0 / num_pairs, G.dtype)
    if pair_prior is None
    else jnp.asarray(pair_prior, G.dtype) / jnp.sum(pair_prior)
  )
  beam = _beam_starts(G, target, weights, beam_width)[:num_starts]
  drawn = jax.random.categorical(key, jnp.log(weights), shape=(num_random_starts, num_rows)).astype(
    jnp.int32
  )
  starts = jnp.concatenate([beam, drawn], axis=0)
  pairs, residual, sweeps = jax.vmap(lambda s: _coordinate_search(G, target, s, num_sweeps))(starts)
  best = jnp.argmin(residual)
  pairs, res = pairs[best], residual[best]
  if pair_sweeps and num_rows >= 2:
    pairs, res = _pair_search(G, target, pairs, pair_sweeps)
  pairs = jnp.where(mask > 0, pairs, 0)
  return JointResult(
    pairs=pairs,
    features=jnp.asarray(table)[pairs // 2],
    labels=(pairs % 2).astype(jnp.int32),
    residual=res,
    sweeps=sweeps[best],
  )


def _pair_search(G, target, pairs, num_sweeps: int):
  """Sweeps of exact minimisation over every two rows at once (``M^2`` sums per two rows), from
  the coordinate search's answer: it leaves a local optimum that no single-row change improves."""
  num_rows, num_pairs, _ = G.shape
  two = np.asarray(list(itertools.combinations(range(num_rows), 2)), np.int32)  # [B(B-1)/2, 2]
  jj, kk = jnp.asarray(two[:, 0]), jnp.asarray(two[:, 1])

  def move(i, pairs):
    j, k = jj[i % len(jj)], kk[i % len(jj)]
    rest = target - _residuals(G, pairs) + G[j, pairs[j]] + G[k, pairs[k]]
    d2 = _sq_distances(rest[None] - G[j], G[k])  # [M, M]
    # The expanded form cancels near zero: its best few are rescored summed directly, and a
    # move is kept only if the residual falls.
    _, top = jax.lax.top_k(-d2.reshape(-1), 8)
    a, b = top // num_pairs, top % num_pairs
    exact = jnp.sum(jnp.square(rest[None] - G[j, a] - G[k, b]), axis=-1)  # [8]
    pick = jnp.argmin(exact)
    now = jnp.sum(jnp.square(rest - G[j, pairs[j]] - G[k, pairs[k]]))
    keep = exact[pick] < now
    new_j = jnp.where(keep, a[pick], pairs[j]).astype(pairs.dtype)
    new_k = jnp.where(keep, b[pick], pairs[k]).astype(pairs.dtype)
    return pairs.at[j].set(new_j).at[k].set(new_k)

  pairs = jax.lax.fori_loop(0, num_sweeps * len(jj), move, pairs)
  return pairs, jnp.sum(jnp.square(target - _residuals(G, pairs)))


def exact_pairs(G: jax.Array, g_bar: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The exact minimiser for a batch of two rows (``M^2`` sums): ([2] pairs, residual).

  The reference of the coordinate search (`joint_attack`); ``G [2, M, d]``, ``g_bar [d]``.
  """
  if G.shape[0] != 2:
    raise ValueError(f"exact_pairs enumerates batches of 2 rows, got {G.shape[0]}")
  target = 2.0 * g_bar
  d2 = _sq_distances(target[None] - G[0], G[1])  # [M, M]
  flat = jnp.argmin(d2)
  m = G.shape[1]
  return jnp.stack([flat // m, flat % m]).astype(jnp.int32), d2.reshape(-1)[flat]


def positive_count(
  G: jax.Array, g_bar: jax.Array, pair_prior: jax.Array | None = None, mask=None
) -> tuple[jax.Array, jax.Array]:
  """The trivial leak of a batch-averaged release: how many of its rows are positive.

  Each row's expected gradient under label 0 and label 1 (its private features at their prior)
  gives ``m0_j`` and ``m1_j``; ``B g_bar - sum_j m0_j`` is close to ``k`` times the mean label
  direction ``mean_j (m1_j - m0_j)`` when ``k`` rows are positive, so ``k`` is read by projection,
  with no search and no knowledge of any row's features.

  Args:
    G: [B, M, d] pair gradients (`pair_gradients`); pairs alternate label 0, 1.
    g_bar: [d] the release.
    pair_prior: [M] pair prior (None: uniform over candidates; the label part is ignored).
    mask: [B] real rows (None: all).

  Returns:
    (the estimate rounded into ``[0, B]`` as int32, the unrounded projection).
  """
  num_rows, num_pairs, d = G.shape
  if mask is None:
    mask = jnp.ones(num_rows, G.dtype)
  mask = mask.astype(G.dtype)
  by_label = G.reshape(num_rows, num_pairs // 2, 2, d) * mask[:, None, None, None]
  w = (
    jnp.full((num_pairs // 2,), 2.0 / num_pairs, G.dtype)
    if pair_prior is None
    else jnp.asarray(pair_prior, G.dtype).reshape(-1, 2).sum(-1)
  )
  w = w / jnp.sum(w)
  means = jnp.einsum("bcld,c->bld", by_label, w)  # [B, 2, d]
  base = means[:, 0].sum(0)
  direction = (means[:, 1] - means[:, 0]).sum(0) / jnp.maximum(jnp.sum(mask), 1.0)
  raw = jnp.dot(jnp.sum(mask) * g_bar - base, direction) / jnp.sum(jnp.square(direction))
  return jnp.clip(jnp.round(raw), 0, jnp.sum(mask)).astype(jnp.int32), raw


class BatchesResult(NamedTuple):
  """The joint attack's answers for every row of a batch-averaged transcript (numpy, host).

  Attributes:
    features: [N, P] int32 each row's private features.
    labels: [N] int32 each row's label.
    fitted: [N] bool, whether the row's batch answer explains its release within the fit
      tolerance (a noise-free release is explained exactly by the truth, so an answer that does
      not fit is a search failure the attacker can see; such rows are answered from the prior).
    relative_residual: [N] float32 ``||B g_bar - sum_j G[j, c_j]||^2 / ||B g_bar||^2`` of the
      row's batch answer.
    positives: [N] int32 the row's batch's `positive_count` estimate.
    batch: [N] int32 the row's batch (consecutive rows of ``batch_size``).
  """

  features: np.ndarray
  labels: np.ndarray
  fitted: np.ndarray
  relative_residual: np.ndarray
  positives: np.ndarray
  batch: np.ndarray


PAIR_SWEEP_MAX_BATCH = 16  # two-row moves cost B (B - 1) / 2 M^2 d per sweep: small batches only


def _prior_modes(log_prior: np.ndarray, table: np.ndarray) -> np.ndarray:
  """[N, P] each row's mode of every feature's marginal under a pair log prior [N, C, 2]."""
  p = np.exp(log_prior - log_prior.max(axis=(1, 2), keepdims=True)).sum(-1)  # [N, C]
  out = np.zeros((len(p), table.shape[1]), np.int32)
  for j in range(table.shape[1]):
    by_value = np.zeros((len(p), int(table[:, j].max()) + 1))
    np.add.at(by_value.T, table[:, j], p.T)
    out[:, j] = by_value.argmax(1)
  return out


def _prior_positive(log_prior: np.ndarray) -> np.ndarray:
  """[N] each row's prior probability of label 1 under a pair log prior [N, C, 2]."""
  p = np.exp(log_prior - log_prior.max(axis=(1, 2), keepdims=True)).sum(1)  # [N, 2]
  return p[:, 1] / p.sum(1)


def attack_batches(
  device_apply: Callable[..., jax.Array],
  params,
  h: np.ndarray,
  g: np.ndarray,
  cardinalities,
  *,
  batch_size: int,
  key: jax.Array,
  log_prior: np.ndarray | None = None,
  user_log_prior: np.ndarray | None = None,
  beam_width: int = 256,
  num_starts: int = 16,
  pair_sweeps: int | None = None,
  fit_tolerance: float = 1e-6,
  progress: Callable[[int], None] | None = None,
) -> BatchesResult:
  """`joint_attack` on every batch of a transcript sent under ``batch_average``.

  The rows are in batches of ``batch_size`` consecutive rows (the last may be shorter), as the
  server saw them arrive; every row of a batch carries the batch's averaged gradient. A batch
  whose best answer does not fit the release (relative residual above ``fit_tolerance``: the
  truth fits a noise-free release to rounding) is a search failure the attacker can see: its
  rows get each feature's prior mode, and the batch's `positive_count` ``k`` its ``k`` rows of
  highest prior probability of label 1 as positives. The search uses one pair prior for every
  row, the fallback the per-row one.

  Args:
    device_apply: ``(params, h [d], x_priv [P]) -> logit``.
    params: the device's parameters (one version).
    h: [N, d] the rows' cut activations.
    g: [N, d] what the device sent (each row its batch's mean).
    cardinalities: P ints, the private features' domains.
    batch_size: the device's batch (rows per release).
    key: PRNG key (one fold per batch).
    log_prior: [C * 2] pair log prior, label fastest (None: uniform): the search's prior.
    user_log_prior: [N, C, 2] per-row log prior (the fallback's; None: ``log_prior``).
    beam_width, num_starts: as `joint_attack`.
    pair_sweeps: sweeps of exact two-row moves (None: 3 up to `PAIR_SWEEP_MAX_BATCH` rows, else 0).
    fit_tolerance: the relative residual under which an answer fits.
    progress: called with the number of rows done after each batch.

  Returns:
    `BatchesResult`.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  h, g = np.asarray(h, np.float32), np.asarray(g, np.float32)
  n = len(h)
  table = scoring.candidate_table(cardinalities)
  num_pairs = 2 * len(table)
  if log_prior is None:
    log_prior = np.zeros(num_pairs, np.float32)
  log_prior = np.asarray(log_prior, np.float64).reshape(-1)
  if log_prior.shape != (num_pairs,):
    raise ValueError(f"log_prior has {log_prior.size} entries for {num_pairs} pairs")
  prior = np.exp(log_prior - log_prior.max())
  if user_log_prior is None:
    user_log_prior = np.broadcast_to(log_prior.reshape(1, -1, 2), (n, len(table), 2))
  modes = _prior_modes(np.asarray(user_log_prior, np.float64), table)
  p_positive = _prior_positive(np.asarray(user_log_prior, np.float64))
  if pair_sweeps is None:
    pair_sweeps = 3 if batch_size <= PAIR_SWEEP_MAX_BATCH else 0
  simulate, search, count = _batch_fns(device_apply, beam_width, num_starts, pair_sweeps)
  table_j = jnp.asarray(table)
  out = BatchesResult(
    features=np.zeros((n, table.shape[1]), np.int32),
    labels=np.zeros(n, np.int32),
    fitted=np.zeros(n, bool),
    relative_residual=np.zeros(n, np.float32),
    positives=np.zeros(n, np.int32),
    batch=np.arange(n, dtype=np.int32) // batch_size,
  )
  for b, start in enumerate(range(0, n, batch_size)):
    rows = np.arange(start, min(start + batch_size, n))
    real = len(rows)
    mask = np.zeros(batch_size, np.float32)
    mask[:real] = 1.0
    h_b = np.zeros((batch_size, h.shape[1]), np.float32)
    h_b[:real] = h[rows]
    g_bar = jnp.asarray(g[rows].mean(0))
    G = simulate(params, jnp.asarray(h_b), table_j)
    res = search(G, g_bar, table_j, jax.random.fold_in(key, b), prior, jnp.asarray(mask))
    k, _ = count(G, g_bar, prior, jnp.asarray(mask))
    target_sq = float(jnp.sum(jnp.square(real * g_bar)))
    rel = float(res.residual) / max(target_sq, 1e-30)
    fits = rel <= fit_tolerance
    k = int(k)
    out.fitted[rows] = fits
    out.relative_residual[rows] = rel
    out.positives[rows] = k
    if fits:
      out.features[rows] = np.asarray(res.features)[:real]
      out.labels[rows] = np.asarray(res.labels)[:real]
    else:
      out.features[rows] = modes[rows]
      # The k rows the prior finds likeliest positive, k the batch's positive count.
      positive = np.argsort(-p_positive[rows], kind="stable")[:k]
      out.labels[rows] = 0
      out.labels[rows[positive]] = 1
    if progress is not None:
      progress(int(rows[-1]) + 1)
  return out


@functools.lru_cache(maxsize=8)
def _batch_fns(device_apply, beam_width: int, num_starts: int, pair_sweeps: int):
  """The jitted simulation, search and count of `attack_batches` (cached per device function)."""
  simulate = jax.jit(functools.partial(pair_gradients, device_apply))

  @jax.jit
  def search(G, g_bar, table, key, prior, mask):
    return joint_attack(
      G,
      g_bar,
      table,
      key,
      beam_width=beam_width,
      num_starts=num_starts,
      pair_sweeps=pair_sweeps,
      pair_prior=prior,
      mask=mask,
    )

  return simulate, search, jax.jit(positive_count)
