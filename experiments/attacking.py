"""Attack a trained workdir: EXACT (three variants) and the no-gradient baselines -> attack.json.

The attacker gets the transcript (``h``, ``g`` and the device parameters behind
each row) and public knowledge (domains, train-set marginals, C, sigma); ground
truth is used only to score the answers.
"""

import contextlib
import dataclasses
import math
import pathlib
import sys
import time
from typing import NamedTuple

import numpy as np

from experiments import common
from experiments import pipeline
from experiments import records
from experiments import workdir as workdir_lib
from experiments.configs import base as configs_base
from splitjax import attacks
from splitjax import metrics
from splitjax import models
from splitjax import results
from splitjax import training
from splitjax.privacy import accounting
from splitjax.privacy import bounds
from splitjax.privacy import label_dp

VARIANTS = ("clip_aware", "paper", "bayes")
USERS = ("test", "train")
BLOCK = 1024  # attacked rows per resumable block
SCHEMA_VERSION = 2  # attack.json: 2 = splitjax 0.2 (prior, bounds with kinds, gains)
INFORMED_ASSUMPTION = (
  "the attacker holds an auxiliary sample of the population with private attributes (the split "
  "not attacked) and the device model; Jayaraman & Evans, CCS 2022"
)


def results_name(config: configs_base.AttackConfig) -> str:
  """``attack.json`` for the default attack, a suffixed name for every other configuration."""
  if (config.attack, config.variant, config.prior, config.users) == (
    "exact",
    "auto",
    "auto",
    "test",
  ):
    return "attack.json"
  if config.attack != "exact":
    return f"attack_{config.attack}_{config.variant}_{config.users}.json"
  return f"attack_{config.attack}_{config.variant}_{config.prior}_{config.users}.json"


def resolve(
  config: configs_base.AttackConfig, clip: float, sigma: float, label_epsilon: float
) -> tuple[str, str]:
  """The (variant, prior) an ``auto`` config means for the workdir's public DP parameters."""
  noisy = sigma > 0 and math.isfinite(clip)
  variant = config.variant if config.variant != "auto" else ("bayes" if noisy else "clip_aware")
  if config.prior != "auto":
    prior = config.prior
  else:
    prior = "informed" if (variant == "bayes" or label_epsilon) else "uniform"
  if variant == "bayes" and config.screen_dtype != "none":
    raise pipeline.ConfigError(
      "--screen_dtype screens distances; the Bayes attack (the default "
      "under noise) needs every posterior term in full precision: use "
      "--screen_dtype=none or --variant=clip_aware"
    )
  if variant == "bayes" and config.top_k != 1:
    raise pipeline.ConfigError(
      f"--variant=bayes answers with the marginal-posterior argmax: use "
      f"--top_k=1, not {config.top_k}"
    )
  return variant, prior


def _with_defaults(old_cfg):
  """A record's attack config with fields added since it was written set to their defaults."""
  if not isinstance(old_cfg, dict):
    return old_cfg
  defaults = results.to_jsonable(dataclasses.asdict(configs_base.AttackConfig()))
  return {**{k: v for k, v in defaults.items() if k not in old_cfg}, **old_cfg}


def validate(config: configs_base.AttackConfig) -> None:
  if config.attack not in attacks.ATTACKS:
    raise pipeline.ConfigError(
      f"unknown --attack {config.attack!r}: choose one of {sorted(attacks.ATTACKS)}"
    )
  if config.variant not in ("auto",) + VARIANTS:
    raise pipeline.ConfigError(
      f"unknown --variant {config.variant!r}: choose one of {('auto',) + VARIANTS}"
    )
  if config.prior not in ("auto",) + attacks.PRIORS:
    raise pipeline.ConfigError(
      f"unknown --prior {config.prior!r}: choose one of {('auto',) + attacks.PRIORS}"
    )
  if config.prior != "auto" and config.attack != "exact":
    raise pipeline.ConfigError(
      f"--prior applies to EXACT; --attack={config.attack} uses none: drop --prior"
    )
  if config.users not in USERS:
    raise pipeline.ConfigError(f"unknown --users {config.users!r}: choose one of {USERS}")
  if config.num_examples < 0:
    raise pipeline.ConfigError(
      f"--num_examples={config.num_examples} must be > 0 (omit it to attack every user)"
    )
  for name in ("top_k", "knn_k"):
    if getattr(config, name) < 1:
      raise pipeline.ConfigError(f"--{name}={getattr(config, name)} must be >= 1")
  if config.distance not in attacks.DISTANCES:
    raise pipeline.ConfigError(
      f"unknown --distance {config.distance!r}: choose one of {sorted(attacks.DISTANCES)}"
    )
  if config.variant == "bayes" and config.distance != "l2":
    raise pipeline.ConfigError(
      f"--variant=bayes scores by Gaussian likelihood: use --distance=l2, not {config.distance!r}"
    )
  if config.screen_dtype != "none" and config.screen_dtype not in attacks.SCREEN_DTYPES:
    raise pipeline.ConfigError(
      f"unknown --screen_dtype {config.screen_dtype!r}: choose none or "
      f"one of {sorted(attacks.SCREEN_DTYPES)}"
    )
  if config.screen_dtype != "none" and config.attack != "exact":
    raise pipeline.ConfigError(
      f"--screen_dtype screens EXACT's enumeration; --attack="
      f"{config.attack} has none: use --screen_dtype=none"
    )
  if config.screen_dtype != "none" and config.variant == "bayes":
    raise pipeline.ConfigError(
      "--screen_dtype screens distances; --variant=bayes needs every "
      "posterior term in full precision: use --screen_dtype=none"
    )
  if config.variant == "bayes" and config.top_k != 1:
    raise pipeline.ConfigError(
      f"--variant=bayes answers with the marginal-posterior argmax: use "
      f"--top_k=1, not {config.top_k}"
    )


