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
