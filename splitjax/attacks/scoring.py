"""The pieces every matching attack shares: candidates, distances, the device's clip, the selection.

All pure jnp functions (`candidate_table` excepted: a host-side numpy table). An attack simulates
what the device would have sent for each (candidate, label) pair, scores it against the observation
(`DISTANCES`, or a Gaussian log-likelihood), and `select` turns the scores into the answer: the best
pair with its tie count and gap, a top-k vote, or each feature's marginal-posterior argmax.
"""

import itertools
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from splitjax.attacks import checks

# Tie tolerance: a (candidate, label) pair is tied with the best when its score is within
# TIE_RTOL * scale + TIE_ATOL of the best score, where `scale` is the score the zero gradient would
# get (l2: ||g_obs||; cosine: 1; Bayes: ||g_obs||^2 / (2 noise_stddev^2) nats). Float32 rounding of
# the simulated gradient is ~1e-7 relative, so 1e-6 covers the recomputation error with margin.
TIE_RTOL = 1e-6
TIE_ATOL = 1e-7


def l2_distance(g_obs: jax.Array, g_cand: jax.Array) -> jax.Array:
  """Euclidean distance over the last axis (broadcasting): `||g_cand - g_obs||`."""
  return jnp.sqrt(jnp.sum(jnp.square(g_cand - g_obs), axis=-1))


def cosine_distance(g_obs: jax.Array, g_cand: jax.Array) -> jax.Array:
  """`1 - cos(g_obs, g_cand)` over the last axis (broadcasting); a zero vector has cosine 0."""
  dot = jnp.sum(g_obs * g_cand, axis=-1)
  norms = jnp.linalg.norm(g_obs, axis=-1) * jnp.linalg.norm(g_cand, axis=-1)
  tiny = jnp.finfo(dot.dtype).tiny
  return 1.0 - jnp.where(norms > tiny, dot / jnp.maximum(norms, tiny), 0.0)


# Name -> pure function `(g_obs [..., d], g_cand [..., d]) -> [...]` (broadcasting).
DISTANCES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
  'l2': l2_distance,
  'cosine': cosine_distance,
}


def candidate_table(cardinalities: Sequence[int]) -> np.ndarray:
  """All private candidates, [prod(cardinalities), P] int32, in `itertools.product` order.

  The first feature varies slowest, so a flat candidate index reshapes to `cardinalities`.

  Example:
    >>> candidate_table((2, 3)).tolist()
    [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
  """
  cards = checks.cardinalities(cardinalities)
  num = math.prod(cards)
  table = np.fromiter(
    itertools.chain.from_iterable(itertools.product(*map(range, cards))),
    dtype=np.int32,
    count=num * len(cards),
  )
  return table.reshape(num, len(cards))


def loss_factors(z: jax.Array) -> jax.Array:
  """`l'(z, y) = sigmoid(z) - y` of binary cross-entropy for y = 0, 1: [...] -> [..., 2].

  The cut gradient of label y is `l'(z, y) dz/dh`. `sigmoid(z) - 1` is computed as
  `-sigmoid(-z)`, which keeps its precision when sigmoid(z) is close to 1.
  """
  return jnp.stack([jax.nn.sigmoid(z), -jax.nn.sigmoid(-z)], axis=-1)


def safe_norm(x: jax.Array) -> jax.Array:
  """L2 norm over the last axis whose gradient is finite (zero) at x = 0."""
  sq = jnp.sum(jnp.square(x), axis=-1)
  tiny = jnp.finfo(x.dtype).tiny
  return jnp.where(sq > tiny, jnp.sqrt(jnp.maximum(sq, tiny)), 0.0)


def clip_rows(x: jax.Array, l2_clip_norm: jax.typing.ArrayLike) -> jax.Array:
  """Scales each row (last axis) of `x` to L2 norm at most `l2_clip_norm` (inf: unchanged).

  What the device's `privacy.clip_per_example` does to each `g_i` (or activation `a_i`) of
  ordinary size, and what a clip-aware attacker simulates for each candidate: `x [..., d] ->
  [..., d]`. Differentiable everywhere, including at zero rows, in `x` and in the clip norm.
  (The device's own clip also handles rows whose norm overflows float32 and non-finite rows,
  which a simulated candidate never has.) `exact` uses the same clip in closed form:
  `min(1, C / (|a| ||v||))` on gradients `a v`, tested equal to this one.

  Example:
    >>> clip_rows(jnp.array([[3., 4.], [0.3, 0.4]]), 1.0).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.30000001192092896, 0.4000000059604645]]
  """
  norm = safe_norm(x)
  # Both branches finite (an inf or NaN in the unselected branch would poison the gradient).
  finite_clip = jnp.where(jnp.isfinite(l2_clip_norm), l2_clip_norm, 1.0)
  factor = jnp.where(norm > l2_clip_norm, finite_clip / jnp.maximum(norm, finite_clip), 1.0)
  return x * factor[..., None]


