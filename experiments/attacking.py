"""Attack a trained workdir: EXACT (three variants) and the no-gradient baselines -> attack.json.

The attacker gets the transcript (``h``, ``g`` and the device parameters behind
each row) and public knowledge (domains, train-set marginals, C, sigma); ground
truth is used only to score the answers.
"""

import dataclasses
import math
import pathlib
import time

import numpy as np

from splitjax import attacks
from splitjax import io
from splitjax import metrics
from splitjax import models
from splitjax import training
from splitjax.privacy import accounting
from splitjax.privacy import bounds
from splitjax.privacy import label_dp

from experiments import pipeline
from experiments.configs import base as configs_base

VARIANTS = ("clip_aware", "paper", "bayes")
USERS = ("test", "train")
BLOCK = 1024  # attacked rows per resumable block


def results_name(config: configs_base.AttackConfig) -> str:
  """``attack.json`` for the default attack, a suffixed name for every other configuration."""
  if (config.attack, config.variant, config.users) == ("exact", "clip_aware", "test"):
    return "attack.json"
  return f"attack_{config.attack}_{config.variant}_{config.users}.json"


def _with_defaults(old_cfg):
  """A record's attack config with fields added since it was written set to their defaults."""
  if not isinstance(old_cfg, dict):
    return old_cfg
  defaults = io.to_jsonable(dataclasses.asdict(configs_base.AttackConfig()))
  return {**{k: v for k, v in defaults.items() if k not in old_cfg}, **old_cfg}


def validate(config: configs_base.AttackConfig) -> None:
  if config.attack not in attacks.ATTACKS:
    raise pipeline.ConfigError(f"unknown --attack {config.attack!r}: choose one of "
                               f"{sorted(attacks.ATTACKS)}")
  if config.variant not in VARIANTS:
    raise pipeline.ConfigError(f"unknown --variant {config.variant!r}: choose one of {VARIANTS}")
  if config.users not in USERS:
    raise pipeline.ConfigError(f"unknown --users {config.users!r}: choose one of {USERS}")
  if config.num_examples < 0:
    raise pipeline.ConfigError(f"--num_examples={config.num_examples} must be >= 0 "
                               "(0 = every user)")
  for name in ("top_k", "knn_k"):
    if getattr(config, name) < 1:
      raise pipeline.ConfigError(f"--{name}={getattr(config, name)} must be >= 1")
  if config.distance not in attacks.DISTANCES:
    raise pipeline.ConfigError(f"unknown --distance {config.distance!r}: choose one of "
                               f"{sorted(attacks.DISTANCES)}")
  if config.variant == "bayes" and config.distance != "l2":
    raise pipeline.ConfigError(f"--variant=bayes scores by Gaussian likelihood: use --distance=l2, "
                               f"not {config.distance!r}")
  if config.screen_dtype != "none" and config.screen_dtype not in attacks.SCREEN_DTYPES:
    raise pipeline.ConfigError(f"unknown --screen_dtype {config.screen_dtype!r}: choose none or "
                               f"one of {sorted(attacks.SCREEN_DTYPES)}")
  if config.screen_dtype != "none" and config.attack != "exact":
    raise pipeline.ConfigError(f"--screen_dtype screens EXACT's enumeration; --attack="
                               f"{config.attack} has none: use --screen_dtype=none")
  if config.screen_dtype != "none" and config.variant == "bayes":
    raise pipeline.ConfigError("--screen_dtype screens distances; --variant=bayes needs every "
                               "posterior term in full precision: use --screen_dtype=none")
  if config.variant == "bayes" and config.top_k != 1:
    raise pipeline.ConfigError(f"--variant=bayes answers with the marginal-posterior argmax: use "
                               f"--top_k=1, not {config.top_k}")


def marginal_log_prior(dataset) -> np.ndarray:
  """Log prior over (candidate, label) pairs from train marginals (features independent).

  ``[C * 2]`` in ``attacks.candidate_table`` order, label fastest.
  """
  table = attacks.candidate_table(dataset.priv_cardinalities)
  logp = np.zeros(len(table))
  for j, card in enumerate(dataset.priv_cardinalities):
    p = np.bincount(dataset.train.priv_cat[:, j], minlength=card) + 1.0
    logp += np.log(p / p.sum())[table[:, j]]
  py = np.bincount(dataset.train.y, minlength=2) + 1.0
  return (logp[:, None] + np.log(py / py.sum())[None, :]).reshape(-1)


