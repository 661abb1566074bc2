"""The defence study's verdicts follow its stated rules, and each verdict can be reached."""

from experiments import defense_studying as ds


def _row(point, *, adaptive=None, naive=None, auc=0.9, dp=False, frozen=False, targets="all"):
  def secrets(leak):
    return {s: {"accuracy": 0.5 + v, "leakage": v, "informed": 0.5} for s, v in leak.items()}

  attacks = {}
  if adaptive is not None:
    attacks["adaptive"] = {"secrets": secrets(adaptive)}
  if naive is not None:
    attacks["naive"] = {"secrets": secrets(naive)}
  return {
    "point": point,
    "topology": "device_top",
    "defenses": [] if dp or point == "none" else [point],
    "dp": dp,
    "frozen": frozen,
    "targets": targets,
    "auc": auc,
    "attacks": attacks,
  }


def test_each_verdict_is_reached_by_its_rule_and_utility_is_relative_to_frozen():
  rows = [
    _row("none", adaptive={"x": 0.4, "label": 0.3}, auc=0.905),
    _row("frozen", auc=0.80, dp=True, frozen=True),
    _row("sigma_1", adaptive={"x": 0.1, "label": 0.05}, auc=0.90, dp=True),
    _row(
      "resists",
      adaptive={"x": 0.3, "label": 0.01},
      naive={"x": 0.3, "label": 0.0},
      targets="label",
      auc=0.95,
    ),
    _row(
      "naive_only",
      adaptive={"x": 0.3, "label": 0.2},
      naive={"x": 0.3, "label": 0.01},
      targets="label",
      auc=0.95,
    ),
    _row("dominated", adaptive={"x": 0.2, "label": 0.1}, naive={"x": 0.2, "label": 0.1}, auc=0.901),
    _row("leaks", adaptive={"x": 0.05, "label": 0.3}, naive={"x": 0.05, "label": 0.3}, auc=0.899),
    _row(
      "better_utility", adaptive={"x": 0.2, "label": 0.2}, naive={"x": 0.2, "label": 0.2}, auc=0.95
    ),
  ]
  ds.verdicts(rows)
  by = {r["point"]: r for r in rows}
  assert abs(by["none"]["utility"] - 0.105) < 1e-9 and by["frozen"]["utility"] == 0.0
  assert by["resists"]["verdict"].startswith("resists this adaptive attack")
  assert by["naive_only"]["verdict"] == "only against a naive attacker"
  assert by["dominated"]["verdict"] == "dominated by DP at equal utility (sigma_1)"
  # sigma_1 leaks less on x but more on the label: not dominated; frozen's AUC is too low.
  assert by["leaks"]["verdict"] == "leaks under this adaptive attack"
  assert by["better_utility"]["verdict"] == "leaks under this adaptive attack"
  assert "verdict" not in by["none"] and "verdict" not in by["sigma_1"]
  table = ds.to_markdown("toy", rows, 10)
  assert ds.VERDICT_RULES in table and "| dominated | device_top | 0.9010 | +0.1010 |" in table
