"""The paper's study end to end: train, attack, sweep DP, and write REPORT.md + results.json.

Layout of the output directory::

  DIR/<dataset>/<protocol>_<recipe>/points/<point>/seed<k>/   train + attack workdirs
  DIR/<dataset>/study.json                                     the dataset's finished results
  DIR/results.json  DIR/REPORT.md  DIR/<dataset>_*.png

Every piece resumes: training per epoch, attacks per block of users, the sweep
per point, the study per dataset. Rerunning the same command after a kill
continues where it stopped and writes the same report.
"""

import dataclasses
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import audit_study
from experiments import common
from experiments import defense_studying
from experiments import pipeline
from experiments import records
from experiments import sweeping
from experiments import training_users
from experiments.configs import base as configs_base
from splitjax import results as sj_results
from splitjax.attacks import update_match

PAPER_SIGMA = 0.01
NEAR_PRIOR = 0.05  # "near the prior": attack accuracy at most this much above it


def _group_dir(workdir, dataset, protocol, recipe) -> pathlib.Path:
  return pathlib.Path(workdir) / dataset / f"{protocol}_{recipe}"


def run_study(
  study: configs_base.StudyConfig,
  workdir,
  *,
  overwrite: bool = False,
  progress=common.progress,
  kill_switch=None,
) -> dict:
  """Runs (or resumes) one dataset's study; returns its results dict (also study.json).

  A finished study.json of the same study is reused; one of another study (or, with
  ``overwrite``, one without a fingerprint, written by splitjax < 0.2) is recomputed, and with
  ``overwrite`` its point runs whose config changed are replaced.
  """
  ds = study.train.dataset
  out = pathlib.Path(workdir) / ds / "study.json"
  study_key = sj_results.fingerprint(
    dict(configs_base.stored_study_dict(study), train=configs_base.stored_train_dict(study.train))
  )
  if out.exists():
    cached = sj_results.read_json(out)
    if cached.get("study_fingerprint", None if overwrite else study_key) == study_key:
      return decode(cached)
  t0 = time.time()
  res = {"dataset": ds, "table1": {}, "auc": {}, "sweeps": {}}
  # Table 1: no DP, every protocol and recipe; attacks on the tuned recipe.
  for proto in study.protocols:
    for recipe in study.recipes:
      cfg = dataclasses.replace(study.train, protocol=proto, recipe=recipe)
      variants = ("clip_aware",) if recipe == "tuned" else ()
      if progress:
        progress(f"[reproduce] {ds}: {proto.upper()} {recipe} recipe, no DP")
      row = sweeping.run_point(
        cfg,
        sweeping.Point("none"),
        _group_dir(workdir, ds, proto, recipe),
        seeds=study.seeds,
        variants=variants,
        num_examples=study.attack_examples,
        overwrite=overwrite,
        progress=None,
        kill_switch=kill_switch,
      )
      res["auc"][f"{proto}_{recipe}"] = row
      if variants:
        res["table1"][proto] = row
  # Tables 2 and 3: cut-layer DP and label DP sweeps.
  points = sweeping.default_points(
    study.sigmas, study.target_epsilons, study.label_epsilons, frozen=study.frozen
  )
  for proto in study.sweep_protocols:
    cfg = dataclasses.replace(study.train, protocol=proto, recipe="tuned")
    rows = []
    for i, point in enumerate(points):
      if progress:
        progress(
          f"[reproduce] {ds}: {proto.upper()} sweep point {i + 1}/{len(points)} ({point.name})"
        )
      rows.append(
        sweeping.run_point(
          cfg,
          point,
          _group_dir(workdir, ds, proto, "tuned"),
          seeds=study.seeds,
          variants=study.variants,
          num_examples=study.attack_examples,
          overwrite=overwrite,
          progress=None,
          kill_switch=kill_switch,
        )
      )
    res["sweeps"][proto] = rows
  if study.train_user_sigmas:
    if progress:
      progress(f"[reproduce] {ds}: training users (SL every release, FSL tracking)")
    res["train_users"] = training_users.run(
      study, workdir, overwrite=overwrite, kill_switch=kill_switch
    )
  if study.audit_sigmas or study.audit_label_epsilon or study.audit_pipeline:
    if progress:
      progress(f"[reproduce] {ds}: audits (cut, label, pipeline)")
    res["audit"] = audit_study.run(study, workdir, overwrite=overwrite)
  if study.defense_points:
    if progress:
      progress(f"[reproduce] {ds}: defences ({len(study.defense_points)} points)")
    res["defenses"] = defense_studying.run_points(
      study.train,
      pathlib.Path(workdir) / ds / "defenses",
      only=tuple(study.defense_points),
      num_examples=study.defense_examples,
      progress=progress,
    )
  spec = pipeline.model_of(study.train, pipeline.load_data(study.train)).spec
  res["dims"] = [spec.cut_dim, len(spec.priv_cardinalities)]
  res["cost"] = cost_summary(res)
  res["seconds"] = time.time() - t0
  res["study_fingerprint"] = study_key
  sj_results.atomic_write_json(out, res)
  return decode(sj_results.read_json(out))  # the same values whether fresh or resumed


