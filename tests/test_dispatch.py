"""`attacks.run`: attacks by name on a transcript; FSL parameter versions batched by param_index."""

import math

import jax
import numpy as np
import pytest
import splits

from splitjax import attacks
from splitjax import models
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


def test_unknown_name_raises_listing_the_valid_names(fsl_transcript):
  with pytest.raises(ValueError, match=r"unknown attack 'nope'; valid names: \[") as err:
    attacks.run('nope', fsl_transcript, _public())
  for name in ('exact', 'hybrid', 'optimize', 'exact_activations', 'label_norm'):
    assert repr(name) in str(err.value), name
  assert set(attacks.ATTACKS) == {
    'exact',
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
