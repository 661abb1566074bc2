"""`attacks.run`: attacks by name on a transcript; FSL parameter versions batched by param_index."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import splits

from splitjax import attacks
from splitjax import models
from splitjax import protocol
from splitjax import training

PUB_CARDS, PRIV_CARDS, SPEC, MODEL = splits.PUB_CARDS, splits.PRIV_CARDS, splits.SPEC, splits.MODEL
CLIP, SIGMA = 0.05, 0.5


def _split(n=48, seed=0):
  return splits.split(n, seed)


@pytest.fixture(scope='module')
def fsl_transcript():
  """The last epoch of a tiny FSL run: several rounds, so several device parameter versions."""
  recipe = training.Recipe(optimizer='sgd', learning_rate=0.5, batch_size=16, epochs=1)
  res = training.fit(
    MODEL,
    _split(),
    recipe=recipe,
    seed=0,
    protocol_name='fsl',
    dp=training.DPConfig(np.float32(CLIP), np.float32(SIGMA)),
    samples_per_device=4,
    devices_per_round=3,
    local_steps=2,
  )
  tr = res.transcript
  assert len(np.unique(tr.param_index)) >= 3, np.unique(tr.param_index)
  return tr


def _assert_same(got, want, *, float_rtol=0.0):
  """Two attack results equal field by field (None on both sides): integer fields (answers,
  ties) exactly, float fields (distances, gaps, posteriors) within `float_rtol`, relative and
  absolute (a gap is a difference of larger scores)."""
  for field in want._fields:
    a, b = getattr(got, field), getattr(want, field)
    assert (a is None) == (b is None), field
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb), field
    for x, y in zip(la, lb, strict=True):
      x, y = np.asarray(x), np.asarray(y)
      if np.issubdtype(x.dtype, np.floating) and float_rtol:
        np.testing.assert_allclose(x, y, rtol=float_rtol, atol=float_rtol, err_msg=field)
      else:
        np.testing.assert_array_equal(x, y, err_msg=field)


def _public(**kw):
  return attacks.Public(model=MODEL, cardinalities=PRIV_CARDS, **kw)


def test_joint_refuses_a_noised_release_and_a_missing_batch_size(fsl_transcript):
  with pytest.raises(ValueError, match='noise-free'):
    attacks.run('joint', fsl_transcript, _public(noise_multiplier=1.0, l2_clip_norm=1.0))
  with pytest.raises(ValueError, match='batch_size='):
    attacks.run('joint', fsl_transcript, _public())


def test_unknown_name_raises_listing_the_valid_names(fsl_transcript):
  with pytest.raises(ValueError, match=r"unknown attack 'nope'; valid names: \[") as err:
    attacks.run('nope', fsl_transcript, _public())
  for name in ('exact', 'hybrid', 'optimize', 'exact_activations', 'label_norm'):
    assert repr(name) in str(err.value), name
  assert set(attacks.ATTACKS) == {
    'exact',
    'joint',
    'exact_releases',
    'fsl_tracking',
    'hybrid',
    'optimize',
    'exact_activations',
    'label_norm',
    'label_direction',
  }
  with pytest.raises(ValueError, match='unknown variant'):
    attacks.run('exact', fsl_transcript, _public(), variant='auto')


def test_run_exact_equals_calling_exact(fsl_transcript):
  tr = fsl_transcript.take(np.flatnonzero(fsl_transcript.param_index == 0))
  got = attacks.run('exact', tr, _public(l2_clip_norm=CLIP), top_k=2)
  want = attacks.exact(
    models.device_logit_fn(MODEL),
    tr.params_at(0),
    tr.h,
    tr.g,
    PRIV_CARDS,
    l2_clip_norm=CLIP,
    top_k=2,
  )
  _assert_same(got, want)


def _per_version(tr, public, **options):
  """One `run` per parameter version (what experiments did before), rows put back in order."""
  parts, order = [], []
  for version in np.unique(tr.param_index):
    rows = np.flatnonzero(tr.param_index == version)
    parts.append(attacks.run('exact', tr.take(rows), public.take(rows), **options))
    order.append(rows)
  inverse = np.argsort(np.concatenate(order))
  return jax.tree.map(lambda *xs: np.concatenate(xs)[inverse], *parts)


@pytest.mark.parametrize(
  'variant, per_user_prior', [('clip_aware', False), ('paper', False), ('bayes', True)]
)
def test_fsl_versions_batched_through_param_index_equal_one_call_per_round(
  fsl_transcript, variant, per_user_prior
):
  tr = fsl_transcript
  cands = int(np.prod(PRIV_CARDS))
  prior = None
  if per_user_prior:
    rng = np.random.default_rng(1)
    prior = np.log(rng.dirichlet(np.ones(cands * 2), size=tr.num_rows)).reshape(-1, cands, 2)
  public = _public(l2_clip_norm=CLIP, noise_multiplier=SIGMA, user_log_prior=prior)
  batched = attacks.run('exact', tr, public, variant=variant)
  per_round = _per_version(tr, public, variant=variant)
  # The answers are identical; the float scores agree to rounding (not bit for bit: EXACT's
  # float32 sums are not invariant to how many users share a jitted call, batched or not).
  _assert_same(batched, per_round, float_rtol=1e-5)
  assert len(np.unique(batched.labels)) == 2 and (batched.num_ties >= 1).all()


def test_attacks_of_one_version_refuse_several(fsl_transcript):
  with pytest.raises(ValueError, match='one parameter version per call'):
    attacks.run('hybrid', fsl_transcript, _public(), key=jax.random.key(0))


def test_label_attacks_read_g_only(fsl_transcript):
  got = attacks.run('label_norm', fsl_transcript, _public(positive_fraction=0.3))
  want = attacks.label_norm(fsl_transcript.g, positive_fraction=0.3)
  np.testing.assert_array_equal(got.labels, want.labels)
  assert math.isfinite(float(np.sum(got.scores)))


def test_label_probability_batches_versions_like_one_call_per_version(fsl_transcript):
  """The informed prior's P(y = 1 | h, x): every version at once equals a call per version."""
  tr = fsl_transcript
  apply = models.device_logit_fn(MODEL)
  batched = attacks.candidate_label_probability(
    apply, tr.device_params, tr.h, PRIV_CARDS, param_index=tr.param_index, block=16
  )
  assert batched.shape == (tr.num_rows, int(np.prod(PRIV_CARDS)))
  for version in np.unique(tr.param_index):
    rows = np.flatnonzero(tr.param_index == version)
    one = attacks.candidate_label_probability(
      apply, tr.params_at(int(version)), tr.h[rows], PRIV_CARDS, block=16
    )
    np.testing.assert_allclose(batched[rows], one, rtol=1e-5, atol=1e-6)
  # The versions differ, so a wrong index would show: the first round's parameters on every row
  # give other probabilities on the rows of later rounds.
  first = attacks.candidate_label_probability(
    apply, tr.params_at(int(tr.param_index.min())), tr.h, PRIV_CARDS, block=16
  )
  assert np.abs(first - batched).max() > 1e-3


