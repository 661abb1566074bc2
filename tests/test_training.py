"""SL and FSL training: FSL with one local step and SGD equals SL on the union; resume is exact."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
import splits
from flax import serialization as flax_serialization

from splitjax import training

PUB_CARDS, PRIV_CARDS, SPEC, MODEL = splits.PUB_CARDS, splits.PRIV_CARDS, splits.SPEC, splits.MODEL


def _split(n=64, seed=0):
  return splits.split(n, seed)


def _close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_fsl_one_local_step_sgd_equals_sl_on_union():
  recipe = training.Recipe(optimizer="sgd", learning_rate=0.5, batch_size=32, epochs=1)
  split = _split(32)
  state0 = training.init_state(MODEL, recipe, seed=3)
  # FSL round: 4 devices x 8 examples = the whole split.
  partition = np.arange(32, dtype=np.int32).reshape(4, 8)
  ((batch, dmask),) = list(training.fsl_rounds(split, partition, 4, seed=0, epoch=0))
  fsl = functools.partial(training.fsl_round, local_steps=1)
  copy = lambda s: jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, s)
  fsl_state, _, hs, gs, _ = fsl(copy(state0), batch, dmask, training.no_dp())
  sl = training.sl_step
  flat = jax.tree.map(lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), batch)
  sl_state, _, h, g, _ = sl(copy(state0), flat, training.no_dp())
  _close(fsl_state.server_params, sl_state.server_params)
  _close(fsl_state.device_params, sl_state.device_params)
  np.testing.assert_allclose(gs[0].reshape(g.shape), g, rtol=1e-5, atol=1e-7)


def test_fsl_multiple_local_steps_differs_and_records_each_step():
  recipe = training.Recipe(optimizer="sgd", learning_rate=0.5, batch_size=32, epochs=1)
  split = _split(40)
  res = training.fit(
    MODEL,
    split,
    recipe=recipe,
    seed=0,
    protocol_name="fsl",
    samples_per_device=8,
    devices_per_round=2,
    local_steps=3,
  )
  tr = res.transcript
  assert tr.num_rows == 3 * 40  # every example sends one g per local step
  assert sorted(set(tr.local_step.tolist())) == [0, 1, 2]
  assert np.array_equal(np.sort(tr.example_index[tr.local_step == 0]), np.arange(40))
  versions = jax.tree.leaves(tr.device_params)[0].shape[0]
  assert versions == 3  # ceil(5 devices / 2 per round) rounds
  # The loop counts what each example sent: local_steps rows per epoch, every example alike,
  # and the transcript agrees.
  np.testing.assert_array_equal(res.releases, np.full(40, 3))
  np.testing.assert_array_equal(np.bincount(tr.example_index, minlength=40), res.releases)


def test_sl_counts_one_release_per_example_and_epoch_with_a_padded_last_batch():
  recipe = training.Recipe(optimizer="sgd", learning_rate=0.5, batch_size=16, epochs=2)
  res = training.fit(MODEL, _split(40), recipe=recipe, seed=0)  # 16 + 16 + 8
  np.testing.assert_array_equal(res.releases, np.full(40, 2))
  resumed = training.fit(MODEL, _split(40), recipe=recipe, seed=0, state=res.state, start_epoch=1)
  np.testing.assert_array_equal(resumed.releases, np.full(40, 1))  # the epochs of this call


def test_sl_transcript_rows_are_what_the_step_sent():
  recipe = training.Recipe(optimizer="adam", learning_rate=1e-2, batch_size=16, epochs=2)
  split = _split(40)
  res = training.fit(MODEL, split, recipe=recipe, seed=1)
  tr = res.transcript
  assert tr.num_rows == 40 and np.array_equal(np.sort(tr.example_index), np.arange(40))
  # Recompute one row's g from the recorded device parameters: same value.
  i = 5
  ex = tr.example_index[i]
  phi = tr.params_at(tr.param_index[i])
  z_grad = jax.grad(lambda h: MODEL.head_apply(phi, h, split.priv_cat[ex], split.priv_dense[ex]))(
    tr.h[i]
  )
  z = MODEL.head_apply(phi, tr.h[i], split.priv_cat[ex], split.priv_dense[ex])
  np.testing.assert_allclose(
    tr.g[i], (jax.nn.sigmoid(z) - split.y[ex]) * z_grad, rtol=1e-4, atol=1e-6
  )


def test_resume_equals_uninterrupted():
  recipe = training.Recipe(optimizer="adam", learning_rate=1e-2, batch_size=16, epochs=3)
  split = _split(48)
  dp = training.DPConfig(np.float32(0.05), np.float32(0.5))
  full = training.fit(MODEL, split, recipe=recipe, seed=2, dp=dp)
  saved = {}

  def stop_after_first(epoch, state, log):
    if epoch == 0:
      saved["state"] = jax.tree.map(
        lambda x: x if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.array(x), state
      )

  part = training.fit(
    MODEL,
    split,
    recipe=dataclasses.replace(recipe, epochs=1),
    seed=2,
    dp=dp,
    on_epoch_end=stop_after_first,
  )
  del part
  state = saved["state"].replace(key=full.state.key)  # the key is fixed for the run
  resumed = training.fit(MODEL, split, recipe=recipe, seed=2, dp=dp, state=state, start_epoch=1)
  _close(resumed.state.server_params, full.state.server_params, rtol=0, atol=0)
  _close(resumed.state.device_params, full.state.device_params, rtol=0, atol=0)
  np.testing.assert_array_equal(resumed.transcript.g, full.transcript.g)


def test_dp_in_training_clips_what_is_sent():
  recipe = training.Recipe(optimizer="adam", learning_rate=1e-2, batch_size=16, epochs=1)
  split = _split(32)
  clip = 0.01
  res = training.fit(
    MODEL,
    split,
    recipe=recipe,
    seed=0,
    dp=training.DPConfig(np.float32(clip), np.float32(0.0)),
  )
  norms = np.linalg.norm(res.transcript.g, axis=1)
  assert norms.max() <= clip * (1 + 1e-5)
  assert res.transcript.l2_clip_norm == pytest.approx(clip)


def test_frozen_server_keeps_server_params():
  recipe = training.Recipe(optimizer="adam", learning_rate=1e-2, batch_size=16, epochs=1)
  split = _split(32)
  init = training.init_state(MODEL, recipe, seed=0, freeze_server=True)
  res = training.fit(MODEL, split, recipe=recipe, seed=0, freeze_server=True)
  _close(res.state.server_params, init.server_params, rtol=0, atol=0)


def test_device_dp_sgd_limit_equals_plain_and_noise_changes_it():
  recipe = training.Recipe(optimizer="sgd", learning_rate=0.5, batch_size=16, epochs=1)
  split = _split(40)
  plain = training.fit(MODEL, split, recipe=recipe, seed=0)
  big_clip = training.DPConfig(np.inf, 0.0, 1e6, 0.0)
  same = training.fit(MODEL, split, recipe=recipe, seed=0, dp=big_clip)
  _close(same.state.device_params, plain.state.device_params, rtol=1e-4, atol=1e-6)
  _close(same.state.server_params, plain.state.server_params, rtol=1e-4, atol=1e-6)
  noisy = training.fit(
    MODEL, split, recipe=recipe, seed=0, dp=training.DPConfig(np.inf, 0.0, 0.1, 1.0)
  )
  diff = max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for a, b in zip(
      jax.tree.leaves(noisy.state.device_params),
      jax.tree.leaves(plain.state.device_params),
      strict=True,
    )
  )
  assert diff > 1e-3


def test_device_dp_sgd_update_is_clipped_per_example():
  """With sigma_d = 0 each example moves the device parameters by at most lr * C_d / n."""
  recipe = training.Recipe(optimizer="sgd", learning_rate=1.0, batch_size=8, epochs=1)
  split = _split(8)
  state0 = training.init_state(MODEL, recipe, seed=0)
  clip = 1e-3
  res = training.fit(
    MODEL, split, recipe=recipe, seed=0, dp=training.DPConfig(np.inf, 0.0, clip, 0.0)
  )
  delta = np.sqrt(
    sum(
      float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
      for a, b in zip(
        jax.tree.leaves(res.state.device_params), jax.tree.leaves(state0.device_params), strict=True
      )
    )
  )
  assert delta <= clip * (1 + 1e-4)  # the mean of 8 rows each clipped to C_d


def test_a_loop_that_sends_more_than_the_accountant_assumed_is_refused(tmp_path, monkeypatch):
  """Sabotage: the accountant's k is one release short of what training sends."""
  from experiments import pipeline
  from experiments.configs import base as configs_base

  config = configs_base.TrainConfig(
    dataset="synthetic", synthetic_examples=200, epochs=1, hidden=(8,), batch_size=64
  )
  planned = pipeline.releases_of
  monkeypatch.setattr(pipeline, "releases_of", lambda c: planned(c) - 1)
  with pytest.raises(RuntimeError, match="accountant assumed 0 over 1 epochs"):
    pipeline.train_workdir(config, tmp_path / "w")
  assert not (tmp_path / "w" / "metrics.json").exists()


