"""Tests of EXACT (`splitjax.attacks.exact`, `exact_user`) on a small random DeepFM-shaped model."""

import math
import os
import textwrap

import chex
import forced_devices
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import splitjax.attacks
from splitjax.attacks import screen as screen_lib

exact_lib = splitjax.attacks  # the public functions (exact, candidate_table, ...)

# Small fixed shapes shared by every test (one compilation per option set).
NUM_SERVER_FIELDS = 2
NUM_DENSE = 2
EMBED = 8
CARDS = (2, 3, 4)
HIDDEN = (32, 16)
D = NUM_SERVER_FIELDS * EMBED + NUM_DENSE
NUM_USERS = 96


def init_deepfm(seed, num_server_fields, num_dense, priv_cards, embed_dim=EMBED, hidden=HIDDEN):
  """Random DeepFM head parameters: linear + FM over 8-dim fields + DNN on [h, e(x_priv)].

  Drawn with numpy (an eager jax.random draw compiles once per shape: seconds per process)."""
  d = num_server_fields * embed_dim + num_dense
  rng = np.random.default_rng([seed, 1])
  normal = lambda shape, s: jnp.asarray(s * rng.standard_normal(shape), jnp.float32)
  h1, h2 = hidden
  num_priv = len(priv_cards)
  return dict(
    w_h=normal((d,), 1 / math.sqrt(d)),
    bias=normal((), 0.1),
    w_priv=tuple(normal((k,), 0.5) for k in priv_cards),
    emb=tuple(normal((k, embed_dim), 0.3) for k in priv_cards),
    W1_h=normal((d, h1), math.sqrt(2 / d)),
    W1_priv=tuple(
      normal((embed_dim, h1), math.sqrt(2 / (embed_dim * num_priv))) for _ in priv_cards
    ),
    b1=normal((h1,), 0.1),
    W2=normal((h1, h2), math.sqrt(2 / h1)),
    b2=normal((h2,), 0.1),
    w3=normal((h2,), 1 / math.sqrt(h2)),
    b3=normal((), 0.1),
  )


def make_apply(num_server_fields, embed_dim=EMBED):
  """device_logit(params, h [d], x_priv [P] int32) -> scalar, first DNN layer factored."""

  def apply(p, h, x):
    num_priv = len(p['emb'])
    e = [p['emb'][j][x[j]] for j in range(num_priv)]
    lin = h @ p['w_h'] + sum(p['w_priv'][j][x[j]] for j in range(num_priv)) + p['bias']
    fields = jnp.concatenate(
      [h[: num_server_fields * embed_dim].reshape(num_server_fields, embed_dim), jnp.stack(e)]
    )
    s = fields.sum(0)
    fm = 0.5 * jnp.sum(s * s - jnp.sum(fields * fields, 0))
    a1 = (
      h @ p['W1_h'] + sum((p['emb'][j] @ p['W1_priv'][j])[x[j]] for j in range(num_priv)) + p['b1']
    )
    a2 = jax.nn.relu(jax.nn.relu(a1) @ p['W2'] + p['b2'])
    return lin + fm + a2 @ p['w3'] + p['b3']

  return apply


