"""The audit binary's work: empirical lower bounds per channel, beside the accounted guarantee.

``run_audit`` claims an ``audit`` workdir, records the request in ``audit_config.json`` (a rerun
with other settings is refused unless ``--overwrite``), runs the channel's audit through the
library's own code paths (`splitjax.audit`) and writes ``audit.json`` atomically, last.
"""

import dataclasses
import json
import math
import pathlib
import time

import numpy as np

from experiments import pipeline
from experiments import records
from experiments import workdir as workdir_lib
from experiments.configs import base as configs_base
from splitjax import audit
from splitjax import results
from splitjax import training
from splitjax.privacy import accounting

CHANNELS = ("cut", "label", "pipeline")
RECORD = "audit.json"
CONFIG_FILE = "audit_config.json"


class AuditUsageError(ValueError):
  """Flags that do not describe an audit (one line, like the other binaries' errors)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AuditRequest:
  """What ``experiments.audit`` runs besides the training config.

  Attributes:
    channel: ``cut``, ``label`` or ``pipeline``.
    trials: trials per hypothesis (0 = the channel's default, `splitjax.audit.DEFAULT_TRIALS`;
      the pipeline audit: its number of canaries m).
    training_trials: trials per hypothesis of the cut channel's k-release audit through the
      training loop (0 = its default).
    epochs: k, the releases per canary in the training-loop audits (>= 2 for the label channel).
    confidence: of every bound.
  """

  channel: str = "cut"
  trials: int = 0
  training_trials: int = 0
  epochs: int = 2
  confidence: float = audit.CONFIDENCE


def validate(config, request: AuditRequest) -> None:
  """One clear line for flags that cannot be audited, before the workdir is touched."""
  if request.channel not in CHANNELS:
    raise AuditUsageError(f"unknown --channel {request.channel!r}: choose one of {CHANNELS}")
  if not 0.0 < request.confidence < 1.0:
    raise AuditUsageError(f"--confidence={request.confidence} must be in (0, 1), e.g. 0.95")
  if request.trials < 0 or request.training_trials < 0:
    raise AuditUsageError("--trials and --training_trials must be positive (0 = the default)")
  if request.epochs < 1 or (request.channel == "label" and request.epochs < 2):
    raise AuditUsageError(
      f"--audit_epochs={request.epochs}: the label audit needs at least 2 epochs (a fresh label "
      "draw per epoch is what it catches), the cut audit at least 1"
    )
  if request.channel == "cut":
    sigma = config.dp_noise_multiplier
    if not config.target_epsilon and not (0 < sigma < math.inf):
      raise AuditUsageError(
        f"--dp_noise_multiplier={sigma}: the cut audit needs a finite positive noise multiplier "
        "(or --target_epsilon)"
      )
    if config.protocol != "sl" or config.topology != "device_top":
      raise AuditUsageError(
        "the cut audit runs the SL step of topology device_top (the cut release is the same in "
        "FSL); drop --protocol/--topology"
      )
  if request.channel == "pipeline" and config.topology != "device_top":
    raise AuditUsageError("the pipeline audit runs topology device_top (the paper's)")
  if request.channel == "label" and not config.label_dp_epsilon:
    raise AuditUsageError("the label audit needs --label_dp_epsilon (randomized response) > 0")


def _sigma(config) -> tuple[float, str]:
  if config.target_epsilon:
    sigma = accounting.calibrate_noise_multiplier(
      target_epsilon=config.target_epsilon, target_delta=config.target_delta, releases=1
    )
    return sigma, f"calibrated to epsilon {config.target_epsilon:g} per release"
  return float(config.dp_noise_multiplier), "--dp_noise_multiplier"


def _setup(config, progress):
  dataset = pipeline.load_data(config)
  model = pipeline.model_of(config, dataset)
  if progress:
    progress(f"audit model: {config.dataset} {config.head}, initialised at seed {config.seed}")
  return dataset, model


def audit_cut(config, request: AuditRequest, progress=None) -> dict:
  """The cut channel: one release through the test replay, k through the training loop."""
  sigma, sigma_source = _sigma(config)
  delta, conf = config.target_delta, request.confidence
  trials = request.trials or audit.DEFAULT_TRIALS["cut"]
  train_trials = request.training_trials or audit.DEFAULT_TRIALS["cut_training"]
  k = request.epochs
  dataset, model = _setup(config, progress)
  batch = 4096
  state = audit.audit_state(model, batch, k, config.seed)
  clip = None if config.dp_clip in ("none", "auto") else float(config.dp_clip)
  canary = audit.find_cut_canary(model, state, dataset.train, clip)
  dp = training.DPConfig(np.float32(canary.l2_clip_norm), np.float32(sigma)).as_arrays()

  mu1, eps1 = audit.cut_accounting(sigma, 1, delta)
  t0 = time.perf_counter()
  if progress:
    progress(
      f"cut audit: {trials:,} replays per label at sigma {sigma:g}, C {canary.l2_clip_norm:.4g}"
    )
  counts = audit.audit_replay(
    model,
    state,
    dataset.train,
    canary,
    dp,
    noise_multiplier=sigma,
    trials=trials,
    seed=config.seed,
    thresholds=audit.check_thresholds(mu1),
  )
  replay_s = time.perf_counter() - t0
  out = {
    "channel": "cut",
    "dataset": config.dataset,
    "noise_multiplier": sigma,
    "noise_multiplier_source": sigma_source,
    "l2_clip_norm": canary.l2_clip_norm,
    "clip_source": "--dp_clip"
    if clip is not None
    else (
      f"{audit.CANARY_CLIP_FRACTION:g} x the canary's margin (the audited mu does not depend on C)"
    ),
    "canary": {"row": canary.row, "margin": canary.margin},
    "releases": 1,
    "path": "test replay (training.replay_chunks)",
    **audit.summary(counts, mu_accounted=mu1, epsilon_accounted=eps1, delta=delta, confidence=conf),
    "two_sided": audit.two_sided(counts, mu1, conf),
    "saturation": audit.saturation(trials, audit.THRESHOLDS, delta, conf),
    "expected": _expected(mu1, trials, delta, conf),
    "seconds": replay_s,
  }

  muk, epsk = audit.cut_accounting(sigma, k, delta)
  if progress:
    progress(f"cut audit: {train_trials:,} canaries per label through {k} training epochs")
  t0 = time.perf_counter()
  bits = np.arange(2 * train_trials, dtype=np.int32) % 2
  canaries = audit.repeat_row(dataset.train, canary.row, bits)
  epochs = audit.training_transcripts(
    model, canaries, dp, epochs=k, seed=config.seed, batch_size=batch
  )
  stat, count_k = audit.release_statistics(epochs, canary, sigma, len(bits))
  if not np.all(count_k == k):
    raise RuntimeError(f"the training loop released canaries {sorted(set(count_k))} times, not {k}")
  counts_k = audit.count(stat, bits, audit.check_thresholds(muk))
  first, _ = audit.release_statistics(epochs[:1], canary, sigma, len(bits))
  counts_1 = audit.count(first, bits, audit.check_thresholds(mu1))
  out["training"] = {
    "path": f"training loop (training.fit, SL, {k} epochs, learning rate 0)",
    "releases": k,
    **audit.summary(
      counts_k, mu_accounted=muk, epsilon_accounted=epsk, delta=delta, confidence=conf
    ),
    "two_sided": audit.two_sided(counts_k, muk, conf),
    "saturation": audit.saturation(train_trials, audit.THRESHOLDS, delta, conf),
    "first_epoch": {
      **audit.summary(
        counts_1, mu_accounted=mu1, epsilon_accounted=eps1, delta=delta, confidence=conf
      ),
      "two_sided": audit.two_sided(counts_1, mu1, conf),
    },
    "seconds": time.perf_counter() - t0,
  }
  return out


def _expected(mu: float, trials: int, delta: float, confidence: float) -> dict:
  """The bounds an exact mu-GDP Gaussian mechanism gives in expectation at these trials."""
  c = audit.gaussian_counts(mu, trials)
  return {
    "mu_lower": audit.mu_lower(c, confidence),
    "epsilon_lower": audit.epsilon_lower(c, delta, confidence),
  }


def audit_label(config, request: AuditRequest, progress=None) -> dict:
  """The label channel: the pipeline's randomized response, read off k epochs' gradients."""
  eps = float(config.label_dp_epsilon)
  delta, conf, k = config.target_delta, request.confidence, request.epochs
  trials = request.trials or audit.DEFAULT_TRIALS["label"]
  dataset, model = _setup(config, progress)
  batch = 4096
  state = audit.audit_state(model, batch, k, config.seed)
  canary = audit.find_cut_canary(model, state, dataset.train)
  bits = audit.key_bits(config.seed + 1, 2 * trials)
  noisy = pipeline.train_labels(config, bits)  # what the pipeline trains on
  canaries = audit.repeat_row(dataset.train, canary.row, bits)
  if progress:
    progress(f"label audit: {len(bits):,} canaries through {k} training epochs, eps {eps:g}")
  t0 = time.perf_counter()
  epochs = audit.training_transcripts(
    model, canaries, training.no_dp(), epochs=k, seed=config.seed, batch_size=batch, labels=noisy
  )
  reads = audit.label_reads(epochs, canary.clip0, len(bits))
  counts = audit.count(reads, bits, audit.label_thresholds(k))
  summ = audit.summary(
    counts, mu_accounted=None, epsilon_accounted=eps, delta=delta, confidence=conf, pure=True
  )
  perfect = audit.Counts(
    counts.thresholds,
    np.full(k, counts.trials_h1),
    np.zeros(k, np.int64),
    counts.trials_h1,
    counts.trials_h0,
  )
  return {
    "channel": "label",
    "dataset": config.dataset,
    "label_dp_epsilon": eps,
    "releases": k,
    "path": f"training loop (training.fit, SL, {k} epochs, learning rate 0, no cut DP)",
    **summ,
    "epsilon_if_redrawn_each_epoch": audit.label_accounting(eps, k, fresh_draw_per_epoch=True),
    "saturation": {"epsilon_lower": audit.epsilon_lower(perfect, delta, conf), "mu_lower": None},
    "reads_agree_with_trained_labels": float(
      np.mean((reads == k) == (noisy == 1)) if noisy is not None else math.nan
    ),
    "trials_per_hypothesis": [counts.trials_h0, counts.trials_h1],
    "seconds": time.perf_counter() - t0,
  }


def run_audit(config, workdir, request: AuditRequest, *, overwrite: bool = False, progress=None):
  """Validates, claims ``workdir``, runs the audit and writes ``audit.json``; returns the record."""
  validate(config, request)
  if request.channel == "cut" and config.dp_clip == "none":  # the audit chooses C (see audit_cut)
    pipeline.validate(dataclasses.replace(config, dp_clip="auto"))
  else:
    pipeline.validate(config)  # --dp_clip is a positive number, auto or none
  if request.channel == "cut" and config.dp_clip not in ("none", "auto"):
    if math.isinf(float(config.dp_clip)):
      raise AuditUsageError(f"--dp_clip={config.dp_clip}: the cut audit needs a finite C")
  if request.channel == "pipeline":
    from experiments import auditing_pipeline  # pylint: disable=import-outside-toplevel

    auditing_pipeline.canary_config(config, request)  # m fits the data, before any write
  stored = {
    "train_config": configs_base.stored_train_dict(config),
    "audit": dataclasses.asdict(request),
  }
  with workdir_lib.own(workdir, "audit") as owned:
    config_path = pathlib.Path(owned) / CONFIG_FILE
    same = config_path.exists() and results.read_json(config_path) == json.loads(
      results.dumps_json(stored)
    )
    results.check_config_compatible(owned, stored, overwrite=overwrite, filename=CONFIG_FILE)
    if same and (pathlib.Path(owned) / RECORD).exists():
      if progress:
        progress(f"{pathlib.Path(owned) / RECORD} holds this audit: kept")
      return results.read_json(pathlib.Path(owned) / RECORD)
    if request.channel == "cut":
      record = audit_cut(config, request, progress)
    elif request.channel == "label":
      record = audit_label(config, request, progress)
    else:
      from experiments import auditing_pipeline  # pylint: disable=import-outside-toplevel

      record = auditing_pipeline.audit_pipeline(config, request, pathlib.Path(owned), progress)
    record["environment"] = records.environment()
    if workdir_lib.is_writer():
      results.atomic_write_json(pathlib.Path(owned) / RECORD, record)
  return record


def _num(x, digits: int = 3) -> str:
  if x is None:
    return "-"
  x = float(x)  # JSON holds inf as "inf"
  if isinstance(x, float) and math.isinf(x):
    return "inf"
  return f"{x:.{digits}f}"


def _pipeline_table(record: dict) -> str:
  head = "| reading | guesses | correct | eps lower |"
  rows = [head, "|---|---|---|---|"]
  for t in record["tried"]:
    rows.append(
      f"| {t['reading']} | {t['guesses']:,} | {t['correct']:,} | {t['epsilon_lower']:.3f} |"
    )
  acc = record.get("epsilon_accounted")
  lines = [
    "\n".join(rows),
    f"{record['protocol'].upper()} pipeline audit, m = {record['trials']:,} canaries: epsilon "
    f"lower {record['epsilon_lower']:.3f} (saturation {record['saturation']['epsilon_lower']:.3f}"
    f" at confidence {record['confidence_each']:.4f} per test); accounted cut only "
    f"{_num(record.get('epsilon_cut_only'))}, total "
    f"{_num(acc) if acc is not None else 'inf (' + record.get('epsilon_accounted_note', '') + ')'}",
  ]
  if record.get("update_matched_exactly") is not None:
    lines.append(f"returned updates matched exactly: {record['update_matched_exactly']:.3f}")
  if not record.get("consistent", True):
    lines.append("AUDIT EXCEEDS THE ACCOUNTED GUARANTEE: the mechanism or its accounting is wrong")
  return "\n\n".join(lines)


def markdown_table(record: dict) -> str:
  """The audit as a Markdown table: one row per release path (pipeline: per reading tried)."""
  if record["channel"] == "pipeline":
    return _pipeline_table(record)
  head = (
    "| channel | path | releases | trials | mu accounted | mu lower | eps accounted | eps lower |"
  )
  rows = [head, "|---|---|---|---|---|---|---|---|"]

  def row(r, path):
    return (
      f"| {record['channel']} | {path} | {r.get('releases', '-')} | {r['trials']:,} | "
      f"{_num(r.get('mu_accounted'))} | {_num(r.get('mu_lower'))} | "
      f"{_num(r.get('epsilon_accounted'))} | {_num(r.get('epsilon_lower'))} |"
    )

  rows.append(row(record, record.get("path", record["channel"])))
  if "training" in record:
    rows.append(row(record["training"], record["training"]["path"]))
  lines = ["\n".join(rows)]
  for where in (record, record.get("training") or {}):
    if "two_sided" in where:
      t = where["two_sided"]
      lo, hi = t["mu_interval"]
      lines.append(
        f"two-sided check at t = {t['threshold']:g}: mu {t['mu_estimate']:.3f} "
        f"[{lo:.3f}, {hi:.3f}] {'contains' if t['passed'] else 'EXCLUDES'} the accounted "
        f"{where['mu_accounted']:.3f}"
      )
  if record.get("epsilon_lower_pure") is not None:
    lines.append(f"pure epsilon (delta = 0) lower bound: {record['epsilon_lower_pure']:.3f}")
  if not record.get("consistent", True) or not (record.get("training") or {}).get(
    "consistent", True
  ):
    lines.append("AUDIT EXCEEDS THE ACCOUNTED GUARANTEE: the mechanism or its accounting is wrong")
  return "\n\n".join(lines)
