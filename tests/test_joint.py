"""The joint attack on batch-averaged releases (`splitjax.attacks.joint`) on a small random head."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from splitjax.attacks import joint
from splitjax.attacks import scoring
from splitjax.defenses import Defense
from splitjax.defenses import apply_one

D = 12
CARDS = (3, 4, 5)
TABLE = jnp.asarray(scoring.candidate_table(CARDS))
_rng = np.random.default_rng(7)
PARAMS = dict(
  W=jnp.asarray(_rng.normal(size=(D, 16)) / math.sqrt(D), jnp.float32),
  E=tuple(jnp.asarray(_rng.normal(size=(k, 16)), jnp.float32) for k in CARDS),
  w=jnp.asarray(_rng.normal(size=16) / 4, jnp.float32),
)


def apply(p, h, x):
  """A nonlinear device head: its dz/dh depends on the private features."""
  a = h @ p["W"] + sum(p["E"][j][x[j]] for j in range(len(CARDS)))
  return jnp.tanh(a) @ p["w"]


def linear_apply(p, h, x):
  """A head whose dz/dh = W w does not depend on the private features."""
  return h @ (p["W"] @ p["w"]) + sum(p["E"][j][x[j]] @ p["w"] for j in range(len(CARDS)))


attack = jax.jit(joint.joint_attack, static_argnames=("beam_width", "num_starts"))
pair_gradients = jax.jit(joint.pair_gradients, static_argnums=0)


def _batch(seed, num_rows, device_apply=apply):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(num_rows, D)), jnp.float32)
  idx = rng.integers(0, len(TABLE), num_rows)
  y = rng.integers(0, 2, num_rows)
  G = pair_gradients(device_apply, PARAMS, h, TABLE)
  return h, idx, y, G


def test_pair_gradients_are_the_per_example_cut_gradients_of_the_loss():
  h, idx, y, G = _batch(0, 5)

  def loss(hj, x, yj):
    z = apply(PARAMS, hj, x)
    return -(yj * jax.nn.log_sigmoid(z) + (1 - yj) * jax.nn.log_sigmoid(-z))

  want = jax.vmap(jax.grad(loss))(h, TABLE[idx], jnp.asarray(y, jnp.float32))
  got = G[jnp.arange(5), 2 * idx + y]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_release_is_what_batch_average_sends():
  h, idx, y, G = _batch(1, 4)
  rows = G[jnp.arange(4), 2 * idx + y]
  sent = apply_one(Defense("batch_average"), rows, None, jnp.ones(4), jnp.inf)
  np.testing.assert_allclose(sent, jnp.broadcast_to(rows.mean(0), rows.shape), rtol=1e-6)


def test_one_row_is_recovered_exactly_and_two_rows_match_the_exhaustive_minimum():
  for seed in range(6):
    _, idx, y, G = _batch(10 + seed, 1)
    res = attack(G, G[0, 2 * idx[0] + y[0]], TABLE, jax.random.key(seed))
    assert int(res.pairs[0]) == 2 * idx[0] + y[0]
  found = 0
  for seed in range(12):
    _, idx, y, G = _batch(20 + seed, 2)
    truth = 2 * idx + y
    g_bar = G[jnp.arange(2), truth].mean(0)
    best, best_residual = joint.exact_pairs(G, g_bar)
    np.testing.assert_array_equal(best, truth)  # the exhaustive search finds the truth
    res = attack(G, g_bar, TABLE, jax.random.key(seed))
    assert float(res.residual) <= float(best_residual) + 1e-5
    found += bool(np.array_equal(res.pairs, truth))
    np.testing.assert_array_equal(res.features, TABLE[res.pairs // 2])
    np.testing.assert_array_equal(res.labels, res.pairs % 2)
  assert found == 12


def test_a_wide_beam_is_the_exhaustive_search():
  """Width M^(B-1) keeps every assignment of the first B - 1 rows: the beam is then exact."""
  _, idx, y, G = _batch(40, 2)
  g_bar = G[jnp.arange(2), 2 * idx + y].mean(0)
  res = attack(G, g_bar, TABLE, jax.random.key(0), beam_width=G.shape[1], num_starts=1)
  best, _ = joint.exact_pairs(G, g_bar)
  np.testing.assert_array_equal(res.pairs, best)


def test_padding_rows_change_nothing():
  _, idx, y, G = _batch(50, 3)
  truth = 2 * idx + y
  g_bar = G[jnp.arange(3), truth].mean(0)
  padded = jnp.concatenate([G, G[:1] * 7.0])  # a fourth row: padding, any gradients
  mask = jnp.asarray([1, 1, 1, 0])
  a = attack(G, g_bar, TABLE, jax.random.key(0))
  b = attack(padded, g_bar, TABLE, jax.random.key(0), mask=mask)
  np.testing.assert_array_equal(b.pairs[:3], a.pairs)
  assert int(b.pairs[3]) == 0
  k, _ = joint.positive_count(padded, g_bar, mask=mask)
  assert int(k) == int(joint.positive_count(G, g_bar)[0])


def test_positive_count_reads_the_count_where_dz_dh_is_the_same_for_every_candidate():
  """On a head linear in h, l'(z, y) scales one direction u = dz/dh, so the projection is
  ``sum_j y_j - sum_j (sigmoid(z_j) - mean_c sigmoid(z_jc))`` exactly (uniform prior): the count,
  off by how far the rows' logits are from their candidates' mean."""
  hits = 0
  for seed in range(8):
    h, idx, y, G = _batch(100 + seed, 3, linear_apply)
    g_bar = G[jnp.arange(3), 2 * idx + y].mean(0)
    k, raw = joint.positive_count(G, g_bar)
    z = jax.vmap(lambda hj, i: linear_apply(PARAMS, hj, TABLE[i]))(h, jnp.asarray(idx))
    zc = jax.vmap(lambda hj: jax.vmap(lambda x: linear_apply(PARAMS, hj, x))(TABLE))(h)
    dev = float(jnp.sum(jax.nn.sigmoid(z) - jax.nn.sigmoid(zc).mean(1)))
    np.testing.assert_allclose(float(raw), y.sum() - dev, rtol=1e-4, atol=1e-4)
    assert int(k) == int(np.clip(np.round(y.sum() - dev), 0, 3))
    hits += int(k) == int(y.sum())
  assert hits >= 1  # the estimate is not degenerate on this head


def test_attack_batches_recovers_small_batches_and_falls_back_on_the_prior_when_nothing_fits():
  rng = np.random.default_rng(40)
  n, b = 7, 2  # batches of 2, the last of one row
  h = rng.normal(size=(n, D)).astype(np.float32)
  idx = rng.integers(0, len(TABLE), n)
  y = rng.integers(0, 2, n)
  rows = np.asarray(pair_gradients(apply, PARAMS, jnp.asarray(h), TABLE))[np.arange(n), 2 * idx + y]
  g = np.concatenate(
    [
      np.repeat(rows[s : s + b].mean(0, keepdims=True), len(rows[s : s + b]), 0)
      for s in range(0, n, b)
    ]
  )
  spoiled = 2  # batch 2 (rows 4, 5): a release no pair of rows explains
  # A count of one positive (row 4 negative, row 5 positive), off any pair's sum.
  G45 = np.asarray(pair_gradients(apply, PARAMS, jnp.asarray(h[4:6]), TABLE))
  mixed = (G45[0, 2 * idx[4]] + G45[1, 2 * idx[5] + 1]) / 2
  g[4:6] = mixed + 0.3 * np.linalg.norm(mixed) * rng.normal(size=D) / np.sqrt(D)
  log_prior = np.log(rng.dirichlet(np.ones(2 * len(TABLE))))
  per_row = np.repeat(log_prior.reshape(1, -1, 2), n, axis=0)
  per_row[5, :, 1] += 3.0  # row 5 likelier positive than row 4
  res = joint.attack_batches(
    apply,
    PARAMS,
    h,
    g,
    CARDS,
    batch_size=b,
    key=jax.random.key(0),
    log_prior=log_prior,
    user_log_prior=per_row,
  )
  ok = res.batch != spoiled
  np.testing.assert_array_equal(res.batch, np.arange(n) // b)
  assert res.fitted[ok].all() and not res.fitted[~ok].any()
  assert (res.relative_residual[ok] < 1e-6).all() and (res.relative_residual[~ok] > 1e-3).all()
  np.testing.assert_array_equal(res.features[ok], np.asarray(TABLE)[idx[ok]])
  np.testing.assert_array_equal(res.labels[ok], y[ok])
  # The spoiled batch: each feature's mode under the row's prior; its k = positive count rows
  # of highest prior P(y = 1) positive.
  table = np.asarray(TABLE)
  for r in (4, 5):
    p = np.exp(per_row[r]).sum(1)
    modes = [np.bincount(table[:, j], weights=p).argmax() for j in range(len(CARDS))]
    np.testing.assert_array_equal(res.features[r], modes)
  k = int(res.positives[4])
  assert k == 1  # the case that exercises the prior's ordering
  want = {0: [0, 0], 1: [0, 1], 2: [1, 1]}[k]
  np.testing.assert_array_equal(res.labels[4:6], want)
