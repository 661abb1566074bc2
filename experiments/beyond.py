r"""Attacks beyond enumeration on a trained workdir -> ``attack_<attack>_<variant>_<users>.json``.

``experiments.attacking.attack_workdir`` hands every attack other than ``exact`` to
:func:`attack_workdir` here; ``exact`` on a model EXACT cannot enumerate (private dense features, or
``device_bottom``) is handled here too:

* ``optimize``: relaxed gradient matching of every secret (``splitjax.attacks.optimize``);
* ``hybrid`` (and ``exact`` with private dense features): EXACT over categorical features and the
  label, optimisation over the dense ones (``splitjax.attacks.hybrid``);
* ``label_norm`` / ``label_direction``: label-only attacks of Li et al. 2021, scored by AUC;
* ``exact_activations`` (and ``exact`` on ``device_bottom``): EXACT on the activations the device
  sends (``splitjax.attacks.exact_activations``).

The record has ``attack.json``'s schema (``attacking.score``): per categorical feature and the
label ``accuracy, ci, macro_f1, prior_accuracy, knn_accuracy, ...``; continuous features get
``mae`` (original units), ``within_tolerance`` (fraction within ``dense_tolerance`` original units,
2 years for age) and their baselines; label-only attacks add ``auc``.

  python -m experiments.train --dataset=adult --private_dense=age --workdir=/tmp/adult_age
  python -m experiments.attack --workdir=/tmp/adult_age --attack=hybrid --num_examples=1000
  python -m experiments.attack --workdir=/tmp/adult_age --attack=optimize --num_examples=1000
  python -m experiments.attack --workdir=/tmp/adult_age --attack=label_norm
  python -m experiments.train --dataset=adult --topology=device_bottom --workdir=/tmp/adult_bottom
  python -m experiments.attack --workdir=/tmp/adult_bottom --attack=exact_activations
"""

import dataclasses
import math
import pathlib
import time

import jax
import numpy as np

from experiments import attacking
from experiments import common
from experiments import pipeline
from experiments import records
from experiments import workdir as workdir_lib
from experiments.configs import base as configs_base
from splitjax import attacks
from splitjax import metrics
from splitjax import models
from splitjax import results
from splitjax.privacy import accounting
from splitjax.privacy import bounds

# The module (the package re-exports the function `optimize` under its name).

LABEL_ATTACKS = ("label_norm", "label_direction")
ATTACKS = ("optimize", "hybrid", "exact_activations", "exact") + LABEL_ATTACKS
DENSE_KNN_BINS = 100  # the k-NN baseline of a dense feature votes over this many bins of [0, 1]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BeyondOptions:
  """Knobs of the optimisation attacks; an ``AttackConfig`` field of the same name overrides each.

  Attributes:
    num_steps: Adam steps per restart of ``optimize``.
    num_restarts: restarts per user of ``optimize``.
    learning_rate: initial step of the cosine-decayed Adam of ``optimize``.
    hybrid_starts: stratified starting points of the dense box per (candidate, label) pair.
    hybrid_steps: refinement steps of the ``num_refine`` best pairs.
    num_refine: pairs short-listed for refinement per user.
    refine_starts: fresh stratified starts each short-listed pair tries before its descent.
    dense_tolerance: ``within_tolerance`` counts |error| <= this, in original units (2 years for
      adult's age).
    oracle: also run EXACT told the true dense values (a reference level, not an attack).
  """

  num_steps: int = 200
  num_restarts: int = 32
  learning_rate: float = 0.05
  hybrid_starts: int = 128
  hybrid_steps: int = 30
  num_refine: int = 128
  refine_starts: int = 512
  dense_tolerance: float = 2.0
  oracle: bool = True


def options_of(config) -> BeyondOptions:
  """``BeyondOptions`` with the fields that ``config`` also has taken from it."""
  names = {f.name for f in dataclasses.fields(BeyondOptions)}
  return BeyondOptions(**{n: getattr(config, n) for n in names if hasattr(config, n)})


