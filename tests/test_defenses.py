"""splitjax.defenses: the chain's placement rules, each defence's definition, and the training
step sending the defended rows (an empty chain is the DP chain bit for bit)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import flagsaver

from experiments import train as train_bin
from splitjax import defenses
from splitjax import training

D = 16


def _rows(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(n, D)) * rng.uniform(0.1, 3.0, (n, 1)), jnp.float32)


def test_plan_places_the_dp_chain_and_says_what_epsilon_covers():
  p = defenses.plan(["topk:0.25"])
  assert [d.text() for d in p.pre] == ["topk:0.25"] and p.covered and not p.between
  p = defenses.plan(["clip", "noise", "max_norm"])
  assert p.covered and [d.name for d in p.post] == ["max_norm"]  # post-processing
  p = defenses.plan(["max_norm"])  # batch-dependent before the noise
  assert not p.covered and "mixes a batch" in p.reason
  p = defenses.plan(["clip", "quantize:4", "noise"])
  assert not p.covered and "between the clip and the noise" in p.reason
  assert p.stages() == [{"defense": "quantize:4", "stage": "between clip and noise"}]
  defenses.check_covered(p, 0.0)  # no noise: nothing to void
  with pytest.raises(defenses.DefenseError, match="voids the cut-layer epsilon"):
    defenses.check_covered(p, 1.0)


@pytest.mark.parametrize(
  "chain, message",
  [
    (["quantize:8"], "after the clip"),
    (["noise", "clip"], "noise before clip"),
    (["clip", "clip"], "twice"),
    (["dropout"], "unknown defence"),
    (["topk"], "takes a parameter"),
    (["sign:2"], "takes no parameter"),
    (["topk:1.5"], r"\(0, 1\]"),
    (["clip", "quantize:2.5"], "integer"),
  ],
)
def test_bad_chains_one_line(chain, message):
  with pytest.raises(defenses.DefenseError, match=message):
    defenses.plan(chain)


def test_empty_chain_is_the_dp_chain_bit_for_bit():
  x, mask = _rows(), jnp.array([1, 1, 1, 1, 1, 1, 0, 0], jnp.float32)
  dp = training.DPConfig(jnp.float32(1.0), jnp.float32(0.7), jnp.float32(jnp.inf), jnp.float32(0))
  key = jax.random.key(3)
  want, bad_want = training.cut_layer_dp(x, dp, key, mask)
  got, bad = defenses.defended_release(x, mask, key, dp.l2_clip_norm, 0.7, defenses.plan([]))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert int(bad) == int(bad_want)


def test_max_norm_equalises_expected_squared_norms():
  x = _rows(6, seed=1)
  mask = jnp.ones(6, jnp.float32)
  d = defenses.Defense("max_norm")
  keys = jax.random.split(jax.random.key(0), 4000)
  out = jax.vmap(lambda k: defenses.apply_one(d, x, k, mask, jnp.inf))(keys)
  mean_sq = np.mean(np.sum(np.square(np.asarray(out)), axis=-1), axis=0)
  target = float(np.max(np.sum(np.square(np.asarray(x)), axis=1)))
  np.testing.assert_allclose(mean_sq, target, rtol=0.03)
  # The largest row gets no noise; a padded row is left as it is.
  big = int(np.argmax(np.sum(np.square(np.asarray(x)), axis=1)))
  np.testing.assert_array_equal(np.asarray(out[0, big]), np.asarray(x[big]))
  pad = defenses.apply_one(d, x, keys[0], mask.at[2].set(0), jnp.inf)
  np.testing.assert_array_equal(np.asarray(pad[2]), np.asarray(x[2]))


def test_topk_sign_and_quantize_definitions():
  x, mask = _rows(), jnp.ones(8, jnp.float32)
  key = jax.random.key(1)
  top = np.asarray(defenses.apply_one(defenses.Defense("topk", 0.25), x, key, mask, jnp.inf))
  k = math.ceil(0.25 * D)
  assert np.all(np.sum(top != 0, axis=1) == k)
  xs = np.abs(np.asarray(x))
  for r in range(8):
    kept = np.flatnonzero(top[r])
    assert set(kept) == set(np.argsort(-xs[r])[:k])
    np.testing.assert_array_equal(top[r, kept], np.asarray(x)[r, kept])
  sg = np.asarray(defenses.apply_one(defenses.Defense("sign"), x, key, mask, jnp.inf))
  np.testing.assert_allclose(
    np.linalg.norm(sg, axis=1), np.linalg.norm(np.asarray(x), axis=1), rtol=1e-5
  )
  assert np.all(np.sign(sg) == np.sign(np.asarray(x)))
  c = 1.0
  clipped = training.DPConfig(
    jnp.float32(c), jnp.float32(0.0), jnp.float32(jnp.inf), jnp.float32(0)
  )
  xc, _ = training.cut_layer_dp(x, clipped, key, mask)
  q = np.asarray(defenses.apply_one(defenses.Defense("quantize", 3), xc, key, mask, c))
  grid = np.linspace(-c, c, 2**3)
  assert np.all(np.min(np.abs(q[..., None] - grid), axis=-1) < 1e-6)
  assert np.max(np.abs(q - np.asarray(xc))) <= c / (2**3 - 1) + 1e-6
  # Stochastic rounding is unbiased.
  keys = jax.random.split(key, 3000)
  qs = jax.vmap(
    lambda kk: defenses.apply_one(defenses.Defense("quantize_stochastic", 2), xc, kk, mask, c)
  )(keys)
  np.testing.assert_allclose(np.mean(np.asarray(qs), axis=0), np.asarray(xc), atol=0.03)


def test_binary_records_the_chain_and_refuses_a_void_one(tmp_path):
  work = tmp_path / "topk"
  with flagsaver.flagsaver(workdir=str(work), config="synthetic_tiny", defense=["topk:0.25"]):
    train_bin.main([])
  cfg = json.loads((work / "config.json").read_text())
  metrics = json.loads((work / "metrics.json").read_text())
  assert cfg["defenses"] == ["topk:0.25"]
  assert metrics["defense_chain"] == [{"defense": "topk:0.25", "stage": "pre-processing"}]
  assert metrics["defense_chain_covered"] is True
  # What crossed the wire is the defended row: ceil(0.25 d) nonzero entries per row.
  with np.load(work / "transcript.npz") as z:
    g = z["g"]
  assert np.all(np.sum(g != 0, axis=1) <= math.ceil(0.25 * g.shape[1]))
  assert np.mean(np.sum(g != 0, axis=1) == math.ceil(0.25 * g.shape[1])) > 0.9
  void = tmp_path / "void"
  with flagsaver.flagsaver(
    workdir=str(void),
    config="synthetic_tiny",
    defense=["max_norm"],
    dp_clip="auto",
    dp_noise_multiplier=1.0,
  ):
    with pytest.raises(ValueError, match="voids the cut-layer epsilon"):
      train_bin.main([])
  assert not void.exists()


def test_marvell_solver_meets_the_power_constraint_and_beats_isotropic_noise():
  delta_sq, u0, u1, p, dim = 4.0, 0.05, 0.2, 0.25, D
  prev = None
  for strength in (0.5, 2.0, 8.0):
    power = strength * delta_sq
    lam = defenses.marvell_lambdas(delta_sq, u0, u1, p, power, dim).astype(np.float64)
    used = p * (lam[2] + (dim - 1) * lam[3]) + (1 - p) * (lam[0] + (dim - 1) * lam[1])
    assert np.all(lam >= 0) and used <= power * (1 + 1e-5)
    kl = defenses.marvell_sum_kl(lam, delta_sq, u0, u1, dim)
    iso = np.full(4, power / dim)  # the same power spread isotropically over both classes
    assert kl < defenses.marvell_sum_kl(iso, delta_sq, u0, u1, dim)
    assert prev is None or kl < prev  # more power, less separable classes
    prev = kl
  assert not np.any(defenses.marvell_lambdas(delta_sq, u0, u1, 1.0, 4.0, dim))  # one class


def test_marvell_noise_has_the_solved_covariance():
  rng = np.random.default_rng(4)
  n = 64
  y = jnp.asarray(rng.integers(0, 2, n), jnp.int32)
  x = jnp.asarray(rng.normal(size=(n, D)) * 0.3 + np.asarray(y)[:, None] * 1.0, jnp.float32)
  mask = jnp.ones(n, jnp.float32)
  d = defenses.Defense("marvell", 2.0)
  keys = jax.random.split(jax.random.key(2), 3000)
  noise = np.asarray(jax.vmap(lambda k: defenses.apply_one(d, x, k, mask, jnp.inf, y))(keys) - x)
  xs, ys = np.asarray(x, np.float64), np.asarray(y)
  delta = xs[ys == 1].mean(0) - xs[ys == 0].mean(0)
  unit = delta / np.linalg.norm(delta)
  var = lambda cls: [xs[ys == cls] - xs[ys == cls].mean(0)]
  u = [float(np.sum(np.square(var(c)[0])) / ((ys == c).sum() * D)) for c in (0, 1)]
  lam = defenses.marvell_lambdas(
    np.sum(delta**2), u[0], u[1], ys.mean(), 2.0 * np.sum(delta**2), D
  ).astype(np.float64)
  for cls, (l1, l2) in ((0, lam[:2]), (1, lam[2:])):
    rows = noise[:, ys == cls, :].reshape(-1, D)
    along = rows @ unit
    across = rows - along[:, None] * unit[None, :]
    np.testing.assert_allclose(np.var(along), l1, rtol=0.08, atol=1e-4)
    np.testing.assert_allclose(np.sum(np.var(across, axis=0)) / (D - 1), l2, rtol=0.08, atol=1e-4)


def test_label_smoothing_is_the_device_loss_on_smoothed_targets():
  import splits

  from splitjax import protocol

  p = defenses.plan(["label_smoothing:0.2", "topk:0.5"])
  assert p.label_smoothing == 0.2 and [d.name for d in p.pre] == ["topk"] and p.covered
  assert p.stages()[0] == {"defense": "label_smoothing:0.2", "stage": "device loss"}
  split = splits.split(32, seed=1)
  recipe = training.Recipe(optimizer="sgd", learning_rate=0.0, batch_size=32, epochs=1)
  state = training.init_state(splits.MODEL, recipe, 0)
  batch = training.split_to_batch(split, np.arange(32, dtype=np.int32), 32)
  dp = training.no_dp()
  smooth = defenses.plan(["label_smoothing:0.2"])
  _, g = training.replay(state, batch, dp, jax.random.key(0), smooth)
  y_s = np.asarray(batch.y, np.float32) * 0.8 + 0.1
  h = training.predict_h(splits.MODEL, state.server_params, batch.pub_cat, batch.pub_dense)
  want = protocol.top_step(
    splits.MODEL,
    state.device_params,
    h,
    batch.priv_cat,
    batch.priv_dense,
    jnp.asarray(y_s),
    batch.mask,
  ).cut_grads
  np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-7)
  _, g0 = training.replay(state, batch, dp, jax.random.key(0))
  assert not np.allclose(np.asarray(g0), np.asarray(g))


def test_attack_on_a_defended_workdir_records_its_defense_model(tmp_path):
  from experiments import attack as attack_bin

  work = tmp_path / "ls"
  with flagsaver.flagsaver(
    workdir=str(work), config="synthetic_tiny", defense=["label_smoothing:0.2", "sign"]
  ):
    train_bin.main([])
  metrics = json.loads((work / "metrics.json").read_text())
  assert [s["stage"] for s in metrics["defense_chain"]] == ["device loss", "pre-processing"]
  with flagsaver.flagsaver(workdir=str(work), num_examples=20):
    attack_bin.main([])
  rec = json.loads((work / "attack.json").read_text())
  assert rec["defense_model"] == "adaptive"
  assert rec["defense_chain"] == ["label_smoothing:0.2", "sign"]
  adaptive = rec["label"]["accuracy"]
  with flagsaver.flagsaver(
    workdir=str(work), num_examples=20, defense_model="naive", overwrite=True
  ):
    attack_bin.main([])
  assert json.loads((work / "attack.json").read_text())["defense_model"] == "adaptive"  # kept
  rec = json.loads((work / "attack_exact_auto_auto_test_naive.json").read_text())
  assert rec["defense_model"].startswith("naive") and adaptive == 1.0


def test_adaptive_exact_reads_through_deterministic_defences_where_naive_fails():
  import splits

  from splitjax import attacks
  from splitjax import models

  split = splits.split(96, seed=2)
  recipe = training.Recipe(optimizer="sgd", learning_rate=0.0, batch_size=96, epochs=1)
  state = training.init_state(splits.MODEL, recipe, 0)
  apply = models.device_logit_fn(splits.MODEL)
  for chain in (["label_smoothing:0.3"], ["topk:0.25"], ["sign"]):
    p = defenses.plan(chain)
    tr = training.replay_transcript(splits.MODEL, state, split, defenses=p)
    model, why = defenses.attack_model(p, 0.0)
    assert model is not None, why
    common = dict(cardinalities=splits.PRIV_CARDS)
    adaptive = attacks.exact(apply, state.device_params, tr.h, tr.g, defense=model, **common)
    naive = attacks.exact(apply, state.device_params, tr.h, tr.g, **common)
    acc = lambda r: np.mean(np.all(np.asarray(r.features) == split.priv_cat, axis=1))
    lab = lambda r: np.mean(np.asarray(r.labels) == split.y)
    assert acc(adaptive) == 1.0 and lab(adaptive) == 1.0, chain
    assert acc(naive) < 0.9, chain


def test_which_randomized_chains_have_a_likelihood():
  for chain, clip in (
    (["max_norm"], math.inf),
    (["marvell:2"], math.inf),
    (["clip", "quantize_stochastic:4"], 1.0),
  ):
    model, why = defenses.attack_model(defenses.plan(chain), 0.0, clip)
    assert model is not None and model.likelihood.name == chain[-1].split(":")[0], why
  model, why = defenses.attack_model(defenses.plan(["max_norm"]), 0.0, 1.0)  # a clip of noise
  assert model is None and "infinite clip" in why
  model, why = defenses.attack_model(defenses.plan(["max_norm", "topk:0.5"]), 0.0)
  assert model is None and "one transform" in why
  model, why = defenses.attack_model(defenses.plan(["clip", "noise", "quantize_stochastic:4"]), 1.0)
  assert model is None and "without noise" in why
  model, why = defenses.attack_model(defenses.plan(["clip", "noise", "sign"]), 1.0)
  assert model is None and "after the noise" in why


def test_topk_ties_go_to_the_first_by_position():
  x = jnp.asarray([[1.0, -1.0, 1.0, 0.5], [0.5, 2.0, -2.0, 2.0]], jnp.float32)
  out = np.asarray(defenses.row_transform(defenses.Defense("topk", 0.5), x, jnp.inf))
  np.testing.assert_array_equal(out, [[1.0, -1.0, 0.0, 0.0], [0.0, 2.0, -2.0, 0.0]])


def test_batch_average_sends_the_mean_row_and_voids_the_accounting_before_the_noise():
  x, mask = _rows(), jnp.array([1, 1, 1, 1, 1, 0, 0, 0], jnp.float32)
  out = np.asarray(defenses.apply_one(defenses.Defense("batch_average"), x, None, mask, jnp.inf))
  mean = np.asarray(x)[:5].mean(0)
  np.testing.assert_allclose(out[:5], np.broadcast_to(mean, (5, D)), rtol=1e-6)
  np.testing.assert_array_equal(out[5:], np.asarray(x)[5:])  # padded rows as they were
  assert not defenses.plan(["batch_average"]).covered
  assert defenses.plan(["clip", "noise", "batch_average"]).covered  # post-processing
  model, why = defenses.attack_model(defenses.plan(["batch_average"]), 0.0)
  assert model is None and "splitjax.attacks.joint" in why


def test_batch_average_workdir_is_attacked_jointly_by_default_and_beats_the_naive_attack(tmp_path):
  from experiments import attack as attack_bin

  work = tmp_path / "avg"
  with flagsaver.flagsaver(workdir=str(work), config="synthetic_tiny", defense=["batch_average"]):
    train_bin.main([])
  with flagsaver.flagsaver(workdir=str(work), num_examples=24, joint_batch_size=2):
    attack_bin.main([])
  rec = json.loads((work / "attack_exact_auto_auto_test_b2.json").read_text())
  assert rec["attack"] == "joint" and rec["defense_model"].startswith("adaptive (joint")
  assert rec["joint"]["batch_size"] == 2 and rec["joint"]["batches"] == 12
  assert rec["joint"]["fitted_batches"] >= 0.9
  joint = rec["label"]["accuracy"], [f["accuracy"] for f in rec["features"].values()]
  assert joint[0] >= 0.9 and min(joint[1]) >= 0.9
  with flagsaver.flagsaver(
    workdir=str(work), num_examples=24, joint_batch_size=2, defense_model="naive", overwrite=True
  ):
    attack_bin.main([])
  rec = json.loads((work / "attack_exact_auto_auto_test_naive_b2.json").read_text())
  assert rec["attack"] == "exact" and rec["defense_model"].startswith("naive")
  naive = rec["label"]["accuracy"], [f["accuracy"] for f in rec["features"].values()]
  assert naive[0] + sum(naive[1]) < joint[0] + sum(joint[1])
  with flagsaver.flagsaver(workdir=str(work), attack="joint", users="train", overwrite=True):
    with pytest.raises(Exception, match="--users=test"):
      attack_bin.main([])


def _dcor_reference(x, z):
  """Szekely et al.'s sample dCor from its definition (numpy, float64)."""

  def centred(u):
    d = np.sqrt(((u[:, None, :] - u[None, :, :]) ** 2).sum(-1))
    return d - d.mean(0)[None, :] - d.mean(1)[:, None] + d.mean()

  a, b = centred(x), centred(z)
  return math.sqrt((a * b).mean() / math.sqrt((a * a).mean() * (b * b).mean()))


