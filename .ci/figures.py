"""CI stage A (the main install, with the plots extra): every figure and table of the report,
drawn from committed results, so the plotting code runs where matplotlib is installed.

  PYTHONPATH=. python .ci/figures.py OUT_DIR

The quick report (docs/results/results.json) goes through `reproducing.write_report` (its tables,
the sweeps' and the audit's figures); each committed frontier (docs/results/defenses/*.json)
through `defense_studying.plot` and `to_markdown`. Fails when a figure is missing or empty, or
when the committed REPORT.md is not what the renderer writes from the committed results.json.
"""

import json
import pathlib
import sys

from experiments import common
from experiments import defense_studying
from experiments import reproducing

REPO = pathlib.Path(__file__).resolve().parents[1]


def main(out: pathlib.Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  results = reproducing.decode(json.loads((REPO / "docs/results/results.json").read_text()))
  studies = {ds: common.load_config(f"{ds}_{results['preset']}", "") for ds in results["datasets"]}
  reproducing.write_report(results, studies, out)
  if (out / "REPORT.md").read_text() != (REPO / "docs/results/REPORT.md").read_text():
    raise SystemExit(
      "docs/results/REPORT.md differs from what write_report draws from docs/results/results.json:"
      " regenerate the quick report (README) and commit both"
    )
  figures = [out / "REPORT.md"]
  for path in sorted((REPO / "docs/results/defenses").glob("*.json")):
    frontier = json.loads(path.read_text())
    target = out / path.stem
    target.mkdir(exist_ok=True)
    names = defense_studying.plot(frontier["rows"], target, frontier["dataset"])
    if not names:
      raise SystemExit("defense_studying.plot drew nothing: is matplotlib installed?")
    figures += [target / n for n in names]
    (target / "defenses.md").write_text(
      defense_studying.to_markdown(frontier["dataset"], frontier["rows"], frontier["num_examples"])
    )
  figures += sorted(out.glob("*.png"))
  empty = [str(f) for f in figures if not f.exists() or f.stat().st_size == 0]
  if empty or len(figures) < 4:
    raise SystemExit(f"missing or empty: {empty or figures}")
  print(f"{len(figures)} report files and figures drawn in {out}")


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]))