def marginal_log_prior(dataset) -> np.ndarray:
  """Log prior over (candidate, label) pairs from train marginals (features independent).

  ``[C * 2]`` in ``attacks.candidate_table`` order, label fastest.
  """
  logp = attacks.priors.marginal_tuple_log_prior(dataset.train.priv_cat, dataset.priv_cardinalities)
  py = np.bincount(dataset.train.y, minlength=2) + 1.0
  return (logp[:, None] + np.log(py / py.sum())[None, :]).reshape(-1)


def variant_kwargs(
  variant: str, clip: float, sigma: float, dataset, prior: str = "marginal", pair_log_prior=None
) -> dict:
  """Keyword arguments of ``attacks.exact`` for a named variant, prior and the DP parameters.

  ``pair_log_prior``: the informed prior's per-user ``[N, C, 2]`` log prior (``prior='informed'``).
  """
  clip_arg = clip if math.isfinite(clip) else None
  kwargs = {"l2_clip_norm": clip_arg, "clip_aware": variant != "paper"}
  if variant == "bayes" and sigma > 0 and clip_arg is not None:
    kwargs["noise_stddev"] = sigma * clip
    if prior == "marginal":
      kwargs["log_prior"] = marginal_log_prior(dataset)
    elif prior == "informed":
      kwargs["log_prior"] = pair_log_prior
  return kwargs


class Informed(NamedTuple):
  """The informed prior of the attacked rows (see ``splitjax.attacks.priors``)."""

  fit: attacks.InformedPrior  # tuple prior [N, C] and how it was chosen
  label_p1: np.ndarray  # [N, C] P(y = 1 | h, x) for the true label (debiased under label DP)
  label_noisy_p1: (
    np.ndarray
  )  # [N, C] the model's own P(y~ = 1 | h, x) (= label_p1 without label DP)
  flip: float  # randomized-response flip probability (0 without label DP)


_INFORMED_CACHE: dict = {}  # the last few fits: the variants of one sweep point share theirs


def informed_prior(restored, config, transcript, split_name: str) -> Informed:
  """Fits the informed prior on the split not attacked and evaluates it for the attacked rows."""
  key = (
    restored.fingerprint,
    split_name,
    config.seed,
    results.fingerprint(transcript.example_index.tolist()),
    results.fingerprint(transcript.param_index.tolist()),
  )
  if key not in _INFORMED_CACHE:
    if len(_INFORMED_CACHE) >= 4:
      _INFORMED_CACHE.pop(next(iter(_INFORMED_CACHE)))
    _INFORMED_CACHE[key] = _fit_informed(restored, config, transcript, split_name)
  return _INFORMED_CACHE[key]