def decode(obj):
  """JSON's "inf"/"-inf"/"nan" strings back to floats, recursively."""
  if isinstance(obj, dict):
    return {k: decode(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [decode(v) for v in obj]
  if obj in ("inf", "-inf", "nan"):
    return float(obj)
  return obj


# ---------------------------------------------------------------- cost / roofline


def analytic_flops_per_candidate(d: int, hidden: tuple[int, ...], num_features: int) -> int:
  """FLOPs of one candidate's logit and dz/dh in the DeepFM head (candidate-dependent part).

  Forward: first-layer table gathers (P x H0 adds), each later dense layer
  (2 x in x out), the output (2 x H_last), the FM over fields (~ 3 x fields x 8).
  Backward: the same dense layers transposed, plus ``W_h^T delta`` (2 x d x H0).
  ``W_h h`` is shared by all candidates of a user and not counted.
  """
  h = list(hidden)
  dense = sum(2 * a * b for a, b in zip(h[:-1], h[1:], strict=False)) + 2 * h[-1]
  fields = d // 8 + num_features
  return int(num_features * h[0] + 2 * dense + 2 * d * h[0] + 6 * fields * 8 + 4 * h[0])


_MATMUL = {}


def matmul_flops_per_second(n: int = 1024, repeats: int = 5) -> float:
  """Measured dense float32 matmul FLOP/s of the default device (median of ``repeats``)."""
  if n in _MATMUL:
    return _MATMUL[n]
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  _MATMUL[n] = 2 * n**3 / float(np.median(times))
  return _MATMUL[n]


def cost_summary(res) -> dict:
  """Per-run timings and the measured matmul throughput (Table 4)."""
  cost = {}
  peak = matmul_flops_per_second()
  for key, row in res["auc"].items():
    cost[key] = {"seconds_per_epoch": row["seconds_per_epoch"], "epochs": row["epochs"]}
    if row.get("attacks"):
      cost[key].update(
        {
          "attack_seconds": row["attack_seconds"],
          "attack_examples": row["attack_examples"],
          "candidates_per_second": row["candidates_per_second"],
        }
      )
  cost["matmul_flops_per_second"] = peak
  return cost


# ---------------------------------------------------------------- report


def _acc(a) -> str:
  return f"{a['accuracy']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}]"


def _eps(x) -> str:
  """An epsilon with 4 significant digits ("∞" when infinite)."""
  if x is None:
    return "–"
  x = float(x)
  return "∞" if math.isinf(x) else f"{x:.4g}"


def _num(x, nd=3) -> str:
  if x is None:
    return "–"
  if isinstance(x, str):
    return "∞" if x == "inf" else x
  if isinstance(x, float) and math.isinf(x):
    return "∞"
  if abs(x) >= 1e4:
    return f"{x:.3g}"
  return f"{x:.{nd}f}"


def _strongest(attacks: dict) -> dict:
  """The informed attack's secrets when it ran, else the clip-aware attack's."""
  return attacks.get("informed") or attacks["clip_aware"]


def table1(res) -> list[str]:
  lines = [
    "| protocol | secret | EXACT accuracy [95% CI] | macro F1 | k-NN (server features) | "
    "k-NN (h) | majority prior | ties |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for proto, row in res["table1"].items():
    for secret, a in row["attacks"]["clip_aware"].items():
      lines.append(
        f"| {proto.upper()} | {secret} | {_acc(a)} | {a['macro_f1']:.3f} | "
        f"{a['knn_accuracy']:.3f} | {a['knn_h_accuracy']:.3f} | "
        f"{a['prior_accuracy']:.3f} | {row['ties']} |"
      )
  return lines


def table_auc(res) -> list[str]:
  lines = [
    "| protocol | recipe | test AUC (mean ± sd over seeds) | seeds | epochs |",
    "|---|---|---|---|---|",
  ]
  for key, row in res["auc"].items():
    proto, recipe = key.split("_", 1)
    lines.append(
      f"| {proto.upper()} | {recipe} | "
      f"{sweeping.auc_cell(row['auc_mean'], row['auc_sd'], len(row['seeds']))} | "
      f"{len(row['seeds'])} | {row['epochs']} |"
    )
  return lines


def table2(rows, no_dp_auc) -> list[str]:
  rows = [r for r in rows if r["kind"] in ("none", "sigma", "target_epsilon")]
  secrets = sweeping._secrets(rows)  # pylint: disable=protected-access
  head = ["sigma", "C", "epsilon (train)", "attack epsilon", "mu (attack)", "AUC", "ΔAUC"]
  head += [f"{s}: informed / clip-aware / Bayes (marginal) / paper; bound (kind)" for s in secrets]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    sigma = "none (no DP)" if r["kind"] == "none" else _num(r["noise_multiplier"])
    if r["kind"] == "sigma" and r["value"] == PAPER_SIGMA:
      sigma += " (paper)"
    if r["kind"] == "target_epsilon":
      sigma += f" (target ε={r['value']:g})"
    nm = float(r["noise_multiplier"])
    mu1 = _num(2.0 / nm if nm else math.inf) if r["kind"] != "none" else "∞"
    cells = [
      sigma,
      _num(r["l2_clip_norm"]),
      _eps(r["epsilon"]),
      _eps(r["attack_epsilon"]),
      mu1,
      sweeping.row_auc_cell(r),
      f"{r['auc_mean'] - no_dp_auc:+.4f}",
    ]
    for s in secrets:
      if not r["attacks"]:
        cells.append("no signal: prior")
        continue
      parts = []
      for v in ("informed", "clip_aware", "bayes", "paper"):
        a = r["attacks"].get(v, {}).get(s)
        parts.append(f"{a['accuracy']:.3f}" if a else "–")
      ref = r["attacks"]["clip_aware"][s]
      cells.append(" / ".join(parts) + "; " + sweeping._bound_cell(ref))  # pylint: disable=protected-access
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def table3(rows, no_dp_auc) -> list[str]:
  rows = [r for r in rows if r["kind"] == "label_dp"]
  if not rows:
    return ["(no label-DP points in this preset)"]
  secrets = sweeping._secrets(rows)  # pylint: disable=protected-access
  head = (
    ["label ε", "AUC", "ΔAUC"]
    + [f"{s} (informed) [CI]" for s in secrets]
    + ["label: prior only / gain [CI]", "label bound (randomized response, per user)"]
  )
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [f"{r['value']:g}", sweeping.row_auc_cell(r), f"{r['auc_mean'] - no_dp_auc:+.4f}"]
    best = _strongest(r["attacks"])
    for s in secrets:
      cells.append(_acc(best[s]))
    g = best["label"]["gain"]
    cells.append(
      f"{best['label']['prior_only_accuracy']:.3f} / {g['difference']:+.3f} "
      f"[{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]"
    )
    cells.append(f"{best['label'].get('bound_label_dp', float('nan')):.3f}")
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def table4(res, study, spec_dims) -> list[str]:
  d, num_features = spec_dims
  flops = analytic_flops_per_candidate(d, tuple(study.train.hidden), num_features)
  peak = res["cost"]["matmul_flops_per_second"]
  lines = [
    "| run | s/epoch | attack s | users | candidate gradients/s | roofline fraction |",
    "|---|---|---|---|---|---|",
  ]
  for key, c in res["cost"].items():
    if not isinstance(c, dict):
      continue
    if "candidates_per_second" in c:
      grads = c["candidates_per_second"] / 2  # one gradient serves both labels
      lines.append(
        f"| {key} | {c['seconds_per_epoch']:.2f} | {c['attack_seconds']:.2f} | "
        f"{c['attack_examples']} | {grads:.3g} | {grads * flops / peak:.1%} |"
      )
    else:
      lines.append(f"| {key} | {c['seconds_per_epoch']:.2f} | – | – | – | – |")
  lines.append("")
  lines.append(
    f"Analytic FLOPs per candidate gradient: {flops:,}; measured float32 matmul "
    f"throughput: {peak / 1e9:.1f} GFLOP/s. Timings vary from run to run."
  )
  return lines


def _cell(x) -> str:
  return "–" if x is None else f"{x:.3f}"


def table_train_users(rows: list[dict]) -> list[str]:
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
        _acc(last),
        _acc(every),
        sweeping._bound_cell(every),  # pylint: disable=protected-access
      ]
      for key in training_users.TRACKING_KEYS:
        cells.append(_cell(fsl.get(key, {}).get(s)))
      out.append("| " + " | ".join(cells) + " |")
    dev = fsl["devices"]
    right = dev["entirely_right"]
    out += [
      "",
      f"FSL devices: {dev['count']}; decoded entirely right at step 0 / by tracking / by the "
      f"match: {_cell(right.get('first_local_step'))} / {_cell(right.get('fsl_tracking'))} / "
      f"{_cell(right.get('device_update_match'))}; update matched exactly (within "
      f"{update_match.EXACT_ULPS:g} float32 ulps, at {dev.get('update_coords', 0)} coordinates): "
      f"{_cell(dev.get('exact_update_match'))}.",
    ]
  return out


def claims(results: dict) -> list[str]:
  """The paper's claims, each judged from this run's numbers."""
  lines = []
  a_ok, b_ok, c_notes, d_notes, a_notes, b_notes = True, True, [], [], [], []
  c_verdicts, d_verdicts = [], []
  for ds, res in results["datasets"].items():
    t1 = res["table1"].get("sl") or next(iter(res["table1"].values()))
    acc = {s: a["accuracy"] for s, a in t1["attacks"]["clip_aware"].items()}
    best_feature = max((s for s in acc if s != "label"), key=lambda s: acc[s])
    a_here = acc["label"] >= 0.99 and acc[best_feature] >= 0.99
    a_ok &= a_here
    a_notes.append(
      f"{ds}: label {acc['label']:.3f}, best feature {best_feature} "
      f"{acc[best_feature]:.3f}, worst "
      f"{min(acc.values()):.3f}"
    )
    beats = {
      s: a["accuracy"] - max(a["knn_accuracy"], a["knn_h_accuracy"])
      for s, a in t1["attacks"]["clip_aware"].items()
    }
    b_here = all(v > 0 for v in beats.values())
    b_ok &= b_here
    b_notes.append(
      f"{ds}: smallest margin over k-NN {min(beats.values()):+.3f} ({min(beats, key=beats.get)})"
    )
    for proto, rows in res["sweeps"].items():
      by = {r["point"]: r for r in rows}
      none = by.get("no_dp")
      clip_only, paper, frozen = (
        by.get("sigma_0"),
        by.get(f"sigma_{PAPER_SIGMA:g}"),
        by.get("sigma_inf"),
      )
      if paper and none:
        pa = paper["attacks"]
        near = {
          s: pa["clip_aware"][s]["accuracy"] - pa["clip_aware"][s]["prior_accuracy"]
          for s in pa["clip_aware"]
        }
        c_verdicts.append(max(near.values()) <= NEAR_PRIOR)
        c_notes.append(
          f"{ds} {proto.upper()}: at the paper's sigma = {PAPER_SIGMA} (training ε "
          f"{_eps(paper['epsilon'])}, attack ε {_eps(paper['attack_epsilon'])}) the clip-aware "
          f"attack is above the prior by "
          + ", ".join(f"{s} {v:+.3f}" for s, v in near.items())
          + "; the paper's clip-unaware variant by "
          + ", ".join(
            f"{s} {pa['paper'][s]['accuracy'] - pa['paper'][s]['prior_accuracy']:+.3f}"
            for s in pa["paper"]
          )
          + f"; AUC {paper['auc_mean'] - none['auc_mean']:+.4f} vs no DP"
        )
      if clip_only and none:
        ca = clip_only["attacks"]
        c_notes.append(
          f"{ds} {proto.upper()}: clipping alone (sigma = 0): clip-aware "
          + ", ".join(f"{s} {ca['clip_aware'][s]['accuracy']:.3f}" for s in ca["clip_aware"])
          + "; paper's variant "
          + ", ".join(f"{s} {ca['paper'][s]['accuracy']:.3f}" for s in ca["paper"])
        )
      if frozen and none:
        c_notes.append(
          f"{ds} {proto.upper()}: sigma = ∞ (server frozen at initialisation) "
          f"AUC {frozen['auc_mean']:.4f} vs {none['auc_mean']:.4f} without DP"
        )
      for r in rows:
        if r["kind"] == "label_dp" and r["attacks"]:
          ca = _strongest(r["attacks"])
          feats = [s for s in ca if s != "label"]
          label_ok = (
            ca["label"]["accuracy"]
            <= max(ca["label"].get("bound_label_dp", 1.0), ca["label"]["prior_accuracy"])
            + NEAR_PRIOR
          )
          d_verdicts.append(label_ok and min(ca[s]["accuracy"] for s in feats) >= 0.9)
          d_notes.append(
            f"{ds} {proto.upper()} label ε = {r['value']:g}: label {ca['label']['accuracy']:.3f}"
            f" (bound {ca['label'].get('bound_label_dp', float('nan')):.3f}, prior "
            f"{ca['label']['prior_accuracy']:.3f}); features "
            + ", ".join(f"{s} {ca[s]['accuracy']:.3f}" for s in feats)
          )
  lines.append(
    f"**(a) Without DP, gradients give near-perfect reconstruction of some private "
    f"features and of the label** — {'supported' if a_ok else 'NOT supported'}: "
    + "; ".join(a_notes)
    + "."
  )
  lines.append("")
  lines.append(
    f"**(b) Gradients beat the no-gradient attacker on every dataset** — "
    f"{'supported' if b_ok else 'NOT supported'}: " + "; ".join(b_notes) + "."
  )
  lines.append("")
  if c_verdicts:
    c_ok = all(c_verdicts)
    verdict = (
      "supported"
      if c_ok
      else "NOT supported against the clip-aware attack "
      f"(it stays more than {NEAR_PRIOR:.2f} above the prior at the paper's setting on "
      f"{sum(not v for v in c_verdicts)} of {len(c_verdicts)} runs)"
    )
  else:
    verdict = "not tested (the preset has no sigma = 0.01 point)"
  lines.append(
    "**(c) A small amount of cut-layer DP brings attacks near the prior with little AUC "
    f"loss** — {verdict}: " + "; ".join(c_notes) + ". "
    "The clip-unaware attack of the paper falls mostly because of clipping (compare "
    "its sigma = 0 row with the clip-aware attack, which clipping alone does not "
    "stop), not because of the noise. The epsilon of the paper's setting (Table 2) is "
    "far too large to be a meaningful formal guarantee. This topology loses little "
    "AUC at any noise: the sigma = ∞ row freezes the server and keeps most of the "
    "AUC, because the device's head sees the private features and the label."
  )
  lines.append("")
  d_verdict = (
    "not tested (no label-DP points in this preset)"
    if not d_verdicts
    else "supported"
    if all(d_verdicts)
    else f"NOT supported on {sum(not v for v in d_verdicts)} of {len(d_verdicts)} runs"
  )
  lines.append(
    "**(d) Label DP protects the label but little of the private features** — "
    f"{d_verdict}: " + "; ".join(d_notes) + ". The label attack recovers the "
    "randomized-response label the device used, so its accuracy against the true "
    "label sits near e^ε/(1+e^ε) or the prior, while the features stay exposed."
  )
  return lines


def write_report(results: dict, studies: dict, workdir) -> str:
  workdir = pathlib.Path(workdir)
  out = [
    "# splitjax reproduction of *Evaluating Privacy Leakage in Split Learning*",
    "",
    f"Preset: `{results['preset']}`. Datasets: {', '.join(results['datasets'])}. "
    "Attacked users: test users, each replayed once through the final model "
    "(one release; attack epsilon has k = 1). Epsilons at delta = 1e-5, replace-one "
    "neighbours, sensitivity 2C, no amplification by sampling. Accuracies with "
    "Clopper-Pearson 95% intervals.",
    "",
    "## Claims checked",
    "",
  ]
  out += claims(results)
  for ds, res in results["datasets"].items():
    study = studies[ds]
    out += ["", f"## {ds}", "", "### Table 1 — leakage without DP", ""] + table1(res)
    out += ["", "Test AUC of the trained models:", ""] + table_auc(res)
    none_auc = res["auc"].get("sl_tuned", next(iter(res["auc"].values())))["auc_mean"]
    for proto, rows in res["sweeps"].items():
      out += [
        "",
        f"### Table 2 — cut-layer DP ({proto.upper()})",
        "",
        "Attack accuracy: informed (the default: Bayes with the informed prior under "
        "noise) / clip-aware / Bayes with the marginal prior / the paper's clip-unaware "
        "variant; then the bound per user averaged over the attacked users and its kind "
        "(estimate: from the informed prior, not a guarantee on real data; none: the "
        "channel is unprotected). The marginal-prior bound, the prior-only accuracy and "
        "the gain over it are in results.json.",
        "",
      ]
      out += table2(rows, none_auc)
      out += ["", f"### Table 3 — label DP ({proto.upper()})", ""] + table3(rows, none_auc)
      figs = sweeping.plot(rows, workdir, f"{ds} {proto.upper()}")
      for f in figs:
        target = workdir / f"{ds}_{proto}_{f}"
        (workdir / f).replace(target)
        out += ["", f"![{ds} {proto} {f}]({target.name})"]
    if res.get("train_users"):
      out += ["", "### Training users — every release and FSL tracking", ""]
      out += table_train_users(res["train_users"])
    if res.get("audit"):
      out += ["", "### Audit — empirical lower bounds beside the accounted guarantee", ""]
      out += audit_study.table_audit(res["audit"])
      fig = audit_study.plot_mu(res["audit"]["cut"], workdir, f"{ds}_audit_mu.png")
      if fig:
        out += ["", f"![{ds} audit mu]({fig})"]
    if res.get("defenses"):
      d = res["defenses"]
      table = defense_studying.to_markdown(ds, d["rows"], d["num_examples"]).splitlines()
      out += ["", "### Defences — the frontier against adaptive attacks", ""] + table[2:]
      figs = defense_studying.plot(d["rows"], workdir, ds)
      for f in figs:
        target = workdir / f"{ds}_{f}"
        (workdir / f).replace(target)
        if target.suffix == ".png":
          out += ["", f"![{ds} defences]({target.name})"]
    out += ["", "### Table 4 — cost", ""] + table4(res, study, res["dims"])
  if results.get("environment"):
    out += ["", "---", "", records.environment_footer(results["environment"])]
  text = "\n".join(out) + "\n"
  sj_results.atomic_write_text(workdir / "REPORT.md", text)
  return text