def test_state_static_fields_are_hashed_by_value_and_steps_compile_once():
  recipe = training.Recipe(optimizer="sgd", learning_rate=0.5, batch_size=16, epochs=1)
  a = training.init_state(MODEL, recipe, seed=0)
  b = training.init_state(MODEL, dataclasses.replace(recipe), seed=1)  # equal, not identical
  assert jax.tree.structure(a) == jax.tree.structure(b)
  other = training.init_state(MODEL, dataclasses.replace(recipe, learning_rate=0.1), seed=0)
  assert jax.tree.structure(other) != jax.tree.structure(a)
  # The checkpointed leaves are the arrays only, under the names of the 0.2 NamedTuple state.
  assert list(flax_serialization.to_state_dict(a)) == [
    "server_params",
    "device_params",
    "server_opt",
    "device_opt",
    "step",
    "key",
  ]
  split = _split(32)
  training.fit(MODEL, split, recipe=recipe, seed=0)
  size = training.sl_step._cache_size()  # pylint: disable=protected-access
  training.fit(MODEL, split, recipe=dataclasses.replace(recipe), seed=1)
  assert training.sl_step._cache_size() == size  # pylint: disable=protected-access


def test_auto_clip_reads_nothing_private():
  """C of --dp_clip=auto is half the mean no-DP ||g|| on the public view of the rows: changing
  the private values and the labels of the training data leaves it unchanged."""
  split = _split(48)
  recipe = training.Recipe(optimizer="sgd", learning_rate=0.5, batch_size=16, epochs=1)
  state = training.init_state(MODEL, recipe, seed=0)

  class Data:  # the two fields auto_clip_norm reads of a TabularData
    priv_cardinalities = PRIV_CARDS

    def __init__(self, train):
      self.train = train

  clip, mean_norm = training.auto_clip_norm(MODEL, state, Data(split), seed=3)
  assert clip == pytest.approx(0.5 * mean_norm) and mean_norm > 0
  public = training.public_clip_split(Data(split), 3)
  assert mean_norm == pytest.approx(training.mean_cut_grad_norm(MODEL, state, public))
  flipped = dataclasses.replace(split, y=1 - split.y, priv_cat=(split.priv_cat + 1) % 2)
  assert training.auto_clip_norm(MODEL, state, Data(flipped), seed=3) == (clip, mean_norm)
  # The true rows give another norm (so the test would notice a clip read from them).
  assert training.mean_cut_grad_norm(MODEL, state, split) != pytest.approx(mean_norm)
