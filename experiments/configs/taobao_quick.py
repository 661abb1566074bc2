"""taobao (from the user's files), quick preset.

Launch::

  python -m experiments.reproduce --preset=quick --taobao_dir=/path/to/taobao --workdir=/tmp/q
"""

from experiments.configs import base


def get_config() -> base.StudyConfig:
  return base.StudyConfig(train=base.TrainConfig(dataset="taobao"), recipes=("tuned",))
