"""Experiment orchestration shared by the binaries: train a workdir, restore it, write results.

A trained workdir holds::

  config.json        the TrainConfig (a second run with another config refuses to overwrite)
  checkpoint.msgpack the train state after the last finished epoch (resume point)
  transcript.npz     the cut-layer traffic of the last epoch (h, g, indices)
  transcript_params.msgpack  the device parameters behind each transcript row
  metrics.json       test AUC / log-loss / accuracy, timings and the privacy report
  run.json           the manifest, written last (experiments/workdir.py): config fingerprint and
                     the SHA-256 of the data files and of every file above
"""

import dataclasses
import json
import math
import pathlib
import sys

import jax
import numpy as np

from experiments import common
from experiments import records
from experiments import workdir as workdir_lib
from experiments.configs import base as configs_base
from splitjax import audit
from splitjax import checkpointing
from splitjax import data as sj_data
from splitjax import defenses as defenses_lib
from splitjax import models
from splitjax import protocol
from splitjax import results
from splitjax import training
from splitjax.privacy import accounting
from splitjax.privacy import label_dp

PROTOCOLS = ("sl", "fsl")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class ConfigError(ValueError):
  """A config value that cannot work: the message names the field and the fix."""


def validate(config: configs_base.TrainConfig) -> None:
  """Rejects impossible configs with one clear line (before anything is written).

  Checks names and numbers first, then loads the data (bundled and parsed tables are cached
  in-process, so the later load is cheap): a bad dataset, CSV file, column role or label is
  reported before the workdir is touched, so the results already in it stay as they were.
  """
  if config.dataset not in sj_data.DATASETS:
    raise ConfigError(
      f"unknown dataset {config.dataset!r} (--dataset): choose one of {', '.join(sj_data.DATASETS)}"
    )
  if config.protocol not in PROTOCOLS:
    raise ConfigError(f"unknown --protocol {config.protocol!r}: choose one of {PROTOCOLS}")
  if config.releases not in RELEASES:
    raise ConfigError(f"unknown --releases {config.releases!r}: choose one of {RELEASES}")
  if config.releases == "all" and not config.record_device_params:
    raise ConfigError(
      "--releases=all records every release with the parameters behind it: drop "
      "--norecord_device_params"
    )
  if config.recipe not in training.RECIPES:
    raise ConfigError(
      f"unknown --recipe {config.recipe!r}: choose one of {sorted(training.RECIPES)}"
    )
  if config.head not in models.HEADS:
    raise ConfigError(f"unknown --head {config.head!r}: choose one of {models.HEADS}")
  if config.topology not in models.TOPOLOGIES:
    raise ConfigError(f"unknown --topology {config.topology!r}: choose one of {models.TOPOLOGIES}")
  clip = None
  if config.dp_clip not in ("none", "auto"):
    try:
      clip = float(config.dp_clip)
    except ValueError:
      raise ConfigError(
        f"--dp_clip={config.dp_clip!r} is not a number: give a positive number, 'auto' or 'none'"
      ) from None
    if not clip > 0 or math.isnan(clip):
      raise ConfigError(f"--dp_clip={config.dp_clip} must be a positive number (or 'auto'/'none')")
  if config.defenses:
    chain = defense_plan(config)
    row_defenses = [d.text() for d in chain.pre + chain.between + chain.post]
    if config.topology != "device_top" and (row_defenses or chain.label_smoothing):
      raise ConfigError(
        f"--defense={(row_defenses or ['label_smoothing'])[0]} acts on the cut gradients the "
        "device sends (topology device_top); device_bottom takes nopeek:ALPHA and "
        "activation_noise:SIGMA"
      )
    if config.topology == "device_top" and chain.nopeek:
      raise ConfigError(
        "--defense=nopeek regularises the device's encoder: it needs --topology=device_bottom"
      )
    defenses_lib.check_covered(
      chain, 1.0 if (config.dp_noise_multiplier or config.target_epsilon) else 0.0
    )
  s = config.dp_noise_multiplier
  if math.isnan(s) or s < 0:
    raise ConfigError(f"--dp_noise_multiplier={s} must be >= 0 (0 = no noise, inf = frozen server)")
  if config.target_epsilon and (
    math.isnan(config.target_epsilon)
    or config.target_epsilon <= 0
    or math.isinf(config.target_epsilon)
  ):
    raise ConfigError(
      f"--target_epsilon={config.target_epsilon} must be a positive finite number "
      "(omit it for no calibration)"
    )
  if config.target_epsilon and s:
    raise ConfigError(
      f"--dp_noise_multiplier={s} and --target_epsilon={config.target_epsilon} "
      "contradict each other (the calibration chooses sigma): give one of them"
    )
  if not 0 < config.target_delta < 1:
    raise ConfigError(f"--target_delta={config.target_delta} must lie in (0, 1), e.g. 1e-5")
  if config.label_dp_epsilon and (
    math.isnan(config.label_dp_epsilon)
    or config.label_dp_epsilon <= 0
    or math.isinf(config.label_dp_epsilon)
  ):
    raise ConfigError(
      f"--label_dp_epsilon={config.label_dp_epsilon} must be a positive finite "
      "number (omit it for no label DP)"
    )
  for name in ("samples_per_device", "devices_per_round", "local_steps"):
    if getattr(config, name) < 1:
      raise ConfigError(f"--{name}={getattr(config, name)} must be >= 1")
  for name in ("epochs", "batch_size"):
    if getattr(config, name) < 0:
      raise ConfigError(
        f"--{name}={getattr(config, name)} must be > 0 (omit it for the recipe's value)"
      )
  if math.isnan(config.learning_rate) or config.learning_rate < 0:
    raise ConfigError(
      f"--learning_rate={config.learning_rate} must be > 0 (omit it for the recipe's value)"
    )
  if (s > 0 or config.target_epsilon) and config.dp_clip == "none":
    raise ConfigError("noise needs a clip norm: set --dp_clip=auto or a number")
  if (s > 0 or config.target_epsilon) and clip is not None and math.isinf(clip):
    raise ConfigError(
      f"--dp_clip={config.dp_clip} with noise gives infinite noise: set "
      "--dp_clip=auto or a finite number"
    )
  if (
    math.isnan(config.device_dp_clip)
    or config.device_dp_clip < 0
    or math.isnan(config.device_dp_noise_multiplier)
    or config.device_dp_noise_multiplier < 0
  ):
    raise ConfigError("--device_dp_clip and --device_dp_noise_multiplier must be >= 0")
  if config.device_dp_noise_multiplier > 0 and not config.device_dp_clip:
    raise ConfigError("device DP-SGD noise needs --device_dp_clip (a positive number)")
  if config.device_dp_noise_multiplier > 0 and math.isinf(config.device_dp_clip):
    raise ConfigError(
      f"--device_dp_clip={config.device_dp_clip} with noise gives infinite noise: "
      "give a finite positive number"
    )
  for flag, sigma, c in (
    ("--dp_noise_multiplier x --dp_clip", s, clip),
    (
      "--device_dp_noise_multiplier x --device_dp_clip",
      config.device_dp_noise_multiplier,
      config.device_dp_clip,
    ),
  ):
    if c is not None and math.isfinite(sigma) and math.isfinite(c) and sigma * c > _FLOAT32_MAX:
      raise ConfigError(
        f"{flag} = {sigma * c:.3g} overflows float32 (max {_FLOAT32_MAX:.3g}): "
        "the noise would be inf; lower the noise multiplier or the clip norm"
      )
  if config.device_dp_clip and config.topology != "device_top":
    raise ConfigError("device DP-SGD (--device_dp_clip) is implemented for device_top only")
  if config.protocol == "fsl" and config.topology != "device_top":
    raise ConfigError("--protocol=fsl needs --topology=device_top")
  if config.dp_clip == "auto" and config.topology != "device_top":
    raise ConfigError("--dp_clip=auto is defined for gradients (device_top); give a number")
  if config.seed < 0 or config.split_seed < 0:
    raise ConfigError(
      f"--seed={config.seed} must be an integer >= 0 (split seed {config.split_seed} likewise)"
    )
  dataset = load_data(config)  # sj_data.DataError: one line naming the file/column and the fix
  model_of(config, dataset)  # the model builds for these columns


