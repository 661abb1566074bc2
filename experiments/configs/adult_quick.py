"""adult, quick preset of the reproduction (one seed, 1,000 attacked test users, 4 noise levels).

Launch (all datasets)::

  python -m experiments.reproduce --preset=quick --workdir=/tmp/splitjax_quick

or this dataset alone::

  python -m experiments.reproduce --preset=quick --datasets=adult --workdir=/tmp/splitjax_quick
"""

from experiments.configs import base


def get_config() -> base.StudyConfig:
  # Training users on one point (sigma 0.1: noised, yet the attacks beat the prior). The audits:
  # the cut channel over a sigma grid (the paper's 0.01 included: saturated), the label channel,
  # and SL and FSL pipeline audits (500 canaries, cut-only epsilon 2, device DP-SGD off).
  return base.StudyConfig(
    train=base.TrainConfig(dataset="adult"),
    train_user_sigmas=(0.1,),
    audit_sigmas=AUDIT_SIGMAS,
    audit_label_epsilon=1.0,
    audit_pipeline=("sl", "fsl"),
  )


AUDIT_SIGMAS = (0.01, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0)
