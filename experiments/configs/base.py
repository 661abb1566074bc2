"""Frozen experiment configs shared by the binaries (variants: ``dataclasses.replace``)."""

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
  """Everything ``experiments.train`` needs (flags override fields of the same name).

  ``dp_clip`` is ``'none'``, ``'auto'`` (half the mean no-DP ``||g_i||`` over the
  train data under the initial model) or a number. ``target_epsilon`` (if set)
  calibrates ``dp_noise_multiplier`` for the number of releases per example.
  ``epochs = 0`` means the recipe's number of epochs.
  """

  dataset: str = "adult"
  data_path: str = ""
  schema: str = ""  # JSON column roles for --data_path (csv, bank, taobao)
  private_dense: tuple[str, ...] = ()
  protocol: str = "sl"
  recipe: str = "tuned"
  epochs: int = 0
  learning_rate: float = 0.0
  batch_size: int = 0
  head: str = "deepfm"
  topology: str = "device_top"
  hidden: tuple[int, ...] = (256, 128)
  samples_per_device: int = 16
  devices_per_round: int = 16
  local_steps: int = 2
  dp_clip: str = "none"
  dp_noise_multiplier: float = 0.0
  target_epsilon: float = 0.0
  target_delta: float = 1e-5
  label_dp_epsilon: float = 0.0
  device_dp_clip: float = 0.0  # device DP-SGD per-example clip (0 = off)
  device_dp_noise_multiplier: float = 0.0
  seed: int = 0
  # Write the device parameters behind every transcript row (transcript_params.msgpack, about
  # 35 MB for adult SL): attacking training users needs them. Off for sweep points.
  record_device_params: bool = True
  # "last_epoch": the transcript of the last epoch (transcript.npz); "all": also every release of
  # every epoch, with the parameters behind it (releases/epoch_NNNN.npz and _params.msgpack).
  releases: str = "last_epoch"
  split_seed: int = 0  # the 90/10 split (and synthetic data) is fixed across training seeds
  # experiments.audit --channel=pipeline: this many training rows (the first example of each of
  # the first devices of the FSL partition) get secret labels drawn from the audit's own key.
  audit_canaries: int = 0
  # --defense entries in order (splitjax.defenses): defences on the rows the device sends, with the
  # markers clip and noise placing the DP chain (appended at the end when absent).
  defenses: tuple[str, ...] = ()
  # synthetic dataset only
  synthetic_examples: int = 2000
  synthetic_correlation: float = 0.0


# TrainConfig fields added after splitjax 0.2's first workdirs, with the value that means "as
# before": left out of config.json and of the fingerprints at that value (`stored_train_dict`), so
# earlier workdirs still resume and earlier reports keep their fingerprints.
LATER_TRAIN_FIELDS = {"releases": "last_epoch", "audit_canaries": 0, "defenses": ()}


