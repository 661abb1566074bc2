"""The reproduction's attacks on training users: every release, and FSL device tracking.

At each cut-layer sigma of ``StudyConfig.train_user_sigmas`` (clip ``auto``, the tuned recipe,
the study's first seed) two models are trained and their training users attacked with the
default attack (Bayes with the informed prior under noise):

* SL, trained with ``--releases=all``: each user's last-epoch release alone, and every release of
  the user combined (``--releases=all``: a *partial* likelihood, exact only when the parameters
  at each release depend on the example only through earlier released outputs, i.e. with device
  DP-SGD; without it, its gain is set against the prior-only attacker);
* FSL, with the local learning rate ``StudyConfig.tracking_learning_rate`` (a large one: where the
  round-start parameters mislead the attack on later local steps): ``fsl_tracking``, whose record
  holds the step-0 rows, the later rows under the stale model and under the tracked parameters,
  the round's releases combined, and the device-update match.

Layout: ``DIR/<dataset>/train_users/<protocol>_<point>/`` (train and attack records in one
workdir). Every piece resumes: training per epoch, EXACT per block of users, a finished record is
reused.
"""

import dataclasses
import pathlib

from experiments import attacking
from experiments import pipeline
from experiments import sweeping
from experiments.configs import base as configs_base

# The fields of an attack record's secret kept in study.json.
_FIELDS = ("accuracy", "ci", "prior_only_accuracy", "gain", "bound", "bound_kind", "mu_hat")
TRACKING_KEYS = (
  "prior_only",
  "first_local_step",
  "stale_model",
  "tracked_later_steps",
  "fsl_tracking",
  "device_update_match",
)


def _train(config, workdir: pathlib.Path, *, overwrite: bool, kill_switch) -> dict:
  return pipeline.train_workdir(
    config,
    workdir,
    resume=True,
    overwrite=overwrite,
    keep_identical=True,
    progress=None,
    kill_switch=kill_switch,
  )


def _attack(workdir, config, *, overwrite: bool, kill_switch) -> dict:
  return attacking.attack_workdir(
    workdir, config, resume=True, overwrite=overwrite, progress=None, kill_switch=kill_switch
  )


def _secrets(record: dict) -> dict:
  items = list(record["features"].items()) + [("label", record["label"])]
  return {name: {k: r.get(k) for k in _FIELDS} for name, r in items}


def _model_fields(metrics: dict) -> dict:
  keys = ("test_auc", "noise_multiplier", "l2_clip_norm", "releases", "epsilon", "total_epsilon")
  return {k: metrics.get(k) for k in keys}


def run(
  study: configs_base.StudyConfig, workdir, *, overwrite: bool = False, kill_switch=None
) -> list[dict]:
  """Trains and attacks ``study``'s training-user points; returns one row per sigma."""
  root = pathlib.Path(workdir) / study.train.dataset / "train_users"
  rows = []
  for sigma in study.train_user_sigmas:
    point = sweeping.Point("sigma", sigma)
    base = dataclasses.replace(
      point.apply(study.train),
      recipe="tuned",
      seed=study.seeds[0],
      record_device_params=True,
    )
    sl_cfg = dataclasses.replace(base, protocol="sl", releases="all")
    fsl_cfg = dataclasses.replace(base, protocol="fsl", learning_rate=study.tracking_learning_rate)
    sl_dir, fsl_dir = root / f"sl_{point.name}", root / f"fsl_{point.name}"
    sl_metrics = _train(sl_cfg, sl_dir, overwrite=overwrite, kill_switch=kill_switch)
    fsl_metrics = _train(fsl_cfg, fsl_dir, overwrite=overwrite, kill_switch=kill_switch)
    n = study.train_user_examples
    attack = dict(overwrite=overwrite, kill_switch=kill_switch)
    last = _attack(sl_dir, configs_base.AttackConfig(users="train", num_examples=n), **attack)
    every = _attack(
      sl_dir, configs_base.AttackConfig(users="train", num_examples=n, releases="all"), **attack
    )
    tracked = _attack(
      fsl_dir,
      configs_base.AttackConfig(users="train", attack="fsl_tracking", num_examples=n),
      **attack,
    )
    rows.append(
      {
        "point": point.name,
        "sigma": sigma,
        "sl": {
          **_model_fields(sl_metrics),
          "attack": [every["variant"], every["prior"]],
          "users": every["num_examples"],
          "releases_per_user": every["releases_combined"]["per_user"],
          "last_epoch": _secrets(last),
          "all_releases": _secrets(every),
          "attack_seconds": last["attack_seconds"] + every["attack_seconds"],
        },
        "fsl": {
          **_model_fields(fsl_metrics),
          "local_learning_rate": study.tracking_learning_rate,
          "local_steps": study.train.local_steps,
          "users": tracked["num_examples"],
          **{k: tracked[k] for k in TRACKING_KEYS if k in tracked},
          "devices": tracked["devices"],
          "attack_seconds": tracked.get("attack_seconds"),
        },
      }
    )
  return rows
