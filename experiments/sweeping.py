"""The privacy / utility / leakage sweep: train and attack over cut-layer DP and label DP points.

Each point is a TrainConfig derived from the base config; its models live in
``DIR/points/<point>/seed<k>/`` (so a killed sweep resumes point by point, and
each training run resumes epoch by epoch). The attacks (clip-aware, Bayes, and
the paper's clip-unaware variant) run on the first seed's model; the AUC is
reported as mean and sd over all seeds.
"""

import csv
import dataclasses
import io as _pyio
import math
import pathlib

import numpy as np

from experiments import attacking
from experiments import common
from experiments import pipeline
from experiments import records
from experiments import workdir as workdir_lib
from experiments.configs import base as configs_base
from splitjax import results

SIGMAS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
TARGET_EPSILONS = (1.0, 4.0, 16.0)
LABEL_EPSILONS = (0.5, 1.0, 2.0, 4.0)
# Sweep attack name -> (variant, prior) of experiments.attack. "informed" is the default attack
# (Bayes with the informed prior under noise; nearest clipped candidate, informed label under
# label DP); "bayes" is Bayes with the marginal prior (splitjax 0.1's bayes).
ATTACK_SPECS = {
  "informed": ("auto", "auto"),
  "clip_aware": ("clip_aware", "uniform"),
  "bayes": ("bayes", "marginal"),
  "paper": ("paper", "uniform"),
}
ATTACK_VARIANTS = tuple(ATTACK_SPECS)
_FIELDS = (
  "accuracy",
  "ci",
  "macro_f1",
  "prior_accuracy",
  "knn_accuracy",
  "knn_h_accuracy",
  "prior_only_accuracy",
  "informed_prior_accuracy",
  "gain",
  "marks",
  "bound",
  "bound_kind",
  "bound_prior",
  "bound_marginal",
  "bound_label_dp",
  "mu_hat",
)


@dataclasses.dataclass(frozen=True)
class Point:
  """One sweep point: ``kind`` in none|sigma|target_epsilon|label_dp and its value."""

  kind: str
  value: float = 0.0

  @property
  def name(self) -> str:
    if self.kind == "none":
      return "no_dp"
    v = "inf" if math.isinf(self.value) else f"{self.value:g}"
    return f"{self.kind}_{v}"

  def apply(self, config: configs_base.TrainConfig) -> configs_base.TrainConfig:
    if self.kind == "none":
      return dataclasses.replace(config, dp_clip="none", dp_noise_multiplier=0.0)
    if self.kind == "sigma":
      return dataclasses.replace(config, dp_clip="auto", dp_noise_multiplier=self.value)
    if self.kind == "target_epsilon":
      return dataclasses.replace(config, dp_clip="auto", target_epsilon=self.value)
    if self.kind == "label_dp":
      return dataclasses.replace(config, dp_clip="none", label_dp_epsilon=self.value)
    raise ValueError(f"unknown sweep point kind {self.kind!r}")


def default_points(
  sigmas=SIGMAS, target_epsilons=TARGET_EPSILONS, label_epsilons=LABEL_EPSILONS, frozen=True
) -> list[Point]:
  points = [Point("none")] + [Point("sigma", s) for s in sigmas]
  if frozen:
    points.append(Point("sigma", math.inf))
  points += [Point("target_epsilon", e) for e in target_epsilons]
  points += [Point("label_dp", e) for e in label_epsilons]
  return points