def test_distance_correlation_matches_its_definition_ignores_padding_and_is_one_for_similarity():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(40, 3))
  z = np.tanh(x @ rng.normal(size=(3, 5))) + 0.3 * rng.normal(size=(40, 5))
  got = float(defenses.distance_correlation(jnp.asarray(x), jnp.asarray(z)))
  assert abs(got - _dcor_reference(x, z)) < 1e-4
  padded_x = np.concatenate([x, rng.normal(size=(8, 3)) * 50])
  padded_z = np.concatenate([z, rng.normal(size=(8, 5)) * 50])
  mask = np.r_[np.ones(40), np.zeros(8)]
  padded = defenses.distance_correlation(jnp.asarray(padded_x), jnp.asarray(padded_z), mask)
  assert abs(float(padded) - got) < 1e-4
  same = defenses.distance_correlation(jnp.asarray(x), jnp.asarray(3.0 * x[:, ::-1] + 1.0))
  assert abs(float(same) - 1.0) < 1e-4
  far = defenses.distance_correlation(
    jnp.asarray(rng.normal(size=(400, 3))), jnp.asarray(rng.normal(size=(400, 5)))
  )
  assert float(far) < 0.25  # independent: the sample dCor -> 0 (about 0.18 here, biased up)
  grad = jax.grad(lambda u: defenses.distance_correlation(jnp.asarray(x), u))(jnp.asarray(z))
  assert np.isfinite(np.asarray(grad)).all()


