"""EXACT over many users: score every candidate of the private features and label (the host runner).

The device sends `g = l'(z, y) * dz/dh` for its own example (DESIGN.md §1). `exact` enumerates all
`prod(cardinalities)` private candidates once (a `[C, P]` int32 table in `itertools.product`
order), scores every `(candidate, label)` pair of every user with the pure core
(`core.score_chunk`, one reverse pass per candidate for both labels) and returns the nearest pair,
a per-feature top-k vote, or the Bayes-optimal per-feature answer under Gaussian noise.

Users are processed in fixed-size chunks (the last one padded, so any number of users beyond a
small power-of-two bucket reuses one compiled function), several chunks per jitted call through
`lax.map`, and sharded across devices (`shard_map` over a 1-D mesh 'users', `runner.run_users`)
when there are several. Users may come from different parameter versions (`param_index`, e.g.
training users of a transcript). With `screen_dtype='bfloat16'` every pair is first screened with
bf16 matrix products (`screen.low_precision_matmuls`), each user's best pairs are rescored in
float32, and users the screen cannot decide are redone in float32 (faster where bf16 matmuls
are; BUILD_NOTES.md "EXACT throughput" has the figures). jit caches the compiled function on
(device_apply, cardinalities, options, devices): calling `exact` again with the same model and
shapes does not retrace or recompile.

References:
  Qiu, Leontiadis, Melis, Sablayrolles, Stock. Evaluating Privacy Leakage in Split Learning.
  arXiv:2305.12997 (EXACT).
"""

import functools
import math
import numbers
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from splitjax.attacks import checks
from splitjax.attacks import core
from splitjax.attacks import runner
from splitjax.attacks import scoring
from splitjax.attacks import screen as screen_lib
from splitjax.attacks import sizing

AttackError = checks.AttackError


# What `exact` returns: the one result type of the matching attacks (`dense` is None here).
ExactResult = scoring.MatchResult


def _device_share(device_apply, opts: core.Options, shared, per_user):
  """One device's share of a call: `chunks_per_call` chunks of users, one after another (lax.map).

  With `opts.screen_dtype` two passes over the chunks: the low-precision screen, then (after one
  selection of every user's best screened pairs over the whole call, see `screen.screen_top`) the
  full-precision rescoring and the answers.
  """
  params, table, clip_norm, noise_stddev, screen_rtol, shared_prior = shared
  if opts.per_user_prior:
    h, g, param_index, info, log_prior = per_user
  else:
    (h, g, param_index, info), log_prior = per_user, shared_prior
  m = opts.chunks_per_call
  chunk = functools.partial(
    core.score_chunk,
    device_apply,
    opts,
    params,
    table=table,
    clip_norm=clip_norm,
    noise_stddev=noise_stddev,
    screen_rtol=screen_rtol,
  )
  split = lambda x: x.reshape((m, x.shape[0] // m) + x.shape[1:])
  merge = lambda tree: jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), tree)

  def run(screen=None):
    if m == 1:
      return chunk(h=h, g=g, param_index=param_index, log_prior=log_prior, screen=screen, info=info)
    blocks = (h, g, param_index, log_prior if opts.per_user_prior else None, screen, info)
    return merge(
      jax.lax.map(
        lambda a: chunk(
          h=a[0],
          g=a[1],
          param_index=a[2],
          log_prior=a[3] if opts.per_user_prior else log_prior,
          screen=a[4],
          info=a[5],
        ),
        jax.tree.map(split, blocks),
      )
    )

  if opts.screen_dtype is None:
    return run()
  return run(screen_lib.screen_top(run()['screen'], opts.screen_top))


def _defense_info(likelihood, defense_info, num_users: int, d: int, dtype) -> np.ndarray:
  """`defense_info` checked against what `likelihood`'s nll reads: [N, k] finite floats."""
  from splitjax import defenses  # pylint: disable=import-outside-toplevel
  from splitjax.attacks import likelihoods  # pylint: disable=import-outside-toplevel

  k = likelihoods.info_size(likelihood.name, d)
  if defense_info is None:
    if likelihood.name in defenses.NEEDS_BATCH_INFO:
      raise AttackError(
        f'defense={likelihood.text()} needs defense_info [N, {k}] (its per-batch side '
        'information, see splitjax.attacks.likelihoods)'
      )
    return np.zeros((num_users, k), dtype)
  info = np.asarray(defense_info, dtype)
  if info.shape != (num_users, k):
    raise AttackError(
      f'defense_info must be [N, k] = ({num_users}, {k}) for {likelihood.text()}, got {info.shape}'
    )
  checks.finite_matrix(info, 'defense_info')
  return info