def _fit_informed(restored, config, transcript, split_name: str) -> Informed:
  dataset, model, state = restored.dataset, restored.model, restored.state
  ref = dataset.test if split_name == "train" else dataset.train
  query = getattr(dataset, split_name).take(transcript.example_index)
  spaces = {
    "server": attacks.server_feature_matrix(ref.pub_cat, ref.pub_dense, dataset.pub_cardinalities),
    "h": np.asarray(training.predict_h(model, state.server_params, ref.pub_cat, ref.pub_dense)),
  }
  query_spaces = {
    "server": attacks.server_feature_matrix(
      query.pub_cat, query.pub_dense, dataset.pub_cardinalities
    ),
    "h": np.asarray(training.predict_h(model, state.server_params, query.pub_cat, query.pub_dense)),
  }
  fit = attacks.fit_informed_prior(
    spaces, ref.priv_cat, dataset.priv_cardinalities, query_spaces=query_spaces, seed=config.seed
  )
  device_apply = models.device_logit_fn(model)
  noisy = np.empty((transcript.num_rows, fit.probs.shape[1]), np.float32)
  for version in np.unique(transcript.param_index):
    rows = np.flatnonzero(transcript.param_index == version)
    noisy[rows] = attacks.candidate_label_probability(
      device_apply,
      transcript.params_at(int(version)),
      transcript.h[rows],
      dataset.priv_cardinalities,
    )
  eps = restored.config.label_dp_epsilon
  flip = label_dp.flip_probability(eps) if eps else 0.0
  p1 = attacks.debias_label_probability(noisy, flip) if eps else noisy.astype(np.float64)
  return Informed(fit, p1, noisy, flip)


def rr_label_answer(
  p1_true: np.ndarray, noisy_label_posterior: np.ndarray, flip: float
) -> np.ndarray:
  """P(y = 1 | g) from P(y~ | g) [N, 2] and P(y = 1 | h, x) [N] through the RR channel.

  ``P(y | g) = sum_y~ P(y~ | g) P(y | y~, h, x)`` with
  ``P(y | y~, h, x) ∝ P(y | h, x) P(y~ | y)`` and ``P(y~ | y) = 1 - q`` if equal, else q.
  """
  p1 = np.clip(np.asarray(p1_true, np.float64), 1e-12, 1 - 1e-12)
  post = np.zeros_like(p1)
  for noisy in (0, 1):
    like1 = (1 - flip) if noisy == 1 else flip  # P(y~ | y = 1)
    like0 = flip if noisy == 1 else (1 - flip)  # P(y~ | y = 0)
    given = p1 * like1 / (p1 * like1 + (1 - p1) * like0)
    post += np.asarray(noisy_label_posterior, np.float64)[:, noisy] * given
  return post


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
      test_split = dataclasses.replace(
        test_split,
        y=label_dp.randomized_response(test_split.y, restored.config.label_dp_epsilon, rng=rng),
      )
    transcript = training.replay_transcript(
      model,
      state,
      test_split,
      dp=training.DPConfig(np.float32(clip), np.float32(sigma)),
      seed=config.seed + 1000,
      num_examples=config.num_examples or None,
    )
    return transcript, "test"
  transcript = restored.transcript()
  if config.num_examples:
    transcript = transcript.take(np.arange(min(config.num_examples, transcript.num_rows)))
  return transcript, "train"


def _targets(dataset, split_name: str, rows: np.ndarray):
  split = getattr(dataset, split_name)
  return split.priv_cat[rows], split.y[rows]


def attack_workdir(
  workdir,
  config: configs_base.AttackConfig,
  *,
  resume: bool = False,
  overwrite: bool = False,
  progress=common.progress,
  kill_switch=None,
  check_memory: bool = True,
) -> dict:
  """Runs ``config`` against the trained ``workdir``; writes and returns the attack record.

  Holds the workdir's lock shared (exclusive with ``overwrite``) and the record's exclusive, so
  several attacks of other configurations can run on one workdir at once (experiments/workdir.py).
  With ``check_memory``, an EXACT run whose smallest possible peak memory exceeds 80 % of the
  free memory is refused before it starts (``common.check_memory``).
  """
  validate(config)
  with owned_for_attack(workdir, config, overwrite=overwrite):
    return _attack_owned(
      workdir,
      config,
      resume=resume,
      overwrite=overwrite,
      progress=progress,
      kill_switch=kill_switch,
      check_memory=check_memory,
    )


@contextlib.contextmanager
def owned_for_attack(workdir, config: configs_base.AttackConfig, *, overwrite: bool):
  """The locks of an attack on ``workdir``: the workdir's (shared, or exclusive with
  ``overwrite``), then its record's (exclusive). A path that is not a directory is left to the
  restore, which names it."""
  workdir = pathlib.Path(workdir).expanduser()
  if not workdir.is_dir():
    yield
    return
  name = results_name(config)
  with (
    workdir_lib.locked(workdir, exclusive=overwrite),
    workdir_lib.locked(workdir, exclusive=True, name=f".{name}.lock", what=f"{workdir / name}"),
  ):
    for p in workdir.glob(f".{name}.*.tmp"):  # an earlier attack of this record, killed mid-write
      p.unlink(missing_ok=True)
    yield