CLIP_SOURCES = {
  "auto": training.AUTO_CLIP_SOURCE,
  "none": "no clip",
  "number": "public: the number given (--dp_clip)",
}


def recipe_of(config) -> training.Recipe:
  recipe = training.RECIPES[config.recipe]
  updates = {
    k: getattr(config, k) for k in ("epochs", "learning_rate", "batch_size") if getattr(config, k)
  }
  return dataclasses.replace(recipe, **updates)


def clamped_sizes(config, num_train: int):
  """The recipe and FSL sizes, with batch and device sizes larger than the data clamped to it.

  Returns:
    (recipe, {"samples_per_device", "devices_per_round"}, notes): one note per clamped value
    (a batch of 10^9 rows would otherwise allocate for 10^9 rows).
  """
  recipe = recipe_of(config)
  notes = []
  if recipe.batch_size > num_train:
    notes.append(
      f"--batch_size={recipe.batch_size} is larger than the {num_train:,} training "
      f"rows: clamped to {num_train:,}"
    )
    recipe = dataclasses.replace(recipe, batch_size=num_train)
  per_device, devices = config.samples_per_device, config.devices_per_round
  if config.protocol == "fsl":
    if per_device > num_train:
      notes.append(
        f"--samples_per_device={per_device} is larger than the {num_train:,} "
        f"training rows: clamped to {num_train:,}"
      )
      per_device = num_train
    most = max(1, num_train // per_device)
    if devices > most:
      notes.append(
        f"--devices_per_round={devices} x --samples_per_device={per_device} is more "
        f"than the {num_train:,} training rows: devices_per_round clamped to {most:,}"
      )
      devices = most
  return recipe, {"samples_per_device": per_device, "devices_per_round": devices}, notes


def releases_of(config) -> int:
  """Cut-layer gradients each training example sends: epochs (x local steps in FSL)."""
  epochs = recipe_of(config).epochs
  return epochs * (config.local_steps if config.protocol == "fsl" else 1)


def load_data(config) -> sj_data.TabularData:
  kwargs = {}
  if config.private_dense:
    kwargs["private_dense"] = tuple(config.private_dense)
  if config.schema:
    kwargs["schema"] = config.schema
  if config.dataset == "synthetic":
    kwargs.update(num_examples=config.synthetic_examples, correlation=config.synthetic_correlation)
  data = sj_data.load(
    config.dataset, seed=config.split_seed, path=config.data_path or None, **kwargs
  )
  if getattr(config, "audit_canaries", 0):
    rows, bits = canaries(config, len(data.train))
    y = np.array(data.train.y, copy=True)
    y[rows] = bits
    data = dataclasses.replace(data, train=dataclasses.replace(data.train, y=y))
  return data


def canaries(config, num_train: int) -> tuple[np.ndarray, np.ndarray]:
  """The pipeline audit's canaries: ``(training rows [m], secret labels [m])``.

  FSL: the first example of each of the first m devices of the partition (one canary per device,
  so each returned update carries one canary); SL: m distinct rows in an order drawn from the
  audit's seed. The labels are bits drawn uniformly from the audit's own key
  (``splitjax.audit.canary_bits``), not the real labels.
  """
  m = int(config.audit_canaries)
  if config.protocol == "fsl":
    _, sizes, _ = clamped_sizes(config, num_train)
    part = training.device_partition(num_train, sizes["samples_per_device"], config.seed)
    if m > part.shape[0]:
      raise ConfigError(
        f"{m:,} FSL canaries need as many devices, the data has {part.shape[0]:,}: lower --trials"
      )
    rows = part[:m, 0].astype(np.int64)
  else:
    if m > num_train:
      raise ConfigError(f"{m:,} canaries but {num_train:,} training rows: lower --trials")
    rows = np.random.default_rng([config.seed, 20]).permutation(num_train)[:m].astype(np.int64)
  return rows, audit.canary_bits(config.seed, m)


def model_of(config, dataset: sj_data.TabularData) -> models.SplitModel:
  spec = models.ModelSpec(
    pub_cardinalities=tuple(dataset.pub_cardinalities),
    num_pub_dense=int(dataset.train.pub_dense.shape[1]),
    priv_cardinalities=tuple(dataset.priv_cardinalities),
    num_priv_dense=int(dataset.train.priv_dense.shape[1]),
    hidden=tuple(config.hidden),
    head=config.head,
    topology=config.topology,
  )
  return models.make_model(spec)


# Initial train states by (architecture, recipe, frozen server, seed): flax initialises eagerly
# (an op at a time, about a second per state), and every restore and the public clip need one.
# Read-only (JAX arrays are immutable); a handful of entries at most per process.
_TEMPLATES: dict = {}


def frozen_server_of(config, sigma: float) -> bool:
  """Noise multiplier inf in device_top: the server's model stays at initialisation."""
  return math.isinf(sigma) and config.topology == "device_top"


def sends_nothing(config, sigma: float) -> bool:
  """Noise multiplier inf in device_bottom: the device sends zero rows (clip 0, no noise), the
  server trains its head on its own features alone and is evaluated on them (the public-only
  yardstick of that topology)."""
  return math.isinf(sigma) and config.topology == "device_bottom"


def _state_template(model, config):
  """The initial train state of ``config`` (also the structure checkpoints restore into)."""
  recipe = recipe_of(config)
  frozen = frozen_server_of(config, config.dp_noise_multiplier)
  key = (results.fingerprint(model.spec.to_dict()), recipe, frozen, config.seed)
  if key not in _TEMPLATES:
    if len(_TEMPLATES) >= 8:
      _TEMPLATES.pop(next(iter(_TEMPLATES)))
    _TEMPLATES[key] = training.init_state(model, recipe, config.seed, freeze_server=frozen)
  return _TEMPLATES[key]


def train_workdir(
  config: configs_base.TrainConfig,
  workdir,
  *,
  resume: bool = False,
  overwrite: bool = False,
  keep_identical: bool = False,
  progress=common.progress,
  kill_switch=None,
) -> dict:
  """Trains per ``config`` into ``workdir``; returns the metrics dict (also in metrics.json).

  What is already in ``workdir`` decides (nothing is deleted before a new run is complete):

  - nothing (a new or empty directory): train.
  - a finished run of the same config: kept, its metrics returned ("already trained"); with
    ``overwrite`` (and not ``keep_identical``) it is retrained beside and swapped in.
  - an unfinished run of the same config: continued with ``resume``, restarted beside with
    ``overwrite``, refused otherwise (naming both flags).
  - a run of another config (or an unreadable config.json): replaced, beside and swapped in at
    completion, only with ``overwrite``; refused otherwise.

  ``sweep`` and ``reproduce`` pass ``resume=True, keep_identical=True``: their points resume,
  and ``--overwrite`` replaces only points whose config changed.

  Raises:
    ConfigError: a bad config, or ``resume`` with ``overwrite`` (from the train binary).
    WorkdirError: a foreign or unwritable workdir, another config without ``overwrite``, an
      unfinished run without ``resume``/``overwrite``.
  """
  config = resolve_aliases(config)
  validate(config)
  if resume and overwrite and not keep_identical:
    raise ConfigError(
      "--resume and --overwrite contradict each other: --resume continues the "
      "run in --workdir, --overwrite replaces it; give one of them"
    )
  with workdir_lib.own(workdir, "train") as workdir:
    metrics = _train_owned(
      config,
      workdir,
      resume=resume,
      overwrite=overwrite,
      keep_identical=keep_identical,
      progress=progress,
      kill_switch=kill_switch,
    )
  workdir_lib.barrier("train-written")  # jax.distributed: process 0's files are on disk
  return metrics


def _train_owned(
  config, workdir: pathlib.Path, *, resume, overwrite, keep_identical, progress, kill_switch
) -> dict:
  """`train_workdir` once the workdir is claimed and locked."""
  cfg = configs_base.stored_train_dict(config)
  status, epoch = _run_status(workdir, cfg, config)
  # jax.distributed: every process has read the workdir before process 0 writes into it.
  workdir_lib.barrier("train-status")
  epochs = recipe_of(config).epochs
  if status == "finished" and not (overwrite and not keep_identical):
    metrics = results.read_json(workdir / "metrics.json")
    if progress:
      progress(
        f"already trained (test AUC {auc_text(metrics)}) in {workdir}: kept; --overwrite to retrain"
      )
    return metrics
  if status == "unfinished" and resume:
    return _train_in_place(config, workdir, resume=True, progress=progress, kill_switch=kill_switch)
  if status == "empty":
    return _train_in_place(
      config, workdir, resume=resume, progress=progress, kill_switch=kill_switch
    )
  if not overwrite:
    if status == "unfinished":
      raise workdir_lib.WorkdirError(
        f"an unfinished run (epoch {epoch} of {epochs}) is in {workdir}: --resume to continue, "
        "--overwrite to restart"
      )
    results.check_config_compatible(workdir, cfg, overwrite=False)  # raises, naming the differences
    raise workdir_lib.WorkdirError(
      f"workdir {workdir} holds another run: use --overwrite or another --workdir"
    )
  staging = (
    workdir_lib.fresh_staging(workdir)
    if workdir_lib.is_writer()
    else (workdir / workdir_lib.STAGING)
  )
  metrics = _train_in_place(
    config, staging, resume=False, progress=progress, kill_switch=kill_switch
  )
  if not workdir_lib.is_writer():
    return metrics
  removed = workdir_lib.swap_in(workdir)
  if progress:
    progress(
      f"--overwrite: the new run replaced the earlier one in {workdir} (removed "
      f"{', '.join(removed)})"
    )
  return metrics


def auc_text(metrics: dict) -> str:
  """The test AUC with 4 decimals, or "undefined (...)" for a one-class test split."""
  if metrics.get("test_auc_note"):
    return "undefined (one class in the test split)"
  return f"{float(metrics['test_auc']):.4f}"


def _run_status(workdir: pathlib.Path, cfg: dict, config) -> tuple[str, int]:
  """('empty' | 'other' | 'finished' | 'unfinished', epochs done) of the run in ``workdir``."""
  target = workdir / "config.json"
  if not target.exists():
    return "empty", 0
  try:
    same = results.read_json(target) == json.loads(results.dumps_json(cfg))
  except results.ResultsError:
    return "other", 0
  if not same:
    return "other", 0
  if (workdir / "metrics.json").exists():
    manifest = workdir_lib.read_manifest(workdir)
    changed = workdir_lib.changed_artifacts(workdir, manifest) if manifest else []
    if changed:
      raise workdir_lib.WorkdirError(
        f"the finished run in {workdir} is damaged: {', '.join(changed)} changed since "
        f"{workdir_lib.MANIFEST} recorded it; --overwrite to retrain"
      )
    return "finished", recipe_of(config).epochs
  epoch = 0
  if (workdir / "checkpoint.msgpack").exists():
    try:
      meta = checkpointing.checkpoint_metadata(workdir / "checkpoint.msgpack")
      epoch = int(meta.get("epoch", 0))
    except checkpointing.CheckpointError:
      epoch = 0  # --resume reports the corruption with its fix
  return "unfinished", epoch


TRAIN_ARTIFACTS = (
  "config.json",
  "checkpoint.msgpack",
  "transcript.npz",
  "transcript_params.msgpack",
  "history.jsonl",
  "metrics.json",
)


def _train_in_place(config, workdir: pathlib.Path, *, resume: bool, progress, kill_switch) -> dict:
  """Trains (or resumes) in ``workdir``; writes metrics.json, then the manifest last."""
  cfg = configs_base.stored_train_dict(config)
  writer = workdir_lib.is_writer()  # under jax.distributed only process 0 writes
  if writer:
    results.check_config_compatible(workdir, cfg, overwrite=False)
  dataset = load_data(config)
  if progress:
    for note in dataset.notes:
      progress(note)
  model = model_of(config, dataset)
  recipe, sizes, notes = clamped_sizes(config, len(dataset.train))
  if progress:
    for note in notes:
      progress(note)
  releases = releases_of(config)
  fingerprint = run_fingerprint(model, json.loads(results.dumps_json(cfg)))  # = config.json
  ckpt_path = workdir / "checkpoint.msgpack"

  state, start_epoch, history, extra = None, 0, [], {}
  if resume and ckpt_path.exists():
    state, meta = checkpointing.restore_checkpoint(
      ckpt_path, _state_template(model, config), fingerprint=fingerprint
    )
    start_epoch, history, extra = meta["epoch"], meta["history"], meta["extra"]
    if progress:
      progress(f"resuming from epoch {start_epoch} of {recipe.epochs} ({ckpt_path})")

  # Cut-layer DP parameters (public).
  if "l2_clip_norm" not in extra:
    init = _state_template(model, config)
    # --dp_clip=auto reads public information only (training.auto_clip_norm says what).
    if config.dp_clip == "auto" and config.topology != "device_top":
      raise ConfigError("--dp_clip=auto is defined for gradients (device_top); give a number")
    auto_clip, mean_norm = (
      training.auto_clip_norm(model, init, dataset, config.seed)
      if config.topology == "device_top"
      else (float("nan"), float("nan"))
    )
    if config.dp_clip == "none":
      clip = math.inf
    elif config.dp_clip == "auto":
      clip = auto_clip
    else:
      clip = float(config.dp_clip)
    sigma = config.dp_noise_multiplier
    if config.target_epsilon:
      sigma = accounting.calibrate_noise_multiplier(
        target_epsilon=config.target_epsilon, target_delta=config.target_delta, releases=releases
      )
    extra = {
      "l2_clip_norm": clip,
      "noise_multiplier": sigma,
      "mean_grad_norm_init": mean_norm,
      "clip_source": CLIP_SOURCES[
        config.dp_clip if config.dp_clip in ("auto", "none") else "number"
      ],
    }
  clip, sigma = float(extra["l2_clip_norm"]), float(extra["noise_multiplier"])
  frozen_server, nothing_sent = frozen_server_of(config, sigma), sends_nothing(config, sigma)
  if frozen_server and progress:
    progress(
      "noise multiplier = inf: the server receives pure noise; its model stays at "
      "initialisation (the utility floor of this topology)"
    )
  if nothing_sent and progress:
    progress(
      "noise multiplier = inf: the device sends zero rows; the server trains and is evaluated "
      "on its own features alone (the utility floor of this topology)"
    )
  device_clip = config.device_dp_clip or math.inf
  dp = training.DPConfig(
    np.float32(0.0 if nothing_sent else clip),
    np.float32(0.0 if frozen_server or nothing_sent else sigma),
    np.float32(device_clip),
    np.float32(config.device_dp_noise_multiplier),
  )

  labels = train_labels(config, dataset.train.y)

  def on_transcript(epoch, transcript):
    # Written before the epoch's checkpoint: a finished checkpoint implies its transcripts.
    if not writer:
      return
    if config.releases == "all":
      write_transcript(workdir, transcript, name=release_chunk(epoch))
    if epoch == recipe.epochs - 1:
      write_transcript(workdir, transcript, device_params=config.record_device_params)

  on_step, epoch_line = common.fit_callbacks(progress, config.protocol, recipe.epochs)

  def on_epoch_end(epoch, st, log):
    if epoch_line is not None:
      epoch_line(epoch, log)
    history.append(log)
    if writer:
      checkpointing.save_checkpoint(
        ckpt_path,
        st,
        metadata={
          "fingerprint": fingerprint,
          "epoch": epoch + 1,
          "history": history,
          "extra": extra,
        },
      )
      records.write_history(workdir, history)  # from the checkpointed history
    common.checkpointed(f"epoch {epoch + 1} of {recipe.epochs}")
    if kill_switch is not None:
      kill_switch.tick()

  chain = defense_plan(config)
  fit_kwargs = dict(
    defenses=chain,
    recipe=recipe,
    seed=config.seed,
    protocol_name=config.protocol,
    dp=dp,
    samples_per_device=sizes["samples_per_device"],
    devices_per_round=sizes["devices_per_round"],
    local_steps=config.local_steps,
    labels=labels,
    state=state,
    start_epoch=start_epoch,
    record=config.releases,
    on_epoch_end=on_epoch_end,
    on_transcript=on_transcript,
    on_step=on_step,
  )
  if frozen_server:
    fit_kwargs["freeze_server"] = True
  if start_epoch < recipe.epochs:
    result = training.fit(model, dataset.train, **fit_kwargs)
    state = result.state
    # The accountant's k (planned from the config, before training: calibration needs it) must be
    # what the loop sent: every example the same number of rows per epoch.
    per_epoch = releases // recipe.epochs
    counted = result.releases
    if counted.min() != counted.max() or counted.max() != per_epoch * (recipe.epochs - start_epoch):
      raise RuntimeError(
        f"internal error: the training loop sent {counted.min()}-{counted.max()} cut-layer rows "
        f"per example in epochs {start_epoch + 1}-{recipe.epochs}, but the accountant assumed "
        f"{releases} over {recipe.epochs} epochs; the epsilon would be wrong: metrics.json is "
        "not written"
      )
  elif not (workdir / "transcript.npz").exists():
    raise checkpointing.CheckpointError(
      f"{workdir} holds a finished checkpoint but no transcript: rerun "
      "experiments.train with --overwrite"
    )
  # Killed after the last checkpoint? Then only the evaluation below is redone.
  if writer:
    records.write_history(workdir, history)
  test = training.evaluate(model, state, dataset.test, zero_cut=nothing_sent)
  auc_note = None
  if math.isnan(test["auc"]):
    classes = np.unique(dataset.test.y)
    auc_note = (
      f"undefined: the {len(dataset.test):,} test rows all have label "
      f"{int(classes[0]) if len(classes) else '?'} (AUC needs both classes); use more "
      "data or another split"
    )
    print(f"warning: test AUC {auc_note}", file=sys.stderr)
  epoch_seconds = [h["seconds"] for h in history]
  metrics = {
    "dataset": config.dataset,
    "protocol": config.protocol,
    "recipe": config.recipe,
    "topology": config.topology,
    "head": config.head,
    "seed": config.seed,
    "epochs": recipe.epochs,
    "test_auc": test["auc"],
    "test_log_loss": test["log_loss"],
    "test_accuracy": test["accuracy"],
    "train_loss": history[-1]["train_loss"],
    **({"test_auc_note": auc_note} if auc_note else {}),
    "train_seconds": float(sum(epoch_seconds)),
    # The first epoch includes compilation: leave it out when there are others.
    "seconds_per_epoch": float(np.median(epoch_seconds[1:] or epoch_seconds)),
    "num_train": len(dataset.train),
    "num_test": len(dataset.test),
    "mean_grad_norm_init": extra["mean_grad_norm_init"],
    "clip_source": extra.get("clip_source", "private training data (splitjax < 0.2)"),
    "frozen_server": frozen_server,
    # device_bottom at sigma = inf: zero rows sent, the head trained and evaluated without them.
    "cut_rows_zeroed": nothing_sent,
    # Rows the DP clip sent as zero rows because they held an inf or NaN (0 for a sane model).
    "nonfinite_rows_zeroed": int(sum(h.get("nonfinite_rows_zeroed", 0) for h in history)),
    # What ran, beside the requested config (config.json, which compatibility checks compare):
    # the recipe with the flag overrides applied, and the releases each example made.
    "resolved_config": {
      **dataclasses.asdict(recipe),
      "releases": releases,
      **{k: v for k, v in sizes.items() if v != getattr(config, k)},
      "hidden": list(config.hidden),
    },
    "environment": records.environment(),
  }
  if chain is not None:
    # The chain as it ran; what the epsilons below cover (run with noise only when covered).
    metrics["defense_chain"] = chain.stages()
    metrics["defense_chain_covered"] = chain.covered
    if not chain.covered:
      metrics["defense_chain_note"] = f"the cut-layer epsilon is not covered: {chain.reason}"
  metrics.update(
    accounting.privacy_report(
      noise_multiplier=sigma,
      l2_clip_norm=clip,
      releases=releases,
      delta=config.target_delta,
      label_epsilon=config.label_dp_epsilon or None,
      device_noise_multiplier=(
        config.device_dp_noise_multiplier if config.device_dp_clip else None
      ),
      device_releases=releases if config.device_dp_clip else None,
    )
  )
  if not writer:
    return metrics
  results.atomic_write_json(workdir / "metrics.json", metrics)
  workdir_lib.write_manifest(
    workdir,
    kind="train",
    config_fingerprint=results.fingerprint(cfg),
    artifacts=[a for a in TRAIN_ARTIFACTS if (workdir / a).exists()]
    + release_chunks(workdir, recipe.epochs if config.releases == "all" else 0),
    data=workdir_lib.data_files(config),
  )
  return metrics


def resolve_aliases(config):
  """``config`` with ``--defense=activation_noise:SIGMA`` resolved: in ``device_bottom`` the DP
  chain on the activations is that Gaussian mechanism, so it becomes ``dp_noise_multiplier``
  (accounted as the cut-layer epsilon); ConfigError for a conflicting or misplaced one."""
  found = [e for e in config.defenses if e.strip().partition(":")[0] == "activation_noise"]
  if not found:
    return config
  if config.topology != "device_bottom":
    raise ConfigError(
      "--defense=activation_noise noises the activations the device sends: it needs "
      "--topology=device_bottom (device_top's cut noise is --dp_noise_multiplier)"
    )
  if len(found) > 1:
    raise ConfigError("activation_noise appears twice in the --defense chain")
  value = found[0].strip().partition(":")[2]
  try:
    sigma = float(value)
  except ValueError:
    raise ConfigError(
      f"--defense={found[0]}: {value!r} is not a number, e.g. activation_noise:1.0"
    ) from None
  if not (sigma > 0 and math.isfinite(sigma)):
    raise ConfigError(f"--defense={found[0]}: SIGMA must be a positive number")
  if config.dp_noise_multiplier not in (0.0, sigma) or config.target_epsilon:
    raise ConfigError(
      f"--defense={found[0]} is --dp_noise_multiplier={sigma:g}: give one of the two, not "
      "--dp_noise_multiplier or --target_epsilon beside it"
    )
  if config.dp_clip == "none":
    raise ConfigError(
      f"--defense={found[0]} needs a finite clip of the activations: give --dp_clip=NUMBER"
    )
  rest = tuple(e for e in config.defenses if e not in found)
  return dataclasses.replace(config, defenses=rest, dp_noise_multiplier=sigma)


def defense_plan(config):
  """The ``--defense`` chain of ``config`` as a `splitjax.defenses.Plan`, or None without one."""
  if not config.defenses:
    return None
  return defenses_lib.plan(config.defenses, finite_clip=config.dp_clip != "none")


def train_labels(config, y: np.ndarray) -> np.ndarray | None:
  """The labels training uses under ``--label_dp_epsilon`` (None without label DP).

  Randomized response drawn once, before training, from ``default_rng([seed, 7])``: every epoch
  trains on the same noisy labels (what the label channel's audit checks).
  """
  if not config.label_dp_epsilon:
    return None
  rng = np.random.default_rng([config.seed, 7])
  return label_dp.randomized_response(y, config.label_dp_epsilon, rng=rng)


def run_fingerprint(model, stored_config: dict) -> str:
  """Identifies a training run: the architecture and the config as stored in config.json."""
  return results.fingerprint({"spec": model.spec.to_dict(), "config": stored_config})


RELEASES = ("last_epoch", "all")  # --releases of train and attack
RELEASES_DIR = "releases"


def release_chunk(epoch: int) -> str:
  """The name (relative to the workdir) of epoch ``epoch``'s releases, 0-based: epoch_NNNN."""
  return f"{RELEASES_DIR}/epoch_{epoch + 1:04d}"


def release_chunks(workdir: pathlib.Path, epochs: int) -> list[str]:
  """The artifact names of ``epochs`` epochs of releases (``--releases=all``)."""
  out = []
  for epoch in range(epochs):
    out += [release_chunk(epoch) + ".npz", release_chunk(epoch) + "_params.msgpack"]
  return out


def write_transcript(
  workdir: pathlib.Path,
  transcript: protocol.Transcript,
  *,
  device_params: bool = True,
  name: str = "transcript",
) -> None:
  """Atomically writes the transcript arrays and (if `device_params`) the parameters behind them:
  ``NAME.npz`` and ``NAME_params.msgpack`` (a chunk of ``--releases=all``: ``release_chunk``).
  Without `device_params` an FSL transcript's optimiser states and returned updates are left out
  too (only the training-user attacks read them)."""
  import io as _pyio

  if not device_params:  # FSL's optimiser states and returned updates serve the same attacks
    transcript = transcript._replace(device_opt=None, device_updates=None, update_coords=None)
  buf = _pyio.BytesIO()
  np.savez_compressed(buf, **transcript.to_arrays())
  (workdir / name).parent.mkdir(parents=True, exist_ok=True)
  if device_params:
    checkpointing.save_checkpoint(
      workdir / f"{name}_params.msgpack",
      transcript.device_params,
      metadata={
        "fingerprint": "transcript",
        "versions": int(jax.tree.leaves(transcript.device_params)[0].shape[0]),
      },
    )
  results.atomic_write_bytes(workdir / f"{name}.npz", buf.getvalue())


def config_from_json(raw: dict) -> configs_base.TrainConfig:
  """Rebuilds a TrainConfig from config.json (lists -> tuples, "inf" -> float)."""
  defaults = configs_base.TrainConfig()
  kwargs = {}
  for f in dataclasses.fields(configs_base.TrainConfig):
    if f.name not in raw:
      continue
    v, d = raw[f.name], getattr(defaults, f.name)
    if isinstance(d, tuple):
      v = tuple(v)
    elif isinstance(d, float):
      v = float(v)
    kwargs[f.name] = v
  return configs_base.TrainConfig(**kwargs)


class Restored:
  """A trained workdir loaded back: config, data, model, final state, transcript."""

  def __init__(self, workdir):
    workdir = pathlib.Path(workdir)
    if not (workdir / "metrics.json").exists():
      raise checkpointing.CheckpointError(
        f"no finished training run in {workdir}: run experiments.train "
        "with this --workdir first (or check the path)"
      )
    raw = results.read_json(workdir / "config.json")
    self.manifest = workdir_lib.read_manifest(workdir)
    if self.manifest is None:
      print(
        f"warning: unverified: {workdir} was written by splitjax < 0.2 (no {workdir_lib.MANIFEST});"
        " its files are read as they are",
        file=sys.stderr,
      )
    self.config = config_from_json(raw)
    if self.manifest is not None:
      workdir_lib.verify(workdir, self.manifest, data=workdir_lib.data_files(self.config))
    self.workdir = workdir
    self.metrics = results.read_json(workdir / "metrics.json")
    self.dataset = load_data(self.config)
    self.model = model_of(self.config, self.dataset)
    fingerprint = run_fingerprint(self.model, raw)
    self.fingerprint = fingerprint
    self.state, _ = checkpointing.restore_checkpoint(
      workdir / "checkpoint.msgpack",
      _state_template(self.model, self.config),
      fingerprint=fingerprint,
    )

  def transcript(self, name: str = "transcript") -> protocol.Transcript:
    """The recorded transcript ``NAME.npz`` with the parameters behind it (the last epoch's by
    default; ``release_chunk(epoch)`` for one epoch of ``--releases=all``)."""
    path = self.workdir / f"{name}.npz"
    if not path.exists():
      raise checkpointing.CheckpointError(
        f"no transcript in {self.workdir}: rerun experiments.train"
      )
    results.check_regular_file(path, checkpointing.CheckpointError)
    try:
      with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
      rows = {len(arrays[k]) for k in ("h", "g", "example_index", "param_index", "local_step")}
    except Exception as e:  # corrupted file
      raise checkpointing.CheckpointError(
        f"transcript {path} is unreadable ({type(e).__name__}): rerun "
        "experiments.train with --overwrite"
      ) from None
    num_train = len(self.dataset.train)
    index = arrays["example_index"]
    if len(rows) != 1 or (len(index) and (index.min() < 0 or index.max() >= num_train)):
      raise checkpointing.CheckpointError(
        f"transcript {path} does not fit this run's data ({len(index):,} rows with example "
        f"indices in [{index.min() if len(index) else 0}, "
        f"{index.max() if len(index) else 0}], {num_train:,} training rows): rerun "
        "experiments.train with --overwrite"
      )
    params_path = self.workdir / f"{name}_params.msgpack"
    if not params_path.exists() and not getattr(self.config, "record_device_params", True):
      raise checkpointing.CheckpointError(
        f"{self.workdir} was trained without the per-step device parameters that attacking "
        "training users needs: retrain with experiments.train --record_device_params "
        "--overwrite (sweep points leave them out), or attack test users (--users=test)"
      )
    pidx = arrays["param_index"]

    def template(meta):  # the saved versions decide the leading axis
      versions = int(meta.get("versions", int(pidx.max()) + 1 if len(pidx) else 1))
      if len(pidx) and (pidx.min() < 0 or pidx.max() >= versions):
        raise checkpointing.CheckpointError(
          f"transcript {path} refers to parameter versions [{pidx.min()}, {pidx.max()}] but "
          f"{params_path.name} holds {versions}: the two files are of different runs; rerun "
          "experiments.train with --overwrite"
        )
      return jax.tree.map(
        lambda x: np.zeros((versions,) + x.shape, x.dtype),
        jax.device_get(self.state.device_params),
      )

    params, _ = checkpointing.restore_checkpoint(params_path, template, fingerprint="transcript")
    return protocol.Transcript(
      h=arrays["h"],
      g=arrays["g"],
      example_index=arrays["example_index"],
      param_index=arrays["param_index"],
      local_step=arrays["local_step"],
      device_params=params,
      l2_clip_norm=float(arrays["l2_clip_norm"]),
      noise_multiplier=float(arrays["noise_multiplier"]),
      **self._fsl_fields(arrays, path),
    )

  def _fsl_fields(self, arrays: dict, path: pathlib.Path) -> dict:
    """The FSL recording's device slots, round-start optimiser states and returned updates
    (absent from SL transcripts and from FSL ones recorded before the tracking attacks)."""
    out = {k: arrays.get(k) for k in ("device_slot", "device_updates", "update_coords")}
    names = sorted(
      (k for k in arrays if k.startswith("device_opt_leaf_")), key=lambda k: int(k.rsplit("_")[-1])
    )
    out["device_opt"] = None
    if names:
      treedef = jax.tree.structure(jax.device_get(self.state.device_opt))
      if treedef.num_leaves != len(names):
        raise checkpointing.CheckpointError(
          f"transcript {path} holds {len(names)} optimiser-state leaves, this run's optimiser "
          f"{treedef.num_leaves}: rerun experiments.train with --overwrite"
        )
      out["device_opt"] = jax.tree.unflatten(treedef, [arrays[k] for k in names])
    return out

  def releases(self) -> protocol.Transcript:
    """Every release of every training example (``--releases=all``): the epochs' chunks in
    order, their parameter versions stacked one after the other (``param_index`` shifted)."""
    if self.config.releases != "all":
      raise checkpointing.CheckpointError(
        f"{self.workdir} recorded the last epoch only: retrain with experiments.train "
        "--releases=all --overwrite to attack every release, or attack with --releases=last_epoch"
      )
    epochs = range(recipe_of(self.config).epochs)
    return protocol.concatenate([self.transcript(release_chunk(epoch)) for epoch in epochs])
