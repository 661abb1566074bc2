"""Prints, from a reproduction's results.json, the leakage table of the valid-bounds issue.

  python -m benchmarks.leakage_table docs/results/results.json

For each dataset and the points sigma = 0.01 (the paper's), sigma = 1, target epsilon 4 and label
DP epsilon 1 (SL): per secret the accuracy of the informed / marginal-prior Bayes / clip-aware /
paper attacks (informed with its 95 % CI), the informed prior without the gradient, the paired gain
with its McNemar interval, and the bound with its kind.
"""

import json
import sys

POINTS = ("sigma_0.01", "sigma_1", "target_epsilon_4", "label_dp_1")


def table(results: dict) -> str:
  out = []
  for ds, res in results["datasets"].items():
    rows = {r["point"]: r for r in res["sweeps"].get("sl", [])}
    for point in POINTS:
      r = rows.get(point)
      if not r or not r["attacks"]:
        continue
      a = r["attacks"]
      out.append(
        f"\n**{ds} SL {point}** (attack epsilon {r['attack_epsilon']}, C {r['l2_clip_norm']})\n"
      )
      out.append(
        "| secret | informed [95% CI] | Bayes marginal | clip-aware | paper | "
        "informed prior only | gain [95% CI] | bound (kind) |"
      )
      out.append("|---|---|---|---|---|---|---|---|")
      for s, inf in a["informed"].items():
        g = inf["gain"]
        bound = "–" if inf["bound"] is None else f"{inf['bound']:.3f}"
        out.append(
          f"| {s} | {inf['accuracy']:.3f} [{inf['ci'][0]:.3f}, {inf['ci'][1]:.3f}] | "
          f"{a['bayes'][s]['accuracy']:.3f} | {a['clip_aware'][s]['accuracy']:.3f} | "
          f"{a['paper'][s]['accuracy']:.3f} | {inf['prior_only_accuracy']:.3f} | "
          f"{g['difference']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}] | "
          f"{bound} ({inf['bound_kind']}) |"
        )
  return "\n".join(out)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  with open(sys.argv[1]) as f:
    print(table(json.load(f)))