def variant_kwargs(variant: str, clip: float, sigma: float, dataset) -> dict:
  """Keyword arguments of ``attacks.exact`` for a named variant and the public DP parameters."""
  clip_arg = clip if math.isfinite(clip) else None
  kwargs = {"l2_clip_norm": clip_arg, "clip_aware": variant != "paper"}
  if variant == "bayes" and sigma > 0 and clip_arg is not None:
    kwargs["noise_stddev"] = sigma * clip
    kwargs["log_prior"] = marginal_log_prior(dataset)
  return kwargs


def observed_transcript(restored, config, clip: float, sigma: float):
  """What the server observed: ``(transcript, split name)``.

  Test users are replayed once through the final model with the public DP
  parameters (under label DP with their own randomized-response label, drawn
  once, as the device only ever uses that one); train users come from the
  recorded last-epoch transcript.
  """
  dataset, model, state = restored.dataset, restored.model, restored.state
  if config.users == "test":
    test_split = dataset.test
    if restored.config.label_dp_epsilon:
      rng = np.random.default_rng([restored.config.seed, 8])
      test_split = dataclasses.replace(test_split, y=label_dp.randomized_response(
          test_split.y, restored.config.label_dp_epsilon, rng=rng))
    transcript = training.replay_transcript(
        model, state, test_split, dp=training.DPConfig(np.float32(clip), np.float32(sigma)),
        seed=config.seed + 1000, num_examples=config.num_examples or None)
    return transcript, "test"
  transcript = restored.transcript()
  if config.num_examples:
    transcript = transcript.take(np.arange(min(config.num_examples, transcript.num_rows)))
  return transcript, "train"


def _targets(dataset, split_name: str, rows: np.ndarray):
  split = getattr(dataset, split_name)
  return split.priv_cat[rows], split.y[rows]