def run_point(
  base_config,
  point: Point,
  workdir: pathlib.Path,
  *,
  seeds,
  variants,
  num_examples: int,
  overwrite: bool = False,
  progress=common.progress,
  kill_switch=None,
) -> dict:
  """Trains every seed and attacks the first seed's model; returns one summary row.

  Finished identical runs are kept and unfinished ones resumed; with ``overwrite`` a run of
  another config (and an attack record of another attack config) is replaced.
  """
  aucs, metrics = [], None
  for seed in seeds:
    # Sweep points attack test users: the per-step device parameters are not written.
    cfg = dataclasses.replace(point.apply(base_config), seed=seed, record_device_params=False)
    wd = workdir / "points" / point.name / f"seed{seed}"
    m = pipeline.train_workdir(
      cfg,
      wd,
      resume=True,
      overwrite=overwrite,
      keep_identical=True,
      progress=None,
      kill_switch=kill_switch,
    )
    aucs.append(m["test_auc"])
    metrics = metrics or m
  row = {
    "point": point.name,
    "kind": point.kind,
    "value": point.value,
    "auc_mean": float(np.mean(aucs)),
    "auc_sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
    "aucs": aucs,
    "seeds": list(seeds),
  }
  row["seconds_per_epoch"] = metrics["seconds_per_epoch"]
  row["epochs"] = metrics["epochs"]
  for key in (
    "noise_multiplier",
    "l2_clip_norm",
    "releases",
    "mu",
    "epsilon",
    "attack_epsilon",
    "delta",
    "label_epsilon",
    "total_epsilon",
  ):
    row[key] = metrics.get(key)
  wd0 = workdir / "points" / point.name / f"seed{seeds[0]}"
  row["attacks"] = {}
  if point.kind == "sigma" and math.isinf(point.value):
    row["attacks"] = None  # pure noise: the Bayes-optimal attacker falls back to the prior
  else:
    for variant in variants:
      scoring, prior = ATTACK_SPECS[variant]
      acfg = configs_base.AttackConfig(variant=scoring, prior=prior, num_examples=num_examples)
      rec = attacking.attack_workdir(
        wd0, acfg, resume=True, overwrite=overwrite, progress=None, kill_switch=kill_switch
      )
      row["attacks"][variant] = {
        name: {k: r.get(k) for k in _FIELDS}
        for name, r in list(rec["features"].items()) + [("label", rec["label"])]
      }
      row.setdefault("attack_resolved", {})[variant] = [rec["variant"], rec["prior"]]
      row["attack_seconds"] = rec["attack_seconds"]
      row["attack_examples"] = rec["num_examples"]
      row["candidates_per_second"] = rec["candidates_per_second"]
      row["ties"] = rec["ties"]
  if progress:
    progress(
      f"[sweep] {point.name}: AUC {row['auc_mean']:.4f} +- {row['auc_sd']:.4f}, "
      f"epsilon {row['epsilon']}"
    )
  return row


def run_sweep(
  base_config,
  workdir,
  *,
  points,
  seeds=(0, 1, 2),
  variants=ATTACK_VARIANTS,
  num_examples=0,
  overwrite: bool = False,
  progress=common.progress,
  kill_switch=None,
) -> list[dict]:
  """Runs (or resumes) every point; writes sweep.json, sweep.csv and sweep.md into workdir.

  ``sweep_config.json`` records the sweep (base config, points, seeds, attacks): a sweep of
  another point set is refused before any work unless ``overwrite``, which replaces the root
  files at the end and every point run whose config changed (identical ones are kept).
  """
  with workdir_lib.own(workdir, "sweep") as owned:
    return _run_sweep(
      base_config,
      owned,
      points=points,
      seeds=seeds,
      variants=variants,
      num_examples=num_examples,
      overwrite=overwrite,
      progress=progress,
      kill_switch=kill_switch,
    )


def _run_sweep(
  base_config, workdir, *, points, seeds, variants, num_examples, overwrite, progress, kill_switch
) -> list[dict]:
  sweep_cfg = {
    "base": dataclasses.asdict(base_config),
    "points": [p.name for p in points],
    "seeds": list(seeds),
    "variants": list(variants),
    "num_examples": num_examples,
  }
  if (
    not overwrite
    and not (workdir / "sweep_config.json").exists()
    and (workdir / "sweep.json").exists()
  ):  # written by splitjax < 0.2: compare its points
    old = results.read_json(workdir / "sweep.json")
    old_points = [row.get("point") for row in (old["rows"] if isinstance(old, dict) else old)]
    if old_points != sweep_cfg["points"]:
      raise results.WorkdirError(
        f"workdir {workdir} holds a sweep of other points ({old_points}): "
        "use --overwrite or another --workdir"
      )
  results.check_config_compatible(
    workdir, sweep_cfg, overwrite=overwrite, filename="sweep_config.json"
  )
  rows = []
  for i, point in enumerate(points):
    if progress:
      progress(f"[sweep] point {i + 1}/{len(points)}: {point.name}")
    rows.append(
      run_point(
        base_config,
        point,
        workdir,
        seeds=tuple(seeds),
        variants=variants,
        num_examples=num_examples,
        overwrite=overwrite,
        progress=progress,
        kill_switch=kill_switch,
      )
    )
  # One object: the rows (each point's summary), and where they were computed. An identical
  # rerun keeps the file (and its environment) as it was.
  summary_path = workdir / "sweep.json"
  old = results.read_json(summary_path) if summary_path.exists() else None
  if not (isinstance(old, dict) and old.get("rows") == results.to_jsonable(rows)):
    results.atomic_write_json(summary_path, {"rows": rows, "environment": records.environment()})
  results.atomic_write_text(workdir / "sweep.csv", to_csv(rows))
  results.atomic_write_text(workdir / "sweep.md", to_markdown(rows))
  return rows


