"""credit: splitjax's tuned split-learning recipe on the credit dataset.

Launch::

  python -m experiments.train --config=credit --workdir=/tmp/credit_sl
"""

from experiments.configs import base


def get_config() -> base.TrainConfig:
  return base.TrainConfig(dataset="credit")