def _resolve(config, model) -> str:
  """The attack to run: ``exact`` maps to hybrid / exact_activations where it cannot enumerate."""
  topology = model.spec.topology
  name = config.attack
  if name not in ATTACKS:
    raise pipeline.ConfigError(f"experiments.beyond runs {ATTACKS}, not --attack={name!r}")
  if name == "exact":
    if topology == "device_bottom":
      return "exact_activations"
    if model.spec.num_priv_dense:
      return "hybrid"
    raise pipeline.ConfigError(
      "--attack=exact on a device_top model with categorical private "
      "features only runs in experiments.attacking"
    )
  if topology == "device_bottom" and name != "exact_activations":
    raise pipeline.ConfigError(
      f"--attack={name} attacks gradients of a device_top model; this "
      "workdir is device_bottom: use --attack=exact_activations"
    )
  if topology == "device_top" and name == "exact_activations":
    raise pipeline.ConfigError(
      "--attack=exact_activations needs a device_bottom model (train with --topology=device_bottom)"
    )
  if name == "exact_activations" and not model.spec.priv_cardinalities:
    raise pipeline.ConfigError("exact_activations needs at least one private categorical feature")
  return name


observed_transcript = attacking.observed_transcript


def _dp_of(restored) -> tuple[float, float]:
  clip = restored.metrics["l2_clip_norm"]
  clip = math.inf if clip == "inf" else float(clip)
  sigma = restored.metrics["noise_multiplier"]
  sigma = math.inf if sigma == "inf" else float(sigma)
  if math.isinf(sigma):
    raise pipeline.ConfigError(
      "the model was trained with noise multiplier inf (the server "
      "sees pure noise): there is nothing to attack"
    )
  return clip, sigma


# ----------------------------------------------------------------------------------------------
# Scoring of continuous features.


def dense_report(
  pred, true, value_range: tuple[float, float], tolerance: float, *, prior_pred=None, knn_pred=None
) -> dict:
  """Errors of a continuous feature in original units; inputs are min-max scaled values.

  Returns ``{'mae', 'rmse', 'median_abs_error', 'within_tolerance', 'ci', 'tolerance', 'n',
  'prior_mae', 'prior_within_tolerance', 'knn_mae', 'knn_within_tolerance'}`` (baselines None when
  not given); ``ci`` is the Clopper-Pearson interval of ``within_tolerance``.
  """
  lo, hi = value_range
  scale = hi - lo
  true_v = lo + scale * np.asarray(true, np.float64)

  def errors(p):
    return np.abs(lo + scale * np.asarray(p, np.float64) - true_v)

  err = errors(pred)
  within = err <= tolerance
  out = {
    "mae": float(err.mean()),
    "rmse": float(np.sqrt(np.mean(err**2))),
    "median_abs_error": float(np.median(err)),
    "within_tolerance": float(within.mean()),
    "ci": list(metrics.clopper_pearson(int(within.sum()), int(within.size))),
    "tolerance": float(tolerance),
    "n": int(err.size),
  }
  for name, p in (("prior", prior_pred), ("knn", knn_pred)):
    if p is None:
      out[f"{name}_mae"] = out[f"{name}_within_tolerance"] = None
      continue
    e = errors(np.broadcast_to(p, err.shape))
    out[f"{name}_mae"] = float(e.mean())
    out[f"{name}_within_tolerance"] = float(np.mean(e <= tolerance))
  return out


def _dense_baselines(dataset, users: str, rows: np.ndarray, k: int):
  """Per private dense feature: (train median, k-NN posterior median on server features)."""
  ref = dataset.test if users == "train" else dataset.train
  query = dataset.train if users == "train" else dataset.test
  ref_x = attacks.server_feature_matrix(ref.pub_cat, ref.pub_dense, dataset.pub_cardinalities)
  query_x = attacks.server_feature_matrix(
    query.pub_cat[rows], query.pub_dense[rows], dataset.pub_cardinalities
  )
  bins = np.clip((ref.priv_dense * DENSE_KNN_BINS).astype(np.int64), 0, DENSE_KNN_BINS - 1)
  cards = (DENSE_KNN_BINS,) * bins.shape[1]
  knn = attacks.knn(ref_x, bins, query_x, cards, k=k) if bins.shape[1] else None
  out = []
  for j in range(bins.shape[1]):
    cdf = np.cumsum(knn.posteriors[j], axis=1)
    median_bin = np.argmax(cdf >= 0.5 - 1e-6, axis=1)
    out.append(
      (float(np.median(dataset.train.priv_dense[:, j])), (median_bin + 0.5) / DENSE_KNN_BINS)
    )
  return out


# ----------------------------------------------------------------------------------------------
# The reference level: EXACT told the true dense values.


