"""Tests of relaxed gradient matching (`optimize`) and the hybrid (EXACT + dense optimisation)."""

import functools
import os
import textwrap

import forced_devices
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import splitjax.attacks
from splitjax import models
from splitjax import protocol

# The modules (the package re-exports functions under the names `exact` and `optimize`).
optimize_lib = splitjax.attacks  # optimize, hybrid, OBJECTIVES, clip_rows

CARDS = (2, 3)
NUM_USERS = 64
HIDDEN = (32, 16)
# One compiled `optimize` shared by the tests that run it with the default options.
OPT_STEPS = 100
OPT_RESTARTS = 16
# Any optax chain drives the relaxed variables (here: clipped Adam with a cosine schedule).
OPT_CHAIN = optax.chain(
  optax.clip_by_global_norm(10.0), optax.adam(optax.cosine_decay_schedule(0.05, OPT_STEPS))
)


def _spec(num_priv_dense, head='deepfm'):
  return models.ModelSpec(
    pub_cardinalities=(3, 4),
    num_pub_dense=2,
    priv_cardinalities=CARDS,
    num_priv_dense=num_priv_dense,
    hidden=HIDDEN,
    head=head,
  )


@functools.cache
def _base_params(seed):
  """Server and device parameters of the largest model (Flax init is slow: done once)."""
  model = models.make_model(_spec(1))
  return model.encoder_init(jax.random.key(seed)), model.head_init(jax.random.key(seed + 1))


def _device_params(model, seed):
  """The device parameters of `model`, cut from `_base_params` (same names, fewer of them)."""
  _, phi = _base_params(seed)
  spec = model.spec
  drop = set()
  if not spec.num_priv_dense:
    drop |= {'dnn0_w_dense', 'emb_dense', 'lin_dense'}
  if spec.head == 'mlp':
    drop |= {k for k in phi if k.startswith('lin')} | {'emb_dense'}
  return {k: v for k, v in phi.items() if k not in drop}


def _observe(model, seed=0, num_users=NUM_USERS):
  """Random (untrained) split model, random users; the per-example gradients the device sends."""
  theta = _base_params(seed)[0]
  phi = _device_params(model, seed)
  rng = np.random.default_rng(seed)
  pub_cat = rng.integers(0, [3, 4], size=(num_users, 2)).astype(np.int32)
  pub_dense = rng.normal(size=(num_users, 2)).astype(np.float32)
  x = rng.integers(0, CARDS, size=(num_users, len(CARDS))).astype(np.int32)
  dense = rng.uniform(size=(num_users, model.spec.num_priv_dense)).astype(np.float32)
  y = rng.integers(0, 2, num_users).astype(np.int32)
  h = jax.jit(model.encode_batch)(theta, pub_cat, pub_dense)
  g = jax.jit(functools.partial(protocol.top_step, model))(
    phi, h, x, dense, y, jnp.ones(num_users)
  ).cut_grads
  return dict(phi=phi, h=np.asarray(h), g=np.asarray(g), x=x, dense=dense, y=y)


@pytest.fixture(scope='module')
def dense_model():
  model = models.make_model(_spec(1))
  return model, _observe(model)


@pytest.fixture(scope='module')
def optimized(dense_model):
  model, obs = dense_model
  res = splitjax.attacks.optimize(
    models.soft_device_apply(model),
    obs['phi'],
    obs['h'],
    obs['g'],
    CARDS,
    1,
    optimizer=OPT_CHAIN,
    num_steps=OPT_STEPS,
    num_restarts=OPT_RESTARTS,
    key=jax.random.key(0),
  )
  return res


