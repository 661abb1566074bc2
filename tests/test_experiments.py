"""Smoke tests of every binary's main(argv) on the tiny synthetic config, and kill/resume."""

import dataclasses
import json
import logging
import re
import types

import numpy as np
import pytest
import tables
from absl import flags
from absl.testing import flagsaver

import splitjax
from experiments import attack as attack_bin
from experiments import common
from experiments import records
from experiments import reproduce as reproduce_bin
from experiments import sweep as sweep_bin
from experiments import train as train_bin

TINY = dict(config="synthetic_tiny")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("train")
  with flagsaver.flagsaver(workdir=str(workdir), **TINY):
    train_bin.main([])
  return workdir


def test_train_writes_metrics_checkpoint_and_transcript(trained):
  metrics = json.loads((trained / "metrics.json").read_text())
  for key in (
    "test_auc",
    "test_log_loss",
    "test_accuracy",
    "epochs",
    "train_seconds",
    "seed",
    "noise_multiplier",
    "l2_clip_norm",
    "releases",
    "sensitivity",
    "neighbouring_relation",
    "mu",
    "epsilon",
    "attack_epsilon",
    "device_epsilon",
    "total_epsilon",
    "delta",
  ):
    assert key in metrics, key
  assert 0.0 <= metrics["test_auc"] <= 1.0
  assert metrics["epochs"] == 2 and metrics["epsilon"] == "inf"
  env = metrics["environment"]
  assert env["splitjax"] == splitjax.__version__ and env["backend"] == "cpu"
  for key in (
    "git_commit",
    "python",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "dp-accounting",
    "numpy",
    "devices",
    "utc_time",
  ):
    assert key in env, key
  assert (
    metrics["resolved_config"]["epochs"] == 2 and metrics["resolved_config"]["batch_size"] == 64
  )
  history = [json.loads(s) for s in (trained / "history.jsonl").read_text().splitlines()]
  assert [h["epoch"] for h in history] == [1, 2]
  assert history[-1]["train_loss"] == metrics["train_loss"]
  assert (trained / "checkpoint.msgpack").exists()
  with np.load(trained / "transcript.npz") as z:
    assert z["h"].shape == z["g"].shape
    assert len(z["example_index"]) == metrics["num_train"]


def test_attack_recovers_everything_without_dp(trained):
  with flagsaver.flagsaver(workdir=str(trained), num_examples=30):
    attack_bin.main([])
  rec = json.loads((trained / "attack.json").read_text())
  for key in (
    "dataset",
    "attack",
    "variant",
    "users",
    "num_examples",
    "features",
    "label",
    "ties",
    "seconds",
    "candidates_per_second",
    "epsilon",
    "attack_epsilon",
    "mu",
  ):
    assert key in rec, key
  assert rec["num_examples"] == 30
  for name, r in list(rec["features"].items()) + [("label", rec["label"])]:
    for key in (
      "accuracy",
      "ci",
      "macro_f1",
      "prior_accuracy",
      "knn_accuracy",
      "prior_only_accuracy",
      "gain",
      "bound",
      "bound_kind",
      "bound_marginal",
    ):
      assert key in r, (name, key)
    # No DP: exact recovers every secret up to reported ties.
    assert r["accuracy"] >= 1.0 - rec["ties"] / 30, name
  assert "mu_hat" in rec["label"]
  assert rec["schema_version"] == 2 and (rec["variant"], rec["prior"]) == ("clip_aware", "uniform")
  # No noise: the cut channel is unprotected, so there is no bound to print.
  assert rec["label"]["bound"] is None
  assert rec["label"]["bound_kind"] == "none:channel_unprotected"


def test_attack_records_from_before_a_new_config_field_still_count(trained):
  """A record written before AttackConfig gained a field (e.g. screen_dtype) is the same attack."""
  with flagsaver.flagsaver(workdir=str(trained), num_examples=30):
    attack_bin.main([])
  path = trained / "attack.json"
  rec = json.loads(path.read_text())
  del rec["config"]["screen_dtype"]
  path.write_text(json.dumps(rec))
  with flagsaver.flagsaver(workdir=str(trained), num_examples=30):
    attack_bin.main([])  # "already holds this attack; nothing to do", not "another configuration"
  assert json.loads(path.read_text()) == rec


