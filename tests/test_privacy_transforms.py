"""Property tests of the DP optax transforms (clip, noise, cut-layer chain, device DP-SGD)."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest
from scipy import stats

from splitjax import privacy

INF = math.inf
CLIPS = (0.0, 1e-3, 0.5, 1.0, 10.0, INF)


def _rows(n=16, seed=0):
  """A two-leaf pytree of n rows with norms spread over 0 .. ~1e3, two rows exactly zero."""
  rng = np.random.default_rng(seed)
  scale = np.concatenate([[0.0, 0.0], np.logspace(-4, 3, n - 2)])
  a = rng.normal(size=(n, 3)) * scale[:, None]
  b = rng.normal(size=(n, 2, 2)) * scale[:, None, None]
  return {'a': jnp.asarray(a, jnp.float32), 'b': jnp.asarray(b, jnp.float32)}


def _row_norms(tree):
  leaves = [np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)]
  return np.sqrt(sum((x**2).sum(1) for x in leaves))


class ClipPerExampleTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_norm_bound_over_clip_and_scale_sweep(self):
    def clip(g, c):
      tx = privacy.clip_per_example(c)
      return tx.update(g, tx.init(g))[0]

    clip = self.variant(clip)
    for c, scale in itertools.product(CLIPS, (0.0, 1e-3, 1.0, 1e3)):
      g = jax.tree.map(lambda x, s=scale: x * s, _rows())
      out = clip(g, c)
      norms_in, norms_out = _row_norms(g), _row_norms(out)
      self.assertFalse(any(np.isnan(x).any() for x in jax.tree.leaves(out)))
      np.testing.assert_array_less(norms_out, c * (1 + 1e-6) + 1e-30)  # never above C
      # Rows already inside the ball are untouched; rows outside land on the sphere.
      inside = norms_in <= c
      np.testing.assert_allclose(norms_out[inside], norms_in[inside], rtol=1e-6)
      if math.isfinite(c):
        np.testing.assert_allclose(norms_out[~inside], c, rtol=1e-5)
      if c == INF:
        chex.assert_trees_all_equal(out, g)
      if c == 0.0:
        self.assertEqual(norms_out.max(), 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_direction_kept_and_each_row_independent(self):
    g = _rows()
    tx = privacy.clip_per_example(1.0)
    out = self.variant(lambda g: tx.update(g, tx.init(g))[0])(g)
    # Scaling is per row and common to all leaves: out = s_i * g_i with 0 <= s_i <= 1.
    nz = _row_norms(g) > 0
    s = _row_norms(out)[nz] / _row_norms(g)[nz]
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(out), strict=True):
      x = np.asarray(x).reshape(len(x), -1)[nz]
      y = np.asarray(y).reshape(len(y), -1)[nz]
      np.testing.assert_allclose(y, x * s[:, None], rtol=1e-5, atol=1e-30)

  @chex.variants(with_jit=True, without_jit=True)
  def test_neighbouring_datasets_sensitivity(self):
    c = 0.75
    tx = privacy.clip_per_example(c)
    clip = self.variant(lambda g: tx.update(g, tx.init(g))[0])
    g = _rows()
    rng = np.random.default_rng(1)
    for i in (0, 5, 15):  # a zero row, a small row, a huge row
      other = jax.tree.map(
        lambda x, i=i: x.at[i].set(jnp.asarray(rng.normal(size=x.shape[1:]) * 50.0, x.dtype)), g
      )
      diff = jax.tree.map(lambda x, y: x - y, clip(g), clip(other))
      d = _row_norms(diff)
      self.assertLessEqual(d[i], 2 * c * (1 + 1e-6))
      np.testing.assert_array_equal(np.delete(d, i), 0.0)  # other rows do not move
    # Antipodal rows reach the sensitivity 2C.
    x = jnp.array([[30.0, 40.0]])
    self.assertAlmostEqual(float(_row_norms(clip(x) - clip(-x))[0]), 2 * c, places=5)

  def test_dtypes_and_shapes_kept_under_jit(self):
    g = {
      'f32': jnp.ones((4, 3), jnp.float32) * 3,
      'bf16': jnp.ones((4, 2, 5), jnp.bfloat16) * 3,
      'f16': jnp.ones((4,), jnp.float16) * 3,
    }
    for tx in (
      privacy.clip_per_example(1.0),
      privacy.cut_layer_dp(1.0, 0.5, key=jax.random.key(0)),
    ):
      out, _ = jax.jit(tx.update)(g, tx.init(g))
      chex.assert_trees_all_equal_shapes_and_dtypes(out, g)
    agg = privacy.dp_aggregate(1.0, 0.5, key=jax.random.key(0))
    out, _ = jax.jit(agg.update)(g, agg.init(g))
    chex.assert_trees_all_equal_shapes_and_dtypes(out, jax.tree.map(lambda x: x[0], g))

  def test_wrong_inputs_raise(self):
    for bad in (-1.0, math.nan, np.array([1.0, 2.0]), 'one'):
      with self.assertRaises(ValueError):
        privacy.clip_per_example(bad)
    tx = privacy.clip_per_example(1.0)
    with self.assertRaisesRegex(ValueError, 'leading batch axis'):
      tx.update({'a': jnp.ones((4, 2)), 'b': jnp.ones((3, 2))}, tx.init(None))
    with self.assertRaisesRegex(ValueError, 'leading batch axis'):
      tx.update(jnp.ones(()), tx.init(None))
    with self.assertRaisesRegex(ValueError, 'floating-point'):
      tx.update(jnp.ones((4, 2), jnp.int32), tx.init(None))
    self.assertTrue(issubclass(privacy.PrivacyError, ValueError))


class AddGaussianNoiseTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_no_privacy_limit_is_identity(self):
    g = _rows()
    key = jax.random.key(3)
    for tx in (
      privacy.add_gaussian_noise(0.0, INF, key=key),
      privacy.cut_layer_dp(INF, 0.0, key=key),
      privacy.add_gaussian_noise(0.0, 1.0, key=key),
    ):
      out, state = self.variant(tx.update)(g, tx.init(g))
      chex.assert_trees_all_equal(out, g)
      del state
    # Traced sigma = 0 with C = inf is the identity too (no 0 * inf = NaN).
    step = jax.jit(
      lambda g, s, c: privacy.add_gaussian_noise(s, c, key=key).update(
        g, (privacy.add_gaussian_noise(s, c, key=key).init(g))
      )[0]
    )
    chex.assert_trees_all_equal(step(g, 0.0, INF), g)
    # And the chain equals the plain (unclipped, noiseless) step.
    params = {'w': jnp.ones(3)}
    grads = {'w': jnp.array([[0.5, -1.0, 2.0]])}
    tx = optax.chain(privacy.cut_layer_dp(INF, 0.0, key=key), optax.sgd(0.1))
    upd, _ = tx.update(grads, tx.init(grads), params)
    plain, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(grads), params)
    chex.assert_trees_all_close(upd, plain)

  @chex.variants(with_jit=True, without_jit=True)
  def test_noise_std_matches_by_ks_test(self):
    sigma, c = 0.7, 1.5
    std = sigma * c
    tx = privacy.add_gaussian_noise(sigma, c, key=jax.random.key(0))
    zeros = {'a': jnp.zeros((200, 120)), 'b': jnp.zeros((200, 80))}
    out, _ = self.variant(tx.update)(zeros, tx.init(zeros))
    x = np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(out)])
    self.assertGreater(stats.kstest(x / std, 'norm').pvalue, 1e-3)
    self.assertLess(stats.kstest(x / (1.1 * std), 'norm').pvalue, 1e-6)  # rejects 1.1 sigma
    self.assertLess(stats.kstest(x / (std / 1.1), 'norm').pvalue, 1e-6)
    # Noise is not shared between leaves or rows.
    a, b = np.asarray(out['a'])[:, :80], np.asarray(out['b'])
    self.assertLess(abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]), 0.05)
    self.assertFalse(np.allclose(a[0], a[1]))

  @chex.variants(with_jit=True, without_jit=True)
  def test_purity_and_key_advance(self):
    tx = privacy.cut_layer_dp(1.0, 1.0, key=jax.random.key(7))
    g = _rows()
    update = self.variant(tx.update)
    state0 = tx.init(g)
    out1, state1 = update(g, state0)
    out1b, state1b = update(g, state0)
    chex.assert_trees_all_equal(out1, out1b)  # same state, same output
    chex.assert_trees_all_equal(
      jax.random.key_data(state1['noise'].rng_key), jax.random.key_data(state1b['noise'].rng_key)
    )
    out2, state2 = update(g, state1)
    self.assertEqual(int(state1['noise'].count), 1)
    self.assertEqual(int(state2['noise'].count), 2)
    self.assertEqual(state2['noise'].count.dtype, jnp.int32)
    self.assertFalse(
      np.array_equal(
        jax.random.key_data(state0['noise'].rng_key), jax.random.key_data(state1['noise'].rng_key)
      )
    )
    self.assertFalse(np.allclose(out1['a'], out2['a']))  # fresh noise per update

  def test_traced_clip_and_sigma_do_not_recompile(self):
    traces = []

    @jax.jit
    def step(g, clip, sigma, key):
      traces.append(1)
      tx = privacy.cut_layer_dp(clip, sigma, key=key)
      return tx.update(g, tx.init(g))[0]

    g = _rows()
    key = jax.random.key(0)
    out1 = step(g, 1.0, 0.0, key)
    out2 = step(g, 0.25, 0.0, key)
    out3 = step(g, 2.0, 0.5, key)
    self.assertLen(traces, 1)
    self.assertLessEqual(_row_norms(out1).max(), 1.0 * (1 + 1e-6))
    self.assertLessEqual(_row_norms(out2).max(), 0.25 * (1 + 1e-6))
    self.assertFalse(np.allclose(out3['a'], step(g, 2.0, 0.0, key)['a']))
    self.assertLen(traces, 1)

  def test_wrong_inputs_raise(self):
    key = jax.random.key(0)
    for sigma, c in ((-1.0, 1.0), (math.nan, 1.0), (1.0, -1.0), (1.0, math.nan), (0.5, INF)):
      with self.assertRaises(ValueError):
        privacy.add_gaussian_noise(sigma, c, key=key)
      with self.assertRaises(ValueError):
        privacy.cut_layer_dp(c, sigma, key=key)
      with self.assertRaises(ValueError):
        privacy.dp_aggregate(c, sigma, key=key)
    for bad_key in (0, jnp.zeros(3, jnp.uint32), jax.random.split(key, 2)):
      with self.assertRaisesRegex(ValueError, 'PRNG key'):
        privacy.add_gaussian_noise(1.0, 1.0, key=bad_key)
    with self.assertRaises(TypeError):
      privacy.add_gaussian_noise(1.0, 1.0, key)  # key is keyword-only
    tx = privacy.add_gaussian_noise(1.0, 1.0, key=jax.random.PRNGKey(0))  # raw keys work
    with self.assertRaisesRegex(ValueError, 'floating-point'):
      tx.update(jnp.ones((2, 2), jnp.int32), tx.init(None))


class DpAggregateTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_noise_is_clipped_mean(self):
    g = _rows()
    tx = privacy.dp_aggregate(0.5, 0.0, key=jax.random.key(0))
    out, state = self.variant(tx.update)(g, tx.init(g))
    clipped = privacy.per_example_global_norm(g)
    scale = np.minimum(1.0, 0.5 / np.where(clipped > 0, clipped, 1.0))
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(out), strict=True):
      expect = (np.asarray(x) * scale.reshape((-1,) + (1,) * (x.ndim - 1))).mean(0)
      np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-7)
    self.assertEqual(int(state.count), 1)

  def test_sum_sensitivity_and_noise_std(self):
    c, sigma, n = 0.5, 0.8, 4
    tx = privacy.dp_aggregate(c, 0.0, key=jax.random.key(0))
    g = _rows(n=n)
    other = jax.tree.map(lambda x: x.at[2].set(-1e3 * jnp.ones_like(x[2])), g)
    d = jax.tree.map(
      lambda x, y: (x - y) * n, tx.update(g, tx.init(g))[0], tx.update(other, tx.init(other))[0]
    )
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(d)])
    self.assertLessEqual(np.linalg.norm(flat), 2 * c * (1 + 1e-6))  # sum moves <= 2C
    tx = privacy.dp_aggregate(c, sigma, key=jax.random.key(1))
    zeros = jnp.zeros((n, 40_000))
    out, _ = jax.jit(tx.update)(zeros, tx.init(zeros))
    x = np.asarray(out) * n / (sigma * c)  # noise on the sum has std sigma * C
    self.assertGreater(stats.kstest(x, 'norm').pvalue, 1e-3)
    self.assertLess(stats.kstest(x / 1.1, 'norm').pvalue, 1e-6)


if __name__ == '__main__':
  absltest.main()


def test_noise_std_that_overflows_float32_is_refused():
  with pytest.raises(privacy.PrivacyError, match="overflows float32"):
    privacy.add_gaussian_noise(1e10, 1e30, key=jax.random.key(0))
  with pytest.raises(privacy.PrivacyError, match="overflows float32"):
    privacy.dp_aggregate(1e30, 1e10, key=jax.random.key(0))
  privacy.add_gaussian_noise(1e10, 1e28, key=jax.random.key(0))  # 1e38 still fits


def test_training_reports_rows_zeroed_for_nonfinite_values():
  from splitjax import training  # pylint: disable=import-outside-toplevel

  x = jnp.array([[1.0, 2.0], [jnp.nan, 0.0], [jnp.inf, 1.0], [3e38, 3e38]], jnp.float32)
  dp = training.DPConfig(np.float32(1.0), np.float32(0.0), np.float32(np.inf), np.float32(0.0))
  mask = jnp.array([1.0, 1.0, 0.0, 1.0])  # the inf row is padding: not counted
  sent, nonfinite = training.cut_layer_dp(x, dp, jax.random.key(0), mask)
  assert int(nonfinite) == 1
  np.testing.assert_array_equal(np.asarray(sent[1:3]), 0.0)
  assert np.all(np.linalg.norm(np.asarray(sent, np.float64), axis=1) <= 1 + 1e-6)


@pytest.mark.parametrize(
  "make",
  [
    lambda: privacy.clip_per_example(1.0),
    lambda: privacy.cut_layer_dp(1.0, 1.0, key=jax.random.key(0)),
    lambda: privacy.dp_aggregate(1.0, 1.0, key=jax.random.key(0)),
  ],
  ids=["clip_per_example", "cut_layer_dp", "dp_aggregate"],
)
def test_an_empty_batch_is_a_value_error_naming_the_problem(make):
  tx = make()
  for empty in (jnp.zeros((0, 3)), {"a": jnp.zeros((0, 2)), "b": jnp.zeros((0,))}):
    with pytest.raises(privacy.PrivacyError, match="the batch is empty") as e:
      tx.update(empty, tx.init(empty))
    assert isinstance(e.value, ValueError)


def test_the_transforms_are_thin_adapters_of_the_pure_functions():
  """clip_per_example is privacy.clip_rows; add_gaussian_noise is add_noise with the split key."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(
    rng.normal(size=(6, 5)).astype(np.float32) * np.array([[1e-3], [1], [3], [0], [1e30], [7]])
  )
  tx = privacy.clip_per_example(1.5)
  np.testing.assert_array_equal(tx.update(x, tx.init(x))[0], privacy.clip_rows(x, 1.5))
  key = jax.random.key(3)
  noise_tx = privacy.add_gaussian_noise(0.7, 1.5, key=key)
  got, _ = noise_tx.update(x, noise_tx.init(x))
  _, noise_key = jax.random.split(key)
  np.testing.assert_array_equal(got, privacy.add_noise(x, noise_key, 0.7 * 1.5))


