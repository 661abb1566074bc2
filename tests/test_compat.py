"""Files an earlier splitjax wrote still restore, or are refused with one line naming the fix."""

import pathlib
import shutil

import numpy as np
import pytest

from experiments import pipeline
from splitjax import attacks
from splitjax import models
from splitjax import results
from splitjax import training

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "train_v0_2"


@pytest.fixture(scope="module")
def restored(tmp_path_factory):
  work = tmp_path_factory.mktemp("compat") / "train_v0_2"
  shutil.copytree(FIXTURE, work)
  return pipeline.Restored(work)  # verifies every artifact against run.json


def test_a_0_2_workdir_restores_and_reproduces_its_figures(restored):
  m = restored.metrics
  assert (m["noise_multiplier"], m["l2_clip_norm"], m["releases"]) == (1.0, 1.0, 1)
  # The restored parameters, through today's model code, give the test figures it recorded.
  ev = training.evaluate(restored.model, restored.state, restored.dataset.test)
  np.testing.assert_allclose(ev["auc"], m["test_auc"], rtol=1e-6)
  np.testing.assert_allclose(ev["log_loss"], m["test_log_loss"], rtol=1e-5)
  t = restored.transcript()
  assert t.num_rows == m["num_train"] * m["releases"]
  assert (t.l2_clip_norm, t.noise_multiplier) == (1.0, 1.0)
  # g = clip(g, 1) + N(0, 1): per coordinate about unit variance around the clipped rows.
  assert 0.8 < float(np.std(t.g)) < 1.2, float(np.std(t.g))


def test_a_0_2_transcript_is_attacked_by_todays_exact(restored):
  t = restored.transcript()
  rows = np.arange(16)
  res = attacks.exact(
    models.device_logit_fn(restored.model),
    t.device_params,
    t.h[rows],
    t.g[rows],
    restored.dataset.priv_cardinalities,
    l2_clip_norm=t.l2_clip_norm,
    noise_multiplier=t.noise_multiplier,
    param_index=t.param_index[rows],
  )
  assert res.features.shape == (16, len(restored.dataset.priv_cardinalities))
  assert np.all(np.isfinite(res.distances)) and np.all(res.num_ties >= 1)


def test_an_edited_artifact_is_refused_with_one_line(tmp_path):
  work = tmp_path / "edited"
  shutil.copytree(FIXTURE, work)
  with open(work / "transcript.npz", "ab") as f:
    f.write(b"x")
  with pytest.raises(results.WorkdirError) as err:
    pipeline.Restored(work).transcript()
  message = str(err.value)
  assert "transcript.npz changed since run.json" in message and "\n" not in message, message
