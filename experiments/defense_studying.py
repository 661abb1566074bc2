"""The defences' privacy-utility frontier (``experiments.defense_study``).

For one dataset, every point of `points` is trained (one seed; resumable: a finished point is
kept, an unfinished one continued) and its first ``num_examples`` test users are attacked three
ways on the same users:

- ``adaptive``: what ``experiments.attack`` runs by default, which models the point's defence
  (EXACT simulating a deterministic defence, a randomized one's likelihood, the joint attack of
  ``batch_average``; activation matching with the trained encoder under ``nopeek``);
- ``naive``: the same attack with the defence ignored (``--defense_model=naive``);
- ``designed``: the attack the label defences were designed against (``label_direction``,
  Li et al. 2021), device_top only.

Leakage is per secret the attack's accuracy minus the informed prior's on the same users
(``informed_prior_accuracy``: the k-NN prior on the server's features and h, what the server knows
without the gradient), so 0 means the gradient added nothing over what the server already had.
Utility is the test AUC minus that of the frozen point (``sigma = inf``: nothing useful crosses
the cut). In ``device_top`` the server's model then stays at initialisation, so utility is what
the server's side contributes, and as the frozen server keeps almost all the AUC, every defence
there is measured against "send nothing". In ``device_bottom`` (the device encodes, the server's
head predicts) the device then sends zero rows and the server trains and predicts on its own
features alone, so utility is what the device's private features contribute.

The verdict of each defended point, by rules fixed before the numbers (``VERDICT_RULES``).
"""

import dataclasses
import math
import pathlib

from experiments import attacking
from experiments import common
from experiments import pipeline
from experiments import workdir as workdir_lib
from experiments.configs import base as configs_base
from splitjax import results

BOTTOM_CLIP = "1.0"  # the activations' clip norm of device_bottom's DP points (auto is for g)
TOLERANCE = 0.02  # leakage at or under this (accuracy over the informed prior) counts as none

VERDICT_RULES = (
  f"Leakage of a secret = the attack's accuracy minus the informed prior's on the same users; "
  f"'none' when at most {TOLERANCE}. The secrets a defence targets: the label for max_norm, "
  "marvell, label_smoothing; the private features for nopeek; all for the wire formats, "
  "batch_average and activation_noise. Verdicts, in this order: 'resists this adaptive attack (no "
  "guarantee)' when the adaptive attack's leakage is none on every targeted secret; 'only against "
  "a naive attacker' when the naive attack's is none on every targeted secret but the adaptive's "
  "is not; 'dominated by DP at equal utility' when a DP point of the same topology (the frozen one "
  "included) has an AUC at least the defence's minus 0.002 and an adaptive leakage no larger on "
  "every secret; else 'leaks under this adaptive attack'. A DP point's leakage is bounded by its "
  "epsilon; a defence's verdict holds against this attack only."
)


@dataclasses.dataclass(frozen=True)
class Point:
  """One frontier point: a name, its topology and the train config fields it sets."""

  name: str
  topology: str
  defenses: tuple[str, ...] = ()
  dp_clip: str = "none"
  noise: float = 0.0
  targets: str = "all"  # label | features | all

  @property
  def is_dp(self) -> bool:
    """A cut-layer DP point (the frozen one included), the yardstick of the defences."""
    return not self.defenses and self.noise > 0

  def apply(self, config: configs_base.TrainConfig) -> configs_base.TrainConfig:
    return dataclasses.replace(
      config,
      topology=self.topology,
      defenses=self.defenses,
      dp_clip=self.dp_clip,
      dp_noise_multiplier=self.noise,
      target_epsilon=0.0,
      label_dp_epsilon=0.0,
      record_device_params=False,
    )


