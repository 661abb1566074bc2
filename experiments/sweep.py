r"""Sweep cut-layer DP and label DP: AUC over seeds and attack success against epsilon.

  python -m experiments.sweep --dataset=adult --workdir=/tmp/adult_sweep
  python -m experiments.sweep --dataset=csv --data_path=my.csv --schema=my_schema.json \
      --workdir=/tmp/my_sweep

Points: no DP; sigma in {0, 0.01, 0.03, 0.1, 0.3, 1, 3, 10} with --dp_clip=auto;
sigma = inf (server frozen); --target_epsilon in {1, 4, 16}; label DP epsilon in
{0.5, 1, 2, 4}. Writes sweep.csv, sweep.md, sweep.json and PNG plots (with the
plots extra). A killed sweep continues where it stopped when rerun.
"""

import math

from absl import app
from absl import flags

from experiments import attack_flags
from experiments import common
from experiments import pipeline
from experiments import sweeping

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds per point.")
_SIGMAS = flags.DEFINE_list("sigmas", [str(s) for s in sweeping.SIGMAS], "Noise multipliers.")
_TARGETS = flags.DEFINE_list(
  "target_epsilons", [str(e) for e in sweeping.TARGET_EPSILONS], "Calibrated epsilons."
)
_LABEL = flags.DEFINE_list(
  "label_epsilons", [str(e) for e in sweeping.LABEL_EPSILONS], "Label-DP epsilons."
)
flags.mark_flags_as_required(["workdir"])
for _name in common.SHARED_FLAGS["sweep"]:
  flags.declare_key_flag(_name)


def _floats(values, flag):
  try:
    return [float(v) for v in values]
  except ValueError:
    raise common.UsageError(
      f"--{flag} must be a comma-separated list of numbers, got {','.join(values)!r}"
    ) from None


def _check(values, flag, ok, want):
  for v in values:
    if math.isnan(v) or not ok(v):
      raise common.UsageError(f"--{flag} value {v:g} is invalid: every value must be {want}")
  return values


def _seeds(values):
  seeds = _floats(values, "seeds")
  if not seeds:
    raise common.UsageError("--seeds is empty: give at least one seed, e.g. --seeds=0")
  for s in seeds:
    if math.isnan(s) or s != int(s) or s < 0:
      raise common.UsageError(f"--seeds value {s:g} is invalid: seeds are integers >= 0")
  if len(set(seeds)) != len(seeds):
    raise common.UsageError(f"--seeds has duplicates ({','.join(values)}): list each seed once")
  return [int(s) for s in seeds]


def main(argv):
  del argv
  base = common.load_train_config(common.CONFIG.value, common.DATASET.value)
  base = common.apply_flag_overrides(base, ["dataset", "data_path", "schema"])
  # Every flag is checked before anything is trained or written (a bad value found half-way
  # through would leave a partial sweep behind).
  sigmas = _check(
    _floats(_SIGMAS.value, "sigmas"), "sigmas", lambda v: v >= 0, ">= 0 (inf = frozen server)"
  )
  targets = _check(
    _floats(_TARGETS.value, "target_epsilons"),
    "target_epsilons",
    lambda v: 0 < v < math.inf,
    "a positive finite epsilon",
  )
  label_eps = _check(
    _floats(_LABEL.value, "label_epsilons"),
    "label_epsilons",
    lambda v: 0 < v < math.inf,
    "a positive finite epsilon",
  )
  seeds = _seeds(_SEEDS.value)
  num_examples = attack_flags.NUM_EXAMPLES.value
  if num_examples is not None and num_examples < 1:
    raise common.UsageError(
      f"--num_examples={num_examples} must be >= 1 (omit it to attack every test user)"
    )
  pipeline.validate(base)
  points = sweeping.default_points(sigmas, targets, label_eps)
  rows = sweeping.run_sweep(
    base,
    common.WORKDIR.value,
    points=points,
    seeds=seeds,
    num_examples=num_examples or 0,
    overwrite=common.overwrite(),
    progress=common.progress,
    kill_switch=common.KillSwitch(),
  )
  sweeping.plot(rows, common.WORKDIR.value, base.dataset)
  print(sweeping.to_markdown(rows))


if __name__ == "__main__":
  app.run(common.run_main(main))
