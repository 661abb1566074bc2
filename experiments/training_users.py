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
_TRACKING_KEYS = (
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
          **{k: tracked[k] for k in _TRACKING_KEYS if k in tracked},
          "devices": tracked["devices"],
          "attack_seconds": tracked.get("attack_seconds"),
        },
      }
    )
  return rows


def _cell(x) -> str:
  return "–" if x is None else f"{x:.3f}"


def _eps(x) -> str:
  return "∞" if x in ("inf", None) or float(x) == float("inf") else f"{float(x):.4g}"


def table(rows: list[dict]) -> list[str]:
  """The report's training-user section: one table per sigma (markdown lines)."""
  out = [
    "Training users, attacked with the default attack (Bayes with the informed prior under "
    "noise), beside the informed prior alone on the same users. SL: each user's last-epoch "
    "release alone, then every release combined — a partial likelihood: exact only when the "
    "parameters at each release depend on the example only through earlier released outputs "
    "(device DP-SGD on, where it is set beside the bound over all releases); without device "
    "DP-SGD the total epsilon is infinite and its gain is set against the prior-only attacker "
    "(the bound column then says none). FSL: the "
    "releases of a round's first local step; the later steps under the round-start (stale) "
    "parameters and under the parameters recomputed from the decoded step-0 rows (tracked); "
    "`fsl_tracking` combines a device's releases of the round; `device_update_match` re-ranks "
    "its hypotheses by the distance between their simulated local update and the update the "
    "device returned.",
  ]
  for r in rows:
    sl, fsl = r["sl"], r["fsl"]
    secrets = list(sl["all_releases"])
    out += [
      "",
      f"**σ = {r['sigma']:g}** — SL: C = {sl['l2_clip_norm']:.4g}, test AUC "
      f"{sl['test_auc']:.4f}, {sl['users']} users, {sl['releases_per_user']:g} releases per "
      f"user, epsilon per example {_eps(sl['epsilon'])}, total {_eps(sl['total_epsilon'])}. "
      f"FSL: C = {fsl['l2_clip_norm']:.4g}, test AUC {fsl['test_auc']:.4f}, {fsl['users']} "
      f"users, local learning rate {fsl['local_learning_rate']:g}, {fsl['local_steps']} local "
      f"steps, total epsilon {_eps(fsl['total_epsilon'])}.",
      "",
      "| secret | SL prior only | SL last epoch [95% CI] | SL every release [95% CI] | "
      "bound, every release (kind) | "
      "FSL prior only | FSL step 0 | later, stale model | later, tracked | fsl_tracking | "
      "device_update_match |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in secrets:
      last, every = sl["last_epoch"][s], sl["all_releases"][s]
      cells = [
        s,
        _cell(every["prior_only_accuracy"]),
        f"{last['accuracy']:.3f} [{last['ci'][0]:.3f}, {last['ci'][1]:.3f}]",
        f"{every['accuracy']:.3f} [{every['ci'][0]:.3f}, {every['ci'][1]:.3f}]",
        "none (unprotected)"
        if every.get("bound") is None
        else f"{every['bound']:.3f} ({str(every['bound_kind']).split(':')[0]})",
      ]
      for key in _TRACKING_KEYS:
        cells.append(_cell(fsl.get(key, {}).get(s)))
      out.append("| " + " | ".join(cells) + " |")
    dev = fsl["devices"]
    right = dev["entirely_right"]
    out += [
      "",
      f"FSL devices: {dev['count']}; decoded entirely right at step 0 / by tracking / by the "
      f"match: {_cell(right.get('first_local_step'))} / {_cell(right.get('fsl_tracking'))} / "
      f"{_cell(right.get('device_update_match'))}; update matched exactly (within 4 float32 "
      f"ulps, at {dev.get('update_coords', 0)} coordinates): "
      f"{_cell(dev.get('exact_update_match'))}.",
    ]
  return out
