"""The reproduction's audits (``StudyConfig.audit_*``): is the accounted epsilon real?

* the cut channel at each sigma of ``audit_sigmas`` (one release through the test replay, k = 2
  through the training loop; the pair of clipped candidates is 2C apart on every dataset, so one
  dataset's study carries it);
* the label channel at ``audit_label_epsilon`` (randomized response, pure epsilon-DP);
* the whole pipeline for each protocol of ``audit_pipeline``: m canaries, cut sigma calibrated to
  ``audit_cut_epsilon`` (the cut channel alone), device DP-SGD off and (``audit_device_dp``) on.

Each audit is an ``experiments.audit`` workdir under ``DIR/<dataset>/audit/<name>/``; a finished
one of the same request is reused (the pipeline audit's training resumes per epoch).
"""

import dataclasses
import pathlib

from experiments import auditing
from experiments import auditing_pipeline
from experiments.configs import base as configs_base
from splitjax import audit

# The fields of an audit record kept in study.json (the pipeline's per-test table too).
_KEEP = (
  "channel",
  "protocol",
  "noise_multiplier",
  "label_dp_epsilon",
  "releases",
  "trials",
  "mu_accounted",
  "mu_lower",
  "epsilon_accounted",
  "epsilon_accounted_note",
  "epsilon_lower",
  "epsilon_lower_pure",
  "epsilon_cut_only",
  "epsilon_device",
  "two_sided",
  "saturation",
  "consistent",
  "guesses",
  "correct",
  "reading",
  "update_matched_exactly",
  "device_dp",
  "test_auc",
)


def _kept(record: dict) -> dict:
  out = {k: record[k] for k in _KEEP if k in record}
  if "training" in record:
    out["training"] = {k: record["training"][k] for k in _KEEP if k in record["training"]}
  return out


def _name(x: float) -> str:
  return f"{x:g}".replace(".", "p")


def run(study: configs_base.StudyConfig, workdir, *, overwrite: bool = False) -> dict:
  """Runs (or reuses) the study's audits: ``{"cut": [...], "label": ..., "pipeline": [...]}``."""
  base = pathlib.Path(workdir) / study.train.dataset / "audit"
  out: dict = {"cut": [], "label": None, "pipeline": []}
  for sigma in study.audit_sigmas:
    cfg = dataclasses.replace(study.train, protocol="sl", dp_noise_multiplier=sigma, dp_clip="none")
    req = auditing.AuditRequest(
      channel="cut", trials=study.audit_trials, training_trials=study.audit_training_trials
    )
    rec = auditing.run_audit(cfg, base / f"cut_sigma_{_name(sigma)}", req, overwrite=overwrite)
    out["cut"].append(_kept(rec))
  if study.audit_label_epsilon:
    cfg = dataclasses.replace(
      study.train, protocol="sl", label_dp_epsilon=study.audit_label_epsilon
    )
    req = auditing.AuditRequest(channel="label", trials=min(study.audit_trials, 200_000))
    rec = auditing.run_audit(
      cfg, base / f"label_eps_{_name(study.audit_label_epsilon)}", req, overwrite=overwrite
    )
    out["label"] = _kept(rec)
  for proto in study.audit_pipeline:
    for device_dp in study.audit_device_dp:
      cfg = dataclasses.replace(
        study.train,
        protocol=proto,
        dp_clip="auto",
        target_epsilon=study.audit_cut_epsilon,
        device_dp_clip=study.audit_device_clip if device_dp else 0.0,
        device_dp_noise_multiplier=study.audit_device_sigma if device_dp else 0.0,
      )
      # FSL holds one canary per device: a small table (bank's 4,521 rows) caps m.
      m = min(study.audit_canaries, auditing_pipeline.max_canaries(cfg))
      req = auditing.AuditRequest(channel="pipeline", trials=m)
      name = f"pipeline_{proto}_{'device_dp' if device_dp else 'no_device_dp'}"
      rec = auditing.run_audit(cfg, base / name, req, overwrite=overwrite)
      out["pipeline"].append({**_kept(rec), "device_dp": device_dp})
  return out


def _f(x, nd: int = 3) -> str:
  if x is None:
    return "∞"
  x = float(x)
  return "∞" if x == float("inf") else f"{x:.{nd}f}"


def _saturated(row: dict) -> bool:
  """The accounted mu lies beyond what the trials can show (e.g. the paper's sigma = 0.01)."""
  sat = (row.get("saturation") or audit.saturation(row["trials"])).get("mu_lower")
  return sat is not None and row.get("mu_accounted") is not None and row["mu_accounted"] > sat