@pytest.mark.parametrize('head', ['deepfm', 'mlp'])
def test_soft_head_equals_head_on_one_hot(head):
  model = models.make_model(_spec(1, head))
  obs = _observe(model, num_users=8)
  relaxed = models.soft_device_apply(model)  # models.Head's soft form, one implementation
  assert models.soft_device_apply(model) is relaxed  # cached: compilations are reused

  def one(h, x, d):
    probs = tuple(jax.nn.one_hot(x[j], k) for j, k in enumerate(CARDS))
    return relaxed(obs['phi'], h, probs, d)

  got = jax.jit(jax.vmap(one))(obs['h'], obs['x'], obs['dense'])
  want = jax.jit(model.head_batch)(obs['phi'], obs['h'], obs['x'], obs['dense'])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_optimize_recovers_the_continuous_feature_without_dp(optimized, dense_model):
  _, obs = dense_model
  err = np.abs(optimized.dense[:, 0] - obs['dense'][:, 0])
  assert np.mean(err <= 0.01) >= 0.95, np.sort(err)[-5:]  # within 1 % of the range [0, 1]
  assert np.mean(optimized.features == obs['x']) >= 0.95
  assert np.mean(optimized.labels == obs['y']) >= 0.95
  assert optimized.dense.min() >= 0.0 and optimized.dense.max() <= 1.0  # stays in the box


def test_restarts_are_independent_and_the_best_is_kept(optimized):
  r = optimized
  num_users, num_restarts = r.restart_distances.shape
  assert num_restarts == OPT_RESTARTS and num_users == NUM_USERS
  # Different keys: restarts end in different places (relaxed losses differ within a user).
  spread = np.ptp(r.restart_relaxed, axis=1)
  assert np.mean(spread > 1e-6) > 0.9
  # The kept restart is the one whose rounded answer matches best, and the answer is its answer.
  np.testing.assert_array_equal(r.best_restart, np.argmin(r.restart_distances, axis=1))
  rows = np.arange(num_users)
  np.testing.assert_array_equal(r.features, r.restart_features[rows, r.best_restart])
  np.testing.assert_array_equal(r.dense, r.restart_dense[rows, r.best_restart])
  np.testing.assert_array_equal(r.distances, r.restart_distances[rows, r.best_restart])
  assert np.all(r.distances <= r.restart_distances.min(axis=1))


def test_restarts_depend_on_the_key_only(optimized, dense_model):
  model, obs = dense_model
  # The fixture's options: its compilation is reused.
  kwargs = dict(optimizer=OPT_CHAIN, num_steps=OPT_STEPS, num_restarts=OPT_RESTARTS)
  relaxed = models.soft_device_apply(model)
  other = splitjax.attacks.optimize(
    relaxed, obs['phi'], obs['h'], obs['g'], CARDS, 1, key=jax.random.key(1), **kwargs
  )
  assert not np.allclose(other.restart_relaxed, optimized.restart_relaxed)  # other restarts
  again = splitjax.attacks.optimize(
    relaxed, obs['phi'], obs['h'], obs['g'], CARDS, 1, key=jax.random.key(0), **kwargs
  )
  np.testing.assert_array_equal(again.restart_relaxed, optimized.restart_relaxed)  # pure


def test_objectives_are_registered_by_name():
  a = jnp.array([[3.0, 4.0], [1.0, 0.0]])
  b = jnp.array([[3.0, 4.0], [0.0, 2.0]])
  np.testing.assert_allclose(optimize_lib.OBJECTIVES['l2'](a, b), [0.0, 5.0])  # squared
  np.testing.assert_allclose(optimize_lib.OBJECTIVES['cosine'](a, b), [0.0, 1.0], atol=1e-6)
  assert optimize_lib.OBJECTIVES['cosine'](a, jnp.zeros_like(a)).tolist() == [1.0, 1.0]
  assert set(optimize_lib.OBJECTIVES) == set(splitjax.attacks.DISTANCES)