# --- every release of a user combined (attacks.exact_releases) ---


def _replays(model_state, split, k, sigma, clip):
  """k replays of `split` through one fixed model: k releases of every example (real keys)."""
  return protocol.concatenate(
    [
      training.replay_transcript(
        MODEL, model_state, split, dp=training.DPConfig(clip, sigma), seed=100 + r
      )
      for r in range(k)
    ]
  )


@pytest.fixture(scope='module')
def fixed_model():
  recipe = training.Recipe(optimizer='sgd', learning_rate=0.5, batch_size=32, epochs=2)
  return training.fit(MODEL, _split(256), recipe=recipe, seed=0, record='none').state


def _label_distance(state, split, clip):
  """d_u = ||clip(g(x_u, 1)) - clip(g(x_u, 0))|| at each user's true x (the label's two
  hypotheses), computed with jax.grad directly."""
  h = np.asarray(training.predict_h(MODEL, state.server_params, split.pub_cat, split.pub_dense))
  apply = models.device_logit_fn(MODEL)

  def one(h_i, x_i):
    z, v = jax.value_and_grad(apply, argnums=1)(state.device_params, h_i, x_i)
    grads = [(jax.nn.sigmoid(z) - y) * v for y in (0.0, 1.0)]
    clipped = [gr * jnp.minimum(1.0, clip / jnp.linalg.norm(gr)) for gr in grads]
    return jnp.linalg.norm(clipped[1] - clipped[0])

  return np.asarray(jax.jit(jax.vmap(one))(h, split.priv_cat))