def table_audit(audit: dict) -> list[str]:
  """REPORT.md's audit tables: the cut channel per sigma, the label channel, the pipeline."""
  out: list[str] = []
  if audit.get("cut"):
    out += [
      "Cut channel: the worst-case pair (a row whose two labels' clipped gradients are 2C apart),",
      "released through the test replay (k = 1) and the training loop (k = 2). mu lower bounds",
      "assume nothing about the trade-off curve; epsilon lower bounds at delta 1e-5; 20 thresholds",
      "fixed before sampling, Clopper-Pearson with Bonferroni, 95 % confidence. The two-sided",
      "check: mu estimated at the pre-registered threshold mu/2, with its interval. Cells marked",
      "saturated: the accounted mu is beyond what the trials can show (every trial separated).",
      "",
      "| sigma | path | k | trials | mu accounted | mu lower | mu at mu/2 [95% CI] "
      "| eps accounted | eps lower |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in audit["cut"]:
      for path, r in (("test replay", row), ("training loop", row.get("training") or {})):
        if not r:
          continue
        sat = _saturated(r)
        t = r.get("two_sided") or {}
        ci = t.get("mu_interval") or [None, None]
        check = f"{_f(t.get('mu_estimate'))} [{_f(ci[0])}, {_f(ci[1])}]" + (
          "" if t.get("passed", True) else " ✗"
        )
        out.append(
          f"| {row['noise_multiplier']:g} | {path} | {r['releases']} | {r['trials']:,} | "
          f"{_f(r['mu_accounted'])} | {_f(r['mu_lower'])}{' (saturated)' if sat else ''} | "
          f"{'saturated' if sat else check} | {_f(r['epsilon_accounted'])} | "
          f"{_f(r['epsilon_lower'])}{' (saturated)' if sat else ''} |"
        )
  if audit.get("label"):
    r = audit["label"]
    out += [
      "",
      "Label channel (randomized response, pure epsilon-DP): the trained label read off each of "
      f"{r['releases']} epochs' gradients, the bit tested from all of them jointly (a fresh draw "
      "per epoch would show as about k x epsilon).",
      "",
      "| label epsilon | epochs | trials | eps lower (delta 0) | eps lower (delta 1e-5) |",
      "|---|---|---|---|---|",
      f"| {r['label_dp_epsilon']:g} | {r['releases']} | {r['trials']:,} | "
      f"{_f(r['epsilon_lower_pure'])} | {_f(r['epsilon_lower'])} |",
    ]
  if audit.get("pipeline"):
    out += [
      "",
      "Whole pipeline, one training run (Steinke, Nasr, Jagielski 2023): m canaries with secret "
      "labels from the audit's own key; the auditor scores each from what the server sees "
      "(SL: the cut releases under the final phi or phi at every step; FSL: the cut releases "
      "and each device's returned update), guesses with abstention at 5 fixed numbers of "
      "guesses, Bonferroni over them and the readings. The cut sigma is calibrated to the "
      "cut-only epsilon shown; the total epsilon covers every channel.",
      "",
      "| protocol | device DP-SGD | m | best reading | guesses | correct | eps lower "
      "(saturation) | eps cut only | eps total | test AUC |",
      "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in audit["pipeline"]:
      total = _f(r.get("epsilon_accounted")) if r.get("epsilon_accounted") is not None else "∞"
      out.append(
        f"| {r['protocol'].upper()} | {'on' if r.get('device_dp') else 'off'} | {r['trials']:,} "
        f"| {r['reading']} | {r['guesses']:,} | {r['correct']:,} | {_f(r['epsilon_lower'])} "
        f"({_f(r['saturation']['epsilon_lower'])}) | {_f(r['epsilon_cut_only'])} | {total} | "
        f"{_f(r.get('test_auc'), 4)} |"
      )
  while out and not out[0]:
    out.pop(0)
  return out


def plot_mu(cut_rows: list[dict], out_dir, name: str) -> str | None:
  """Accounted vs audited mu over the sigma grid (log-log); the file name, or None."""
  rows = [r for r in cut_rows if r.get("mu_accounted")]
  if not rows:
    return None
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  rows.sort(key=lambda r: r["noise_multiplier"])
  sig = [r["noise_multiplier"] for r in rows]
  fig, ax = plt.subplots(figsize=(5.6, 3.8))
  ax.plot(sig, [r["mu_accounted"] for r in rows], "k-", label="accounted mu = 2/sigma (k = 1)")
  ax.plot(sig, [r["mu_lower"] for r in rows], "o", label="audited mu lower bound (test replay)")
  tr = [r["training"] for r in rows if r.get("training")]
  if tr:
    ax.plot(sig, [t["mu_accounted"] for t in tr], "k--", lw=0.8, label="accounted (k = 2)")
    ax.plot(sig, [t["mu_lower"] for t in tr], "s", ms=4, label="audited (training loop, k = 2)")
  sat = rows[0]["saturation"]["mu_lower"]
  ax.axhline(sat, color="gray", lw=0.8, ls=":", label=f"saturation ({rows[0]['trials']:,} trials)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("noise multiplier sigma")
  ax.set_ylabel("mu (GDP)")
  ax.legend(fontsize=7)
  ax.set_title("cut channel: accounted vs audited mu (95 % bounds)", fontsize=10)
  fig.tight_layout()
  path = pathlib.Path(out_dir) / name
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path.name
