r"""The defences' privacy-utility frontier on one dataset (experiments/defense_studying.py).

  python -m experiments.defense_study --dataset=adult --workdir=workdirs/defenses_adult
  python -m experiments.defense_study --dataset=bank --workdir=workdirs/defenses_bank \
      --points=none,frozen,max_norm,marvell_4 --num_examples=256

Trains every point (one seed; a killed study continues where it stopped when rerun), attacks
its first --num_examples test users adaptively, naively and with label_direction, and writes
defenses.json and defenses.md (the frontier table with a verdict per defended point, by the rules
the table states first) into --workdir.
"""

from absl import app
from absl import flags

from experiments import common
from experiments import defense_studying

_NUM = flags.DEFINE_integer("num_examples", 512, "Test users attacked per point.")
_POINTS = flags.DEFINE_list(
  "points", [], f"Points to run (default all): {[p.name for p in defense_studying.points()]}."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  out = defense_studying.run_study(
    common.DATASET.value,
    common.WORKDIR.value,
    num_examples=_NUM.value,
    only=tuple(_POINTS.value),
    progress=common.progress,
  )
  print(defense_studying.to_markdown(out["dataset"], out["rows"], out["num_examples"]))


if __name__ == "__main__":
  app.run(common.run_main(main))