@pytest.mark.parametrize('k', [1, 4])
def test_k_releases_reach_the_gaussian_accuracy_phi_sqrt_k_d_over_2_sigma_c(fixed_model, k):
  """With x known (a per-user prior on the true tuple) and one fixed model, the label's two
  hypotheses are at distance d_u and k releases average the noise: the accuracy is
  mean_u Phi(sqrt(k) d_u / (2 sigma C)). Checked two-sided at 4 standard errors."""
  from scipy import stats

  split, clip, sigma = _split(3000, seed=5), 0.05, 2.0
  tr = _replays(fixed_model, split, k, sigma, clip)
  cand = attacks.candidate_table(PRIV_CARDS)
  known = (cand[None, :, :] == split.priv_cat[:, None, :]).all(-1)  # [U, C]
  prior = np.where(known[:, :, None], 0.0, -np.inf) * np.ones((1, 1, 2))
  res = attacks.run(
    'exact_releases',
    tr,
    attacks.Public(
      model=MODEL,
      cardinalities=PRIV_CARDS,
      l2_clip_norm=clip,
      noise_multiplier=sigma,
      user_log_prior=prior,
    ),
    variant='bayes',
  )
  np.testing.assert_array_equal(res.users, np.arange(len(split)))
  np.testing.assert_array_equal(res.releases, np.full(len(split), k))
  correct = res.result.labels == split.y
  p = stats.norm.cdf(np.sqrt(k) * _label_distance(fixed_model, split, clip) / (2 * sigma * clip))
  se = np.sqrt(np.sum(p * (1 - p))) / len(p)
  assert abs(correct.mean() - p.mean()) < 4 * se, (correct.mean(), p.mean(), se)
  assert 0.55 < p.mean() < 0.95  # a regime where k matters (neither chance nor certainty)


def test_one_release_each_equals_exact(fixed_model):
  """exact_releases on one release per user answers as exact does (Bayes and noise-free)."""
  split = _split(200, seed=6)
  apply = models.device_logit_fn(MODEL)
  for sigma in (0.0, 0.8):
    tr = _replays(fixed_model, split, 1, sigma, 0.05)
    noise = {'noise_multiplier': sigma} if sigma else {}
    want = attacks.exact(apply, tr.params_at(0), tr.h, tr.g, PRIV_CARDS, l2_clip_norm=0.05, **noise)
    got = attacks.exact_releases(
      apply,
      tr.params_at(0),
      tr.h,
      tr.g,
      PRIV_CARDS,
      user_index=tr.example_index,
      l2_clip_norm=0.05,
      **noise,
    ).result
    np.testing.assert_array_equal(got.features, want.features)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.map_features, want.map_features)
    if sigma:
      np.testing.assert_allclose(got.label_posterior, want.label_posterior, rtol=1e-4, atol=1e-5)


def test_every_release_recorded_and_scored_under_its_own_parameters():
  """fit(record='all') hands every epoch to on_transcript; noise-free, each release matched
  under its own parameter version reproduces the truth (distance ~0, every secret right), while
  one version for every row does not."""
  recipe = training.Recipe(optimizer='sgd', learning_rate=0.5, batch_size=16, epochs=3)
  split, chunks = _split(), []
  res = training.fit(
    MODEL,
    split,
    recipe=recipe,
    seed=0,
    record='all',
    on_transcript=lambda e, t: chunks.append((e, t)),
  )
  assert [e for e, _ in chunks] == [0, 1, 2]
  np.testing.assert_array_equal(res.transcript.g, chunks[-1][1].g)  # the last epoch's, as before
  tr = protocol.concatenate([t for _, t in chunks])
  apply = models.device_logit_fn(MODEL)
  kw = dict(user_index=tr.example_index)
  right = attacks.exact_releases(
    apply, tr.device_params, tr.h, tr.g, PRIV_CARDS, param_index=tr.param_index, **kw
  )
  wrong = attacks.exact_releases(
    apply, tr.device_params, tr.h, tr.g, PRIV_CARDS, param_index=np.zeros_like(tr.param_index), **kw
  )
  np.testing.assert_array_equal(right.releases, np.full(len(split), 3))  # one per epoch
  assert (right.result.features == split.priv_cat).all()
  assert (right.result.labels == split.y).all()
  scale = np.linalg.norm(tr.g, axis=1).mean()
  assert right.result.distances.max() < 1e-3 * scale
  assert wrong.result.distances.mean() > 10 * right.result.distances.mean() + 1e-3 * scale