def _secrets(rows):
  for r in rows:
    if r["attacks"]:
      first = next(iter(r["attacks"].values()))
      return list(first)
  return []


def _fmt(x, nd=4):
  if x is None:
    return ""
  if isinstance(x, str):
    return x
  if isinstance(x, float) and math.isinf(x):
    return "inf"
  return f"{x:.{nd}g}" if abs(x) >= 1e4 else f"{x:.{nd}f}"


def to_csv(rows) -> str:
  """One CSV line per (point, variant, secret)."""
  buf = _pyio.StringIO()
  w = csv.writer(buf)
  w.writerow(
    [
      "point",
      "kind",
      "value",
      "noise_multiplier",
      "l2_clip_norm",
      "epsilon",
      "attack_epsilon",
      "label_epsilon",
      "mu",
      "auc_mean",
      "auc_sd",
      "variant",
      "secret",
      "accuracy",
      "ci_lo",
      "ci_hi",
      "prior_only_accuracy",
      "gain",
      "gain_lo",
      "gain_hi",
      "prior_accuracy",
      "knn_accuracy",
      "bound",
      "bound_kind",
      "bound_marginal",
      "mu_hat",
    ]
  )
  for r in rows:
    head = [
      r["point"],
      r["kind"],
      r["value"],
      r["noise_multiplier"],
      r["l2_clip_norm"],
      r["epsilon"],
      r["attack_epsilon"],
      r.get("label_epsilon"),
      r["mu"],
      r["auc_mean"],
      r["auc_sd"],
    ]
    if not r["attacks"]:
      w.writerow(head + ["none"] + [""] * 14)
      continue
    for variant, secrets in r["attacks"].items():
      for secret, s in secrets.items():
        w.writerow(
          head
          + [
            variant,
            secret,
            s["accuracy"],
            s["ci"][0],
            s["ci"][1],
            s["prior_only_accuracy"],
            s["gain"]["difference"],
            s["gain"]["ci"][0],
            s["gain"]["ci"][1],
            s["prior_accuracy"],
            s["knn_accuracy"],
            s["bound"],
            s["bound_kind"],
            s["bound_marginal"],
            s.get("mu_hat"),
          ]
        )
  return buf.getvalue()


def to_markdown(rows, variants=ATTACK_VARIANTS) -> str:
  """Table: per point the epsilons, AUC and attack accuracy per secret for the named variants."""
  secrets = _secrets(rows)
  head = ["point", "sigma", "C", "epsilon (train)", "attack epsilon", "mu (train)", "AUC"]
  for v in variants:
    head += [f"{s} ({v})" for s in secrets]
  head += [f"{s} bound (kind)" for s in secrets]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [
      r["point"],
      _fmt(r["noise_multiplier"]),
      _fmt(r["l2_clip_norm"], 3),
      common.format_number(r["epsilon"]),
      common.format_number(r["attack_epsilon"]),
      _fmt(r["mu"], 3),
      row_auc_cell(r),
    ]
    for v in variants:
      for s in secrets:
        a = (r["attacks"] or {}).get(v, {}).get(s)
        cells.append(f"{a['accuracy']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}]" if a else "prior")
    for s in secrets:
      a = next(iter((r["attacks"] or {"": {}}).values()), {}).get(s)
      cells.append(_bound_cell(a))
    lines.append("| " + " | ".join(cells) + " |")
  lines += [
    "",
    "Epsilons at the report's delta: train = the cut layer over training (k releases "
    "per example), attack = one replayed test release; mu (train) is the composed GDP mu "
    "of training. AUC: mean ± sd over seeds (n = 1: one seed, no sd). Bounds: the most "
    "any attacker with the stated prior can reach (guarantee: true prior; estimate: "
    "informed prior; none: the channel is unprotected).",
  ]
  return "\n".join(lines) + "\n"