def test_an_existing_record_is_kept_refused_or_recomputed_by_what_it_holds(tmp_path):
  """This attack of this model: kept; of an earlier model (or an unstamped record of a search
  attack): recomputed; another configuration or a pre-0.2 record: refused, nothing deleted."""
  from experiments import attacking
  from experiments.configs import base as configs_base
  from splitjax import results

  cfg = dataclasses.asdict(configs_base.AttackConfig(num_examples=30))
  model = types.SimpleNamespace(fingerprint="model-a")
  path = tmp_path / "attack.json"
  existing = lambda **kw: attacking._existing_record(
    path, cfg, model, overwrite=False, progress=None, **kw
  )
  assert existing() is None  # nothing there
  record = {"schema_version": 2, "model_fingerprint": "model-a", "config": cfg, "x": 1}
  path.write_text(json.dumps(record))
  assert existing() == json.loads(path.read_text())
  assert attacking._existing_record(path, cfg, model, overwrite=True, progress=None) is None
  path.write_text(json.dumps(dict(record, model_fingerprint="model-b")))
  assert existing() is None  # stale
  path.write_text(json.dumps(dict(record, config=dict(cfg, num_examples=31))))
  with pytest.raises(results.WorkdirError, match="another attack configuration"):
    existing()
  unstamped = {k: v for k, v in record.items() if k not in ("schema_version", "model_fingerprint")}
  path.write_text(json.dumps(unstamped))
  with pytest.raises(results.WorkdirError, match="splitjax < 0.2"):
    existing()
  assert existing(legacy_is_stale=True) is None
  assert json.loads(path.read_text()) == unstamped  # refused or stale: the file is untouched


def test_attack_train_users_and_paper_variant(trained):
  with flagsaver.flagsaver(workdir=str(trained), users="train", variant="paper", num_examples=40):
    attack_bin.main([])
  rec = json.loads((trained / "attack_exact_paper_auto_train.json").read_text())
  assert rec["users"] == "train" and rec["num_examples"] == 40
  assert rec["label"]["accuracy"] >= 1.0 - rec["ties"] / 40
  # The default attack.json of the other test is untouched by this configuration.
  assert json.loads((trained / "attack.json").read_text())["variant"] == "clip_aware"
  assert rec["label"]["bound_kind"] == "none:channel_unprotected"  # training users, no DP-SGD


def test_sweep_writes_csv_and_table(tmp_path):
  with flagsaver.flagsaver(
    workdir=str(tmp_path),
    seeds=["0"],
    sigmas=["1.0"],
    target_epsilons=[],
    label_epsilons=[],
    num_examples=20,
    **TINY,
  ):
    sweep_bin.main([])
  text = (tmp_path / "sweep.csv").read_text().splitlines()
  header = text[0].split(",")
  assert header[:3] == ["point", "kind", "value"]
  points = {line.split(",")[0] for line in text[1:]}
  assert points == {"no_dp", "sigma_1", "sigma_inf"}
  assert (tmp_path / "sweep.md").read_text().count("\n") >= 5
  # Sweep points leave out the per-step device parameters (disk); attacking their training users
  # says in one line which flag to retrain with.
  point = tmp_path / "points" / "no_dp" / "seed0"
  assert (point / "transcript.npz").exists() and not (point / "transcript_params.msgpack").exists()
  with flagsaver.flagsaver(workdir=str(point), users="train"):
    with pytest.raises(ValueError, match="retrain with experiments.train --record_device_params"):
      attack_bin.main([])


def _strip_cost(report: str) -> str:
  """The report without Table 4 (wall-clock timings) and the environment footer (UTC time)."""
  report = re.sub(r"### Table 4 — cost.*?(?=\n## |\Z)", "", report, flags=re.S)
  return "\n".join(s for s in report.splitlines() if not s.startswith(records.FOOTER_PREFIX))


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reproduce")
  with flagsaver.flagsaver(workdir=str(workdir), preset="tiny", datasets=["synthetic"]):
    reproduce_bin.main([])
  return workdir


