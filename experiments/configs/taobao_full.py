"""taobao (from the user's files), full preset.

Launch::

  python -m experiments.reproduce --preset=full --taobao_dir=/path/to/taobao --workdir=/tmp/q
"""

from experiments.configs import base


def get_config() -> base.StudyConfig:
  return base.StudyConfig(
    train=base.TrainConfig(dataset="taobao"), seeds=(0, 1, 2), attack_examples=0
  )