def row_auc_cell(row) -> str:
  """`auc_cell` of a sweep row (its seeds counted from `aucs`)."""
  return auc_cell(row["auc_mean"], row["auc_sd"], len(row.get("aucs") or row.get("seeds") or []))


def auc_cell(mean: float, sd: float, n: int) -> str:
  """The cell "mean ± sd (n=k)" over k seeds; one seed has no sd: "mean (n=1)"."""
  if n <= 1:
    return f"{mean:.4f} (n=1)"
  return f"{mean:.4f} ± {sd:.4f} (n={n})"


def _bound_cell(a) -> str:
  if not a:
    return ""
  if a.get("bound") is None:
    return "none (unprotected)"
  return f"{a['bound']:.3f} ({a['bound_kind'].split(':')[0]})"


def plot(rows, out_dir, title: str) -> list[str]:
  """PNG figures: attack accuracy vs epsilon (prior and bounds drawn) and AUC vs epsilon."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return []
  out_dir = pathlib.Path(out_dir)
  files = []
  cut = [
    r
    for r in rows
    if r["kind"] in ("sigma", "target_epsilon") and r["attacks"] and _finite(r["epsilon"])
  ]
  cut.sort(key=lambda r: float(r["epsilon"]))
  secrets = _secrets(rows)
  if cut and secrets:
    fig, axes = plt.subplots(1, len(secrets), figsize=(3.2 * len(secrets), 3.2), squeeze=False)
    eps = [float(r["attack_epsilon"]) for r in cut]
    for ax, s in zip(axes[0], secrets, strict=False):
      for v, style in (("informed", "D-"), ("clip_aware", "o-"), ("bayes", "s--"), ("paper", "x:")):
        acc = [r["attacks"].get(v, {}).get(s, {}).get("accuracy") for r in cut]
        if all(a is not None for a in acc):
          ax.plot(eps, acc, style, label=v)
      prior = cut[0]["attacks"]["clip_aware"][s]["prior_accuracy"]
      ax.axhline(prior, color="gray", lw=1, label="prior")
      marg = [r["attacks"]["clip_aware"][s]["bound_marginal"] for r in cut]
      if all(b is not None for b in marg):
        ax.plot(eps, marg, "k-", lw=0.8, label="bound (marginal prior)")
      bnd = [r["attacks"]["clip_aware"][s]["bound"] for r in cut]
      if all(b is not None for b in bnd):
        ax.plot(eps, bnd, "k--", lw=0.8, label="bound (informed est.)")
      ax.set_xscale("log")
      ax.set_title(s)
      ax.set_xlabel("attack epsilon (delta 1e-5)")
      ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("attack accuracy")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    path = out_dir / "attack_vs_epsilon.png"
    _save(fig, path)
    files.append(path.name)
    plt.close(fig)
  if cut:
    fig, ax = plt.subplots(figsize=(4, 3.2))
    ax.errorbar(
      [float(r["epsilon"]) for r in cut],
      [r["auc_mean"] for r in cut],
      yerr=[r["auc_sd"] for r in cut],
      fmt="o-",
      label="cut-layer DP",
    )
    for r in rows:
      if r["kind"] == "none":
        ax.axhline(r["auc_mean"], color="green", lw=1, label="no DP")
      if r["kind"] == "sigma" and math.isinf(r["value"]):
        ax.axhline(r["auc_mean"], color="red", lw=1, label="sigma = inf (server frozen)")
    ax.set_xscale("log")
    ax.set_xlabel("training epsilon (delta 1e-5)")
    ax.set_ylabel("test AUC")
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    path = out_dir / "auc_vs_epsilon.png"
    _save(fig, path)
    files.append(path.name)
    plt.close(fig)
  return files


def _finite(x) -> bool:
  try:
    return math.isfinite(float(x))
  except (TypeError, ValueError):
    return False


def _save(fig, path):
  buf = _pyio.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  results.atomic_write_bytes(path, buf.getvalue())