def test_activation_noise_is_the_dp_chain_on_device_bottom_activations_and_misuse_is_refused():
  from experiments import pipeline
  from experiments.configs import base

  cfg = base.TrainConfig(topology="device_bottom", dp_clip="auto", defenses=("activation_noise:2",))
  out = pipeline.resolve_aliases(cfg)
  assert out.dp_noise_multiplier == 2.0 and out.defenses == ()
  for bad, match in (
    (dict(topology="device_top", dp_clip="auto"), "device_bottom"),
    (dict(topology="device_bottom", dp_clip="none"), "finite clip"),
    (dict(topology="device_bottom", dp_clip="auto", dp_noise_multiplier=1.0), "one of the two"),
  ):
    with pytest.raises(pipeline.ConfigError, match=match):
      pipeline.resolve_aliases(base.TrainConfig(defenses=("activation_noise:2",), **bad))
  with pytest.raises(defenses.DefenseError, match="DP chain"):
    defenses.plan(["activation_noise:2"])
  with pytest.raises(pipeline.ConfigError, match="device_bottom"):
    pipeline.validate(base.TrainConfig(topology="device_top", defenses=("nopeek:1",)))
  with pytest.raises(pipeline.ConfigError, match="device_top"):
    pipeline.validate(base.TrainConfig(topology="device_bottom", defenses=("sign",)))