def test_reproduce_tiny_report_and_results_schema(tiny_report):
  report = (tiny_report / "REPORT.md").read_text()
  for heading in (
    "## Claims checked",
    "### Table 1",
    "### Table 2",
    "### Table 3",
    "### Table 4",
    "### Training users",
    "**(a)",
    "**(b)",
    "**(c)",
    "**(d)",
  ):
    assert heading in report, heading
  results = json.loads((tiny_report / "results.json").read_text())
  assert results["preset"] == "tiny"
  ds = results["datasets"]["synthetic"]
  assert set(ds["table1"]) == {"sl", "fsl"}
  sweep = ds["sweeps"]["sl"]
  assert [r["point"] for r in sweep] == ["no_dp", "sigma_0", "sigma_1", "sigma_inf", "label_dp_1"]
  for row in sweep:
    assert {"auc_mean", "auc_sd", "epsilon", "attack_epsilon", "attacks"} <= set(row)
  no_dp = sweep[0]["attacks"]["clip_aware"]
  assert all(v["accuracy"] == 1.0 for v in no_dp.values())
  # The training-user point: SL's 40 users with both epochs' releases combined; FSL whole rounds.
  (tu,) = ds["train_users"]
  assert tu["sigma"] == 1.0 and tu["sl"]["users"] == 40 and tu["sl"]["releases_per_user"] == 2.0
  assert tu["fsl"]["users"] >= 40 and tu["fsl"]["local_learning_rate"] == 0.01
  for key in ("first_local_step", "stale_model", "fsl_tracking", "device_update_match"):
    assert set(tu["fsl"][key]) >= {"label", "priv_cat_0"}, key
  assert tu["sl"]["all_releases"]["label"]["bound"] is None  # no device DP-SGD: unprotected
  # The audits: the cut channel at sigma 2 (mu 1), the label channel, an FSL pipeline audit.
  assert "### Audit" in report and "saturation" in report
  (cut,) = ds["audit"]["cut"]
  assert cut["mu_accounted"] == 1.0 and 0.9 < cut["mu_lower"] <= 1.0 and cut["consistent"]
  assert cut["two_sided"]["passed"] and cut["training"]["releases"] == 2
  assert 0.8 < ds["audit"]["label"]["epsilon_lower_pure"] <= 1.0
  (pipe,) = ds["audit"]["pipeline"]
  assert pipe["protocol"] == "fsl" and pipe["trials"] == 20
  assert pipe["epsilon_cut_only"] == pytest.approx(2.0, rel=1e-5)
  assert pipe["epsilon_lower"] > 0 and pipe["epsilon_accounted"] is None
  # The defences: sign, attacked adaptively (through it), naively and with label_direction (the
  # figure only with the plots extra).
  assert "### Defences — the frontier" in report
  (sign,) = ds["defenses"]["rows"]
  assert sign["point"] == "sign" and sign["verdict"] == "leaks under this adaptive attack"
  assert sign["attacks"]["adaptive"]["secrets"]["label"]["accuracy"] == 1.0
  assert sign["attacks"]["naive"]["defense_model"].startswith("naive")
  assert "auc" in sign["attacks"]["designed"]["secrets"]["label"]


class _Killed(BaseException):
  """Raised instead of os._exit by an in-process kill (nothing after it runs, like a kill)."""


