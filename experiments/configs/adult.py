"""adult: splitjax's tuned split-learning recipe on the adult dataset.

Launch::

  python -m experiments.train --config=adult --workdir=/tmp/adult_sl
"""

from experiments.configs import base


def get_config() -> base.TrainConfig:
  return base.TrainConfig(dataset="adult")