def numpy_logit_and_grad(p, h, x, num_server_fields=NUM_SERVER_FIELDS, embed_dim=EMBED):
  """The same model's z and dz/dh in float64 numpy, by hand (independent of jax autodiff)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  h = np.asarray(h, np.float64)
  num_priv = len(p['emb'])
  e = [p['emb'][j][x[j]] for j in range(num_priv)]
  sf = num_server_fields * embed_dim
  fields = np.concatenate([h[:sf].reshape(num_server_fields, embed_dim), np.stack(e)])
  s = fields.sum(0)
  a1 = h @ p['W1_h'] + sum((p['emb'][j] @ p['W1_priv'][j])[x[j]] for j in range(num_priv)) + p['b1']
  u1 = np.maximum(a1, 0)
  a2 = u1 @ p['W2'] + p['b2']
  u2 = np.maximum(a2, 0)
  z = (
    h @ p['w_h']
    + sum(p['w_priv'][j][x[j]] for j in range(num_priv))
    + p['bias']
    + 0.5 * np.sum(s * s - np.sum(fields * fields, 0))
    + u2 @ p['w3']
    + p['b3']
  )
  delta2 = p['w3'] * (a2 > 0)
  delta1 = (p['W2'] @ delta2) * (a1 > 0)
  grad = p['w_h'] + p['W1_h'] @ delta1
  grad[:sf] += (s[None, :] - h[:sf].reshape(num_server_fields, embed_dim)).reshape(-1)
  return z, grad


def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def brute_force_gradients(p, h):
  """[N, C, L, d] float64 simulated gradients of every (candidate, label) pair, numpy only."""
  table = np.array(list(np.ndindex(*CARDS)), dtype=np.int32)
  out = np.zeros((h.shape[0], len(table), 2, h.shape[1]))
  for u in range(h.shape[0]):
    for c, x in enumerate(table):
      z, v = numpy_logit_and_grad(p, h[u], x)
      for y in (0, 1):
        out[u, c, y] = (sigmoid(z) - y) * v
  return table, out


def device_gradients(apply, p, h, x, y):
  """What the device sends without DP: per-example d BCE / d h (jax, float32)."""

  def loss(h_i, x_i, y_i):
    z = apply(p, h_i, x_i)
    return jnp.logaddexp(0.0, z) - y_i * z

  return np.asarray(
    jax.jit(jax.vmap(jax.grad(loss)))(jnp.asarray(h), jnp.asarray(x), jnp.asarray(y))
  )


def clip_rows(g, c):
  norms = np.linalg.norm(g, axis=1, keepdims=True)
  return g * np.minimum(1.0, c / np.maximum(norms, 1e-30))


class Problem:
  """A model, users and their true secrets; shared by the whole module."""

  def __init__(self, seed=0, h_scale=1.0):
    rng = np.random.default_rng(seed)
    self.params = init_deepfm(seed, NUM_SERVER_FIELDS, NUM_DENSE, CARDS)
    self.apply = make_apply(NUM_SERVER_FIELDS)
    self.h = (h_scale * rng.normal(size=(NUM_USERS, D))).astype(np.float32)
    self.x = np.stack([rng.integers(0, k, NUM_USERS) for k in CARDS], 1).astype(np.int32)
    self.y = rng.integers(0, 2, NUM_USERS).astype(np.int32)
    self.g = device_gradients(self.apply, self.params, self.h, self.x, self.y)


@pytest.fixture(scope='module')
def problem():
  return Problem()


@pytest.fixture(scope='module')
def brute(problem):
  """Brute-force candidate gradients for the first 12 users."""
  return brute_force_gradients(problem.params, problem.h[:12])


def _correct(result, problem):
  return (result.features == problem.x).all(axis=1) & (result.labels == problem.y)


def test_candidate_table_order():
  table = exact_lib.candidate_table((2, 3, 2))
  assert table.shape == (12, 3) and table.dtype == np.int32
  np.testing.assert_array_equal(table, np.array(list(np.ndindex(2, 3, 2))))


def test_recovers_every_user_without_dp_up_to_ties(problem):
  r = exact_lib.exact(problem.apply, problem.params, problem.h, problem.g, CARDS)
  ok = _correct(r, problem)
  assert np.all(ok | (r.num_ties > 1)), np.nonzero(~ok)
  assert ok.mean() >= 0.95
  assert r.features.shape == (NUM_USERS, len(CARDS)) and r.features.dtype == np.int32
  assert r.labels.shape == r.distances.shape == r.num_ties.shape == r.gap.shape == (NUM_USERS,)
  assert np.all(r.num_ties >= 1)
  # The true pair is at distance ~0 (float32 rounding), the runner-up far away. g = (p - y) dz/dh:
  # both sides round p - y to about 1e-7 absolute, an error that scales with ||dz/dh||, which is
  # large beside ||g|| for users the model is sure of.
  scale = np.linalg.norm(problem.g, axis=1)
  z = np.asarray(
    jax.vmap(problem.apply, in_axes=(None, 0, 0))(problem.params, problem.h, problem.x)
  )
  dz_dh = scale / np.abs(1 / (1 + np.exp(-z.astype(np.float64))) - problem.y)
  assert np.all(r.distances[ok] <= 1e-5 * scale[ok] + 1e-6 * np.maximum(1.0, dz_dh[ok]))
  np.testing.assert_array_equal(r.features, r.map_features)
  assert r.feature_posteriors is None and r.label_posterior is None


@pytest.mark.parametrize('distance', ['l2', 'cosine'])
def test_equals_numpy_brute_force_argmin(problem, brute, distance):
  table, cand = brute  # [n, C, L, d]
  n = cand.shape[0]
  rng = np.random.default_rng(1)
  # Observations: true gradients and random directions (non-trivial nearest pairs).
  g_obs = np.concatenate(
    [
      problem.g[:n],
      rng.normal(size=problem.g[:n].shape).astype(np.float32)
      * np.linalg.norm(problem.g[:n], axis=1, keepdims=True)
      / math.sqrt(D),
    ]
  )
  cand = np.concatenate([cand, cand])
  h = np.concatenate([problem.h[:n], problem.h[:n]])
  if distance == 'l2':
    dist = np.linalg.norm(cand - g_obs[:, None, None, :], axis=-1)
  else:
    cos = np.einsum('ncld,nd->ncl', cand, g_obs) / (
      np.linalg.norm(cand, axis=-1) * np.linalg.norm(g_obs, axis=-1)[:, None, None]
    )
    dist = 1.0 - cos
  flat = dist.reshape(len(g_obs), -1)
  best = flat.argmin(axis=1)
  srt = np.sort(flat, axis=1)
  r = exact_lib.exact(problem.apply, problem.params, h, g_obs, CARDS, distance=distance)
  clear = (srt[:, 1] - srt[:, 0]) > 1e-4 * (
    np.linalg.norm(g_obs, axis=1) if distance == 'l2' else 1
  )
  assert clear.sum() >= len(g_obs) - 2
  np.testing.assert_array_equal(r.map_features[clear], table[best // 2][clear])
  np.testing.assert_array_equal(r.map_labels[clear], (best % 2)[clear])
  np.testing.assert_allclose(r.distances, srt[:, 0], rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(r.gap[clear], (srt[:, 1] - srt[:, 0])[clear], rtol=1e-3, atol=1e-5)


def test_clip_aware_recovers_where_clip_unaware_fails(problem):
  norms = np.linalg.norm(problem.g, axis=1)
  assert norms.std() > 0.5 * norms.mean()  # norms vary a lot: clipping removes information
  clip = 0.5 * norms.mean()  # like --dp_clip=auto
  assert np.mean(norms > clip) > 0.4
  g_clipped = clip_rows(problem.g, clip)
  aware = exact_lib.exact(
    problem.apply, problem.params, problem.h, g_clipped, CARDS, l2_clip_norm=clip
  )
  unaware = exact_lib.exact(
    problem.apply, problem.params, problem.h, g_clipped, CARDS, l2_clip_norm=clip, clip_aware=False
  )
  aware_acc = np.mean(_correct(aware, problem))
  unaware_acc = np.mean(_correct(unaware, problem))
  assert aware_acc >= 0.99, aware_acc
  assert unaware_acc <= aware_acc - 0.3, (aware_acc, unaware_acc)
  # The clip-aware simulated gradient of the true pair matches the observation.
  ok = _correct(aware, problem)
  assert np.all(aware.distances[ok] <= 1e-5 * clip + 1e-6)


def test_bayes_marginals_match_brute_force_posterior(problem, brute):
  table, cand = brute
  n = cand.shape[0]
  clip = 0.5 * float(np.linalg.norm(problem.g, axis=1).mean())
  stddev = clip / math.sqrt(D)  # noise norm ~ C: mixed posteriors
  rng = np.random.default_rng(2)
  g_obs = (clip_rows(problem.g[:n], clip) + stddev * rng.normal(size=(n, D))).astype(np.float32)
  num_cand = len(table)
  log_prior = rng.normal(size=num_cand * 2).astype(np.float32)
  r = exact_lib.exact(
    problem.apply,
    problem.params,
    problem.h[:n],
    g_obs,
    CARDS,
    l2_clip_norm=clip,
    noise_stddev=stddev,
    log_prior=log_prior,
  )
  assert min(p.max(axis=1).min() for p in r.feature_posteriors) < 0.8  # not all one-hot
  # Brute force: clip every candidate like the device, Gaussian log-likelihood + log prior.
  cnorm = np.linalg.norm(cand, axis=-1, keepdims=True)
  cand_c = cand * np.minimum(1.0, clip / cnorm)
  loglik = -np.sum((cand_c - g_obs[:, None, None, :]) ** 2, axis=-1) / (2 * stddev**2)
  logpost = loglik + log_prior.reshape(num_cand, 2)[None]
  post = np.exp(logpost - logpost.max(axis=(1, 2), keepdims=True))
  post /= post.sum(axis=(1, 2), keepdims=True)
  post_full = post.reshape((n,) + CARDS + (2,))
  for j in range(len(CARDS)):
    axes = tuple(a for a in range(1, len(CARDS) + 2) if a != j + 1)
    marginal = post_full.sum(axis=axes)
    np.testing.assert_allclose(r.feature_posteriors[j], marginal, atol=2e-3)
    np.testing.assert_array_equal(r.features[:, j], marginal.argmax(axis=1))
  label_marginal = post.sum(axis=1)
  np.testing.assert_allclose(r.label_posterior, label_marginal, atol=2e-3)
  np.testing.assert_array_equal(r.labels, label_marginal.argmax(axis=1))
  best = post.reshape(n, -1).argmax(axis=1)
  np.testing.assert_array_equal(r.map_features, table[best // 2])
  np.testing.assert_array_equal(r.map_labels, best % 2)
  np.testing.assert_allclose(
    sum(p.sum(axis=1) for p in r.feature_posteriors), len(CARDS), rtol=1e-4
  )


def test_bayes_per_user_prior_equals_shared_prior(problem):
  rng = np.random.default_rng(5)
  num_pairs = math.prod(CARDS) * 2
  prior = rng.normal(size=(math.prod(CARDS), 2)).astype(np.float32)
  kwargs = dict(noise_stddev=0.05, l2_clip_norm=1.0)
  shared = exact_lib.exact(
    problem.apply, problem.params, problem.h, problem.g, CARDS, log_prior=prior, **kwargs
  )
  per_user = exact_lib.exact(
    problem.apply,
    problem.params,
    problem.h,
    problem.g,
    CARDS,
    log_prior=np.tile(prior.reshape(1, num_pairs), (NUM_USERS, 1)),
    **kwargs,
  )
  np.testing.assert_array_equal(shared.features, per_user.features)
  np.testing.assert_allclose(shared.label_posterior, per_user.label_posterior, rtol=1e-5, atol=1e-7)


def test_noise_multiplier_is_noise_stddev_over_the_clip_norm(problem):
  prior = np.random.default_rng(5).normal(size=(math.prod(CARDS), 2)).astype(np.float32)
  args = (problem.apply, problem.params, problem.h, problem.g, CARDS)
  by_stddev = exact_lib.exact(*args, l2_clip_norm=2.0, noise_stddev=0.1, log_prior=prior)
  by_sigma = exact_lib.exact(*args, l2_clip_norm=2.0, noise_multiplier=0.05, log_prior=prior)
  for a, b in zip(by_stddev, by_sigma, strict=True):
    for x, y in zip(*((v,) if not isinstance(v, tuple) else v for v in (a, b)), strict=True):
      np.testing.assert_array_equal(x, y)
  with pytest.raises(splitjax.attacks.AttackError, match='not both'):
    exact_lib.exact(*args, l2_clip_norm=2.0, noise_stddev=0.1, noise_multiplier=0.05)
  with pytest.raises(splitjax.attacks.AttackError, match='finite l2_clip_norm'):
    exact_lib.exact(*args, noise_multiplier=0.05)


def test_top_k_majority_vote(problem, brute):
  table, cand = brute
  n = cand.shape[0]
  rng = np.random.default_rng(3)
  g_obs = (
    problem.g[:n]
    + 0.3
    * np.linalg.norm(problem.g[:n], axis=1, keepdims=True)
    * rng.normal(size=(n, D))
    / math.sqrt(D)
  ).astype(np.float32)
  k = 7
  r = exact_lib.exact(problem.apply, problem.params, problem.h[:n], g_obs, CARDS, top_k=k)
  dist = np.linalg.norm(cand - g_obs[:, None, None, :], axis=-1).reshape(n, -1)
  for u in range(n):
    order = np.argsort(dist[u], kind='stable')[:k]
    feats = table[order // 2]
    for j, kj in enumerate(CARDS):
      votes = np.bincount(feats[:, j], minlength=kj)
      assert r.features[u, j] == votes.argmax()  # ties -> lower value
      np.testing.assert_allclose(r.feature_posteriors[j][u], votes / k, atol=1e-6)
    assert r.labels[u] == np.bincount(order % 2, minlength=2).argmax()
    assert r.map_features[u].tolist() == table[order[0] // 2].tolist()


def test_chunking_options_give_the_same_answer(problem):
  ref = exact_lib.exact(problem.apply, problem.params, problem.h, problem.g, CARDS)
  for kwargs in (
    dict(chunk_size=5),
    dict(users_per_chunk=7),
    dict(chunk_size=24, users_per_chunk=1),
  ):
    r = exact_lib.exact(problem.apply, problem.params, problem.h, problem.g, CARDS, **kwargs)
    np.testing.assert_array_equal(r.features, ref.features)
    np.testing.assert_array_equal(r.labels, ref.labels)
    np.testing.assert_allclose(r.distances, ref.distances, rtol=1e-5, atol=1e-6)


def test_param_index_attacks_each_user_with_its_own_version(problem):
  other = Problem(seed=11)  # a second parameter version, other users
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), problem.params, other.params)
  n = 40
  h = np.concatenate([problem.h[:n], other.h[:n]])
  g = np.concatenate([problem.g[:n], other.g[:n]])
  index = np.repeat(np.array([0, 1]), n)
  perm = np.random.default_rng(0).permutation(2 * n)
  r = exact_lib.exact(problem.apply, stacked, h[perm], g[perm], CARDS, param_index=index[perm])
  inv = np.argsort(perm)
  for version, prob in enumerate((problem, other)):
    rows = inv[version * n : (version + 1) * n]
    ref = exact_lib.exact(prob.apply, prob.params, prob.h[:n], prob.g[:n], CARDS)
    np.testing.assert_array_equal(r.features[rows], ref.features)
    np.testing.assert_array_equal(r.labels[rows], ref.labels)
    np.testing.assert_array_equal(r.features[rows], prob.x[:n])
  with pytest.raises(ValueError, match=r'param_index values must lie in \[0, 2\)'):
    exact_lib.exact(problem.apply, stacked, h, g, CARDS, param_index=index + 1)


def test_second_call_does_not_retrace(problem):
  traces = []

  def counting_apply(p, h, x):
    traces.append(1)  # runs at trace time only
    return problem.apply(p, h, x)

  r1 = exact_lib.exact(
    counting_apply, problem.params, problem.h, problem.g, CARDS, l2_clip_norm=1.0
  )
  first = len(traces)
  assert first > 0
  r2 = exact_lib.exact(
    counting_apply, problem.params, problem.h, problem.g, CARDS, l2_clip_norm=2.0
  )  # another clip value is a traced argument
  # Fewer users in the same chunk bucket: padded, same compiled function.
  exact_lib.exact(
    counting_apply, problem.params, problem.h[:-5], problem.g[:-5], CARDS, l2_clip_norm=1.0
  )
  assert len(traces) == first
  np.testing.assert_array_equal(r1.features.shape, r2.features.shape)


def test_empty_input(problem):
  r = exact_lib.exact(problem.apply, problem.params, problem.h[:0], problem.g[:0], CARDS)
  assert r.features.shape == (0, len(CARDS)) and r.labels.shape == (0,)


def test_registry_names():
  assert set(exact_lib.DISTANCES) >= {'l2', 'cosine'}
  assert splitjax.attacks.exact is exact_lib.exact
  assert splitjax.attacks.DISTANCES is exact_lib.DISTANCES
  with pytest.raises(ValueError, match=r"unknown attack 'nope'; valid names: \['exact'"):
    splitjax.attacks.run('nope', None, None)  # the name is checked first


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(cardinalities=(2, 0, 4)), r'cardinalities\[1\] must be >= 1, got 0'),
    (dict(cardinalities=(2, -3, 4)), r'got -3'),
    (dict(g_obs='short'), r'h \(96, 18\) and g_obs \(95, 18\)'),
    (dict(g_obs='nan'), r'g_obs \(96, 18\) has 1 NaN'),
    (dict(h='rank1'), r'h \(18,\)'),
    (dict(distance='manhattan'), r"unknown distance 'manhattan'.*'cosine', 'l2'"),
    (dict(top_k=0), r'top_k must be a positive int'),
    (dict(top_k=1000), r'top_k=1000 exceeds the 48'),
    (dict(noise_stddev=0.1, distance='cosine'), r'distance must be "l2"'),
    (dict(log_prior=np.zeros(48)), r'log_prior is used only with noise_stddev'),
    (dict(noise_stddev=0.1, log_prior=np.zeros(47)), r'log_prior has shape \(47,\)'),
    (dict(l2_clip_norm=-1.0), r'l2_clip_norm must be >= 0'),
    (dict(l2_clip_norm=0.0), r'l2_clip_norm must be > 0'),
    (dict(noise_stddev=-0.5), r'noise_stddev must be >= 0'),
    (dict(num_labels=1), r'num_labels must be an int >= 2'),
    (dict(screen_dtype='int8'), r"unknown screen_dtype 'int8'"),
    (dict(screen_dtype='bfloat16', noise_stddev=0.1), r'cannot be combined with noise_stddev'),
    (dict(screen_dtype='bfloat16', top_k=9), r'top_k=9 exceeds screen_top=8'),
    (dict(screen_rtol=-1.0), r'screen_rtol must be >= 0'),
  ],
)
def test_bad_arguments_raise_value_error(problem, kwargs, match):
  args = dict(h=problem.h, g_obs=problem.g, cardinalities=CARDS)
  kwargs = dict(kwargs)
  if kwargs.get('g_obs') == 'short':
    kwargs['g_obs'] = problem.g[:-1]
  elif kwargs.get('g_obs') == 'nan':
    g = problem.g.copy()
    g[3, 2] = np.nan
    kwargs['g_obs'] = g
  if kwargs.get('h') == 'rank1':
    kwargs['h'], kwargs['g_obs'] = problem.h[0], problem.g[0]
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    exact_lib.exact(problem.apply, problem.params, **args)


def test_more_than_two_labels_not_implemented(problem):
  with pytest.raises(NotImplementedError):
    exact_lib.exact(problem.apply, problem.params, problem.h, problem.g, CARDS, num_labels=3)


def _observations_with_near_misses(problem, n=48):
  """True gradients, clipped ones and random directions: nearest pairs of every kind."""
  rng = np.random.default_rng(5)
  scale = np.linalg.norm(problem.g[:n], axis=1, keepdims=True) / math.sqrt(D)
  g = np.concatenate(
    [
      problem.g[:n],
      clip_rows(problem.g[:n], float(np.median(scale))),
      (rng.normal(size=problem.g[:n].shape) * scale).astype(np.float32),
    ]
  )
  return np.concatenate([problem.h[:n]] * 3), g


@pytest.mark.parametrize(
  'kwargs',
  [
    dict(),
    dict(distance='cosine'),
    dict(top_k=3),
    dict(l2_clip_norm=0.3),
    dict(l2_clip_norm=0.3, clip_aware=False),
  ],
)
def test_low_precision_screen_equals_full_precision(problem, kwargs):
  h, g = _observations_with_near_misses(problem)
  ref = exact_lib.exact(problem.apply, problem.params, h, g, CARDS, **kwargs)
  r = exact_lib.exact(problem.apply, problem.params, h, g, CARDS, screen_dtype='bfloat16', **kwargs)
  assert ref.screen_fallback is None and r.screen_fallback.shape == (len(h),)
  assert r.screen_fallback.dtype == bool
  if 'l2_clip_norm' not in kwargs and 'top_k' not in kwargs:
    # True gradients are reproduced by a rescored pair: decided by the screen, ~none redone. (The
    # other observations, with no exact match, and votes may be redone in float32.)
    assert r.screen_fallback[: len(h) // 3].mean() <= 0.05
  np.testing.assert_array_equal(r.features, ref.features)
  np.testing.assert_array_equal(r.labels, ref.labels)
  np.testing.assert_array_equal(r.map_features, ref.map_features)
  np.testing.assert_array_equal(r.map_labels, ref.map_labels)
  np.testing.assert_array_equal(r.num_ties, ref.num_ties)
  # The answer's score is recomputed in float32: equal to the unscreened one up to rounding.
  np.testing.assert_allclose(r.distances, ref.distances, rtol=1e-5, atol=1e-6)
  # Where the runner-up was rescored the gap is the float32 one; else the screen's score of the
  # best unrescored pair enters, a lower bound: the gap is never overstated.
  assert np.all(r.gap <= ref.gap * (1 + 1e-5) + 1e-6)
  assert np.mean(np.isclose(r.gap, ref.gap, rtol=1e-4, atol=1e-6)) >= 0.8
  if 'top_k' in kwargs:
    for a, b in zip(r.feature_posteriors, ref.feature_posteriors, strict=True):
      np.testing.assert_array_equal(a, b)


def test_screen_decides_clipped_observations_by_their_exact_match(problem):
  # The device clipped at C and the attack knows C: the true pair reproduces g_obs exactly.
  clip = float(np.median(np.linalg.norm(problem.g, axis=1)))
  g = clip_rows(problem.g, clip)
  ref = exact_lib.exact(problem.apply, problem.params, problem.h, g, CARDS, l2_clip_norm=clip)
  r = exact_lib.exact(
    problem.apply, problem.params, problem.h, g, CARDS, l2_clip_norm=clip, screen_dtype='bfloat16'
  )
  assert r.screen_fallback.mean() <= 0.05, r.screen_fallback.mean()
  np.testing.assert_array_equal(r.features, ref.features)
  np.testing.assert_array_equal(r.labels, ref.labels)
  assert _correct(r, problem).mean() >= 0.95


@pytest.mark.parametrize('top_k', [2, 3])
def test_screened_vote_equals_full_precision_vote(top_k):
  # Regression (found in review): the screen checked only the best pair, not all top_k voters.
  prob = Problem(seed=1)
  ref = exact_lib.exact(prob.apply, prob.params, prob.h, prob.g, CARDS, top_k=top_k)
  r = exact_lib.exact(
    prob.apply,
    prob.params,
    prob.h,
    prob.g,
    CARDS,
    top_k=top_k,
    screen_dtype='bfloat16',
    screen_top=top_k,
  )
  for a, b in zip(
    r.feature_posteriors + (r.label_posterior,),
    ref.feature_posteriors + (ref.label_posterior,),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(r.features, ref.features)


def test_screen_selection_flags_non_finite_scores():
  screen = jnp.array(
    [
      [1.0, 3.0, 0.5, 2.0, 9.0, 7.0, 8.0, 6.0],
      [1.0, jnp.inf, jnp.inf, jnp.inf, jnp.inf, jnp.inf, jnp.inf, jnp.inf],
    ]
  )
  top, cutoff, non_finite = screen_lib.screen_top(screen, 2)
  np.testing.assert_array_equal(np.asarray(top[0]), [2, 0])
  assert float(cutoff[0]) == 2.0
  np.testing.assert_array_equal(np.asarray(non_finite), [False, True])


def test_inconclusive_screens_fall_back_to_full_precision(problem):
  h, g = _observations_with_near_misses(problem)
  ref = exact_lib.exact(problem.apply, problem.params, h, g, CARDS)
  # An error bound no screen can clear: every user without an exact match (the random directions)
  # is attacked again without screening; users whose true gradient is reproduced are not.
  r = exact_lib.exact(
    problem.apply, problem.params, h, g, CARDS, screen_dtype='bfloat16', screen_rtol=1e6
  )
  n = len(h) // 3
  # (A true gradient of tiny norm may miss the match tolerance and be redone: allowed, rare.)
  assert r.screen_fallback[2 * n :].all() and r.screen_fallback[:n].mean() <= 0.05
  for name in ('features', 'labels', 'map_features', 'map_labels', 'num_ties'):
    np.testing.assert_array_equal(getattr(r, name), getattr(ref, name))
  redone = r.screen_fallback  # redone users: float32's own numbers
  np.testing.assert_array_equal(r.gap[redone], ref.gap[redone])
  np.testing.assert_array_equal(r.distances[redone], ref.distances[redone])
  # screen_top=1 with no assumed error: users without an exact match are decided by the screen's
  # ranking alone (fewer redone than with the default bound).
  r1 = exact_lib.exact(
    problem.apply,
    problem.params,
    h,
    g,
    CARDS,
    screen_dtype='bfloat16',
    screen_top=1,
    screen_rtol=0.0,
  )
  r_default = exact_lib.exact(
    problem.apply, problem.params, h, g, CARDS, screen_dtype='bfloat16', screen_top=1
  )
  assert r1.screen_fallback.sum() < r_default.screen_fallback.sum()
  np.testing.assert_array_equal(r1.features[: len(h) // 3], ref.features[: len(h) // 3])


def test_low_precision_matmuls_rewrites_every_float32_product(problem):
  vg = jax.value_and_grad(problem.apply, argnums=1)
  low = exact_lib.low_precision_matmuls(vg)
  x = problem.x[0]
  jaxpr = jax.make_jaxpr(low)(problem.params, problem.h[0], x).jaxpr
  eqns = [e for e in jaxpr.eqns if e.primitive.name == 'dot_general']
  assert eqns and all(v.aval.dtype == jnp.bfloat16 for e in eqns for v in e.invars)
  assert all(e.outvars[0].aval.dtype == jnp.float32 for e in eqns)
  # Matmuls inside jax.checkpoint (the remat2 primitive, an open jaxpr) are rewritten too.
  remat = exact_lib.low_precision_matmuls(jax.checkpoint(vg))
  eqns = jax.make_jaxpr(remat)(problem.params, problem.h[0], x).jaxpr.eqns
  dots = [e for e in eqns if e.primitive.name == 'dot_general']
  assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  (z_ref, g_ref), (z, g) = vg(problem.params, problem.h[0], x), low(problem.params, problem.h[0], x)
  assert g.dtype == jnp.float32
  # bf16 inputs: relative error ~2^-8 per product, well away from float32's ~1e-7.
  err = float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref))
  assert 1e-6 < err < 3e-2, err
  np.testing.assert_allclose(z, z_ref, rtol=3e-2, atol=3e-2)


_MULTI_DEVICE_SCRIPT = textwrap.dedent('''
    import importlib.util, sys
    import jax, numpy as np
    assert jax.device_count() == 4, jax.devices()
    spec = importlib.util.spec_from_file_location('test_exact', sys.argv[1])
    t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)
    import splitjax.attacks as ex
    prob = t.Problem(seed=7)
    rng = np.random.default_rng(0)
    n = 37  # not a multiple of the device count: padded
    g = (t.clip_rows(prob.g, 1.0) + 0.02 * rng.normal(size=prob.g.shape)).astype(np.float32)[:n]
    for kwargs in (dict(), dict(l2_clip_norm=1.0, noise_stddev=0.02), dict(top_k=3)):
      one = ex.exact(prob.apply, prob.params, prob.h[:n], g, t.CARDS, devices=jax.devices()[:1],
                     **kwargs)
      four = ex.exact(prob.apply, prob.params, prob.h[:n], g, t.CARDS, **kwargs)
      near_tie = one.gap < 1e-4
      for a, b in zip(one, four):
        if a is None:
          assert b is None
          continue
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
          if x.dtype.kind == 'f':
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
          else:
            np.testing.assert_array_equal(x[~near_tie], y[~near_tie])
    print('OK', jax.device_count())
''')


def test_sharded_over_four_devices_equals_single_device():
  proc = forced_devices.run(_MULTI_DEVICE_SCRIPT, os.path.abspath(__file__), timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'OK 4' in proc.stdout


def test_estimate_counts_the_candidate_flops_and_scales_with_users():
  """FLOPs per candidate of tanh(h W[x0]) . v: forward h W (2dm) and its transpose for dl/dh
  (2dm), plus O(m) for the dot with v; the estimate is linear in users and candidates."""
  d, m = 8, 16
  params = {"W": jnp.ones((3, d, m)), "v": jnp.ones((m,))}
  apply = lambda p, h, x: jnp.tanh(h @ p["W"][x[0]]) @ p["v"]
  est = splitjax.attacks.estimate(apply, params, d, (3, 2), num_users=100)
  assert 4 * d * m <= est.flops_per_candidate <= 4 * d * m + 8 * m, est
  assert (est.num_candidates, est.num_pairs, est.num_users) == (6, 12, 100)
  assert est.matmul_flops_per_second > 0 and est.bytes_per_candidate > 0
  twice = splitjax.attacks.estimate(apply, params, d, (3, 2), num_users=200)
  assert twice.seconds == pytest.approx(2 * est.seconds)
  assert est.seconds == pytest.approx(
    100 * 6 * est.flops_per_candidate / (0.5 * est.matmul_flops_per_second)
  )
  with pytest.raises(splitjax.attacks.AttackError, match="efficiency"):
    splitjax.attacks.estimate(apply, params, d, (3, 2), num_users=1, efficiency=0)


def test_cardinalities_are_checked_against_the_model_and_empty_means_label_only():
  """device_logit_fn carries the model's cardinalities: a wrong tuple is refused (JAX would clamp
  the out-of-range indices and answer silently wrong). An empty tuple is a label-only run."""
  from splitjax import models  # pylint: disable=import-outside-toplevel

  model = models.make_model(
    models.ModelSpec(
      pub_cardinalities=(3,), num_pub_dense=1, priv_cardinalities=(2, 3), hidden=(4,)
    )
  )
  apply, phi = models.device_logit_fn(model), model.device_init(jax.random.key(0))
  h = np.asarray(
    model.encode_batch(
      model.server_init(jax.random.key(1)), np.zeros((2, 1), np.int32), np.ones((2, 1), np.float32)
    )
  )
  g = np.ones_like(h)
  for wrong in ((2,), (2, 3, 4), (3, 3)):
    with pytest.raises(
      splitjax.attacks.AttackError,
      match=r"do not match the model behind "
      r"device_apply, whose private features have cardinalities \(2, 3\)",
    ):
      splitjax.attacks.exact(apply, phi, h, g, wrong)
  assert splitjax.attacks.exact(apply, phi, h, g, (2, 3)).features.shape == (2, 2)
  label_only = splitjax.attacks.exact(lambda p, hh, x: jnp.sum(hh) * p, 1.0, h, g, ())
  assert label_only.features.shape == (2, 0) and set(label_only.labels) <= {0, 1}
  assert splitjax.attacks.tuple_codes(np.zeros((2, 0), np.int32), ()).tolist() == [0, 0]


def test_device_logit_equality_is_safe_inside_a_trace():
  """JAX may compare static callables while it traces (CI once failed a doctest this way): the
  comparison is by value on the host, never a traced jnp operation."""
  from splitjax import models  # pylint: disable=import-outside-toplevel

  same = [models._DeviceLogit(abs, jnp.zeros(3)) for _ in range(2)]  # pylint: disable=protected-access
  other = models._DeviceLogit(abs, jnp.ones(3))  # pylint: disable=protected-access

  @jax.jit
  def compare(x):
    assert same[0] == same[1] and same[0] != other
    return x

  assert float(compare(1.0)) == 1.0
  assert hash(same[0]) == hash(same[1])


class ExactUserTest(chex.TestCase):
  """exact_user, the pure core: jit(vmap(...)) over users equals the host runner `exact`, and the
  scores are differentiable (a defence can be trained against them) and vmappable over clips."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.prob = Problem(seed=3)
    rng = np.random.default_rng(1)
    cls.g_noisy = (clip_rows(cls.prob.g, 1.0) + 0.02 * rng.normal(size=cls.prob.g.shape)).astype(
      np.float32
    )

  def _cases(self):
    p = self.prob
    return [
      (p.g, dict()),
      (p.g, dict(top_k=3)),
      (p.g, dict(distance='cosine')),
      (clip_rows(p.g, 1.0), dict(l2_clip_norm=1.0)),
      (self.g_noisy, dict(l2_clip_norm=1.0, noise_stddev=0.02)),
    ]

  @chex.variants(with_jit=True)
  def test_vmapped_over_users_equals_exact(self):
    self._check(self._cases())

  @chex.variants(without_jit=True)
  def test_vmapped_over_users_equals_exact_eagerly(self):
    # Eager vmap is slow: the plain case only; the jitted test above runs every case (CI time).
    self._check(self._cases()[:1])

  def _check(self, cases):
    p = self.prob
    for g, kwargs in cases:
      ref = exact_lib.exact(p.apply, p.params, p.h, g, CARDS, **kwargs)
      user = self.variant(
        jax.vmap(
          lambda h, g_, kw=kwargs: splitjax.attacks.exact_user(
            p.apply, p.params, h, g_, CARDS, **kw
          )
        )
      )
      got = user(jnp.asarray(p.h), jnp.asarray(g))
      np.testing.assert_array_equal(got.features, ref.features, err_msg=str(kwargs))
      np.testing.assert_array_equal(got.label, ref.labels, err_msg=str(kwargs))
      np.testing.assert_array_equal(got.num_ties, ref.num_ties, err_msg=str(kwargs))
      np.testing.assert_array_equal(got.map_features, ref.map_features, err_msg=str(kwargs))
      # float32 rounding of an exact match is ~1e-6 absolute (||g|| ~ 1), in either order of ops
      np.testing.assert_allclose(got.distance, ref.distances, rtol=1e-5, atol=1e-5)
      finite = np.isfinite(ref.gap)
      np.testing.assert_allclose(got.gap[finite], ref.gap[finite], rtol=1e-5, atol=1e-5)
      self.assertEqual(got.scores.shape, (len(p.h), math.prod(CARDS), 2))
      if ref.label_posterior is None:
        self.assertIsNone(got.label_posterior)
      else:
        np.testing.assert_allclose(got.label_posterior, ref.label_posterior, rtol=1e-5, atol=1e-6)
        for a, b in zip(got.feature_posteriors, ref.feature_posteriors, strict=True):
          np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  def test_scores_are_differentiable_and_vmappable_over_clip_norms(self):
    p = self.prob
    h, g = jnp.asarray(p.h[0]), jnp.asarray(self.g_noisy[0])

    def total(params, g_obs, clip):
      res = splitjax.attacks.exact_user(
        p.apply, params, h, g_obs, CARDS, l2_clip_norm=clip, noise_stddev=0.02
      )
      return jnp.sum(jax.nn.logsumexp(-res.scores))

    d_params, d_g, d_clip = jax.jit(jax.grad(total, argnums=(0, 1, 2)))(p.params, g, 1.0)
    for leaf in jax.tree.leaves((d_params, d_g, d_clip)):
      self.assertTrue(np.all(np.isfinite(np.asarray(leaf))))
    self.assertGreater(float(jnp.linalg.norm(d_g)), 0.0)
    self.assertGreater(float(jnp.linalg.norm(d_params['W2'])), 0.0)
    scores = jax.jit(
      jax.vmap(
        lambda c: splitjax.attacks.exact_user(p.apply, p.params, h, g, CARDS, l2_clip_norm=c).scores
      )
    )(jnp.array([0.5, 1.0, 4.0]))
    self.assertEqual(scores.shape, (3, math.prod(CARDS), 2))
    self.assertFalse(np.allclose(scores[0], scores[2]))  # the clip binds at 0.5, not at 4

  def test_shape_and_static_errors_at_trace_time(self):
    p = self.prob
    with self.assertRaisesRegex(splitjax.attacks.AttackError, 'vmap exact_user over users'):
      splitjax.attacks.exact_user(p.apply, p.params, p.h, p.g, CARDS)
    with self.assertRaisesRegex(splitjax.attacks.AttackError, 'distance must be "l2"'):
      splitjax.attacks.exact_user(
        p.apply, p.params, p.h[0], p.g[0], CARDS, noise_stddev=0.1, distance='cosine'
      )
    with self.assertRaisesRegex(splitjax.attacks.AttackError, 'log_prior must be'):
      splitjax.attacks.exact_user(
        p.apply, p.params, p.h[0], p.g[0], CARDS, noise_stddev=0.1, log_prior=jnp.zeros(5)
      )


