"""Numerics and reproducibility: stable cut gradients, float32 by default, the float64 switch,
near-ties, same seed -> same bits, and killed runs that resume to the uninterrupted result.

Kill tests use the test-only hook ``SPLITJAX_TEST_KILL_AFTER=N`` (``common.KillSwitch``): the
binary exits with status 75 right after its N-th checkpoint (an epoch of training, a block of
attacked users), like a kill: no cleanup, no final writes. The killed part runs as a subprocess,
the resumed part in-process, so every equality below also holds across processes.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import flagsaver

from experiments import attack as attack_bin
from experiments import common
from experiments import records
from experiments import sweep as sweep_bin
from experiments import train as train_bin
from splitjax import attacks
from splitjax import data as sj_data
from splitjax import models
from splitjax import protocol

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "synthetic_tiny"
KILLED = 75


def _run(args, env_extra=None) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env.pop(common.KILL_ENV, None)
  env.update(env_extra or {})
  return subprocess.run(
    [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )


def _timing_free(record: dict) -> dict:
  """A results dict without wall-clock keys (``*seconds*``, throughput) and the environment."""
  return {
    k: v
    for k, v in records.without_environment(record).items()
    if "seconds" not in k and k != "candidates_per_second"
  }


def _history(workdir: pathlib.Path) -> list[dict]:
  """history.jsonl without the epochs' wall-clock seconds."""
  lines = (workdir / "history.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(s).items() if "seconds" not in k} for s in lines]


def _assert_same_training(got: pathlib.Path, want: pathlib.Path):
  """metrics.json (but timings) equal, transcript arrays and their device parameters bit for bit."""
  m_got = json.loads((got / "metrics.json").read_text())
  m_want = json.loads((want / "metrics.json").read_text())
  assert m_got["test_auc"] == m_want["test_auc"]
  assert m_got["test_log_loss"] == m_want["test_log_loss"]
  assert _timing_free(m_got) == _timing_free(m_want)
  assert m_got["environment"]["jax"] == m_want["environment"]["jax"]
  # history.jsonl is rewritten from the checkpointed history: a resumed run's equals this one's.
  assert _history(got) == _history(want) and len(_history(want)) == m_want["epochs"]
  with np.load(got / "transcript.npz") as a, np.load(want / "transcript.npz") as b:
    assert sorted(a.files) == sorted(b.files)
    for key in b.files:
      assert a[key].dtype == b[key].dtype, key
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert (got / "transcript_params.msgpack").read_bytes() == (
    want / "transcript_params.msgpack"
  ).read_bytes()


# --------------------------------------------------------------------------------------------------
# Stable BCE: no NaN/inf in the cut gradients at extreme logits.

_SPEC = dict(pub_cardinalities=(3, 4), num_pub_dense=1, priv_cardinalities=(2, 3), hidden=(8, 4))


def _with_output_bias(phi, value):
  phi = jax.tree.map(lambda x: x, phi)  # a copy of the nested dicts
  phi["dnn_out"] = dict(phi["dnn_out"], bias=np.full_like(phi["dnn_out"]["bias"], value))
  return phi


@pytest.mark.parametrize("head", ["deepfm", "mlp"])
def test_cut_gradients_are_finite_and_exact_at_extreme_logits(head):
  model = models.make_model(models.ModelSpec(head=head, **_SPEC))
  n = 8
  rng = np.random.default_rng(0)
  # (jit everything: flax's eager init and op-by-op dispatch cost seconds on 2 cores)
  theta = jax.jit(model.encoder_init)(jax.random.key(0))
  phi0 = jax.device_get(jax.jit(model.head_init)(jax.random.key(1)))
  pub_cat = np.stack([rng.integers(0, c, n) for c in _SPEC["pub_cardinalities"]], 1)
  priv_cat = np.stack([rng.integers(0, c, n) for c in _SPEC["priv_cardinalities"]], 1)
  priv_cat = priv_cat.astype(np.int32)
  server_apply, device_apply = protocol.apply_fns(model)
  h = jax.jit(lambda t, c, d: protocol.server_forward(server_apply, t, (c, d)))(
    theta, pub_cat.astype(np.int32), rng.random((n, 1), np.float32)
  )
  dense = np.zeros((n, 0), np.float32)
  y = np.array([0, 1] * (n // 2), np.int32)
  mask = np.array([1] * (n - 1) + [0], np.float32)  # the last row is padding
  dz_dh = jax.vmap(jax.grad(model.head_apply, argnums=1), in_axes=(None, 0, 0, 0))

  @jax.jit
  def step_and_reference(phi):
    out = protocol.device_step(device_apply, phi, h, (priv_cat, dense), y, mask)
    # g_i = (sigmoid(z_i) - y_i) dz_i/dh_i, and exactly 0 on padding.
    want = (jax.nn.sigmoid(out.logits) - y)[:, None] * dz_dh(phi, h, priv_cat, dense)
    return out, want * mask[:, None]

  scaled = jax.tree.map(lambda x: np.float32(300.0) * x, phi0)  # huge logits of both signs
  for phi in (_with_output_bias(phi0, 1e4), _with_output_bias(phi0, -1e4), scaled):
    out, want = jax.device_get(step_and_reference(phi))
    z = np.asarray(out.logits, np.float64)
    assert np.all(np.abs(z) > 1e3), z
    for name, value in (
      ("loss", out.loss),
      ("cut_grads", out.cut_grads),
      *(
        (f"param_grads{jax.tree_util.keystr(k)}", v)
        for k, v in jax.tree_util.tree_leaves_with_path(out.param_grads)
      ),
    ):
      assert np.all(np.isfinite(value)), name
    assert out.cut_grads.dtype == np.float32
    np.testing.assert_allclose(out.cut_grads, want, rtol=1e-5, atol=1e-30)
    assert np.all(out.cut_grads[-1] == 0)
    # The loss is the mean stable BCE max(z, 0) - z y + log1p(exp(-|z|)) over the valid rows.
    bce = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
    np.testing.assert_allclose(float(out.loss), bce[:-1].mean(), rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# float32 by default; the float64 switch; near-ties.


def test_float32_is_the_default():
  assert not jax.config.jax_enable_x64, "tests expect the default (JAX_ENABLE_X64 unset)"
  data = sj_data.load("synthetic", num_examples=200, num_priv_dense=1)
  assert data.train.pub_dense.dtype == data.train.priv_dense.dtype == np.float32
  assert data.train.priv_cat.dtype == data.train.pub_cat.dtype == data.train.y.dtype == np.int32
  model = models.make_model(models.ModelSpec(**_SPEC))
  for params in (
    jax.jit(model.encoder_init)(jax.random.key(0)),
    jax.jit(model.head_init)(jax.random.key(1)),
  ):
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  assert jnp.asarray(1.0).dtype == jnp.float32


# Run in a subprocess with JAX_ENABLE_X64=1: EXACT on a small model of its own, on the same
# problem in float32 and in float64 (EXACT computes in the dtype of h). Prints one JSON line.
_X64_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from splitjax import attacks

    CARDS, D, K, N = (3, 4, 2), 6, 8, 64
    rng = np.random.default_rng(0)
    emb = [rng.normal(size=(c, K)) for c in CARDS]
    emb[1][3] = emb[1][2] + 1e-9   # values 2 and 3 of feature 1: a near-tie in either precision
    params = dict(emb=emb, w=rng.normal(size=(D, K)) / np.sqrt(D), v=rng.normal(size=K),
                  b=np.array(0.1))

    def device_apply(p, h, x):
      e = sum(p["emb"][j][x[j]] for j in range(len(CARDS)))
      return jnp.tanh(h @ p["w"] + e) @ p["v"] + p["b"]

    x = np.stack([rng.integers(0, c, N) for c in CARDS], 1).astype(np.int32)
    y = rng.integers(0, 2, N)
    h = rng.normal(size=(N, D))
    p64 = jax.tree.map(jnp.float64, params)
    def grad(hi, xi, yi):
      z, dz = jax.value_and_grad(device_apply, argnums=1)(p64, hi, xi)
      return (jax.nn.sigmoid(z) - yi) * dz
    g = np.asarray(jax.vmap(grad)(jnp.asarray(h), x, y))   # float64 ground truth
    clip = float(np.median(np.linalg.norm(g, axis=1)))
    out = {"x64": bool(jax.config.jax_enable_x64), "x": x.tolist(), "y": y.tolist()}
    for dtype in ("float32", "float64"):
      p = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
      for mode, kw in (("plain", {}), ("clipped", {"l2_clip_norm": clip})):
        gm = g
        if kw:
          n = np.linalg.norm(g, axis=1, keepdims=True)
          gm = g * np.minimum(1.0, clip / n)
        r = attacks.exact(device_apply, p, h.astype(dtype), gm.astype(dtype), CARDS, **kw)
        out[f"{dtype}_{mode}"] = {"features": r.features.tolist(), "labels": r.labels.tolist(),
                                  "num_ties": r.num_ties.tolist(),
                                  "distance_dtype": str(r.distances.dtype)}
    print(json.dumps(out))
""")


def test_exact_agrees_between_float32_and_float64_and_reports_near_ties():
  res = _run(["-c", _X64_SCRIPT], {"JAX_ENABLE_X64": "1"})
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["x64"], "JAX_ENABLE_X64=1 did not switch JAX to 64-bit"
  x, y = np.array(out["x"]), np.array(out["y"])
  near_tie = np.isin(x[:, 1], (2, 3))  # the two nearly equal candidates of feature 1
  assert 0 < near_tie.sum() < len(x)
  for mode in ("plain", "clipped"):
    f32, f64 = out[f"float32_{mode}"], out[f"float64_{mode}"]
    assert f32["distance_dtype"] == "float32" and f64["distance_dtype"] == "float64"
    for r in (f32, f64):
      feats, labels, ties = map(np.array, (r["features"], r["labels"], r["num_ties"]))
      # Near-ties are reported, in both precisions, and only there.
      assert np.all(ties[near_tie] >= 2), (mode, ties[near_tie])
      assert np.all(ties[~near_tie] == 1), (mode, ties[~near_tie])
      # Untied users are recovered exactly; tied ones up to the tied feature.
      np.testing.assert_array_equal(feats[~near_tie], x[~near_tie])
      np.testing.assert_array_equal(np.delete(feats, 1, axis=1), np.delete(x, 1, axis=1))
      assert np.all(np.isin(feats[near_tie, 1], (2, 3)))
      np.testing.assert_array_equal(labels, y)
    # float32 and float64 give the same answer wherever the answer is not a reported tie.
    np.testing.assert_array_equal(
      np.array(f32["features"])[~near_tie], np.array(f64["features"])[~near_tie]
    )
    np.testing.assert_array_equal(f32["labels"], f64["labels"])


def test_exact_reports_exact_ties_in_float32():
  cards = (2, 3)
  emb = jnp.array([[0.5, -1.0], [0.5, -1.0]])  # feature 0 has no effect: every user is tied
  params = dict(emb0=emb, emb1=jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))

  def device_apply(p, h, x):
    return jnp.dot(h, p["emb0"][x[0]] + p["emb1"][x[1]])

  h = jnp.array([[1.0, 2.0], [0.5, -0.3], [-2.0, 1.0]])
  x1 = np.array([0, 1, 2])
  g = jax.vmap(
    lambda hi, xi: (
      (jax.nn.sigmoid(device_apply(params, hi, jnp.array([0, xi]))) - 1)
      * jax.grad(device_apply, argnums=1)(params, hi, jnp.array([0, xi]))
    )
  )(h, x1)
  r = attacks.exact(device_apply, params, h, g, cards)
  np.testing.assert_array_equal(r.num_ties, [2, 2, 2])
  np.testing.assert_array_equal(r.features[:, 1], x1)
  np.testing.assert_array_equal(r.labels, [1, 1, 1])


# --------------------------------------------------------------------------------------------------
# Same seed, same results; killed runs resume to the uninterrupted result.


# With cut-layer DP, so that the noise key is part of what a resume must restore.
_TRAIN_FLAGS = dict(config=TINY, dp_clip="auto", dp_noise_multiplier=0.5)
_TRAIN_ARGS = [
  "-m",
  "experiments.train",
  f"--config={TINY}",
  "--dp_clip=auto",
  "--dp_noise_multiplier=0.5",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted tiny training run (with DP) and its train-user attack, in-process."""
  workdir = tmp_path_factory.mktemp("reference")
  with flagsaver.flagsaver(workdir=str(workdir), **_TRAIN_FLAGS):
    train_bin.main([])
  with flagsaver.flagsaver(workdir=str(workdir), users="train"):
    attack_bin.main([])
  return workdir


def test_same_seed_gives_the_same_bits_in_a_fresh_process(reference, tmp_path):
  res = _run(_TRAIN_ARGS + [f"--workdir={tmp_path}"])
  assert res.returncode == 0, res.stderr[-2000:]
  _assert_same_training(tmp_path, reference)


def test_train_killed_then_resumed_equals_uninterrupted(reference, tmp_path):
  killed = _run(_TRAIN_ARGS + [f"--workdir={tmp_path}"], {common.KILL_ENV: "1"})
  assert killed.returncode == KILLED, killed.stderr[-2000:]
  assert (tmp_path / "checkpoint.msgpack").exists()
  assert not (tmp_path / "metrics.json").exists()
  with flagsaver.flagsaver(workdir=str(tmp_path), resume=True, **_TRAIN_FLAGS):
    train_bin.main([])
  _assert_same_training(tmp_path, reference)


class _Killed(BaseException):
  """Raised instead of os._exit by an in-process kill (nothing after it runs, like a kill)."""


def test_train_killed_after_its_last_checkpoint_resumes(reference, tmp_path, monkeypatch):
  # In-process kill (cheaper than a subprocess): the hook's os._exit raises instead.
  def kill(status):
    raise _Killed(status)

  monkeypatch.setattr(common.os, "_exit", kill)
  monkeypatch.setenv(common.KILL_ENV, "2")  # the tiny config trains 2 epochs
  with pytest.raises(_Killed), flagsaver.flagsaver(workdir=str(tmp_path), **_TRAIN_FLAGS):
    train_bin.main([])
  monkeypatch.delenv(common.KILL_ENV)
  assert (tmp_path / "checkpoint.msgpack").exists() and not (tmp_path / "metrics.json").exists()
  with flagsaver.flagsaver(workdir=str(tmp_path), resume=True, **_TRAIN_FLAGS):
    train_bin.main([])
  _assert_same_training(tmp_path, reference)


def test_attack_killed_then_resumed_equals_uninterrupted(reference, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  name = "attack_exact_auto_auto_train.json"
  (workdir / name).unlink()
  # Blocks of 16 rows (a block's parameter versions go in one EXACT call): several blocks.
  killed = _run(
    ["-m", "experiments.attack", "--users=train", f"--workdir={workdir}"],
    {common.KILL_ENV: "2", common.ATTACK_BLOCK_ENV: "16"},
  )
  assert killed.returncode == KILLED, killed.stderr[-2000:]
  assert (workdir / (name + ".partial.npz")).exists() and not (workdir / name).exists()
  with np.load(workdir / (name + ".partial.npz")) as partial:
    assert 0 < partial["finished"].sum() < len(partial["finished"])
  with flagsaver.flagsaver(workdir=str(workdir), users="train", resume=True):
    attack_bin.main([])
  got = json.loads((workdir / name).read_text())
  want = json.loads((reference / name).read_text())
  for secret in want["features"]:
    assert got["features"][secret]["accuracy"] == want["features"][secret]["accuracy"], secret
  assert got["label"]["accuracy"] == want["label"]["accuracy"]
  assert _timing_free(got) == _timing_free(want)
  assert not (workdir / (name + ".partial.npz")).exists()


# Points: no_dp, then sigma_inf (the frozen server: trained, not attacked).
_SWEEP_FLAGS = dict(
  config=TINY, seeds=["0"], sigmas=[], target_epsilons=[], label_epsilons=[], num_examples=20
)


def test_sweep_killed_then_rerun_equals_uninterrupted(tmp_path, monkeypatch):
  want_dir, got_dir = tmp_path / "uninterrupted", tmp_path / "killed"
  with flagsaver.flagsaver(workdir=str(want_dir), **_SWEEP_FLAGS):
    sweep_bin.main([])

  # Ticks: no_dp trains 2 epochs and runs 3 attacks (5), then sigma_inf's first epoch: kill there
  # (in-process: the hook's os._exit raises; subprocess kills are tested for train and attack).
  def kill(status):
    raise _Killed(status)

  monkeypatch.setattr(common.os, "_exit", kill)
  monkeypatch.setenv(common.KILL_ENV, "6")
  with pytest.raises(_Killed), flagsaver.flagsaver(workdir=str(got_dir), **_SWEEP_FLAGS):
    sweep_bin.main([])
  monkeypatch.delenv(common.KILL_ENV)
  assert not (got_dir / "sweep.csv").exists()
  assert (got_dir / "points" / "no_dp" / "seed0" / "attack.json").exists()
  with flagsaver.flagsaver(workdir=str(got_dir), **_SWEEP_FLAGS):
    sweep_bin.main([])
  assert (got_dir / "sweep.csv").read_text() == (want_dir / "sweep.csv").read_text()
  assert (got_dir / "sweep.md").read_text() == (want_dir / "sweep.md").read_text()
