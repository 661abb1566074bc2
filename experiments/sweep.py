r"""Sweep cut-layer DP and label DP: AUC over seeds and attack success against epsilon.

  python -m experiments.sweep --dataset=adult --workdir=/tmp/adult_sweep

Points: no DP; sigma in {0, 0.01, 0.03, 0.1, 0.3, 1, 3, 10} with --dp_clip=auto;
sigma = inf (server frozen); --target_epsilon in {1, 4, 16}; label DP epsilon in
{0.5, 1, 2, 4}. Writes sweep.csv, sweep.md, sweep.json and PNG plots (with the
plots extra). A killed sweep continues where it stopped when rerun.
"""

from absl import app
from absl import flags

from experiments import common
from experiments import sweeping

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds per point.")
_SIGMAS = flags.DEFINE_list("sigmas", [str(s) for s in sweeping.SIGMAS], "Noise multipliers.")
_TARGETS = flags.DEFINE_list("target_epsilons", [str(e) for e in sweeping.TARGET_EPSILONS],
                             "Calibrated epsilons.")
_LABEL = flags.DEFINE_list("label_epsilons", [str(e) for e in sweeping.LABEL_EPSILONS],
                           "Label-DP epsilons.")
flags.mark_flags_as_required(["workdir"])


def _floats(values, flag):
  try:
    return [float(v) for v in values]
  except ValueError:
    raise common.UsageError(f"--{flag} must be a comma-separated list of numbers") from None


def main(argv):
  del argv
  base = common.load_train_config(common.CONFIG.value, common.DATASET.value)
  points = sweeping.default_points(_floats(_SIGMAS.value, "sigmas"),
                                   _floats(_TARGETS.value, "target_epsilons"),
                                   _floats(_LABEL.value, "label_epsilons"))
  seeds = [int(s) for s in _floats(_SEEDS.value, "seeds")]
  rows = sweeping.run_sweep(base, common.WORKDIR.value, points=points, seeds=seeds,
                            num_examples=common.NUM_EXAMPLES.value, kill_switch=common.KillSwitch())
  sweeping.plot(rows, common.WORKDIR.value, base.dataset)
  print(sweeping.to_markdown(rows))


if __name__ == "__main__":
  app.run(common.run_main(main))