def test_hybrid_equals_exact_without_dense():
  model = models.make_model(_spec(0))
  obs = _observe(model)
  apply = model.head_apply
  for clip in (None, 0.05):  # clip-aware with a clip that binds for most users
    g = obs['g'] if clip is None else np.asarray(optimize_lib.clip_rows(obs['g'], clip))
    hyb = splitjax.attacks.hybrid(apply, obs['phi'], obs['h'], g, CARDS, 0, l2_clip_norm=clip)
    ex = splitjax.attacks.exact(
      models.device_logit_fn(model), obs['phi'], obs['h'], g, CARDS, l2_clip_norm=clip
    )
    np.testing.assert_array_equal(hyb.features, ex.features)
    np.testing.assert_array_equal(hyb.labels, ex.labels)
    np.testing.assert_allclose(hyb.distances, ex.distances, rtol=1e-4, atol=1e-6)
    assert np.mean(hyb.features == obs['x']) == 1.0


def _known_dense_apply(params, h_ext, x):
  """EXACT told the dense value: read from the last column of h, not differentiated."""
  return model_for_oracle.head_apply(params, h_ext[:-1], x, jax.lax.stop_gradient(h_ext[-1:]))


model_for_oracle = models.make_model(_spec(1))


def test_hybrid_equals_exact_on_categorical_with_dense(dense_model):
  model, obs = dense_model
  hyb = splitjax.attacks.hybrid(
    model.head_apply,
    obs['phi'],
    obs['h'],
    obs['g'],
    CARDS,
    1,
    num_steps=50,
    num_restarts=64,
    num_refine=4,
    key=jax.random.key(0),
  )
  h_ext = np.concatenate([obs['h'], obs['dense']], axis=1)
  g_ext = np.concatenate([obs['g'], np.zeros_like(obs['dense'])], axis=1)
  oracle = splitjax.attacks.exact(_known_dense_apply, obs['phi'], h_ext, g_ext, CARDS)
  np.testing.assert_array_equal(hyb.features, oracle.features)
  np.testing.assert_array_equal(hyb.labels, oracle.labels)
  err = np.abs(hyb.dense[:, 0] - obs['dense'][:, 0])
  assert np.mean(err <= 0.01) >= 0.95


def test_hybrid_bayes_posteriors_are_distributions():
  model = models.make_model(_spec(0))
  obs = _observe(model, num_users=8)
  noise = 0.01
  g = obs['g'] + noise * np.random.default_rng(3).normal(size=obs['g'].shape)
  r = splitjax.attacks.hybrid(
    model.head_apply,
    obs['phi'],
    obs['h'],
    g.astype(np.float32),
    CARDS,
    0,
    noise_stddev=noise,
    log_prior=np.zeros(12),
  )
  for post, k in zip(r.feature_posteriors + (r.label_posterior,), CARDS + (2,), strict=True):
    assert post.shape == (8, k)
    np.testing.assert_allclose(post.sum(-1), 1.0, rtol=1e-4)
  np.testing.assert_array_equal(
    r.features, np.stack([p.argmax(-1) for p in r.feature_posteriors], -1)
  )


def test_clip_rows_is_the_device_clip_and_has_finite_gradients():
  x = jnp.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
  np.testing.assert_allclose(
    optimize_lib.clip_rows(x, 1.0), [[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]], rtol=1e-6
  )
  np.testing.assert_allclose(optimize_lib.clip_rows(x, jnp.inf), x)
  for c in (1.0, jnp.inf):
    grad = jax.grad(lambda z, c=c: jnp.sum(optimize_lib.clip_rows(z, c) ** 2))(x)
    assert np.all(np.isfinite(grad))