def _attack_owned(
  workdir,
  config: configs_base.AttackConfig,
  *,
  resume: bool,
  overwrite: bool,
  progress,
  kill_switch,
  check_memory: bool = True,
) -> dict:
  restored = None if config.attack != "exact" else pipeline.Restored(workdir)
  if restored is None or (
    restored.model.spec.topology != "device_top" or restored.model.spec.num_priv_dense
  ):
    # Attacks beyond enumeration, activation matching (device_bottom) and the hybrid of
    # enumeration and optimisation (private dense features).
    if config.screen_dtype != "none" and restored is not None:
      raise pipeline.ConfigError(
        "--screen_dtype applies to EXACT on device_top models without "
        "private dense features; this workdir's model needs the "
        "activation or hybrid attack: use --screen_dtype=none"
      )
    from experiments import beyond  # pylint: disable=g-import-not-at-top

    return beyond.attack_workdir(
      workdir,
      config,
      resume=resume,
      overwrite=overwrite,
      progress=progress,
      kill_switch=kill_switch,
    )
  workdir = pathlib.Path(workdir)
  dataset, model = restored.dataset, restored.model
  check_knn_k(config, dataset)
  name = results_name(config)
  out_path = workdir / name
  cfg = dataclasses.asdict(config)
  partial_path = workdir / (name + ".partial.npz")
  run_key = results.fingerprint(
    {"attack": cfg, "model": restored.fingerprint, "schema_version": SCHEMA_VERSION}
  )
  if out_path.exists() and not overwrite:
    old = read_record(out_path)
    if old.get("schema_version") != SCHEMA_VERSION:
      raise results.WorkdirError(
        f"{out_path} was written by splitjax < 0.2 (attack record schema "
        f"{old.get('schema_version', 1)}, this splitjax writes "
        f"{SCHEMA_VERSION}): --overwrite to recompute it"
      )
    same_config = _with_defaults(old.get("config")) == results.to_jsonable(cfg)
    if same_config and old.get("model_fingerprint") == restored.fingerprint:
      if progress:
        progress(f"{out_path} already holds this attack; nothing to do")
      return old
    if not same_config:
      raise results.WorkdirError(
        f"{out_path} holds another attack configuration: use --overwrite or another --workdir"
      )
    # Same attack of an earlier model of this workdir: stale, recompute it.
  clip = (
    float(restored.metrics["l2_clip_norm"])
    if restored.metrics["l2_clip_norm"] != "inf"
    else math.inf
  )
  sigma = restored.metrics["noise_multiplier"]
  sigma = math.inf if sigma == "inf" else float(sigma)
  if math.isinf(sigma):
    raise pipeline.ConfigError(
      "the model was trained with noise multiplier inf (the server "
      "sees pure noise): there is nothing to attack"
    )
  label_eps = restored.config.label_dp_epsilon or 0.0
  variant, prior = resolve(config, clip, sigma, label_eps)

  transcript, split_name = observed_transcript(restored, config, clip, sigma)
  n = transcript.num_rows
  device_apply = models.device_logit_fn(model)
  # One estimate of the run (linear in users) serves the memory check and the progress line.
  est = None
  if check_memory or progress:
    est = attacks.estimate(
      device_apply,
      transcript.params_at(int(transcript.param_index[0])),
      transcript.h.shape[1],
      dataset.priv_cardinalities,
      n,
    )
  if check_memory:  # before anything sized by the candidates (the informed prior's pair table)
    common.check_memory(
      est.min_peak_bytes,
      f"EXACT over {est.num_pairs:,} (candidate, label) pairs per user",
      "--skip_memory_check",
    )
  informed = informed_prior(restored, config, transcript, split_name)
  pair_lp = None
  if prior == "informed":
    pair_lp = attacks.pair_log_prior(informed.fit.probs, informed.label_noisy_p1)
  kwargs = variant_kwargs(variant, clip, sigma, dataset, prior, pair_lp)
  if config.screen_dtype != "none":
    kwargs["screen_dtype"] = config.screen_dtype

  # Resumable: blocks of rows grouped by parameter version.
  done = {}
  if resume:
    done = read_partial(partial_path, run_key, n)
  feats = done.get("features", np.full((n, len(dataset.priv_cardinalities)), -1, np.int32))
  labels = done.get("labels", np.full(n, -1, np.int32))
  ties = done.get("ties", np.zeros(n, np.int32))
  finished = done.get("finished", np.zeros(n, bool))
  redone = done.get("screen_fallback", np.zeros(n, bool))  # users the bf16 screen left undecided
  label_post = done.get("label_posterior", np.full((n, 2), np.nan))  # P(label | g), Bayes only
  map_codes = done.get("map_codes", np.full(n, -1, np.int64))  # joint MAP / nearest tuple
  if progress:
    remaining = int((~finished).sum())
    progress(
      f"EXACT: {remaining:,} users x {est.num_pairs:,} pairs, about "
      f"{est.seconds * remaining / max(n, 1):.2g} s after compilation (estimate: "
      f"{est.flops_per_candidate:,} FLOPs per candidate at half of "
      f"{est.matmul_flops_per_second / 1e9:.0f} GFLOP/s)"
    )
  t0 = time.time()
  bar = (
    common.ProgressPrinter(n, f"attack {variant}/{prior} {config.users}", printer=progress)
    if progress
    else None
  )
  # Compile on a first block (exact buckets its chunk plan by powers of two, so blocks of this
  # size reuse it), so that the timed attack measures throughput, not compilation.
  tc = time.time()
  first = np.flatnonzero(transcript.param_index == transcript.param_index[0])[:BLOCK]
  attacks.exact(
    device_apply,
    transcript.params_at(int(transcript.param_index[0])),
    transcript.h[first],
    transcript.g[first],
    dataset.priv_cardinalities,
    top_k=config.top_k,
    distance=config.distance,
    **_first_rows(kwargs, first),
  )
  compile_seconds = time.time() - tc
  attack_seconds = 0.0
  for version in np.unique(transcript.param_index):
    rows_v = np.flatnonzero((transcript.param_index == version) & ~finished)
    params = transcript.params_at(int(version))
    for start in range(0, len(rows_v), BLOCK):
      rows = rows_v[start : start + BLOCK]
      ta = time.time()
      res = attacks.exact(
        device_apply,
        params,
        transcript.h[rows],
        transcript.g[rows],
        dataset.priv_cardinalities,
        top_k=config.top_k,
        distance=config.distance,
        **_first_rows(kwargs, rows),
      )
      attack_seconds += time.time() - ta
      feats[rows], labels[rows], ties[rows] = res.features, res.labels, res.num_ties
      map_codes[rows] = attacks.tuple_codes(res.map_features, dataset.priv_cardinalities)
      if res.label_posterior is not None:
        label_post[rows] = res.label_posterior
      if res.screen_fallback is not None:
        redone[rows] = res.screen_fallback
      finished[rows] = True
      if workdir_lib.is_writer():
        results.atomic_write_bytes(
          partial_path,
          _npz(
            features=feats,
            labels=labels,
            ties=ties,
            screen_fallback=redone,
            finished=finished,
            label_posterior=label_post,
            map_codes=map_codes,
            run_key=np.str_(run_key),
          ),
        )
      common.checkpointed(f"{int(finished.sum()):,} of {n:,} attacked users")
      if bar:
        bar(int(finished.sum()))
      if kill_switch is not None:
        kill_switch.tick()

  if label_eps and prior == "informed":
    # The gradient reveals the noisy label; the true label's answer goes through the RR channel
    # with the device model's (debiased) P(y | h, x) at the recovered tuple.
    p1_at = informed.label_p1[np.arange(n), map_codes]
    noisy_post = (
      label_post if variant == "bayes" and not np.isnan(label_post).any() else (np.eye(2)[labels])
    )
    labels = (rr_label_answer(p1_at, noisy_post, informed.flip) > 0.5).astype(np.int32)
  true_feats, true_y = _targets(dataset, split_name, transcript.example_index)
  record = score(
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
    prior=prior,
    informed=informed,
  )
  record["variant"], record["prior"] = variant, prior
  candidates = int(np.prod(dataset.priv_cardinalities)) * 2
  if config.screen_dtype != "none":
    record["screen_fallback_fraction"] = float(redone.mean()) if n else 0.0
  record.update(
    {
      "seconds": time.time() - t0,
      "attack_seconds": attack_seconds,
      "compile_seconds": compile_seconds,
      "model_fingerprint": restored.fingerprint,
      "candidates_per_second": n * candidates / max(attack_seconds, 1e-9),
      "config": cfg,
    }
  )
  if config.users == "train":
    record["local_steps_attacked"] = sorted(set(int(s) for s in transcript.local_step))
    stale = transcript.local_step > 0
    if stale.any():
      record["stale_model"] = _stale_report(dataset, feats, labels, true_feats, true_y, stale)
      record["first_local_step"] = _stale_report(dataset, feats, labels, true_feats, true_y, ~stale)
  record["environment"] = records.environment()
  if workdir_lib.is_writer():  # under jax.distributed, process 0 writes
    results.atomic_write_json(out_path, record)
    partial_path.unlink(missing_ok=True)
  return record


