"""synthetic, tiny preset: a seconds-long end-to-end run of the reproduction (used by the tests).

Launch::

  python -m experiments.reproduce --preset=tiny --datasets=synthetic --workdir=/tmp/splitjax_tiny
"""

from experiments.configs import base


def get_config() -> base.StudyConfig:
  train = base.TrainConfig(
    dataset="synthetic",
    synthetic_examples=400,
    epochs=2,
    hidden=(16, 8),
    batch_size=64,
    devices_per_round=4,
  )
  return base.StudyConfig(
    train=train,
    recipes=("tuned",),
    attack_examples=40,
    sigmas=(0.0, 1.0),
    target_epsilons=(),
    label_epsilons=(1.0,),
    # The marginal-prior Bayes attack is left out to keep the tests short.
    variants=("informed", "clip_aware", "paper"),
    # One training-user point (as the every-release test's FSL run: 40 users).
    train_user_sigmas=(1.0,),
    # Every audit, small: the cut channel at sigma 2, the label channel, an FSL pipeline audit.
    audit_sigmas=(2.0,),
    audit_trials=20_000,
    audit_training_trials=5_000,
    audit_label_epsilon=1.0,
    audit_pipeline=("fsl",),
    audit_canaries=20,
    train_user_examples=40,
    # One defence point (its three attacks), 20 users: the frontier's machinery, kept short.
    defense_points=("sign",),
    defense_examples=20,
  )