def test_bad_inputs_raise(dense_model):
  model, obs = dense_model
  relaxed = models.soft_device_apply(model)
  with pytest.raises(splitjax.attacks.AttackError, match='distance'):
    splitjax.attacks.optimize(relaxed, obs['phi'], obs['h'], obs['g'], CARDS, 1, distance='l3')
  with pytest.raises(splitjax.attacks.AttackError, match='same shape'):
    splitjax.attacks.optimize(relaxed, obs['phi'], obs['h'], obs['g'][:, :3], CARDS, 1)
  with pytest.raises(splitjax.attacks.AttackError, match='num_restarts'):
    splitjax.attacks.optimize(relaxed, obs['phi'], obs['h'], obs['g'], CARDS, 1, num_restarts=0)
  with pytest.raises(splitjax.attacks.AttackError, match='dense_bounds'):
    splitjax.attacks.hybrid(
      model.head_apply, obs['phi'], obs['h'], obs['g'], CARDS, 1, dense_bounds=(1.0, 0.0)
    )
  with pytest.raises(splitjax.attacks.AttackError, match='log_prior'):
    splitjax.attacks.hybrid(
      model.head_apply, obs['phi'], obs['h'], obs['g'], CARDS, 1, log_prior=np.zeros(12)
    )
  bad = obs['g'].copy()
  bad[3, 1] = np.nan
  with pytest.raises(splitjax.attacks.AttackError, match='NaN'):
    splitjax.attacks.hybrid(model.head_apply, obs['phi'], obs['h'], bad, CARDS, 1)
  with pytest.raises(ValueError, match='device_top'):
    models.soft_device_apply(
      models.make_model(
        models.ModelSpec(
          pub_cardinalities=(3,), num_pub_dense=1, priv_cardinalities=(2,), topology='device_bottom'
        )
      )
    )
  custom = dict(
    server_init=lambda k: {},
    server_apply=lambda p, c, d: d,
    device_init=lambda k: {},
    device_apply=lambda p, h, c, d: jnp.sum(h),
    priv_cardinalities=(2,),
  )
  with pytest.raises(ValueError, match='device_soft_apply'):
    models.soft_device_apply(models.SplitModel.from_apply_fns(**custom))
  soft = lambda p, h, probs, d: jnp.sum(h) + probs[0][1]
  given = models.SplitModel.from_apply_fns(**custom, device_soft_apply=soft)
  assert models.soft_device_apply(given) is soft
  with pytest.raises(ValueError, match='probability vectors'):
    model.head_soft_apply(obs['phi'], obs['h'][0], (jnp.ones(2),), obs['dense'][0])


_MULTI_DEVICE_SCRIPT = textwrap.dedent('''
    import importlib, importlib.util, sys
    import jax, numpy as np
    assert jax.device_count() == 4, jax.devices()
    spec = importlib.util.spec_from_file_location('test_optimize', sys.argv[1])
    t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)
    import splitjax.attacks as opt
    from splitjax.attacks import runner
    model = t.models.make_model(t._spec(1))
    obs = t._observe(model, num_users=9)  # not a multiple of the device count: padded
    # hybrid only: optimize goes through the same user sharding (runner.run_users), and its
    # multi-device result is checked across jax.distributed processes in test_distributed.
    runs = {
        'hybrid': lambda devices: opt.hybrid(
            model.head_apply, obs['phi'], obs['h'], obs['g'], t.CARDS, 1, num_steps=20,
            num_restarts=4, num_refine=4, refine_starts=4, key=jax.random.key(3),
            users_per_batch=2, devices=devices),
    }
    for name, run in runs.items():
      before = runner._call._cache_size()
      one, four = run(jax.devices()[:1]), run(None)
      assert runner._call._cache_size() == before + 2  # one 1-device and one 4-device program
      for field, a, b in zip(one._fields, one, four):
        if a is None:
          assert b is None, field
          continue
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
          if x.dtype.kind == 'f':
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=name + '.' + field)
          else:
            np.testing.assert_array_equal(x, y, err_msg=name + '.' + field)
      # Sharding changes nothing about who is recovered: the answers are the truth for most users.
      assert np.mean((four.features == obs['x']).all(1)) > 0.5, (name, four.features, obs['x'])
      print('OK', name, jax.device_count())
''')


def test_hybrid_sharded_over_four_devices_equals_single_device():
  proc = forced_devices.run(_MULTI_DEVICE_SCRIPT, os.path.abspath(__file__))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'OK hybrid 4' in proc.stdout, proc.stdout