def exact(
  device_apply: Callable[[Any, jax.Array, jax.Array], jax.Array],
  device_params: Any,
  h: jax.typing.ArrayLike,
  g_obs: jax.typing.ArrayLike,
  cardinalities: Sequence[int],
  *,
  num_labels: int = 2,
  top_k: int = 1,
  chunk_size: int | None = None,
  distance: str = 'l2',
  l2_clip_norm: float | None = None,
  noise_stddev: float | None = None,
  noise_multiplier: float | None = None,
  log_prior: jax.typing.ArrayLike | None = None,
  clip_aware: bool = True,
  users_per_chunk: int | None = None,
  param_index: jax.typing.ArrayLike | None = None,
  devices: Sequence[jax.Device] | None = None,
  screen_dtype: str | None = None,
  screen_top: int = screen_lib.DEFAULT_SCREEN_TOP,
  screen_rtol: float = screen_lib.DEFAULT_SCREEN_RTOL,
  defense: Any = None,
  defense_info: jax.typing.ArrayLike | None = None,
) -> ExactResult:
  """Recovers each user's private features and label from its cut-layer gradient (EXACT).

  For every user and every (candidate, label) pair the attack simulates the gradient the device
  would have sent, `(sigmoid(z) - y) * dz/dh` with `z = device_apply(device_params, h, x)`, clipped
  to `l2_clip_norm` first when the attack is clip-aware, and scores it against `g_obs`:

  - no noise: the distance named by `distance`; the answer is the nearest pair (`top_k=1`) or the
    per-feature / label majority vote over the `top_k` nearest pairs (vote ties -> lower index);
  - `noise_stddev > 0`: the Gaussian log-likelihood `-||g_obs - g_c||^2 / (2 noise_stddev^2)` plus
    `log_prior`; the answer for each feature and for the label is the argmax of its marginal
    posterior (logsumexp over the pairs that share the value — the Bayes-optimal per-feature guess),
    and `map_features`/`map_labels` hold the joint MAP pair.

  One `jax.value_and_grad` of the logit with respect to `h` per private candidate serves both
  labels. Users are processed `users_per_chunk` at a time (the last chunk padded; no recompilation
  for a new number of users), sharded over `devices` along a 1-D mesh axis 'users'
  (`runner.run_users`). jit caches the compiled function on (device_apply, cardinalities, options,
  devices): pass the same `device_apply` object (not a fresh lambda) to reuse it;
  `jax.clear_caches()` frees it.

  Args:
    device_apply: `(params, h [d], x_priv [P] int32) -> scalar logit`, pure and jit-compatible.
    device_params: the device model's parameters (the version that produced `g_obs`); with
      `param_index`, several versions stacked along a leading axis of every leaf.
    h: [N, d] cut activations the server computed.
    g_obs: [N, d] gradients the server received (after any DP transform).
    cardinalities: P ints >= 1, the number of values of each private feature (P = 0: no private
      categorical feature, the label alone is enumerated). Checked against the model when
      `device_apply` carries `priv_cardinalities` (`models.device_logit_fn` does). For a bare
      `device_apply` they are not: JAX clamps out-of-range embedding indices instead of raising,
      so a wrong feature count or cardinality gives silently wrong answers.
    num_labels: 2 (binary cross-entropy); other values are not supported.
    top_k: >= 1; with top_k > 1 and no noise, per-feature majority vote over the top_k nearest
      pairs.
    chunk_size: private candidates scored at once per user (None: all of them, unless one user's
      candidates exceed the ~2 GiB memory budget); smaller values trade speed for memory.
    distance: a name in DISTANCES ('l2' or 'cosine'); the Bayes variant requires 'l2'.
    l2_clip_norm: the public clip norm C of the device's DP transform, or None (no clipping).
    noise_stddev: the public standard deviation of the Gaussian noise per coordinate
      (noise_multiplier * C), or None / 0 for no noise.
    noise_multiplier: the noise as sigma, in units of `l2_clip_norm` (noise_stddev = sigma * C);
      give it or `noise_stddev`, not both.
    log_prior: optional log prior over pairs for the Bayes variant: [C*L] or [C, L] (shared) or
      [N, C*L] / [N, C, L] (per user), candidates in `candidate_table` order, label fastest; None is
      uniform. Unnormalised values are fine; -inf marks impossible pairs.
    clip_aware: True (default) clips each candidate's gradient like the device before scoring; False
      is the paper's clip-unaware scoring (unclipped candidates against the clipped observation).
    users_per_chunk: users vmapped together on each device (None: automatic, ~4k (user, candidate)
      rows on CPU, bounded by the memory budget everywhere). Several chunks run per jitted call.
    param_index: optional [N] int, the parameter version (index into the leading axis of
      `device_params`) that produced each row, e.g. `Transcript.param_index`; each user is then
      attacked with its own version in the same batched computation.
    devices: devices to shard users across (default: all of `jax.devices()`); pass one device to
      force a single-device run.
    screen_dtype: None (default: every score in the input precision), or 'bfloat16' / 'float16':
      a faster two-stage attack for noise-free observations. Every pair is first scored with the
      model's matrix products on `screen_dtype`-rounded inputs (float32 sums; see
      `low_precision_matmuls`; faster where the hardware's bf16 matmuls are, see BUILD_NOTES.md),
      then the `screen_top` best pairs of each user are rescored in full
      precision and the answer is taken among them. The l2 screening score of a pair is its
      distance to the segment of gradients its loss factor sigmoid(z) - y would give for logits
      within SCREEN_LOGIT_SLACK of the screened one (the screen's largest error is in the logit;
      see `screen.screen_scores`). A user is attacked again without screening (`screen_fallback`)
      unless (1) a rescored pair reproduces `g_obs` (distance <= SCREEN_MATCH_RTOL x ||g_obs||
      for l2; 1 - cos <= 1e-7): then the answer equals the full-precision one up to near-ties,
      guaranteed; or (2) every unrescored pair would still lose to the rescored best if its
      screened gradient direction were off by `screen_rtol` times its norm (an assumed bound).
      Without noise and with the clip-aware variant the true pair reproduces
      `g_obs`, so (1) decides almost every user; with noise, or the clip-unaware variant under
      clipping, most users fall back and the screen costs more than it saves. With top_k > 1
      only (2) applies, to the top_k-th best rescored pair (every voter must be rescored), so
      most voting users are redone. `gap` counts the best unrescored pair at its screening
      score, `num_ties` only rescored pairs; a screening score that is not finite (float16
      overflow) always sends the user to the redo. Not for the Bayes variant (its posteriors need
      every pair in full precision).
    screen_top: pairs per user rescored in full precision (>= top_k).
    defense: a `splitjax.defenses.AttackModel` (from `splitjax.defenses.attack_model`): the
      adaptive attack simulates the device's deterministic defences and label smoothing on every
      candidate (not with a screen); without noise, pairs tied with the best (e.g. under
      quantization) are answered by the prior-weighted choice among them: the marginal
      posteriors of `log_prior` restricted to the tied pairs (`feature_posteriors`,
      `label_posterior`; their mass on the truth is the expected accuracy); with a randomized
      defence (`defense.likelihood`: max_norm, marvell, quantize_stochastic) every pair is
      scored by the negative log-likelihood of `g_obs` under the defence's noise model
      (`likelihoods`) plus `log_prior`, the answers are the marginal-posterior argmaxes and
      `distances` is NaN. None: the DP chain alone.
    defense_info: [N, k] float, per user the side information of `defense.likelihood`
      (`likelihoods.info_size(name, d)` columns: max_norm the batch's largest squared row
      norm; marvell the unit Delta and the four lambdas of the user's batch); required for
      those two, ignored otherwise.
    screen_rtol: the error bound assumed by (2) (>= 0; default 0.25, above the worst errors of
      bf16 dz/dh measured on trained and random models: direction 0.12 rad, norm 5 %).

  Returns:
    An `ExactResult` (`scoring.MatchResult`) of numpy arrays, rows in the order of `h`.

  Raises:
    AttackError (a ValueError): bad cardinalities (e.g. 0), h/g_obs rank or shape mismatch, NaN or
      inf in h or g_obs, an unknown distance, a bad top_k / clip / noise / log_prior argument.
    NotImplementedError: num_labels > 2 (a scalar logit only supports binary labels).

  Example:
    >>> import jax.numpy as jnp
    >>> apply = lambda p, h, x: jnp.dot(p[x[0]], h)
    >>> params = jnp.array([[1., 0.], [0., 2.]])
    >>> h = jnp.array([[1., 1.]])
    >>> z = apply(params, h[0], jnp.array([1]))
    >>> g = (jax.nn.sigmoid(z) - 1) * params[1][None]  # x = 1, y = 1
    >>> r = exact(apply, params, h, g, (2,))
    >>> r.features.tolist(), r.labels.tolist()
    ([[1]], [1])

  References:
    Qiu et al., Evaluating Privacy Leakage in Split Learning, arXiv:2305.12997 (EXACT; clip-unaware
    scoring is theirs, clip-aware and Bayes scoring are splitjax's).
  """
  noise_stddev = checks.noise_stddev(noise_stddev, noise_multiplier, l2_clip_norm)
  cards = checks.cardinalities(cardinalities, device_apply)
  if isinstance(num_labels, bool) or not isinstance(num_labels, numbers.Integral) or num_labels < 2:
    raise AttackError(f'num_labels must be an int >= 2, got {num_labels!r}.')
  if num_labels != 2:
    raise NotImplementedError(
      f'num_labels={num_labels}: exact supports binary labels (a scalar '
      'logit with binary cross-entropy) only.'
    )
  checks.name_in(distance, scoring.DISTANCES, 'distance')
  top_k = checks.positive_int(top_k, 'top_k', allow_none=False)
  assert top_k is not None
  chunk_size = checks.positive_int(chunk_size, 'chunk_size')
  users_per_chunk = checks.positive_int(users_per_chunk, 'users_per_chunk')
  clip_value = checks.clip_norm(l2_clip_norm)
  likelihood = defense is not None and defense.likelihood is not None
  noise_value, bayes = checks.noise(
    noise_stddev, distance, None if defense is not None else log_prior
  )
  if likelihood:
    if bayes:
      raise AttackError(
        f'defense={defense.likelihood.text()} is scored by its own likelihood, modelled without '
        'the DP noise: pass noise_stddev=None.'
      )
    bayes = True  # the pairs' log-likelihood plus the log prior: the posterior path
  if bayes and top_k > 1:
    raise AttackError(
      f'top_k={top_k} is for distance scoring; with noise_stddev the answer is the '
      'marginal-posterior argmax. Pass top_k=1.'
    )
  clip = clip_value is not None and not math.isinf(clip_value)
  if defense is not None and screen_dtype is not None:
    raise AttackError(
      'screen_dtype cannot be combined with defense: the screen\'s closed form does not hold '
      'for the defences\' transforms. Pass screen_dtype=None.'
    )
  if screen_dtype is not None:
    if screen_dtype not in screen_lib.SCREEN_DTYPES:
      raise AttackError(
        f'unknown screen_dtype {screen_dtype!r}; valid: None or {sorted(screen_lib.SCREEN_DTYPES)}.'
      )
    if bayes:
      raise AttackError(
        f'screen_dtype={screen_dtype!r} cannot be combined with noise_stddev: the '
        'Bayes posteriors need every pair in full precision. Pass screen_dtype=None.'
      )
  screen_top = checks.positive_int(screen_top, 'screen_top', allow_none=False)
  assert screen_top is not None
  if screen_dtype is not None and top_k > screen_top:
    raise AttackError(
      f'top_k={top_k} exceeds screen_top={screen_top}: the vote needs its top_k '
      'pairs rescored. Raise screen_top.'
    )
  screen_rtol_value = checks.scalar(screen_rtol, 'screen_rtol')
  if screen_rtol_value is None or math.isinf(screen_rtol_value):
    raise AttackError(f'screen_rtol must be a finite number >= 0, got {screen_rtol!r}.')

  h_np, g_np, dtype = checks.observations(h, g_obs, dtype_from='h')
  checks.same_shape(h_np, g_np)
  num_users, d = h_np.shape
  num_cand = math.prod(cards)
  num_pairs = num_cand * num_labels
  if top_k > num_pairs:
    raise AttackError(
      f'top_k={top_k} exceeds the {num_pairs} (candidate, label) pairs of cardinalities {cards}.'
    )
  prior, per_user = (np.zeros((1, num_cand, num_labels), dtype), False)
  if log_prior is not None:
    prior, per_user = checks.log_prior(log_prior, num_users, num_cand, num_labels)
    prior = prior.astype(dtype)

  per_user_params = param_index is not None
  if per_user_params:
    index_np = checks.param_index(param_index, device_params, num_users)
    one_version = jax.tree.map(lambda leaf: leaf[0], device_params)
  else:
    index_np = np.zeros((num_users,), np.int32)
    one_version = device_params
  devices = checks.devices(devices)

  if num_users == 0:
    return ExactResult.empty(
      cards,
      num_labels,
      dtype,
      posteriors=bayes or top_k > 1 or defense is not None,
      screen=screen_dtype is not None,
    )

  plan = sizing.plan(
    device_apply,
    one_version,
    d,
    dtype,
    cards,
    num_labels,
    num_users,
    len(devices),
    devices[0].platform,
    chunk_size,
    users_per_chunk,
    per_user_params,
    screen=screen_dtype is not None,
  )
  opts = core.Options(
    cardinalities=cards,
    num_labels=num_labels,
    top_k=top_k,
    distance=distance,
    clip=clip,
    clip_aware=bool(clip_aware),
    bayes=bayes,
    per_user_prior=per_user,
    per_user_params=per_user_params,
    candidates_per_block=plan.candidates_per_block,
    num_blocks=plan.num_blocks,
    chunks_per_call=plan.chunks_per_call,
    screen_dtype=screen_dtype,
    screen_top=screen_top,
    defense=defense,
  )
  table = scoring.candidate_table(cards)
  padded_cand = plan.candidates_per_block * plan.num_blocks
  if padded_cand > num_cand:  # pad with copies of the last candidate; sliced off after scoring
    table = np.concatenate([table, np.repeat(table[-1:], padded_cand - num_cand, axis=0)])
  shared = (
    device_params,
    table,
    np.asarray(clip_value if clip else np.inf, dtype),
    np.asarray(noise_value if bayes else 1.0, dtype),
    np.asarray(screen_rtol_value, dtype),
    None if per_user else prior,
  )
  info_np = np.zeros((num_users, 1), dtype)
  if likelihood:
    info_np = _defense_info(defense.likelihood, defense_info, num_users, d, dtype)
  per_user_args = (h_np, g_np, index_np, info_np) + ((prior,) if per_user else ())
  merged = runner.run_users(
    runner.Static(_device_share, (device_apply, opts)),
    shared,
    per_user_args,
    num_users=num_users,
    users_per_call=plan.users_per_chunk * plan.chunks_per_call * len(devices),
    devices=devices,
  )
  fallback = merged.pop('screen_fallback', None)
  if fallback is not None and fallback.any():
    # Inconclusive screens: attack those users again in full precision.
    rows = np.nonzero(fallback)[0]
    redo = exact(
      device_apply,
      device_params,
      h_np[rows],
      g_np[rows],
      cards,
      num_labels=num_labels,
      top_k=top_k,
      chunk_size=chunk_size,
      distance=distance,
      l2_clip_norm=l2_clip_norm,
      clip_aware=clip_aware,
      users_per_chunk=users_per_chunk,
      param_index=index_np[rows] if per_user_params else None,
      devices=devices,
    )
    for name, value in redo._asdict().items():
      if name == 'screen_fallback' or value is None:
        continue
      if isinstance(value, tuple):
        for part, new in zip(merged[name], value, strict=False):
          part[rows] = new
      else:
        merged[name][rows] = value
  return ExactResult.from_outputs(merged, screen_fallback=fallback)