def stored_train_dict(config: TrainConfig) -> dict:
  """The config as ``config.json`` and the fingerprints hold it (see ``LATER_TRAIN_FIELDS``)."""
  out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
  for name, value in LATER_TRAIN_FIELDS.items():
    if out[name] == value:
      del out[name]
  return out


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AttackConfig:
  """What ``experiments.attack`` runs on a trained workdir."""

  attack: str = "exact"
  # auto: bayes when the cut layer is noised (sigma > 0, finite C), else clip_aware.
  variant: str = "auto"
  # uniform, marginal or informed; auto: informed for bayes and under label DP, else uniform.
  prior: str = "auto"
  users: str = "test"
  num_examples: int = 0
  top_k: int = 1
  distance: str = "l2"
  knn_k: int = 30
  seed: int = 0
  # "none", or "bfloat16"/"float16": EXACT screens all pairs with low-precision matmuls and rescores
  # the best in float32 (splitjax.attacks.exact's screen_dtype); not with --variant=bayes.
  screen_dtype: str = "none"
  # --users=train: "last_epoch" attacks each recorded row alone; "all" combines every release of
  # a user (the partial likelihood; needs a workdir trained with --releases=all).
  releases: str = "last_epoch"
  # On a workdir trained with --defense: adaptive (EXACT simulates the deterministic defences and
  # label smoothing on every candidate), naive (the defences ignored), auto = adaptive where the
  # chain can be simulated, else naive.
  defense_model: str = "auto"
  # --attack=joint (batch_average): the rows per release of the replayed test users (0: the
  # workdir's training batch size).
  joint_batch_size: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StudyConfig:
  """One dataset's part of ``experiments.reproduce``.

  ``train`` is the base training config; Table 1 trains it for every protocol
  and recipe; the cut-layer and label-DP sweeps run on ``sweep_protocols`` with
  the tuned recipe. Attacks use the first ``attack_examples`` test users
  (0 = all) of the first seed's model.
  """

  train: TrainConfig
  protocols: tuple[str, ...] = ("sl", "fsl")
  recipes: tuple[str, ...] = ("tuned", "paper")
  seeds: tuple[int, ...] = (0,)
  attack_examples: int = 1000
  sweep_protocols: tuple[str, ...] = ("sl",)
  sigmas: tuple[float, ...] = (0.0, 0.01, 0.1, 1.0)
  frozen: bool = True
  target_epsilons: tuple[float, ...] = (4.0,)
  label_epsilons: tuple[float, ...] = (1.0,)
  # Sweep attack names (experiments.sweeping.ATTACK_SPECS): informed = the default attack (Bayes
  # with the informed prior under noise), bayes = Bayes with the marginal prior.
  variants: tuple[str, ...] = ("informed", "clip_aware", "bayes", "paper")
  # Training users (experiments.training_users): at each of these cut-layer sigmas (clip auto), SL
  # trained with --releases=all is attacked on its last epoch and on every release, and FSL with
  # the local learning rate tracking_learning_rate with fsl_tracking; train_user_examples users.
  train_user_sigmas: tuple[float, ...] = ()
  train_user_examples: int = 1000
  tracking_learning_rate: float = 0.01
  # Audits (experiments.audit_study): the cut channel at each of these sigmas (audit_trials
  # replays per label, audit_training_trials canaries through the training loop), the label channel
  # at audit_label_epsilon (0 = off), and the whole pipeline for each protocol of audit_pipeline
  # with audit_canaries canaries, cut sigma calibrated to audit_cut_epsilon (cut only), device
  # DP-SGD off, and on (clip audit_device_clip, multiplier audit_device_sigma) where
  # audit_device_dp holds True.
  audit_sigmas: tuple[float, ...] = ()
  audit_trials: int = 1_000_000
  audit_training_trials: int = 100_000
  audit_label_epsilon: float = 0.0
  audit_pipeline: tuple[str, ...] = ()
  audit_canaries: int = 500
  audit_cut_epsilon: float = 2.0
  audit_device_dp: tuple[bool, ...] = (False,)
  audit_device_clip: float = 1.0
  audit_device_sigma: float = 2.0
  # The defences' frontier (experiments.defense_studying): these points of its grid, each attacked
  # on defense_examples test users (adaptive, naive, label_direction); () = none.
  defense_points: tuple[str, ...] = ()
  defense_examples: int = 512


# StudyConfig fields added after the first committed reports, with the value that means "as
# before": left out of reproduce_config.json and of the study fingerprints at that value.
LATER_STUDY_FIELDS = {
  "train_user_sigmas": (),
  "train_user_examples": 1000,
  "tracking_learning_rate": 0.01,
  "audit_sigmas": (),
  "audit_trials": 1_000_000,
  "audit_training_trials": 100_000,
  "audit_label_epsilon": 0.0,
  "audit_pipeline": (),
  "audit_canaries": 500,
  "audit_cut_epsilon": 2.0,
  "audit_device_dp": (False,),
  "audit_device_clip": 1.0,
  "audit_device_sigma": 2.0,
  "defense_points": (),
  "defense_examples": 512,
}
_TRAIN_USER_FIELDS = ("train_user_sigmas", "train_user_examples", "tracking_learning_rate")


def stored_study_dict(study: StudyConfig) -> dict:
  """The study as reproduce_config.json holds it (see ``LATER_STUDY_FIELDS``)."""
  out = dataclasses.asdict(study)
  if not study.train_user_sigmas:  # the other two fields only matter with points
    for name in _TRAIN_USER_FIELDS:
      del out[name]
  for name, value in LATER_STUDY_FIELDS.items():  # the audit fields at their defaults
    if name not in _TRAIN_USER_FIELDS and out[name] == value:
      del out[name]
  return out