def read_record(path: pathlib.Path) -> dict:
  """An existing attack record; one line with the fix when it is corrupted or not a record."""
  old = results.read_json(path)
  if not isinstance(old, dict) or "config" not in old:
    raise results.ResultsError(
      f"{path} is not an attack record (edited or damaged): --overwrite to recompute it"
    )
  return old


def check_knn_k(config: configs_base.AttackConfig, dataset) -> None:
  """--knn_k against the reference split the k-NN baselines vote from, before any attack runs."""
  ref = dataset.test if config.users == "train" else dataset.train
  if config.knn_k > len(ref):
    raise pipeline.ConfigError(
      f"--knn_k={config.knn_k} exceeds the {len(ref):,} rows of the "
      "reference split the k-NN baselines vote from: give at most "
      f"{len(ref):,} (the paper uses 30)"
    )


def read_partial(path: pathlib.Path, run_key: str, num_rows: int) -> dict:
  """The arrays of an attack's ``.partial.npz`` for ``--resume``, or {} (attack from the start)
  when there is none, or it is of another attack or model, unreadable (truncated, garbage) or of
  another size: each of those says so in one line (stderr) and is replaced as the attack goes."""
  if not path.exists():
    return {}
  why = None
  try:
    results.check_regular_file(path)
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except Exception as e:  # np.load raises many types on truncated or garbage files
    why = f"unreadable ({type(e).__name__})"
  else:
    if "run_key" not in arrays or str(arrays.pop("run_key")) != run_key:
      why = "written by another attack or model"
    elif any(np.ndim(v) < 1 or len(v) != num_rows for v in arrays.values()):
      why = f"not of these {num_rows:,} users"
  if why:
    print(f"warning: ignoring {path}: {why}; attacking every user again", file=sys.stderr)
    return {}
  return arrays


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