class _KnownDenseApply:
  """``(params, [h, dense], x) -> logit``: dense read from extra columns of h, not differentiated.

  The gradient's extra columns are zero, so EXACT with ``g`` padded by zeros scores categorical
  candidates exactly as if the dense values were known.
  """

  def __init__(self, head_apply, num_dense: int):
    self.head_apply, self.num_dense = head_apply, num_dense

  def __call__(self, params, h_ext, x):
    h, dense = h_ext[: -self.num_dense], jax.lax.stop_gradient(h_ext[-self.num_dense :])
    return self.head_apply(params, h, x, dense)

  def __hash__(self):
    return hash((_KnownDenseApply, self.head_apply, self.num_dense))

  def __eq__(self, other):
    return (
      isinstance(other, _KnownDenseApply)
      and other.head_apply is self.head_apply
      and other.num_dense == self.num_dense
    )


# ----------------------------------------------------------------------------------------------
# The runner.


def attack_workdir(
  workdir,
  config: configs_base.AttackConfig,
  *,
  resume: bool = False,
  overwrite: bool = False,
  progress=common.progress,
  kill_switch=None,
  options: BeyondOptions | None = None,
) -> dict:
  """Runs ``config`` (an attack of :data:`ATTACKS`) on ``workdir``; writes and returns the record.

  Raises:
    pipeline.ConfigError: the attack does not fit the workdir's model (e.g. a label attack on a
      device_bottom model).
    results.WorkdirError: the results file holds another configuration (use ``overwrite``).
  """
  attacking.validate(config)
  with attacking.owned_for_attack(workdir, config, overwrite=overwrite):
    return _attack_owned(
      workdir,
      config,
      resume=resume,
      overwrite=overwrite,
      progress=progress,
      kill_switch=kill_switch,
      options=options,
    )


def _attack_owned(workdir, config, *, resume, overwrite, progress, kill_switch, options) -> dict:
  options = options or options_of(config)
  restored = pipeline.Restored(workdir)
  workdir = pathlib.Path(workdir)
  dataset, model = restored.dataset, restored.model
  attacking.check_knn_k(config, dataset)
  name = _resolve(config, model)
  out_path = workdir / attacking.results_name(config)
  partial_path = workdir / (out_path.name + ".partial.npz")
  cfg = dataclasses.asdict(config)
  cfg_record = dict(cfg, options=dataclasses.asdict(options), resolved_attack=name)
  if out_path.exists() and not overwrite:
    old = attacking.read_record(out_path)
    if old.get("config") == results.to_jsonable(cfg_record):
      if progress:
        progress(f"{out_path} already holds this attack; nothing to do")
      return old
    raise results.WorkdirError(
      f"{out_path} holds another attack configuration: use --overwrite or another --workdir"
    )
  clip, sigma = _dp_of(restored)
  transcript, split_name = observed_transcript(restored, config, clip, sigma)
  t0 = time.time()
  if name in LABEL_ATTACKS:
    record = _label_attack(name, dataset, restored, config, transcript, split_name, clip, sigma)
  else:
    record = _feature_attack(
      name,
      dataset,
      restored,
      config,
      options,
      transcript,
      split_name,
      clip,
      sigma,
      partial_path=partial_path,
      resume=resume,
      progress=progress,
      kill_switch=kill_switch,
    )
  record["seconds"] = time.time() - t0
  record["config"] = cfg_record
  record["environment"] = records.environment()
  if workdir_lib.is_writer():  # under jax.distributed, process 0 writes
    results.atomic_write_json(out_path, record)
    partial_path.unlink(missing_ok=True)
  return record


def _label_attack(name, dataset, restored, config, transcript, split_name, clip, sigma) -> dict:
  if name == "label_norm":
    res = attacks.label_norm(transcript.g, positive_fraction=float(dataset.train.y.mean()))
  else:
    res = attacks.label_direction(transcript.g, positive_fraction=float(dataset.train.y.mean()))
  split = getattr(dataset, split_name)
  true_feats = split.priv_cat[transcript.example_index]
  true_y = split.y[transcript.example_index]
  # attacking.score reports the label with its baselines and bounds; the features are not
  # attacked (zeros are passed and their entries dropped).
  dummy = np.zeros_like(true_feats)
  record = attacking.score(
    dataset,
    restored,
    config,
    transcript,
    dummy,
    res.labels,
    np.ones(len(res.labels), np.int32),
    true_feats,
    true_y,
    clip=clip,
    sigma=sigma,
    prior="uniform",
    informed=attacking.informed_prior(restored, config, transcript, split_name),
  )
  record["features"] = {}
  record["ties"] = 0
  record["label"]["auc"] = metrics.roc_auc(res.scores, true_y)
  return record


