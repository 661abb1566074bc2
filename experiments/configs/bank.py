"""bank: splitjax's tuned split-learning recipe on the bank dataset.

Launch::

  python -m experiments.train --config=bank --workdir=/tmp/bank_sl
"""

from experiments.configs import base


def get_config() -> base.TrainConfig:
  return base.TrainConfig(dataset="bank")