def clip_factors(a: jax.Array, v_norm: jax.Array, clip_norm) -> jax.Array:
  """Loss factors `a` [..., L] after the clip of the gradients `a v`: `a min(1, C / (|a| ||v||))`.

  The closed form of `clip_rows` on gradients that are multiples of one vector `v` (one reverse
  pass serves every label), without forming them; `v_norm` is `||v||` [...].
  """
  cand_norm = jnp.abs(a) * v_norm[..., None]
  tiny = jnp.finfo(cand_norm.dtype).tiny
  return a * jnp.where(cand_norm > clip_norm, clip_norm / jnp.maximum(cand_norm, tiny), 1.0)


def pair_scores(
  z, v, g, clip_norm, *, distance: str, clip: bool, bayes: bool, defense=None, info=None
):
  """Scores of every label of B candidates: z [U, B], v = dz/dh [U, B, d], g [U, d] -> [U, B, L].

  The simulated gradient of label y is `clip(l'(z, y) v)` (`clip`: the attack is clip-aware and a
  clip norm is given); the score is the distance `distance`, or the squared l2 distance when
  `bayes` (the caller turns it into a log-likelihood). `defense` (a static
  `splitjax.defenses.AttackModel`, or None): the adaptive attack, which simulates the device's
  defences on every candidate (its label smoothing in the loss, its row transforms around the
  clip) before scoring; with a randomized defence (`defense.likelihood`) the score is the
  negative log-likelihood of `g` under its noise model (`likelihoods.nll`; `info` [U, k] the
  per-user side information it reads).
  """
  if defense is not None:
    from splitjax import defenses  # pylint: disable=import-outside-toplevel
    from splitjax.attacks import likelihoods  # pylint: disable=import-outside-toplevel

    eps = defense.label_smoothing
    a = loss_factors(z) + jnp.asarray([-0.5 * eps, 0.5 * eps], z.dtype)
    g_cand = a[..., None] * v[:, :, None, :]  # [U, B, 2, d]
    clip_fn = (lambda x: clip_rows(x, clip_norm)) if clip else (lambda x: x)
    if defense.likelihood is not None:
      if defense.likelihood.name in defenses.LIKELIHOOD_AFTER_CLIP:
        g_cand = clip_fn(g_cand)
      return likelihoods.nll(defense.likelihood, g, g_cand, info, clip_norm)
    g_cand = defenses.simulate(defense, g_cand, clip_norm, clip_fn)
    if bayes:
      return jnp.sum(jnp.square(g_cand - g[:, None, None, :]), axis=-1)
    return DISTANCES[distance](g[:, None, None, :], g_cand)
  a = loss_factors(z)  # [U, B, 2]
  if clip:
    # The device clips g to norm C: factor min(1, C / ||a v||) = min(1, C / (|a| ||v||)).
    a = clip_factors(a, jnp.linalg.norm(v, axis=-1), clip_norm)
  g_cand = a[..., None] * v[:, :, None, :]  # [U, B, 2, d] (fused into the reduction by XLA)
  if bayes:
    return jnp.sum(jnp.square(g_cand - g[:, None, None, :]), axis=-1)
  return DISTANCES[distance](g[:, None, None, :], g_cand)