def test_reproduce_killed_then_resumed_equals_uninterrupted(tiny_report, tmp_path, monkeypatch):
  # In-process kill at the 9th checkpoint (the hook's os._exit raises instead; a subprocess kill
  # of train and attack is tested in test_numerics), then the same command again.
  def kill(status):
    raise _Killed(status)

  monkeypatch.setattr(common.os, "_exit", kill)
  monkeypatch.setenv(common.KILL_ENV, "9")
  flags = dict(workdir=str(tmp_path), preset="tiny", datasets=["synthetic"])
  with pytest.raises(_Killed), flagsaver.flagsaver(**flags):
    reproduce_bin.main([])
  monkeypatch.delenv(common.KILL_ENV)
  assert not (tmp_path / "REPORT.md").exists()
  assert any(tmp_path.rglob("checkpoint.msgpack")) or any(tmp_path.rglob("metrics.json"))
  with flagsaver.flagsaver(**flags):
    reproduce_bin.main([])
  want = _strip_cost((tiny_report / "REPORT.md").read_text())
  got = _strip_cost((tmp_path / "REPORT.md").read_text())
  if got != want:
    import difflib

    diff = "\n".join(difflib.unified_diff(want.splitlines(), got.splitlines(), lineterm=""))
    pytest.fail(f"resumed report differs from the uninterrupted one:\n{diff}")


@pytest.mark.parametrize(
  "args, message",
  [
    (["experiments.train", "--dataset=nope"], "unknown dataset"),
    (
      ["experiments.train", "--config=synthetic_tiny", "--dp_noise_multiplier=-1"],
      "dp_noise_multiplier",
    ),
    (["experiments.train", "--config=synthetic_tiny", "--dp_clip=0"], "dp_clip"),
    (["experiments.train", "--config=synthetic_tiny", "--target_delta=2"], "target_delta"),
    (["experiments.attack"], "no finished training run"),
    (["experiments.attack", "--screen_dtype=int8"], "unknown --screen_dtype 'int8'"),
    (
      ["experiments.attack", "--screen_dtype=bfloat16", "--attack=optimize"],
      "--attack=optimize has none",
    ),
    (
      ["experiments.attack", "--screen_dtype=bfloat16", "--variant=bayes"],
      "--variant=bayes needs every posterior term in full precision",
    ),
  ],
)
def test_bad_input_one_line_no_traceback(tmp_path, args, message, capsys):
  # In-process through the binaries' own wrapper (test_bad_input runs one subprocess per binary).
  module, argv = args[0], args[1:] + [f"--workdir={tmp_path / 'w'}"]
  binary = {"experiments.train": train_bin, "experiments.attack": attack_bin}[module]
  capsys.readouterr()
  code = 0
  with flagsaver.flagsaver():
    flags.FLAGS(["prog"] + argv)
    try:
      common.run_main(binary.main)([])
    except SystemExit as e:
      code = e.code
  err = capsys.readouterr().err
  assert code == 2, err[-2000:]
  lines = [s for s in err.splitlines() if s.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], err[-2000:]
  assert "Traceback" not in err


def test_attacks_under_dp_stay_below_true_prior_bounds(tmp_path):
  """Synthetic data, known prior: no variant exceeds its bound (attack raises if one does)."""
  with flagsaver.flagsaver(workdir=str(tmp_path), dp_clip="auto", dp_noise_multiplier=1.0, **TINY):
    train_bin.main([])
  for variant in ("bayes", "clip_aware", "paper"):
    with flagsaver.flagsaver(workdir=str(tmp_path), variant=variant):
      attack_bin.main([])
  rec = json.loads((tmp_path / "attack_exact_bayes_auto_test.json").read_text())
  assert rec["prior"] == "informed" and rec["mu_reference"] == pytest.approx(1.0)
  assert rec["mu"] == pytest.approx(2.0 * np.sqrt(2))  # 2 releases at sigma = 1
  assert rec["attack_epsilon"] == pytest.approx(9.9973, rel=1e-3)  # mu = 2, delta 1e-5
  assert "public" in rec["clip_source"]
  for r in list(rec["features"].values()) + [rec["label"]]:
    assert r["bound_kind"] == "guarantee:true_prior"
    assert 0 < r["bound"] <= 1
    assert r["ci"][0] <= r["bound"]