def test_nopeek_lowers_the_distance_correlation_but_activation_matching_still_recovers(tmp_path):
  from experiments import attack as attack_bin
  from experiments import pipeline
  from splitjax.training import steps

  dcors, accuracy = {}, {}
  for name, chain in (("plain", []), ("nopeek", ["nopeek:3"])):
    work = tmp_path / name
    with flagsaver.flagsaver(
      workdir=str(work),
      config="synthetic_tiny",
      topology="device_bottom",
      defense=chain,
      epochs=10,
      learning_rate=0.01,
    ):
      train_bin.main([])
    restored = pipeline.Restored(work)
    test = restored.dataset.test
    x = steps.private_design(restored.model, test.priv_cat[:256], test.priv_dense[:256])
    a = restored.model.encode_batch(
      restored.state.device_params, test.priv_cat[:256], test.priv_dense[:256]
    )
    dcors[name] = float(defenses.distance_correlation(x, a))
    with flagsaver.flagsaver(workdir=str(work), num_examples=64):
      attack_bin.main([])
    rec = json.loads((work / "attack.json").read_text())
    accuracy[name] = min(f["accuracy"] for f in rec["features"].values() if "accuracy" in f)
    if name == "nopeek":
      assert rec["defense_model"].startswith("adaptive (nopeek")
      metrics = json.loads((work / "metrics.json").read_text())
      assert metrics["defense_chain"] == [{"defense": "nopeek:3", "stage": "device encoder loss"}]
  assert dcors["nopeek"] < dcors["plain"] - 0.05, dcors
  assert accuracy["nopeek"] >= 0.95, accuracy  # the encoder stays injective on the domain


