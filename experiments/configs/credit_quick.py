"""credit, quick preset of the reproduction (one seed, 1,000 attacked test users, 4 noise levels).

Launch (all datasets)::

  python -m experiments.reproduce --preset=quick --workdir=/tmp/splitjax_quick

or this dataset alone::

  python -m experiments.reproduce --preset=quick --datasets=credit --workdir=/tmp/splitjax_quick
"""

from experiments.configs import base


def get_config() -> base.StudyConfig:
  # The FSL pipeline audit (500 canaries, cut-only epsilon 2, device DP-SGD off); the cut and
  # label channels are the same on every dataset and run in adult's study.
  return base.StudyConfig(train=base.TrainConfig(dataset="credit"), audit_pipeline=("fsl",))