def attack_workdir(workdir, config: configs_base.AttackConfig, *, resume: bool = False,
                   overwrite: bool = False, progress=print, kill_switch=None) -> dict:
  """Runs ``config`` against the trained ``workdir``; writes and returns the attack record."""
  validate(config)
  restored = None if config.attack != "exact" else pipeline.Restored(workdir)
  if restored is None or (restored.model.spec.topology != "device_top"
                          or restored.model.spec.num_priv_dense):
    # Attacks beyond enumeration, activation matching (device_bottom) and the hybrid of
    # enumeration and optimisation (private dense features).
    if config.screen_dtype != "none" and restored is not None:
      raise pipeline.ConfigError("--screen_dtype applies to EXACT on device_top models without "
                                 "private dense features; this workdir's model needs the "
                                 "activation or hybrid attack: use --screen_dtype=none")
    from experiments import beyond  # pylint: disable=g-import-not-at-top
    return beyond.attack_workdir(workdir, config, resume=resume, overwrite=overwrite,
                                 progress=progress, kill_switch=kill_switch)
  workdir = pathlib.Path(workdir)
  dataset, model = restored.dataset, restored.model
  name = results_name(config)
  out_path = workdir / name
  cfg = dataclasses.asdict(config)
  partial_path = workdir / (name + ".partial.npz")
  run_key = io.fingerprint({"attack": cfg, "model": restored.fingerprint})
  if out_path.exists() and not overwrite:
    old = io.read_json(out_path)
    same_config = _with_defaults(old.get("config")) == io.to_jsonable(cfg)
    if same_config and old.get("model_fingerprint") == restored.fingerprint:
      if progress:
        progress(f"{out_path} already holds this attack; nothing to do")
      return old
    if not same_config:
      raise io.WorkdirError(f"{out_path} holds another attack configuration: use --overwrite "
                            "or another --workdir")
    # Same attack of an earlier model of this workdir: stale, recompute it.
  clip = float(restored.metrics["l2_clip_norm"]) if restored.metrics["l2_clip_norm"] != "inf" \
      else math.inf
  sigma = restored.metrics["noise_multiplier"]
  sigma = math.inf if sigma == "inf" else float(sigma)
  if math.isinf(sigma):
    raise pipeline.ConfigError("the model was trained with noise multiplier inf (the server "
                               "sees pure noise): there is nothing to attack")

  transcript, split_name = observed_transcript(restored, config, clip, sigma)
  n = transcript.num_rows
  device_apply = models.device_logit_fn(model)
  kwargs = variant_kwargs(config.variant, clip, sigma, dataset)
  if config.screen_dtype != "none":
    kwargs["screen_dtype"] = config.screen_dtype

  # Resumable: blocks of rows grouped by parameter version.
  done = {}
  if resume and partial_path.exists():
    with np.load(partial_path) as z:
      if "run_key" in z.files and str(z["run_key"]) == run_key:
        done = {k: z[k] for k in z.files if k != "run_key"}
      elif progress:
        progress(f"ignoring {partial_path}: written by another attack or model")
  feats = done.get("features", np.full((n, len(dataset.priv_cardinalities)), -1, np.int32))
  labels = done.get("labels", np.full(n, -1, np.int32))
  ties = done.get("ties", np.zeros(n, np.int32))
  finished = done.get("finished", np.zeros(n, bool))
  redone = done.get("screen_fallback", np.zeros(n, bool))  # users the bf16 screen left undecided
  t0 = time.time()
  bar = training.ProgressPrinter(n, f"attack {config.variant} {config.users}",
                                 printer=progress) if progress else None
  # Compile on a first block (exact buckets its chunk plan by powers of two, so blocks of this
  # size reuse it), so that the timed attack measures throughput, not compilation.
  tc = time.time()
  first = np.flatnonzero(transcript.param_index == transcript.param_index[0])[:BLOCK]
  attacks.exact(device_apply, transcript.params_at(int(transcript.param_index[0])),
                transcript.h[first], transcript.g[first], dataset.priv_cardinalities,
                top_k=config.top_k, distance=config.distance, **_first_rows(kwargs, first))
  compile_seconds = time.time() - tc
  attack_seconds = 0.0
  for version in np.unique(transcript.param_index):
    rows_v = np.flatnonzero((transcript.param_index == version) & ~finished)
    params = transcript.params_at(int(version))
    for start in range(0, len(rows_v), BLOCK):
      rows = rows_v[start:start + BLOCK]
      ta = time.time()
      res = attacks.exact(device_apply, params, transcript.h[rows], transcript.g[rows],
                          dataset.priv_cardinalities, top_k=config.top_k,
                          distance=config.distance, **kwargs)
      attack_seconds += time.time() - ta
      feats[rows], labels[rows], ties[rows] = res.features, res.labels, res.num_ties
      if res.screen_fallback is not None:
        redone[rows] = res.screen_fallback
      finished[rows] = True
      io.atomic_write_bytes(partial_path, _npz(features=feats, labels=labels, ties=ties,
                                               screen_fallback=redone, finished=finished,
                                               run_key=np.str_(run_key)))
      if bar:
        bar(int(finished.sum()))
      if kill_switch is not None:
        kill_switch.tick()

  true_feats, true_y = _targets(dataset, split_name, transcript.example_index)
  record = score(dataset, restored, config, transcript, feats, labels, ties, true_feats, true_y,
                 clip=clip, sigma=sigma)
  candidates = int(np.prod(dataset.priv_cardinalities)) * 2
  if config.screen_dtype != "none":
    record["screen_fallback_fraction"] = float(redone.mean()) if n else 0.0
  record.update({"seconds": time.time() - t0, "attack_seconds": attack_seconds,
                 "compile_seconds": compile_seconds,
                 "model_fingerprint": restored.fingerprint,
                 "candidates_per_second": n * candidates / max(attack_seconds, 1e-9),
                 "config": cfg})
  if config.users == "train":
    record["local_steps_attacked"] = sorted(set(int(s) for s in transcript.local_step))
    stale = transcript.local_step > 0
    if stale.any():
      record["stale_model"] = _stale_report(dataset, feats, labels, true_feats, true_y, stale)
      record["first_local_step"] = _stale_report(dataset, feats, labels, true_feats, true_y,
                                                 ~stale)
  io.atomic_write_json(out_path, record)
  partial_path.unlink(missing_ok=True)
  return record