def points() -> list[Point]:
  """The default grid: device_top's label defences and wire formats, device_bottom's two."""
  top = [
    Point("none", "device_top"),
    Point("frozen", "device_top", dp_clip="auto", noise=math.inf),
    Point("sigma_1", "device_top", dp_clip="auto", noise=1.0),
    Point("max_norm", "device_top", ("max_norm",), targets="label"),
    Point("marvell_1", "device_top", ("marvell:1",), targets="label"),
    Point("marvell_4", "device_top", ("marvell:4",), targets="label"),
    Point("label_smoothing_0.1", "device_top", ("label_smoothing:0.1",), targets="label"),
    Point("label_smoothing_0.4", "device_top", ("label_smoothing:0.4",), targets="label"),
    Point("topk_0.5", "device_top", ("topk:0.5",)),
    Point("topk_0.1", "device_top", ("topk:0.1",)),
    Point("sign", "device_top", ("sign",)),
    Point("quantize_4", "device_top", ("clip", "quantize:4"), dp_clip="auto"),
    Point("quantize_1", "device_top", ("clip", "quantize:1"), dp_clip="auto"),
    Point("batch_average", "device_top", ("batch_average",)),
  ]
  bottom = [
    Point("bottom_none", "device_bottom"),
    Point("bottom_frozen", "device_bottom", dp_clip=BOTTOM_CLIP, noise=math.inf),
    Point("activation_noise_0.3", "device_bottom", dp_clip=BOTTOM_CLIP, noise=0.3),
    Point("activation_noise_1", "device_bottom", dp_clip=BOTTOM_CLIP, noise=1.0),
    Point("nopeek_0.5", "device_bottom", ("nopeek:0.5",), targets="features"),
    Point("nopeek_2", "device_bottom", ("nopeek:2",), targets="features"),
  ]
  return top + bottom


def _secrets(record: dict) -> dict:
  """Per secret {accuracy, ci, informed, leakage} of an attack record."""
  rows = dict(record.get("features") or {})
  if record.get("label"):
    rows["label"] = record["label"]
  out = {}
  for name, r in rows.items():
    if "accuracy" not in r:
      continue
    # device_bottom records have no informed prior: the server's k-NN on its own features.
    informed = r.get("informed_prior_accuracy", r.get("knn_accuracy"))
    out[name] = {
      "accuracy": r["accuracy"],
      "ci": r.get("ci"),
      "informed": informed,
      "leakage": None if informed is None else r["accuracy"] - informed,
      "auc": r.get("auc"),
    }
  return out


def run_point(
  base_config, point: Point, workdir: pathlib.Path, *, num_examples: int, progress
) -> dict:
  """Trains and attacks one point -> its row (AUC, the three attacks' secrets)."""
  wd = workdir / "points" / point.name
  metrics = pipeline.train_workdir(
    point.apply(base_config), wd, resume=True, keep_identical=True, progress=None
  )
  row = {
    "point": point.name,
    "topology": point.topology,
    "defenses": list(point.defenses),
    "noise_multiplier": metrics.get("noise_multiplier"),
    "epsilon": metrics.get("attack_epsilon"),
    "targets": point.targets,
    "frozen": math.isinf(point.noise),
    "dp": point.is_dp,
    "auc": metrics["test_auc"],
    "attacks": {},
  }
  if math.isinf(point.noise):
    return row  # pure noise: every attack falls back to the prior
  configs = {"adaptive": configs_base.AttackConfig(num_examples=num_examples)}
  if point.defenses:
    configs["naive"] = configs_base.AttackConfig(num_examples=num_examples, defense_model="naive")
  if point.topology == "device_top":
    configs["designed"] = configs_base.AttackConfig(
      attack="label_direction", num_examples=num_examples
    )
  for name, cfg in configs.items():
    rec = attacking.attack_workdir(wd, cfg, resume=True, progress=None)
    row["attacks"][name] = {
      "attack": rec.get("attack"),
      "defense_model": rec.get("defense_model", "-"),
      "secrets": _secrets(rec),
    }
  designed = row["attacks"].get("designed")
  adaptive = row["attacks"]["adaptive"]["secrets"]
  if designed and "label" in designed["secrets"] and "label" in adaptive:
    # The label-only record has no informed prior: the adaptive record's, same users.
    lab = designed["secrets"]["label"]
    lab["informed"] = adaptive["label"]["informed"]
    lab["leakage"] = lab["accuracy"] - lab["informed"] if lab["informed"] is not None else None
  if progress:
    progress(f"[defenses] {point.name}: AUC {row['auc']:.4f}")
  return row


def _targeted(row: dict, secrets) -> list[str]:
  if row["targets"] == "label":
    return [s for s in secrets if s == "label"]
  if row["targets"] == "features":
    return [s for s in secrets if s != "label"]
  return list(secrets)


def _none(secrets: dict, names) -> bool:
  return all(
    secrets[s]["leakage"] is not None and secrets[s]["leakage"] <= TOLERANCE for s in names
  )