def _feature_attack(
  name,
  dataset,
  restored,
  config,
  options,
  transcript,
  split_name,
  clip,
  sigma,
  *,
  partial_path,
  resume,
  progress,
  kill_switch,
) -> dict:
  model = restored.model
  n = transcript.num_rows
  num_cat = len(dataset.priv_cardinalities)
  num_dense = int(dataset.train.priv_dense.shape[1])
  clip_arg = clip if (math.isfinite(clip) and config.variant != "paper") else None
  bayes = config.variant == "bayes" and sigma > 0 and math.isfinite(clip)
  done = {}
  run_key = results.fingerprint(
    {
      "attack": dataclasses.asdict(config),
      "options": dataclasses.asdict(options),
      "model": restored.fingerprint,
    }
  )
  if resume:
    done = attacking.read_partial(partial_path, run_key, n)
  feats = done.get("features", np.full((n, num_cat), -1, np.int32))
  dense = done.get("dense", np.full((n, num_dense), np.nan, np.float32))
  labels = done.get("labels", np.full(n, -1, np.int32))
  ties = done.get("ties", np.zeros(n, np.int32))
  label_scores = done.get("label_scores", np.full(n, np.nan, np.float32))
  finished = done.get("finished", np.zeros(n, bool))
  bar = (
    common.ProgressPrinter(n, f"attack {name} {config.variant} {config.users}", printer=progress)
    if progress
    else None
  )
  key = jax.random.key(config.seed)
  attack_seconds = 0.0
  for version in np.unique(transcript.param_index):
    rows_v = np.flatnonzero((transcript.param_index == version) & ~finished)
    params = transcript.params_at(int(version))
    for start in range(0, len(rows_v), attacking.BLOCK):
      rows = rows_v[start : start + attacking.BLOCK]
      block_key = jax.random.fold_in(jax.random.fold_in(key, int(version)), int(rows[0]))
      ta = time.time()
      out = _run_block(
        name,
        model,
        dataset,
        params,
        transcript.h[rows],
        transcript.g[rows],
        options,
        block_key,
        clip_arg,
        bayes,
        clip,
        sigma,
        config,
      )
      attack_seconds += time.time() - ta
      feats[rows], dense[rows], ties[rows] = out["features"], out["dense"], out["ties"]
      if "labels" in out:
        labels[rows] = out["labels"]
      if "label_scores" in out:
        label_scores[rows] = out["label_scores"]
      finished[rows] = True
      if workdir_lib.is_writer():
        results.atomic_write_bytes(
          partial_path,
          attacking._npz(  # pylint: disable=protected-access
            features=feats,
            dense=dense,
            labels=labels,
            ties=ties,
            label_scores=label_scores,
            finished=finished,
            run_key=np.str_(run_key),
          ),
        )
      if bar:
        bar(int(finished.sum()))
      if kill_switch is not None:
        kill_switch.tick()

  rows = transcript.example_index
  split = getattr(dataset, split_name)
  true_feats, true_y = split.priv_cat[rows], split.y[rows]
  if model.spec.topology == "device_top":
    record = attacking.score(
      dataset,
      restored,
      config,
      transcript,
      feats,
      labels,
      ties,
      true_feats,
      true_y,
      clip=clip,
      sigma=sigma,
      prior="marginal",
      informed=attacking.informed_prior(restored, config, transcript, split_name),
    )
    if np.isfinite(label_scores).all():
      record["label"]["auc"] = metrics.roc_auc(label_scores, true_y)
  else:
    record = _score_bottom(
      dataset, restored, config, transcript, feats, ties, true_feats, clip=clip, sigma=sigma
    )
  record["attack"] = name
  names = dataset.roles.private_dense
  for j, (prior_pred, knn_pred) in enumerate(
    _dense_baselines(dataset, config.users, rows, config.knn_k)
  ):
    record["features"][names[j]] = dense_report(
      dense[:, j],
      split.priv_dense[rows, j],
      dataset.dense_ranges[names[j]],
      options.dense_tolerance,
      prior_pred=prior_pred,
      knn_pred=knn_pred,
    )
  if options.oracle and num_dense and model.spec.topology == "device_top" and num_cat:
    record["oracle_known_dense"] = _oracle(
      dataset,
      model,
      transcript,
      split.priv_dense[rows],
      true_feats,
      true_y,
      clip_arg,
      bayes,
      clip,
      sigma,
    )
  record.update(
    {"attack_seconds": attack_seconds, "users_per_second": n / max(attack_seconds, 1e-9)}
  )
  return record