def _first_rows(kwargs: dict, rows) -> dict:
  """``kwargs`` with a per-user log prior (if any) cut to ``rows``."""
  lp = kwargs.get("log_prior")
  if lp is not None and np.ndim(lp) >= 2 and np.shape(lp)[0] > 1:
    return dict(kwargs, log_prior=np.asarray(lp)[rows])
  return kwargs


def _npz(**arrays) -> bytes:
  import io as _pyio
  buf = _pyio.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def _stale_report(dataset, feats, labels, true_feats, true_y, rows) -> dict:
  out = {"num_examples": int(rows.sum())}
  for j, fname in enumerate(dataset.roles.private_categorical):
    out[fname] = metrics.accuracy(feats[rows, j], true_feats[rows, j])["accuracy"]
  out["label"] = metrics.accuracy(labels[rows], true_y[rows])["accuracy"]
  return out


def score(dataset, restored, config, transcript, feats, labels, ties, true_feats, true_y, *,
          clip, sigma) -> dict:
  """Per-feature and label metrics, baselines, privacy report and bounds."""
  cards = dataset.priv_cardinalities
  train = dataset.train
  # Baselines without gradients: majority prior, k-NN on server features and on h.
  ref = dataset.test if config.users == "train" else dataset.train
  query_split = getattr(dataset, "train" if config.users == "train" else "test")
  q = transcript.example_index
  ref_targets = np.concatenate([ref.priv_cat, ref.y[:, None]], axis=1)
  target_cards = tuple(cards) + (2,)
  ref_x = attacks.server_feature_matrix(ref.pub_cat, ref.pub_dense, dataset.pub_cardinalities)
  query_x = attacks.server_feature_matrix(query_split.pub_cat[q], query_split.pub_dense[q],
                                          dataset.pub_cardinalities)
  knn = attacks.knn(ref_x, ref_targets, query_x, target_cards, k=config.knn_k)
  ref_h = np.asarray(training.make_predict_h(restored.model)(
      restored.state.server_params, ref.pub_cat, ref.pub_dense))
  knn_h = attacks.knn(ref_h, ref_targets, transcript.h, target_cards, k=config.knn_k)
  priors = [np.bincount(train.priv_cat[:, j], minlength=c) / len(train)
            for j, c in enumerate(cards)] + [np.bincount(train.y, minlength=2) / len(train)]

  releases = 1 if config.users == "test" else int(restored.metrics["releases"])
  mu = accounting.composed_mu(sigma, releases) if math.isfinite(clip) else math.inf
  record = {"dataset": restored.config.dataset, "protocol": restored.config.protocol,
            "attack": config.attack, "variant": config.variant, "users": config.users,
            "num_examples": int(transcript.num_rows), "ties": int(np.sum(ties > 1)),
            "features": {}, "label": None}
  names = list(dataset.roles.private_categorical) + ["label"]
  preds = [feats[:, j] for j in range(len(cards))] + [labels]
  trues = [true_feats[:, j] for j in range(len(cards))] + [true_y]
  for j, name in enumerate(names):
    k = target_cards[j]
    rep = metrics.feature_report(preds[j], trues[j], k, prior_pred=int(np.argmax(priors[j])),
                                 knn_pred=knn.predictions[:, j])
    rep["knn_h_accuracy"] = metrics.accuracy(knn_h.predictions[:, j], trues[j])["accuracy"]
    rep["bound_marginal"] = bounds.prior_bound(priors[j], mu)
    rep["bound_marginal_note"] = "marginal prior: not valid against an attacker who knows h"
    rep["bound_knn"] = bounds.knn_bound(knn.posteriors[j], mu)
    label_eps = restored.config.label_dp_epsilon
    if name == "label" and label_eps:
      # Randomized response bounds the label whatever the cut layer leaks.
      p = float(priors[j][1])
      rr = bounds.randomized_response_bound(p, label_eps)
      rep["bound_label_dp"] = rr
      rep["bound_marginal"] = min(rep["bound_marginal"], rr)
      rep["bound_knn"] = min(rep["bound_knn"], rr)
    if k == 2:
      p = float(priors[j][1])
      rep["mu_hat"] = bounds.mu_hat(rep["ci"][0], p)
    if name == "label":
      record["label"] = rep
    else:
      record["features"][name] = rep
  if dataset.priv_priors is not None:
    _check_true_bounds(record, dataset, query_split, q, mu,
                       restored.config.label_dp_epsilon, math.isfinite(clip))
  record.update(accounting.privacy_report(
      noise_multiplier=sigma, l2_clip_norm=clip,
      releases=int(restored.metrics["releases"]), delta=restored.config.target_delta,
      label_epsilon=restored.config.label_dp_epsilon or None))
  record["mu_attack_bound"] = mu
  record["releases_attacked"] = releases
  return record