def marginal_posteriors(log_post, shape: tuple[int, ...]) -> list[jax.Array]:
  """Normalised marginals of an unnormalised log posterior over pairs.

  Args:
    log_post: [U, n] with n = prod(shape), pairs in `candidate_table` order, label fastest.
    shape: the cardinalities followed by the number of labels (or the cardinalities alone).

  Returns:
    One [U, K] array per axis of `shape` (features, then the label).
  """
  num_users = log_post.shape[0]
  lp = log_post.reshape((num_users,) + tuple(shape))
  total = jax.scipy.special.logsumexp(lp.reshape(num_users, -1), axis=-1)
  all_axes = set(range(1, lp.ndim))
  posts = []
  for j in range(lp.ndim - 1):
    other = tuple(sorted(all_axes - {j + 1}))
    posts.append(jnp.exp(jax.scipy.special.logsumexp(lp, axis=other) - total[:, None]))
  return posts


def tie_log_posterior(score, scale, log_prior):
  """The posterior of a noise-free deterministic observation: the log prior [1 or U, n] on the
  pairs tied with the best score (within the tie tolerance), -inf elsewhere -> [U, n].

  Where the prior excludes every tied pair, the tied pairs get a uniform weight instead (the
  observation then contradicts the prior; ties stay the answer set).
  """
  best = jnp.min(score, axis=-1, keepdims=True)
  tied = score <= best + (TIE_RTOL * scale + TIE_ATOL)[:, None]
  weighted = jnp.where(tied, log_prior, -jnp.inf)
  possible = jnp.max(weighted, axis=-1, keepdims=True) > -jnp.inf
  return jnp.where(possible, weighted, jnp.where(tied, 0.0, -jnp.inf))