def score(
  dataset,
  restored,
  config,
  transcript,
  feats,
  labels,
  ties,
  true_feats,
  true_y,
  *,
  clip,
  sigma,
  prior: str = "marginal",
  informed: Informed | None = None,
) -> dict:
  """Per-secret metrics, baselines, the prior-only answers and the gain, bounds and the report.

  Every secret gets ``accuracy`` (Clopper-Pearson ``ci``), the majority guess ``prior_accuracy``,
  k-NN on server features and on ``h``, ``prior_only_accuracy`` (the attack's own prior without
  the gradient, on the same users) with the paired ``gain`` (McNemar interval), ``marks``, and
  ``bound`` / ``bound_kind`` / ``bound_prior`` (per user, averaged over the attacked users; see
  ``bounds.BOUND_KINDS``), beside ``bound_marginal`` (the marginal prior; not valid against an
  attacker who knows h). ``mu_hat`` only where the bound is a guarantee.
  """
  cards = dataset.priv_cardinalities
  train = dataset.train
  # Baselines without gradients: majority prior, k-NN on server features and on h.
  ref = dataset.test if config.users == "train" else dataset.train
  query_split = getattr(dataset, "train" if config.users == "train" else "test")
  q = transcript.example_index
  ref_targets = np.concatenate([ref.priv_cat, ref.y[:, None]], axis=1)
  target_cards = tuple(cards) + (2,)
  ref_x = attacks.server_feature_matrix(ref.pub_cat, ref.pub_dense, dataset.pub_cardinalities)
  query_x = attacks.server_feature_matrix(
    query_split.pub_cat[q], query_split.pub_dense[q], dataset.pub_cardinalities
  )
  knn = attacks.knn(ref_x, ref_targets, query_x, target_cards, k=config.knn_k)
  ref_h = np.asarray(
    training.predict_h(restored.model, restored.state.server_params, ref.pub_cat, ref.pub_dense)
  )
  knn_h = attacks.knn(ref_h, ref_targets, transcript.h, target_cards, k=config.knn_k)
  priors = [
    np.bincount(train.priv_cat[:, j], minlength=c) / len(train) for j, c in enumerate(cards)
  ] + [np.bincount(train.y, minlength=2) / len(train)]
  n = int(transcript.num_rows)

  # The prior's own answers (no gradient): the informed prior, or the majority guess.
  if informed is None:
    raise ValueError("score needs the informed prior (attacking.informed_prior)")
  inf_feats, inf_labels, inf_margs, inf_py1 = attacks.prior_guess(
    informed.fit.probs, informed.label_p1, cards
  )
  inf_preds = [inf_feats[:, j] for j in range(len(cards))] + [inf_labels]
  inf_posts = list(inf_margs) + [np.stack([1 - inf_py1, inf_py1], axis=1)]

  # What protects each channel (DESIGN.md §4): the cut layer for test users; training users only
  # with device DP-SGD as well (their later releases depend on a non-privately updated phi).
  cfg = restored.config
  cut_protected = math.isfinite(clip) and sigma > 0
  releases = 1 if config.users == "test" else int(restored.metrics["releases"])
  device_dp = bool(cfg.device_dp_clip) and cfg.device_dp_noise_multiplier > 0
  if not cut_protected or (config.users == "train" and not device_dp):
    mu_ref = None
  else:
    mu_ref = bounds.reference_mu(
      noise_multiplier=sigma,
      releases=releases,
      device_noise_multiplier=cfg.device_dp_noise_multiplier if device_dp else None,
      device_releases=releases if (device_dp and config.users == "train") else 0,
    )
  mu = accounting.composed_mu(sigma, releases) if math.isfinite(clip) else math.inf
  label_eps = cfg.label_dp_epsilon
  true_prior = query_split.p_priv_pub is not None and query_split.p_y_pub is not None
  record = {
    "schema_version": SCHEMA_VERSION,
    "dataset": cfg.dataset,
    "protocol": cfg.protocol,
    "attack": config.attack,
    "variant": config.variant,
    "prior": prior,
    "users": config.users,
    "num_examples": n,
    "ties": int(np.sum(ties > 1)),
    "features": {},
    "label": None,
    "informed_prior": {
      "k": informed.fit.k,
      "lam": informed.fit.lam,
      "space": informed.fit.space,
      "cv_log_loss": informed.fit.cv_log_loss,
      "ece": {
        name: informed.fit.ece[j] for j, name in enumerate(dataset.roles.private_categorical)
      },
      "assumption": INFORMED_ASSUMPTION,
    },
  }
  names = list(dataset.roles.private_categorical) + ["label"]
  preds = [feats[:, j] for j in range(len(cards))] + [labels]
  trues = [true_feats[:, j] for j in range(len(cards))] + [true_y]
  offsets = np.concatenate([[0], np.cumsum(cards)])
  for j, name in enumerate(names):
    k = target_cards[j]
    is_label = name == "label"
    rep = metrics.feature_report(
      preds[j], trues[j], k, prior_pred=int(np.argmax(priors[j])), knn_pred=knn.predictions[:, j]
    )
    rep["knn_h_accuracy"] = metrics.accuracy(knn_h.predictions[:, j], trues[j])["accuracy"]
    # The same prior without the gradient, on the same users, and the paired gain.
    if prior == "informed" or (is_label and label_eps and prior != "uniform"):
      base_pred = inf_preds[j]
    else:
      base_pred = np.full(n, int(np.argmax(priors[j])))
    rep["prior_only_accuracy"] = float(np.mean(base_pred == trues[j]))
    rep["informed_prior_accuracy"] = float(np.mean(inf_preds[j] == trues[j]))
    rep["gain"] = metrics.paired_difference(preds[j] == trues[j], base_pred == trues[j])
    rep["marks"] = ([("below_majority_prior")] if rep["ci"][1] < rep["prior_accuracy"] else []) + (
      ["below_knn"] if rep["accuracy"] < rep["knn_accuracy"] else []
    )
    # Per-user priors for the bound: the generator's truth (synthetic), else the informed prior.
    if true_prior:
      user_prior = (
        np.stack([1 - query_split.p_y_pub[q], query_split.p_y_pub[q]], axis=1)
        if is_label
        else query_split.p_priv_pub[q][:, offsets[j] : offsets[j + 1]]
      )
      kind, described = "guarantee:true_prior", "the generator's P(secret | x_pub)"
    else:
      user_prior = inf_posts[j]
      kind, described = "estimate:knn_prior", "informed (k-NN joint prior + device model)"
    marginal = np.tile(priors[j], (n, 1))
    if mu_ref is None:
      bound, bound_marginal = None, None
    else:
      bound = float(np.mean(bounds.per_user_bound(user_prior, mu_ref)))
      bound_marginal = float(np.mean(bounds.per_user_bound(marginal, mu_ref)))
    clip_read_labels = cfg.dp_clip == "auto" and str(
      restored.metrics.get("clip_source", "private")
    ).startswith("private")
    if is_label and label_eps and clip_read_labels:
      # splitjax < 0.2 computed --dp_clip=auto from the true training labels: a release that
      # nothing accounts for, so the label's randomized-response guarantee is void.
      rep["label_guarantee_void"] = (
        "the clip norm was computed from the private training "
        "labels (splitjax < 0.2 --dp_clip=auto): retrain"
      )
    elif is_label and label_eps:
      # Randomized response bounds the label end to end (also for training users): the public
      # clip reads no true label. Under label DP alone the unnoised gradient reveals x_priv, so
      # the per-user prior is P(y | x_pub, x_priv).
      if true_prior and query_split.p_y_full is not None:
        p_full = np.asarray(query_split.p_y_full)[q]
      else:
        codes = attacks.tuple_codes(true_feats, cards)
        p_full = informed.label_p1[np.arange(n), codes]
        kind, described = "estimate:knn_prior", "the device model's P(y | h, x_priv)"
      rr = np.asarray(bounds.randomized_response_bound(np.clip(p_full, 0, 1), label_eps))
      rep["bound_label_dp"] = float(np.mean(rr))
      rr_marginal = bounds.randomized_response_bound(float(priors[j][1]), label_eps)
      bound = rep["bound_label_dp"] if bound is None else min(bound, rep["bound_label_dp"])
      bound_marginal = rr_marginal if bound_marginal is None else min(bound_marginal, rr_marginal)
    rep["bound"] = bound
    rep["bound_kind"] = kind if bound is not None else "none:channel_unprotected"
    rep["bound_prior"] = described if bound is not None else None
    rep["bound_marginal"] = bound_marginal
    rep["bound_marginal_note"] = (
      "marginal prior (estimate:marginal_prior): not valid against an attacker who knows h"
    )
    rep["mu_hat"] = None
    if k == 2 and bound is not None and rep["bound_kind"].startswith("guarantee"):
      rep["mu_hat"] = bounds.mu_hat(rep["ci"][0], float(np.mean(user_prior[:, 1])))
    if is_label:
      record["label"] = rep
    else:
      record["features"][name] = rep
  _check_guarantees(record)
  record.update(
    accounting.privacy_report(
      noise_multiplier=sigma,
      l2_clip_norm=clip,
      releases=int(restored.metrics["releases"]),
      delta=cfg.target_delta,
      label_epsilon=label_eps or None,
    )
  )
  record["mu_attack_bound"] = mu
  record["mu_reference"] = mu_ref
  record["releases_attacked"] = releases
  record["clip_source"] = restored.metrics.get("clip_source")
  return record