def verdicts(rows: list[dict]) -> None:
  """Sets ``utility`` (AUC minus the frozen point's) and each defended row's ``verdict``."""
  frozen = {r["topology"]: r["auc"] for r in rows if r["frozen"]}
  for r in rows:
    r["utility"] = r["auc"] - frozen[r["topology"]] if r["topology"] in frozen else None
  for r in rows:
    if not r["defenses"] or "adaptive" not in r["attacks"]:
      continue
    adaptive = r["attacks"]["adaptive"]["secrets"]
    names = _targeted(r, adaptive)
    naive = r["attacks"].get("naive", {}).get("secrets", {})
    if _none(adaptive, names):
      r["verdict"] = "resists this adaptive attack (no guarantee)"
      continue
    if naive and _none(naive, names):
      r["verdict"] = "only against a naive attacker"
      continue
    for d in rows:
      if not d["dp"] or d["topology"] != r["topology"] or d["auc"] < r["auc"] - 0.002:
        continue
      if d["frozen"]:
        dominated = True  # the frozen point: the prior exactly, leakage 0 by construction
      else:
        dp = d["attacks"].get("adaptive", {}).get("secrets", {})
        dominated = bool(dp) and all(
          s in dp
          and dp[s]["leakage"] is not None
          and adaptive[s]["leakage"] is not None
          and dp[s]["leakage"] <= adaptive[s]["leakage"]
          for s in adaptive
        )
      if dominated:
        r["verdict"] = f"dominated by DP at equal utility ({d['point']})"
        break
    else:
      r["verdict"] = "leaks under this adaptive attack"


def _cell(secrets: dict, name: str) -> str:
  s = secrets.get(name)
  if not s or s["leakage"] is None:
    return "-"
  return f"{s['accuracy']:.3f} ({s['leakage']:+.3f})"


def auc(secrets: dict) -> str:
  """The label-only attack's AUC, either sign (which cluster is positive is a convention the
  attack guesses; Li et al. report the better of the two)."""
  s = secrets.get("label")
  return "-" if not s or s.get("auc") is None else f"{max(s['auc'], 1.0 - s['auc']):.3f}"


def to_markdown(dataset: str, rows: list[dict], num_examples: int) -> str:
  secrets: list[str] = []
  for r in rows:
    for s in r["attacks"].get("adaptive", {}).get("secrets", {}):
      if s not in secrets:
        secrets.append(s)
  secrets.sort(key=lambda s: s == "label")  # the features first, the label last
  lines = [
    f"### Defences on {dataset}: {num_examples} test users per point, one training seed",
    "",
    VERDICT_RULES,
    "",
    "Each cell: accuracy (leakage = accuracy minus the informed prior's; device_bottom: minus "
    "the server's k-NN on its own features), adaptive / naive ('=': no defence to ignore); "
    "label_direction (the attack the label defences were designed against) by its AUC.",
    "",
    "| point | topology | AUC | AUC - frozen | "
    + " | ".join(f"{s}: adaptive / naive" for s in secrets)
    + " | label_direction AUC (either sign) | verdict |",
    "|---|---|---|---|" + "---|" * len(secrets) + "---|---|",
  ]
  for r in rows:
    a = r["attacks"].get("adaptive", {}).get("secrets", {})
    n = r["attacks"].get("naive", {}).get("secrets", {})
    d = r["attacks"].get("designed", {}).get("secrets", {})
    util = "-" if r.get("utility") is None else f"{r['utility']:+.4f}"
    kind = "DP (accounted)" if r["dp"] else ("no defence" if not r["defenses"] else "-")
    cells = [f"{_cell(a, s)} / {_cell(n, s) if n else '='}" for s in secrets]
    lines.append(
      f"| {r['point']} | {r['topology']} | {r['auc']:.4f} | {util} | "
      + " | ".join(cells)
      + f" | {auc(d)} | {r.get('verdict', kind)} |"
    )
  return "\n".join(lines) + "\n"


def _leakage(row: dict, attack: str) -> float | None:
  """The largest leakage over the secrets the row's defence targets (None: not attacked)."""
  secrets = row["attacks"].get(attack, {}).get("secrets", {})
  leaks = [
    secrets[s]["leakage"] for s in _targeted(row, secrets) if secrets[s]["leakage"] is not None
  ]
  return max(leaks) if leaks else None