def test_exact_on_a_trained_adult_model(tmp_path):
  """Adult, clipped at C = auto, no noise: the clip-aware attack recovers >= 99 % of the test users
  (up to reported ties), the paper's clip-unaware one does not, and the bf16 screen recovers what
  float32 does (on the clipped gradients: the harder case). Without a clip the clip-aware scoring
  is the paper's; that case is the synthetic end-to-end tests' (CI time)."""
  # One epoch at batch 4096 (10 steps): the claims hold for any trained parameters.
  with flagsaver.flagsaver(
    workdir=str(tmp_path), dataset="adult", epochs=1, batch_size=4096, dp_clip="auto"
  ):
    train_bin.main([])
  n = 200
  recs = {}
  for variant in ("clip_aware", "paper"):
    with flagsaver.flagsaver(workdir=str(tmp_path), variant=variant, num_examples=n):
      attack_bin.main([])
    name = f"attack_exact_{variant}_auto_test.json"
    recs[variant] = json.loads((tmp_path / name).read_text())
  for variant, rec in recs.items():
    secrets = list(rec["features"].values()) + [rec["label"]]
    if variant == "clip_aware":
      for r in secrets:
        assert r["accuracy"] >= max(0.99, 1.0 - rec["ties"] / n)
    else:
      assert min(r["accuracy"] for r in secrets) < 0.9
  # The bf16 screen (rescored in float32) recovers the same secrets as the float32 attack.
  with flagsaver.flagsaver(
    workdir=str(tmp_path), num_examples=n, screen_dtype="bfloat16", overwrite=True
  ):
    attack_bin.main([])
  rec = json.loads((tmp_path / "attack.json").read_text())
  assert rec["config"]["screen_dtype"] == "bfloat16"
  # Clip-aware, no noise: the true pair reproduces g, so the screen decides (almost) every user.
  assert 0.0 <= rec["screen_fallback_fraction"] <= 0.05, rec["screen_fallback_fraction"]
  ref = recs["clip_aware"]
  for name in ref["features"]:
    assert abs(rec["features"][name]["accuracy"] - ref["features"][name]["accuracy"]) <= 1 / n
  assert abs(rec["label"]["accuracy"] - ref["label"]["accuracy"]) <= 1 / n


def test_own_table_through_the_binaries(tmp_path, caplog, capsys):
  """--dataset=csv with a schema naming only the label and the private columns trains, lists the
  columns it gave the server, and is attacked; reproduce builds a csv study from the preset."""
  path = tables.german_like(tmp_path / "german.csv")
  schema = tmp_path / "schema.json"
  schema.write_text(json.dumps(tables.SCHEMA))
  wd = tmp_path / "w"
  caplog.set_level(logging.INFO)
  capsys.readouterr()
  with flagsaver.flagsaver(
    workdir=str(wd), dataset="csv", data_path=str(path), schema=str(schema), **TINY
  ):
    train_bin.main([])
  # Progress goes through absl logging (stderr); results and the epsilons to stdout.
  assert (
    "german.csv: 18 unlisted column(s) go to the server: server_dense (duration," in caplog.text
  )
  assert "[sl] epoch 2/2: train loss " in caplog.text
  out = capsys.readouterr().out
  assert (
    "epsilon at delta 1e-05: cut layer in training inf (k = 2 releases); one attacked "
    "release inf; device updates inf; total inf"
  ) in out
  metrics = json.loads((wd / "metrics.json").read_text())
  assert metrics["dataset"] == "csv" and 0.0 <= metrics["test_auc"] <= 1.0
  with flagsaver.flagsaver(workdir=str(wd)):
    attack_bin.main([])
  rec = json.loads((wd / "attack.json").read_text())
  assert set(rec["features"]) == {"personal_status", "housing"}
  # No DP: EXACT recovers every attacked user up to reported ties.
  for r in list(rec["features"].values()) + [rec["label"]]:
    assert r["accuracy"] >= 1.0 - rec["ties"] / rec["num_examples"], r
  study = reproduce_bin.csv_study("quick", str(path), str(schema))
  assert (study.train.dataset, study.train.data_path, study.recipes) == (
    "csv",
    str(path),
    ("tuned",),
  )
  with flagsaver.flagsaver(workdir=str(tmp_path / "r"), preset="tiny", datasets=["csv"]):
    with pytest.raises(common.UsageError, match="--datasets=csv needs your table and its roles"):
      reproduce_bin.main([])


