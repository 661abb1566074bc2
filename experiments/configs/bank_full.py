"""bank, full preset of the reproduction: every setting, 3 seeds, every test user attacked.

Launch::

  python -m experiments.reproduce --preset=full --datasets=bank --workdir=/tmp/splitjax_full
"""

from experiments import sweeping
from experiments.configs import base


def get_config() -> base.StudyConfig:
  return base.StudyConfig(
    train=base.TrainConfig(dataset="bank"),
    seeds=(0, 1, 2),
    attack_examples=0,
    sweep_protocols=("sl", "fsl"),
    sigmas=sweeping.SIGMAS,
    target_epsilons=sweeping.TARGET_EPSILONS,
    label_epsilons=sweeping.LABEL_EPSILONS,
    # Pipeline audits: SL and FSL, 1,000 canaries, device DP-SGD off and on.
    audit_pipeline=("sl", "fsl"),
    audit_canaries=1000,
    audit_device_dp=(False, True),
    # The defences' frontier: every point of experiments.defense_studying's grid, every test user.
    defense_points=("all",),
    defense_examples=0,
  )