class BoundViolation(AssertionError):
  """A measured success above its DP bound on synthetic data, beyond sampling error: a bug."""


def _check_true_bounds(record, dataset, split, rows, mu, label_eps, cut_dp: bool) -> None:
  """Bounds with the generator's true prior (synthetic data); fails loudly when exceeded.

  Private features are drawn independently of the server's features, so their
  marginal prior is the attacker's true prior. The label is bounded per user
  with p_u = P(y | x_pub) under cut-layer DP, or P(y | x_pub, x_priv) under
  label DP alone (the unnoised gradient reveals x_priv), and averaged.
  """
  for j, name in enumerate(dataset.roles.private_categorical):
    r = record["features"][name]
    r["bound_true_prior"] = float(bounds.prior_bound(dataset.priv_priors[j], mu))
  r = record["label"]
  per_user = None
  if cut_dp and split.p_y_pub is not None:
    per_user = np.asarray(bounds.binary_bound(np.asarray(split.p_y_pub)[rows], mu))
  if label_eps and split.p_y_full is not None:
    rr = np.asarray(bounds.randomized_response_bound(np.asarray(split.p_y_full)[rows], label_eps))
    per_user = rr if per_user is None else np.minimum(per_user, rr)
  if per_user is not None:
    r["bound_true_prior"] = float(np.mean(per_user))
  for name, r in list(record["features"].items()) + [("label", record["label"])]:
    if "bound_true_prior" in r and r["ci"][0] > r["bound_true_prior"] + 1e-9:
      raise BoundViolation(
          f"{name}: measured success {r['accuracy']:.4f} (95% CI lower end {r['ci'][0]:.4f}) is "
          f"above the DP bound {r['bound_true_prior']:.4f} on synthetic data with a known prior: "
          "this is a bug in the attack, the DP transform or the accounting; rerun with --debug "
          "and report it")


def markdown_table(record: dict) -> str:
  """The attack record as a Markdown table (one row per private feature and the label)."""
  lines = [f"### {record['attack']} ({record['variant']}) on {record['num_examples']} "
           f"{record['users']} users of {record['dataset']} ({record['protocol']})", "",
           "| secret | accuracy | 95% CI | macro F1 | prior | k-NN (server feats) | k-NN (h) |"
           " bound (marginal) | bound (k-NN) |",
           "|---|---|---|---|---|---|---|---|---|"]
  rows = list(record["features"].items()) + [("label", record["label"])]
  for name, r in rows:
    lines.append(f"| {name} | {r['accuracy']:.4f} | [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] | "
                 f"{r['macro_f1']:.4f} | {r['prior_accuracy']:.4f} | {r['knn_accuracy']:.4f} | "
                 f"{r['knn_h_accuracy']:.4f} | {r['bound_marginal']:.4f} | {r['bound_knn']:.4f} |")
  lines.append("")
  lines.append(f"ties: {record['ties']}; attack epsilon {record['attack_epsilon']} "
               f"(delta {record['delta']}); {record['candidates_per_second']:.3g} candidates/s")
  return "\n".join(lines)
