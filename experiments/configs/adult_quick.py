"""adult, quick preset of the reproduction (one seed, 1,000 attacked test users, 4 noise levels).

Launch (all datasets)::

  python -m experiments.reproduce --preset=quick --workdir=/tmp/splitjax_quick

or this dataset alone::

  python -m experiments.reproduce --preset=quick --datasets=adult --workdir=/tmp/splitjax_quick
"""

from experiments.configs import base


def get_config() -> base.StudyConfig:
  # Training users on one point (sigma 0.1: noised, yet the attacks beat the prior).
  return base.StudyConfig(train=base.TrainConfig(dataset="adult"), train_user_sigmas=(0.1,))
