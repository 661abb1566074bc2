r"""Audit the guarantee: empirical lower bounds on mu and epsilon per channel, beside the accounted.

  python -m experiments.audit --channel=cut --dp_noise_multiplier=2 --workdir=workdirs/audit_cut
  python -m experiments.audit --channel=label --label_dp_epsilon=1 --workdir=workdirs/audit_label
  python -m experiments.audit --channel=pipeline --protocol=fsl --target_epsilon=2 \
      --workdir=workdirs/audit_fsl

Takes the DP flags of ``experiments.train`` (``--dp_clip``, ``--dp_noise_multiplier`` or
``--target_epsilon``, ``--label_dp_epsilon``, ``--device_dp_*``, ``--protocol``, ``--config``) and
writes ``audit.json`` into ``--workdir`` (see ``experiments.auditing``); prints a Markdown table.
"""

from absl import app
from absl import flags

from experiments import auditing
from experiments import common
from experiments import train  # noqa: F401  (defines the training and DP flags)
from experiments.configs import base

_CHANNEL = flags.DEFINE_enum(
  "channel",
  "cut",
  list(auditing.CHANNELS),
  "What to audit: the cut layer, label DP or the pipeline.",
)
_TRIALS = flags.DEFINE_integer(
  "trials",
  0,
  "Trials per hypothesis (0 = the channel's default: cut 1,000,000 replays, label 200,000 "
  "canaries); for --channel=pipeline the number of canaries m (0 = 1,000; FSL 500).",
)
_TRAINING_TRIALS = flags.DEFINE_integer(
  "training_trials", 0, "Cut channel: canaries per label through the training loop (0 = 100,000)."
)
_AUDIT_EPOCHS = flags.DEFINE_integer(
  "audit_epochs", 2, "Releases k per canary in the training-loop audits (label: >= 2)."
)
_CONFIDENCE = flags.DEFINE_float("confidence", 0.95, "Confidence of every bound.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  config = common.load_train_config(common.CONFIG.value, common.DATASET.value)
  config = common.apply_flag_overrides(config, common.config_dict(base.TrainConfig()))
  request = auditing.AuditRequest(
    channel=_CHANNEL.value,
    trials=_TRIALS.value,
    training_trials=_TRAINING_TRIALS.value,
    epochs=_AUDIT_EPOCHS.value,
    confidence=_CONFIDENCE.value,
  )
  record = auditing.run_audit(
    config,
    common.WORKDIR.value,
    request,
    overwrite=common.overwrite(),
    progress=common.progress,
  )
  print(auditing.markdown_table(record))
  print(f"-> {common.WORKDIR.value}/{auditing.RECORD}")


if __name__ == "__main__":
  app.run(common.run_main(main))