class BoundViolation(AssertionError):
  """A measured success above its DP bound on synthetic data, beyond sampling error: a bug."""


def _check_guarantees(record) -> None:
  """Fails loudly where a success's CI lower end exceeds a bound of kind guarantee."""
  for name, r in list(record["features"].items()) + [("label", record["label"])]:
    if r["bound_kind"].startswith("guarantee") and r["ci"][0] > r["bound"] + 1e-9:
      raise BoundViolation(
        f"{name}: measured success {r['accuracy']:.4f} (95% CI lower end {r['ci'][0]:.4f}) is "
        f"above the DP bound {r['bound']:.4f} on synthetic data with a known prior: "
        "this is a bug in the attack, the DP transform or the accounting; rerun with --debug "
        "and report it"
      )


def markdown_table(record: dict) -> str:
  """The attack record as a Markdown table (one row per private feature and the label)."""
  fmt = lambda x: "–" if x is None else f"{x:.4f}"
  lines = [
    f"### {record['attack']} ({record['variant']}, prior {record.get('prior')}) on "
    f"{record['num_examples']} {record['users']} users of {record['dataset']} "
    f"({record['protocol']})",
    "",
    "| secret | accuracy | 95% CI | prior only | gain [95% CI] | majority | k-NN (server) |"
    " k-NN (h) | bound (kind) | bound (marginal) | marks |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  rows = list(record["features"].items()) + [("label", record["label"])]
  for name, r in rows:
    g = r["gain"]
    lines.append(
      f"| {name} | {r['accuracy']:.4f} | [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] | "
      f"{r['prior_only_accuracy']:.4f} | {g['difference']:+.4f} [{g['ci'][0]:+.4f}, "
      f"{g['ci'][1]:+.4f}] | {r['prior_accuracy']:.4f} | {r['knn_accuracy']:.4f} | "
      f"{r['knn_h_accuracy']:.4f} | {fmt(r['bound'])} ({r['bound_kind']}) | "
      f"{fmt(r['bound_marginal'])} | {', '.join(r['marks'])} |"
    )
  lines.append("")
  eps = lambda x: x if isinstance(x, str) else f"{float(x):.4g}"
  lines.append(
    f"ties: {record['ties']} (users whose best candidates scored equal: the answer "
    f"took the first); epsilon of one attacked release {eps(record['attack_epsilon'])}"
    f" (cut layer, delta {record['delta']}); {record['candidates_per_second']:.3g} "
    "candidates/s"
  )
  lines.append(
    "prior only: the same prior's guess without the gradient; gain: accuracy minus "
    "it (paired, McNemar 95% CI); bound: the most an attacker with that prior can "
    "reach; mu_hat (in the JSON): the smallest mu consistent with the accuracy, only "
    "where the bound is a guarantee."
  )
  return "\n".join(lines)