def _run_block(
  name, model, dataset, params, h, g, options, key, clip_arg, bayes, clip, sigma, config
) -> dict:
  cards = dataset.priv_cardinalities
  num_dense = int(dataset.train.priv_dense.shape[1])
  if name == "optimize":
    r = attacks.optimize(
      models.soft_device_apply(model),
      params,
      h,
      g,
      cards,
      num_dense,
      optimizer=attacks.default_optimizer(options.learning_rate, options.num_steps),
      num_steps=options.num_steps,
      num_restarts=options.num_restarts,
      key=key,
      l2_clip_norm=clip_arg,
      distance=config.distance,
    )
    return dict(
      features=r.features, dense=r.dense, labels=r.labels, ties=np.ones(len(r.labels), np.int32)
    )
  if name == "hybrid":
    kwargs = {}
    if bayes:
      kwargs = dict(noise_stddev=sigma * clip, log_prior=attacking.marginal_log_prior(dataset))
    r = attacks.hybrid(
      model.head_apply,
      params,
      h,
      g,
      cards,
      num_dense,
      optimizer=attacks.default_optimizer(options.learning_rate, options.hybrid_steps),
      num_steps=options.hybrid_steps,
      num_restarts=options.hybrid_starts,
      num_refine=options.num_refine,
      refine_starts=options.refine_starts,
      key=key,
      l2_clip_norm=clip_arg,
      distance=config.distance,
      **kwargs,
    )
    out = dict(features=r.features, dense=r.dense, labels=r.labels, ties=r.num_ties)
    if r.label_posterior is not None:
      out["label_scores"] = r.label_posterior[:, 1]
    return out
  # exact_activations: the device sent h (= its activations a).
  kwargs = {}
  if bayes:
    kwargs = dict(noise_stddev=sigma * clip, log_prior=_feature_log_prior(dataset))
  r = attacks.exact_activations(
    model.encoder_apply,
    params,
    h,
    cards,
    num_dense=num_dense,
    l2_clip_norm=clip if math.isfinite(clip) else None,
    clip_aware=config.variant != "paper",
    distance=config.distance,
    key=key,
    num_restarts=options.hybrid_starts,
    num_steps=options.hybrid_steps,
    num_refine=options.num_refine,
    refine_starts=options.refine_starts,
    **kwargs,
  )
  return dict(features=r.features, dense=r.dense, ties=r.num_ties)


def _feature_log_prior(dataset) -> np.ndarray:
  """Log prior over candidates (no label) from train marginals, features independent: [C]."""
  table = attacks.candidate_table(dataset.priv_cardinalities)
  logp = np.zeros(len(table))
  for j, card in enumerate(dataset.priv_cardinalities):
    p = np.bincount(dataset.train.priv_cat[:, j], minlength=card) + 1.0
    logp += np.log(p / p.sum())[table[:, j]]
  return logp


def _oracle(
  dataset, model, transcript, true_dense, true_feats, true_y, clip_arg, bayes, clip, sigma
) -> dict:
  """Accuracy of EXACT told each user's true dense values (a reference level, not an attack)."""
  num_dense = true_dense.shape[1]
  apply = _KnownDenseApply(model.head_apply, num_dense)
  h_ext = np.concatenate([transcript.h, true_dense.astype(transcript.h.dtype)], axis=1)
  g_ext = np.concatenate([transcript.g, np.zeros_like(true_dense, transcript.g.dtype)], axis=1)
  kwargs = {"l2_clip_norm": clip_arg}
  if bayes:
    kwargs.update(noise_stddev=sigma * clip, log_prior=attacking.marginal_log_prior(dataset))
  feats = np.zeros_like(true_feats)
  labels = np.zeros_like(true_y)
  for version in np.unique(transcript.param_index):
    rows = np.flatnonzero(transcript.param_index == version)
    r = attacks.exact(
      apply,
      transcript.params_at(int(version)),
      h_ext[rows],
      g_ext[rows],
      dataset.priv_cardinalities,
      **kwargs,
    )
    feats[rows], labels[rows] = r.features, r.labels
  out = {
    "note": "EXACT told the true private dense values: the categorical level to compare "
    "with, not an attack"
  }
  for j, fname in enumerate(dataset.roles.private_categorical):
    out[fname] = metrics.accuracy(feats[:, j], true_feats[:, j])["accuracy"]
  out["label"] = metrics.accuracy(labels, true_y)["accuracy"]
  return out