def test_closed_form_clip_equals_clip_rows():
  """exact's clip `a min(1, C / (|a| ||v||))` on gradients `a v` equals `clip_rows(a v, C)`."""
  from splitjax import privacy
  from splitjax.attacks import scoring

  rng = np.random.default_rng(0)
  d, clip = 6, 0.5
  v = rng.normal(size=(7, d)).astype(np.float32)
  v[1] *= 1e-20  # far below the clip norm: unchanged
  v[2] = 0.0  # zero row: stays zero
  v[3] *= 1e17  # extreme but representable (||a v||^2 ~ 1e34): clipped to norm C
  v[4, 2] = np.nan  # non-finite rows: NaN in both
  v[5, 0] = np.inf
  a = np.array(
    [[0.3, -0.7], [0.9, -0.1], [0.5, -0.5], [1e-3, -1.0], [0.2, -0.8], [0.4, -0.6], [0.0, -1.0]],
    np.float32,
  )
  # (jitted: one compilation instead of dozens of op-by-op dispatches)
  closed = jax.jit(
    lambda a, v: (
      scoring.clip_factors(a, jnp.linalg.norm(v, axis=-1), clip)[..., None] * v[:, None, :]
    )
  )(a, v)
  closed = np.asarray(closed)
  direct = np.asarray(jax.jit(scoring.clip_rows)(a[..., None] * v[:, None, :], clip))
  finite = np.isfinite(v).all(axis=1)
  np.testing.assert_allclose(closed[finite], direct[finite], rtol=2e-6, atol=0)
  assert np.isnan(closed[~finite]).any(axis=-1).all() and np.isnan(direct[~finite]).any(-1).all()
  norms = np.linalg.norm(direct[finite].astype(np.float64), axis=-1)
  assert np.all(norms <= clip * (1 + 1e-6)) and np.isclose(norms[3], clip, rtol=1e-6).all()
  np.testing.assert_array_equal(direct[1], a[1][:, None] * v[1][None])  # below C: unchanged
  # The device's clip (which also zeroes non-finite rows) agrees with both on finite rows.
  rows = jnp.asarray((a[..., None] * v[:, None, :])[finite].reshape(-1, d))
  device = jax.jit(lambda r: privacy.clip_per_example(clip).update(r, None)[0])(rows)
  np.testing.assert_allclose(np.asarray(device), direct[finite].reshape(-1, d), rtol=2e-6)
