"""synthetic: splitjax's tuned split-learning recipe on the synthetic dataset.

Launch::

  python -m experiments.train --config=synthetic --workdir=/tmp/synthetic_sl
"""

from experiments.configs import base


def get_config() -> base.TrainConfig:
  return base.TrainConfig(dataset="synthetic")