def _score_bottom(
  dataset, restored, config, transcript, feats, ties, true_feats, *, clip, sigma
) -> dict:
  """``attacking.score`` for device_bottom: private features only (the server holds the label).

  The k-NN baseline uses the server's own features only (in this orientation ``h`` is the device's
  activation, i.e. the very signal under attack).
  """
  cards = dataset.priv_cardinalities
  train = dataset.train
  ref = dataset.test if config.users == "train" else dataset.train
  query = dataset.train if config.users == "train" else dataset.test
  q = transcript.example_index
  ref_x = attacks.server_feature_matrix(ref.pub_cat, ref.pub_dense, dataset.pub_cardinalities)
  query_x = attacks.server_feature_matrix(
    query.pub_cat[q], query.pub_dense[q], dataset.pub_cardinalities
  )
  knn = attacks.knn(ref_x, ref.priv_cat, query_x, cards, k=config.knn_k)
  releases = 1 if config.users == "test" else int(restored.metrics["releases"])
  mu = accounting.composed_mu(sigma, releases) if math.isfinite(clip) else math.inf
  record = {
    "dataset": restored.config.dataset,
    "protocol": restored.config.protocol,
    "topology": "device_bottom",
    "attack": config.attack,
    "variant": config.variant,
    "users": config.users,
    "num_examples": int(transcript.num_rows),
    "ties": int(np.sum(ties > 1)),
    "features": {},
    "label": None,
    "label_note": "device_bottom: the server holds the label; nothing to attack",
  }
  for j, fname in enumerate(dataset.roles.private_categorical):
    prior = np.bincount(train.priv_cat[:, j], minlength=cards[j]) / len(train)
    rep = metrics.feature_report(
      feats[:, j],
      true_feats[:, j],
      cards[j],
      prior_pred=int(np.argmax(prior)),
      knn_pred=knn.predictions[:, j],
    )
    rep["knn_h_accuracy"] = None
    rep["bound_marginal"] = bounds.prior_bound(prior, mu)
    rep["bound_marginal_note"] = "marginal prior: not valid against an attacker who knows h"
    rep["bound_knn"] = bounds.knn_bound(knn.posteriors[j], mu)
    if cards[j] == 2:
      rep["mu_hat"] = bounds.mu_hat(rep["ci"][0], float(prior[1]))
    record["features"][fname] = rep
  record.update(
    accounting.privacy_report(
      noise_multiplier=sigma,
      l2_clip_norm=clip,
      releases=int(restored.metrics["releases"]),
      delta=restored.config.target_delta,
      label_epsilon=restored.config.label_dp_epsilon or None,
    )
  )
  record["mu_attack_bound"] = mu
  record["releases_attacked"] = releases
  return record


def markdown_table(record: dict) -> str:
  """The record as Markdown: categorical rows (accuracy), dense rows (MAE), label (with AUC)."""
  lines = [
    f"### {record['attack']} ({record['variant']}) on {record['num_examples']} "
    f"{record['users']} users of {record['dataset']}",
    "",
    "| secret | accuracy / within tol. | 95% CI | MAE | AUC | prior | k-NN |",
    "|---|---|---|---|---|---|---|",
  ]
  rows = list(record["features"].items())
  if record.get("label"):
    rows.append(("label", record["label"]))

  def f(x):
    return "-" if x is None else f"{x:.4f}"

  for name, r in rows:
    if "mae" in r:
      lines.append(
        f"| {name} | {f(r['within_tolerance'])} (±{r['tolerance']:g}) | "
        f"[{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] | {f(r['mae'])} | - | "
        f"MAE {f(r['prior_mae'])} | MAE {f(r['knn_mae'])} |"
      )
    else:
      lines.append(
        f"| {name} | {f(r['accuracy'])} | [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] | - | "
        f"{f(r.get('auc'))} | {f(r['prior_accuracy'])} | {f(r['knn_accuracy'])} |"
      )
  if "oracle_known_dense" in record:
    o = record["oracle_known_dense"]
    lines.append("")
    lines.append(
      "EXACT told the true dense values (reference): "
      + ", ".join(f"{k} {v:.4f}" for k, v in o.items() if k != "note")
    )
  return "\n".join(lines)