def test_every_release_recorded_and_attacked_through_the_binaries(tmp_path):
  """train --releases=all writes one chunk per epoch (in the manifest); attack --users=train
  --releases=all combines them per user, on the users --releases=last_epoch attacks (FSL: the
  first local step of each round only); test users refuse it. (FSL covers SL's path plus the
  local-step filter; one protocol keeps CI's time.)"""
  workdir, protocol = tmp_path / "all", "fsl"
  noise = dict(dp_clip="0.05", dp_noise_multiplier=1.0, protocol=protocol)
  with flagsaver.flagsaver(workdir=str(workdir), releases="all", **noise, **TINY):
    train_bin.main([])
  chunks = sorted(p.name for p in (workdir / "releases").iterdir())
  assert chunks == [
    "epoch_0001.npz",
    "epoch_0001_params.msgpack",
    "epoch_0002.npz",
    "epoch_0002_params.msgpack",
  ]
  manifest = json.loads((workdir / "run.json").read_text())
  assert "releases/epoch_0002.npz" in manifest["artifacts"]
  assert json.loads((workdir / "config.json").read_text())["releases"] == "all"
  for releases in ("last_epoch", "all"):
    with flagsaver.flagsaver(
      workdir=str(workdir), users="train", releases=releases, num_examples=40
    ):
      attack_bin.main([])
  last = json.loads((workdir / "attack_exact_auto_auto_train.json").read_text())
  every = json.loads((workdir / "attack_exact_auto_auto_train_all.json").read_text())
  # The users of the first 40 rows of the last epoch (each FSL local step is a row of its own).
  with np.load(workdir / "transcript.npz") as z:
    users = np.unique(z["example_index"][:40])
  assert every["num_examples"] == len(users) and last["num_examples"] == 40
  assert every["local_steps_attacked"] == [0]
  assert every["releases_combined"]["per_user"] == 2.0  # one (first-step) release per epoch
  assert "partial likelihood" in every["releases_combined"]["likelihood"]
  assert (every["variant"], every["prior"]) == ("bayes", "informed")
  # Two releases at sigma = 1 carry more than one: the label gains (a small tolerance for 40
  # users).
  assert every["label"]["accuracy"] >= last["label"]["accuracy"] - 0.1
  with flagsaver.flagsaver(workdir=str(workdir), users="test", releases="all"):
    with pytest.raises(ValueError, match="--users=train --attack=exact"):
      attack_bin.main([])
  # The same FSL workdir through --attack=fsl_tracking: whole rounds from the recorded fields.
  with flagsaver.flagsaver(
    workdir=str(workdir), users="train", attack="fsl_tracking", num_examples=40
  ):
    attack_bin.main([])
  tracked = json.loads((workdir / "attack_fsl_tracking_auto_train.json").read_text())
  assert tracked["num_examples"] >= 40 and tracked["devices"]["count"] >= 1
  for key in ("first_local_step", "stale_model", "tracked_later_steps", "fsl_tracking"):
    assert 0.0 <= tracked[key]["label"] <= 1.0
  assert tracked["stale_model"]["num_releases"] == tracked["num_examples"]  # 2 local steps
  assert tracked["device_update_match"]["num_examples"] == tracked["num_examples"]
  assert tracked["devices"]["update_coords"] > 0
  with flagsaver.flagsaver(workdir=str(workdir), users="test", attack="fsl_tracking"):
    with pytest.raises(ValueError, match="--users=train --releases=last_epoch"):
      attack_bin.main([])


def test_releases_all_needs_a_workdir_that_recorded_them(trained):
  with flagsaver.flagsaver(workdir=str(trained), users="train", releases="all", num_examples=10):
    with pytest.raises(Exception, match="--releases=all --overwrite"):
      attack_bin.main([])
  with flagsaver.flagsaver(
    workdir=str(trained), users="train", attack="fsl_tracking", num_examples=10
  ):
    with pytest.raises(ValueError, match="this workdir trained with SL"):
      attack_bin.main([])