def test_add_noise_has_the_requested_stddev_and_is_a_function_of_the_key():
  x = jnp.zeros((4000, 8), jnp.float32)
  a = np.asarray(privacy.add_noise(x, jax.random.key(0), 0.3))
  assert abs(a.std() - 0.3) < 0.3 * 0.02 and abs(a.mean()) < 0.3 * 0.02
  np.testing.assert_array_equal(a, privacy.add_noise(x, jax.random.key(0), 0.3))
  assert not np.array_equal(a, privacy.add_noise(x, jax.random.key(1), 0.3))


def test_dp_aggregate_normalize_by_divides_the_noisy_sum_by_the_given_count():
  rng = np.random.default_rng(1)
  g = rng.normal(size=(8, 3)).astype(np.float32)
  g[5:] = 0.0  # padded rows: zero
  key = jax.random.key(2)
  tx = privacy.dp_aggregate(1.0, 0.5, key=key, normalize_by=5.0)
  got, _ = tx.update(jnp.asarray(g), tx.init(None))
  summed = jnp.sum(privacy.clip_rows(jnp.asarray(g), 1.0), axis=0)
  _, noise_key = jax.random.split(key)
  np.testing.assert_allclose(got, privacy.add_noise(summed, noise_key, 0.5) / 5.0, rtol=1e-6)
  plain = privacy.dp_aggregate(1.0, 0.0, key=key)  # default: the static batch size
  np.testing.assert_allclose(plain.update(jnp.asarray(g), plain.init(None))[0], summed / 8.0)
