r"""Train a split model (SL or FSL) with optional cut-layer DP and label DP.

  python -m experiments.train --dataset=adult --protocol=sl --workdir=/tmp/adult_sl
  python -m experiments.train --dataset=adult --dp_clip=auto --dp_noise_multiplier=0.01 \
      --workdir=/tmp/adult_dp

Writes ``metrics.json`` (test AUC, log-loss, accuracy, timings, privacy report),
the checkpoint and the last epoch's transcript into ``--workdir``.
"""

import dataclasses

from absl import app
from absl import flags

from experiments import common
from experiments import pipeline
from experiments.configs import base

flags.DEFINE_list("private_dense", [], "Numeric columns moved to the device.")
flags.DEFINE_enum("protocol", "sl", ["sl", "fsl"], "Split learning or federated split learning.")
flags.DEFINE_string("recipe", "tuned", "tuned (splitjax's) or paper (the authors').")
flags.DEFINE_integer("epochs", None, "Override the recipe's epochs (unset = the recipe's).")
flags.DEFINE_float(
  "learning_rate", None, "Override the recipe's learning rate (unset = the recipe's)."
)
flags.DEFINE_integer(
  "batch_size",
  None,
  "Override the recipe's batch size (unset = the recipe's; clamped to the data).",
)
flags.DEFINE_string("head", "deepfm", "deepfm or mlp.")
flags.DEFINE_string("topology", "device_top", "device_top (the paper's) or device_bottom.")
flags.DEFINE_integer("samples_per_device", 16, "FSL: examples per device.")
flags.DEFINE_integer("devices_per_round", 16, "FSL: devices per round.")
flags.DEFINE_integer("local_steps", 2, "FSL: local steps per round.")
flags.DEFINE_string("dp_clip", "none", "Cut-layer clip norm: a number, auto or none.")
flags.DEFINE_float("dp_noise_multiplier", 0.0, "Cut-layer noise multiplier sigma (inf = frozen).")
flags.DEFINE_float("target_epsilon", None, "Calibrate sigma to this epsilon (unset = off).")
flags.DEFINE_float("target_delta", 1e-5, "Delta of every reported epsilon.")
flags.DEFINE_float("device_dp_clip", 0.0, "Device DP-SGD per-example clip norm (0 = off).")
flags.DEFINE_float("device_dp_noise_multiplier", 0.0, "Device DP-SGD noise multiplier.")
flags.DEFINE_float("label_dp_epsilon", None, "Randomized-response label DP epsilon (unset = off).")
flags.DEFINE_bool(
  "record_device_params",
  True,
  "Write the device parameters behind every "
  "transcript row (transcript_params.msgpack; about 35 MB for adult SL): "
  "attack --users=train needs them.",
)
_DEFENSE = flags.DEFINE_multi_string(
  "defense",
  [],
  "A defence on the rows the device sends, NAME[:PARAM] (repeatable, in order): max_norm, "
  "marvell:S, batch_average, topk:FRACTION, sign, quantize:BITS, quantize_stochastic:BITS, and "
  "label_smoothing:EPS (the device's loss); in device_bottom nopeek:ALPHA (distance "
  "correlation in the device encoder's loss) and activation_noise:SIGMA (= --dp_noise_multiplier "
  "on the activations); the markers clip and noise "
  "place the DP chain (appended at the end when absent). A chain that voids the cut-layer "
  "epsilon is refused with noise on (splitjax.defenses).",
)
flags.mark_flags_as_required(["workdir"])
for _name in common.SHARED_FLAGS["train"]:
  flags.declare_key_flag(_name)


def main(argv):
  del argv
  config = common.load_train_config(common.CONFIG.value, common.DATASET.value)
  config = common.apply_flag_overrides(config, common.config_dict(base.TrainConfig()))
  if _DEFENSE.value:
    config = dataclasses.replace(config, defenses=tuple(_DEFENSE.value))
  metrics = pipeline.train_workdir(
    config,
    common.WORKDIR.value,
    resume=common.resume(),
    overwrite=common.overwrite(),
    progress=common.progress,
    kill_switch=common.KillSwitch(),
  )
  print(
    f"test AUC {pipeline.auc_text(metrics)}  log-loss {metrics['test_log_loss']:.4f}  "
    f"accuracy {metrics['test_accuracy']:.4f}  ({metrics['seconds_per_epoch']:.1f} s/epoch)"
  )
  print(common.format_epsilons(metrics))
  print(f"-> {common.WORKDIR.value}/metrics.json")


if __name__ == "__main__":
  app.run(common.run_main(main))