def plot(rows: list[dict], out_dir, dataset: str) -> list[str]:
  """The frontier, one panel per topology: AUC minus the frozen point's (x) against the largest
  leakage over the targeted secrets (y); adaptive filled, naive hollow, DP points as squares.
  Writes defenses.png and defenses.pdf; [] without matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return []
  topologies = [t for t in ("device_top", "device_bottom") if any(r["topology"] == t for r in rows)]
  fig, axes = plt.subplots(1, len(topologies), figsize=(5.2 * len(topologies), 4.2), squeeze=False)
  for ax, topology in zip(axes[0], topologies, strict=True):
    for r in (r for r in rows if r["topology"] == topology and r.get("utility") is not None):
      y = 0.0 if r["frozen"] else _leakage(r, "adaptive")
      if y is None:
        continue
      marker = "s" if (r["dp"] or not r["defenses"]) else "o"
      color = "k" if (r["dp"] or not r["defenses"]) else "C0"
      ax.plot(r["utility"], y, marker, color=color, ms=6)
      naive = _leakage(r, "naive") if r["defenses"] else None
      if naive is not None:
        ax.plot(r["utility"], naive, marker, mfc="none", color="C1", ms=7)
        ax.plot([r["utility"]] * 2, [naive, y], color="gray", lw=0.6)
      ax.annotate(
        r["point"], (r["utility"], y), fontsize=6, xytext=(3, 3), textcoords="offset points"
      )
    ax.axhline(TOLERANCE, color="gray", ls=":", lw=0.8)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
    ax.tick_params(labelsize=8)
    whose = "the server's" if topology == "device_top" else "the device's features'"
    ax.set_xlabel(f"AUC minus the frozen point's ({whose} contribution)")
    ax.set_ylabel("largest leakage over the targeted secrets")
    ax.set_title(f"{dataset}, {topology}", fontsize=10)
  handles = [
    plt.Line2D([], [], marker="o", color="C0", ls="", label="defence, adaptive attack"),
    plt.Line2D([], [], marker="o", mfc="none", color="C1", ls="", label="defence, naive attack"),
    plt.Line2D([], [], marker="s", color="k", ls="", label="no defence / DP"),
    plt.Line2D([], [], color="gray", ls=":", label=f"leakage tolerance {TOLERANCE}"),
  ]
  fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  names = []
  for ext in ("png", "pdf"):
    path = pathlib.Path(out_dir) / f"defenses.{ext}"
    fig.savefig(path, dpi=130)
    names.append(path.name)
  plt.close(fig)
  return names


def run_study(
  dataset: str,
  workdir,
  *,
  num_examples: int = 512,
  only: tuple[str, ...] = (),
  progress=common.progress,
) -> dict:
  """Runs (or resumes) every point; writes defenses.json and defenses.md into ``workdir``."""
  with workdir_lib.own(workdir, "defense_study") as owned:
    out = _run_study(dataset, owned, num_examples=num_examples, only=only, progress=progress)
    out["figures"] = plot(out["rows"], owned, dataset)
    return out


def _run_study(dataset, workdir: pathlib.Path, *, num_examples, only, progress) -> dict:
  base = common.load_train_config(None, dataset)
  return run_points(base, workdir, only=only, num_examples=num_examples, progress=progress)


def run_points(
  base, workdir, *, only: tuple[str, ...] = (), num_examples: int = 512, progress=None
) -> dict:
  """Trains and attacks the points ``only`` (all when empty or ``("all",)``) of the grid on
  ``base`` (a TrainConfig) under ``workdir`` (not claimed: the caller owns it); writes and
  returns defenses.json (and defenses.md) after every point, so a stopped run resumes point by
  point."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  names = [p.name for p in points()]
  if tuple(only) == ("all",):
    only = ()
  unknown = sorted(set(only) - set(names))
  if unknown:
    raise pipeline.ConfigError(f"unknown defence study points {unknown}: choose among {names}")
  grid = [p for p in points() if not only or p.name in only]
  dataset = base.dataset
  rows: list[dict] = []
  out: dict = {}
  for i, point in enumerate(grid):
    if progress:
      progress(f"[defenses] {dataset}: point {i + 1}/{len(grid)} ({point.name})")
    rows.append(run_point(base, point, workdir, num_examples=num_examples, progress=None))
    verdicts(rows)
    out = {"dataset": dataset, "num_examples": num_examples, "rules": VERDICT_RULES, "rows": rows}
    results.atomic_write_json(workdir / "defenses.json", out)
    results.atomic_write_text(workdir / "defenses.md", to_markdown(dataset, rows, num_examples))
  return out
