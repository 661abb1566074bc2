r"""Attack a trained workdir with EXACT and the no-gradient baselines.

  python -m experiments.train --dataset=adult --workdir=/tmp/adult_sl
  python -m experiments.attack --workdir=/tmp/adult_sl                      # test users, clip-aware
  python -m experiments.attack --workdir=/tmp/adult_sl --users=train --variant=paper

Writes ``attack.json`` (default attack: ``--variant=auto --prior=auto`` on test users) or
``attack_<attack>_<variant>_<prior>_<users>.json`` into the workdir and prints a Markdown table.
"""

from absl import app
from absl import flags

from experiments import attack_flags  # noqa: F401  (defines --num_examples)
from experiments import attacking
from experiments import common
from experiments.configs import base

flags.DEFINE_string("attack", "exact", f"Attack: one of {', '.join(attacking.BINARY_ATTACKS)}.")
flags.DEFINE_string(
  "variant",
  "auto",
  "Scoring: clip_aware (nearest clipped candidate), paper "
  "(nearest unclipped), bayes (Gaussian likelihood + prior); auto = bayes when "
  "the cut layer is noised, else clip_aware.",
)
flags.DEFINE_string(
  "prior",
  "auto",
  "The attacker's prior: uniform, marginal (train marginals) or "
  "informed (k-NN joint prior on an auxiliary sample + the device model's "
  "P(y | h, x)); auto = informed for bayes and under label DP, else uniform.",
)
flags.DEFINE_string(
  "users",
  "test",
  "test (replayed once through the final model) or train (the recorded last-epoch transcript).",
)
flags.DEFINE_integer("top_k", 1, "Per-feature majority vote over the top-k candidates.")
flags.DEFINE_string("distance", "l2", "l2 or cosine.")
flags.DEFINE_integer("knn_k", 30, "k of the k-NN baselines.")
flags.DEFINE_string(
  "screen_dtype",
  "none",
  "none, bfloat16 or float16: EXACT screens every pair "
  "with low-precision matmuls, rescores the best in float32 (faster; falls back "
  "to float32 for users the screen cannot decide). Not with --variant=bayes.",
)
flags.DEFINE_string(
  "defense_model",
  "auto",
  "On a workdir trained with --defense: adaptive (EXACT simulates the deterministic defences and "
  "label smoothing on every candidate), naive (ignores them), auto = adaptive where possible.",
)
flags.DEFINE_integer(
  "joint_batch_size",
  0,
  "--attack=joint (the default on a --defense=batch_average workdir): the rows per "
  "batch-averaged release the test users are replayed in (0: the workdir's training batch size).",
)
_SKIP_MEMORY_CHECK = flags.DEFINE_bool(
  "skip_memory_check",
  False,
  "Run EXACT even when its memory estimate exceeds 80% of the "
  "free memory (it is then likely to fail or swap).",
)
flags.mark_flags_as_required(["workdir"])
for _name in common.SHARED_FLAGS["attack"]:
  flags.declare_key_flag(_name)


def main(argv):
  del argv
  config = common.apply_flag_overrides(base.AttackConfig(), common.config_dict(base.AttackConfig()))
  record = attacking.attack_workdir(
    common.WORKDIR.value,
    config,
    resume=common.resume(),
    overwrite=common.overwrite(),
    progress=common.progress,
    kill_switch=common.KillSwitch(),
    check_memory=not _SKIP_MEMORY_CHECK.value,
  )
  print(attacking.markdown_table(record))


if __name__ == "__main__":
  app.run(common.run_main(main))