def select(
  score,
  dist,
  scale,
  table,
  cardinalities: tuple[int, ...],
  num_labels: int,
  *,
  top_k: int = 1,
  log_post=None,
  squared: bool = True,
):
  """The answer of a matching attack from its pair scores (lower is better).

  Args:
    score: [U, n] the score each pair is ranked by (n = C * num_labels, label fastest): a
      distance, or the negative unnormalised log posterior.
    dist: [U, n] the distance reported for the best pair (squared l2 in the Bayes variant).
    scale: [U] the score the zero observation would get (sets the tie tolerance).
    table: [>= C, P] int32 candidates (`candidate_table` order).
    cardinalities, num_labels: the pair layout.
    top_k: > 1 (without `log_post`): the per-feature majority vote of the top_k pairs (ties ->
      the lower pair index, then the lower value).
    log_post: [U, n] or None: with it, each feature's and the label's answer is the argmax of its
      marginal posterior (`marginal_posteriors`).
    squared: with `log_post`, `dist` holds squared l2 distances (the Bayes variant; reported as
      their square roots); False: distances as they are (`tie_log_posterior`).

  Returns:
    (a dict of [U, ...] arrays: map_features, map_labels, num_ties, gap, distances, features,
    labels, and feature_posteriors / label_posterior with a posterior or a vote; the best
    score [U]; the tie tolerance [U]). Ties in the best score go to the lower pair index.
  """
  num_users = score.shape[0]
  # argmin (ties -> lower index) and a masked second minimum; a full top_k (a sort on CPU) only for
  # the vote.
  best_idx = jnp.argmin(score, axis=-1)
  best = jnp.take_along_axis(score, best_idx[:, None], axis=1)[:, 0]
  is_best = jnp.arange(score.shape[1])[None, :] == best_idx[:, None]
  gap = jnp.min(jnp.where(is_best, jnp.inf, score), axis=-1) - best
  tol = TIE_RTOL * scale + TIE_ATOL
  num_ties = jnp.sum(score <= (best + tol)[:, None], axis=-1).astype(jnp.int32)
  map_features = table[best_idx // num_labels]
  map_labels = (best_idx % num_labels).astype(jnp.int32)
  out = dict(
    map_features=map_features,
    map_labels=map_labels,
    num_ties=num_ties,
    gap=gap,
    distances=jnp.take_along_axis(dist, best_idx[:, None], axis=1)[:, 0],
  )
  if log_post is not None:
    if squared:
      out['distances'] = jnp.sqrt(out['distances'])
    posts = marginal_posteriors(log_post, tuple(cardinalities) + (num_labels,))
    out['feature_posteriors'] = tuple(posts[:-1])
    out['label_posterior'] = posts[-1]
  elif top_k > 1:
    _, top = jax.lax.top_k(-score, top_k)  # ascending score; ties -> lower index first
    votes_feat = table[top // num_labels]  # [U, k, P]
    posts = [
      jnp.mean(jax.nn.one_hot(votes_feat[..., j], kj), axis=1) for j, kj in enumerate(cardinalities)
    ]
    posts.append(jnp.mean(jax.nn.one_hot(top % num_labels, num_labels), axis=1))
    out['feature_posteriors'] = tuple(posts[:-1])
    out['label_posterior'] = posts[-1]
  if 'label_posterior' in out:  # argmax: ties -> the lower value index
    out['features'] = jnp.stack(
      [jnp.argmax(p, axis=-1).astype(jnp.int32) for p in out['feature_posteriors']]
      + [jnp.zeros((num_users,), jnp.int32)],
      axis=-1,
    )[:, :-1]
    out['labels'] = jnp.argmax(out['label_posterior'], axis=-1).astype(jnp.int32)
  else:
    out['features'], out['labels'] = map_features, map_labels
  return out, best, tol


class MatchResult(NamedTuple):
  """What a matching attack recovers for each of N users (numpy arrays on the host).

  The one result of `exact`, `hybrid` and `exact_activations` (`ExactResult`, `HybridResult`
  and `ActivationResult` are this type); fields an attack does not produce are None.

  Attributes:
    features: [N, P] int32, the answer per private feature: the nearest pair's features (top_k=1),
      the per-feature majority of the top_k nearest pairs, or, with noise, the argmax of each
      feature's marginal posterior.
    labels: [N] int32, the answer for the label, chosen the same way (None for activations:
      the label stays on the server in that orientation).
    distances: [N] float32, distance (under `distance`; l2 in the Bayes variant) from the
      observation to the simulated one of the best pair (`map_features`, `map_labels`).
    num_ties: [N] int32, number of pairs whose score is within the tie tolerance of the best
      score, the best included (1 = unique; see TIE_RTOL, TIE_ATOL).
    gap: [N] float32, second-best minus best score (distance units; nats of negative log
      posterior in the Bayes variant); inf when there is a single pair.
    map_features: [N, P] int32, the features of the single best pair (nearest / joint MAP).
    map_labels: [N] int32, the label of the single best pair (None for activations).
    feature_posteriors: None, or a tuple of P arrays [N, K_j] float32: marginal posteriors with
      noise, vote fractions of the top_k pairs when top_k > 1.
    label_posterior: None, or [N, num_labels] float32, likewise.
    screen_fallback: `exact` with a `screen_dtype`: [N] bool, True for the users whose
      low-precision screen was not conclusive and who were attacked again in full precision.
    dense: [N, Pd] float32, the fitted private dense features of the best pair (`hybrid`,
      `exact_activations`; None for `exact`).
  """

  features: np.ndarray
  labels: np.ndarray | None
  distances: np.ndarray
  num_ties: np.ndarray
  gap: np.ndarray
  map_features: np.ndarray
  map_labels: np.ndarray | None
  feature_posteriors: tuple[np.ndarray, ...] | None = None
  label_posterior: np.ndarray | None = None
  screen_fallback: np.ndarray | None = None
  dense: np.ndarray | None = None

  @classmethod
  def from_outputs(cls, out: dict, **fields) -> 'MatchResult':
    """The result from a runner's output dict (missing fields None), `fields` overriding."""
    values = {name: out.get(name) for name in cls._fields}
    values.update(fields)
    return cls._make(values[name] for name in cls._fields)

  @classmethod
  def empty(
    cls,
    cardinalities: tuple[int, ...],
    num_labels: int,
    dtype,
    *,
    posteriors: bool,
    num_dense: int | None = None,
    screen: bool = False,
  ) -> 'MatchResult':
    """The result for N = 0 users, with the shapes and fields a run would have."""
    feats, ints = np.zeros((0, len(cardinalities)), np.int32), np.zeros(0, np.int32)
    floats = np.zeros(0, dtype)
    labels = ints if num_labels > 1 else None
    return cls(
      features=feats,
      labels=labels,
      distances=floats,
      num_ties=ints,
      gap=floats,
      map_features=feats,
      map_labels=labels,
      feature_posteriors=tuple(np.zeros((0, k), dtype) for k in cardinalities)
      if posteriors
      else None,
      label_posterior=np.zeros((0, num_labels), dtype) if posteriors and num_labels > 1 else None,
      screen_fallback=np.zeros((0,), bool) if screen else None,
      dense=None if num_dense is None else np.zeros((0, num_dense), dtype),
    )