def test_device_bottom_at_sigma_inf_sends_zero_rows_and_is_the_public_only_model(tmp_path):
  """Noise multiplier inf on the activations: the device sends zero rows, the server's head is
  trained (not frozen at initialisation, as in device_top) on its own features alone, and the
  test AUC is that model's: its logits do not move when the private features change."""
  import dataclasses

  from experiments import pipeline
  from splitjax import metrics as sj_metrics

  with flagsaver.flagsaver(
    workdir=str(tmp_path),
    config="synthetic_tiny",
    topology="device_bottom",
    dp_clip="1",
    dp_noise_multiplier=math.inf,
  ):
    train_bin.main([])
  restored = pipeline.Restored(tmp_path)
  m = restored.metrics
  assert m["cut_rows_zeroed"] and not m["frozen_server"], m
  assert not np.any(restored.transcript().h), "the device sent non-zero rows"
  model, state, test = restored.model, restored.state, restored.dataset.test
  logits = training.predict_logits(model, state, test, zero_cut=True)
  assert float(sj_metrics.roc_auc(logits, test.y)) == pytest.approx(m["test_auc"], abs=1e-6)
  # Trained, not frozen: the server's head moved from its initialisation.
  init = training.init_state(model, pipeline.recipe_of(restored.config), restored.config.seed)
  moved = jax.tree.map(
    lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
    state.server_params,
    init.server_params,
  )
  assert any(jax.tree.leaves(moved)), "the server's head stayed at initialisation"
  other = dataclasses.replace(test, priv_cat=np.roll(test.priv_cat, 1, axis=0))
  np.testing.assert_allclose(
    training.predict_logits(model, state, other, zero_cut=True), logits, rtol=0, atol=0
  )
  # With the cut read back (what the evaluation did before), the untrained h weights move them.
  clean = training.predict_logits(model, state, test)
  assert not np.allclose(clean, logits)
