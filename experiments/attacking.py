r"""Attack a trained workdir: one resumable loop over ``splitjax.attacks.run`` -> the record.

The attacker gets the transcript (``h``, ``g`` and the device parameters behind each row) and
public knowledge (``attacks.Public``: domains, train-set marginals, C, sigma, priors); ground
truth is used only to score the answers (``splitjax.evaluation``). Every attack of
``attacks.ATTACKS`` runs here:

* ``exact`` on a device_top model with categorical private features only: EXACT in three
  variants (clip_aware, paper, bayes) and three priors (uniform, marginal, informed) ->
  ``attack.json`` (the default attack) or ``attack_exact_<variant>_<prior>_<users>.json``; the
  parameter versions of a training transcript are attacked in one batched call per block
  (``param_index``);
* ``optimize``: relaxed gradient matching of every secret (``splitjax.attacks.optimize``);
* ``hybrid`` (and ``exact`` with private dense features): EXACT over categorical features and the
  label, optimisation over the dense ones (``splitjax.attacks.hybrid``);
* ``label_norm`` / ``label_direction``: label-only attacks of Li et al. 2021, scored by AUC;
* ``exact_activations`` (and ``exact`` on ``device_bottom``): EXACT on the activations the device
  sends (``splitjax.attacks.exact_activations``).

The attacks other than EXACT write ``attack_<attack>_<variant>_<users>.json`` with the same
schema (``evaluation.score``): per categorical feature and the label ``accuracy, ci, macro_f1,
prior_accuracy, knn_accuracy, ...``; continuous features get ``mae`` (original units),
``within_tolerance`` (fraction within ``dense_tolerance`` original units, 2 years for age) and
their baselines; label-only attacks add ``auc``.

  python -m experiments.train --dataset=adult --private_dense=age --workdir=/tmp/adult_age
  python -m experiments.attack --workdir=/tmp/adult_age --attack=hybrid --num_examples=1000
  python -m experiments.attack --workdir=/tmp/adult_age --attack=optimize --num_examples=1000
  python -m experiments.attack --workdir=/tmp/adult_age --attack=label_norm
  python -m experiments.train --dataset=adult --topology=device_bottom --workdir=/tmp/adult_bottom
  python -m experiments.attack --workdir=/tmp/adult_bottom --attack=exact_activations
"""

import contextlib
import dataclasses
import io as _pyio
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

from experiments import common
from experiments import defending
from experiments import joint_attacking
from experiments import pipeline
from experiments import records
from experiments import workdir as workdir_lib
from experiments.configs import base as configs_base
from splitjax import attacks
from splitjax import defenses as defenses_lib
from splitjax import evaluation
from splitjax import metrics
from splitjax import models
from splitjax import protocol
from splitjax import results
from splitjax import training
from splitjax.privacy import label_dp

VARIANTS = attacks.VARIANTS
USERS = ("test", "train")
BLOCK = 1024  # attacked rows per resumable block


def _block_rows() -> int:
  """Rows per resumable block: BLOCK, or the test-only ``common.ATTACK_BLOCK_ENV``."""
  value = os.environ.get(common.ATTACK_BLOCK_ENV, "")
  return int(value) if value.strip() else BLOCK


SCHEMA_VERSION = evaluation.SCHEMA_VERSION  # attack.json: 2 = splitjax 0.2
LABEL_ATTACKS = ("label_norm", "label_direction")
# --attack's names: every attack but exact_releases, which --users=train --releases=all runs.
BINARY_ATTACKS = tuple(name for name in attacks.ATTACKS if name != "exact_releases")


def results_name(config: configs_base.AttackConfig) -> str:
  """``attack.json`` for the default attack, a suffixed name for every other configuration
  (``--defense_model`` other than auto and ``--joint_batch_size`` add ``_<model>`` and
  ``_b<size>``, so an adaptive and a naive record sit side by side)."""
  extra = "" if config.defense_model == "auto" else f"_{config.defense_model}"
  if config.joint_batch_size:
    extra += f"_b{config.joint_batch_size}"
  if (config.attack, config.variant, config.prior, config.users, extra) == (
    "exact",
    "auto",
    "auto",
    "test",
    "",
  ):
    return "attack.json"
  if config.attack != "exact":
    return f"attack_{config.attack}_{config.variant}_{config.users}{extra}.json"
  releases = "_all" if config.releases == "all" else ""
  return (
    f"attack_{config.attack}_{config.variant}_{config.prior}_{config.users}{releases}{extra}.json"
  )


def resolve(
  config: configs_base.AttackConfig,
  clip: float,
  sigma: float,
  label_epsilon: float,
  defended: bool = False,
) -> tuple[str, str]:
  """The (variant, prior) an ``auto`` config means for the workdir's public DP parameters.

  ``defended``: EXACT models a defence (`defense_model_of`): its randomized likelihood, or a
  deterministic one's ties, is then combined with the informed prior (Bayes), as under noise."""
  noisy = (sigma > 0 and math.isfinite(clip)) or defended
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


DEFENSE_MODELS = ("auto", "adaptive", "white_box", "naive")


def defense_model_of(restored, config, sigma: float, clip: float = math.inf):
  """``(splitjax.defenses.AttackModel or None, note)``: what EXACT simulates of the workdir's
  ``--defense`` chain under ``--defense_model`` (UsageError: adaptive asked, not modelled).

  ``white_box`` is ``adaptive`` with the device's own batch statistics for the batch-dependent
  randomized defences (max_norm, marvell), where ``adaptive`` estimates them (`defending`)."""
  chain = pipeline.defense_plan(restored.config)
  if chain is None:
    return None, ""
  model, why = defenses_lib.attack_model(chain, sigma, clip)
  if (
    model is not None
    and model.likelihood is not None
    and model.likelihood.name in defenses_lib.NEEDS_BATCH_INFO
    and config.users != "test"
  ):
    model, why = None, f"{model.likelihood.text()}'s batch statistics are built for test users"
  mode = config.defense_model
  if mode == "naive" or (mode == "auto" and model is None):
    return None, "naive" + (f" ({why})" if why else "")
  if model is None:
    raise common.UsageError(f"--defense_model={mode}: {why}; use --defense_model=naive")
  if config.screen_dtype != "none":
    raise common.UsageError(
      "--screen_dtype cannot screen an adaptive attack (the defences' transforms break its "
      "closed form): drop it or pass --defense_model=naive"
    )
  if model.likelihood is not None:
    return model, f"{'white_box' if mode == 'white_box' else 'adaptive'} (likelihood)"
  return model, "adaptive"


def validate(config: configs_base.AttackConfig) -> None:
  if config.attack == "exact_releases":
    raise pipeline.ConfigError(
      "--attack=exact_releases is what --attack=exact --users=train --releases=all runs: use that"
    )
  if config.defense_model not in DEFENSE_MODELS:
    raise pipeline.ConfigError(
      f"unknown --defense_model {config.defense_model!r}: choose one of {DEFENSE_MODELS}"
    )
  if config.attack not in BINARY_ATTACKS:
    raise pipeline.ConfigError(
      f"unknown --attack {config.attack!r}: choose one of {sorted(BINARY_ATTACKS)}"
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
  if config.releases not in pipeline.RELEASES:
    raise pipeline.ConfigError(
      f"unknown --releases {config.releases!r}: choose one of {pipeline.RELEASES}"
    )
  if config.releases == "all":
    if config.users != "train" or config.attack != "exact":
      raise pipeline.ConfigError(
        "--releases=all combines the recorded releases of training users with EXACT: use "
        "--users=train --attack=exact (a test user sends one release)"
      )
    if config.top_k != 1 or config.distance != "l2" or config.screen_dtype != "none":
      raise pipeline.ConfigError(
        "--releases=all sums squared distances (log-likelihoods under noise) over releases: "
        "use --top_k=1 --distance=l2 --screen_dtype=none"
      )
  if config.attack == "fsl_tracking" and (
    config.users != "train"
    or config.releases != "last_epoch"
    or config.top_k != 1
    or config.distance != "l2"
    or config.screen_dtype != "none"
    or config.variant == "paper"
  ):
    raise pipeline.ConfigError(
      "--attack=fsl_tracking follows FSL devices through the last epoch's local steps: use "
      "--users=train --releases=last_epoch with the defaults of --top_k, --distance, "
      "--screen_dtype and a clip-aware --variant (auto, clip_aware or bayes)"
    )
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


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SearchOptions:
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


def options_of(config) -> SearchOptions:
  """``SearchOptions`` with the fields that ``config`` also has taken from it."""
  names = {f.name for f in dataclasses.fields(SearchOptions)}
  return SearchOptions(**{n: getattr(config, n) for n in names if hasattr(config, n)})


def resolve_attack(config, model) -> str:
  """The attack to run: ``exact`` maps to hybrid / exact_activations where it cannot enumerate."""
  topology = model.spec.topology
  name = config.attack
  if name == "exact":
    if topology == "device_bottom":
      return "exact_activations"
    return "hybrid" if model.spec.num_priv_dense else "exact"
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


def dp_of(restored) -> tuple[float, float]:
  """The workdir's public DP parameters ``(C, sigma)`` (inf: none); refuses sigma = inf."""
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


def setting_of(restored, config: configs_base.AttackConfig) -> evaluation.Setting:
  """The public facts of the attacked workdir that its record states (``evaluation.Setting``)."""
  cfg, m = restored.config, restored.metrics
  clip, sigma = dp_of(restored)
  device_dp = bool(cfg.device_dp_clip) and cfg.device_dp_noise_multiplier > 0
  return evaluation.Setting(
    dataset=cfg.dataset,
    protocol=cfg.protocol,
    attack=config.attack,
    variant=config.variant,
    users=config.users,
    knn_k=config.knn_k,
    releases=int(m["releases"]),
    l2_clip_norm=clip,
    noise_multiplier=sigma,
    device_noise_multiplier=cfg.device_dp_noise_multiplier if device_dp else None,
    label_epsilon=cfg.label_dp_epsilon,
    delta=cfg.target_delta,
    clip_source=m.get("clip_source"),
    # splitjax < 0.2 computed --dp_clip=auto from the private training labels.
    clip_read_labels=cfg.dp_clip == "auto"
    and str(m.get("clip_source", "private")).startswith("private"),
  )


def public_of(restored, clip: float, sigma: float, **priors) -> attacks.Public:
  """What the server knows of the workdir (``attacks.Public``), with the given priors."""
  dataset = restored.dataset
  return attacks.Public(
    model=restored.model,
    cardinalities=dataset.priv_cardinalities,
    num_dense=int(dataset.train.priv_dense.shape[1]),
    l2_clip_norm=clip,
    noise_multiplier=sigma,
    positive_fraction=float(dataset.train.y.mean()),
    **priors,
  )


_INFORMED_CACHE: dict = {}  # the last few fits: the variants of one sweep point share theirs


def informed_prior(restored, config, transcript, split_name: str) -> evaluation.Informed:
  """The informed prior of the attacked rows (``evaluation.fit_informed``), cached per workdir."""
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
    _INFORMED_CACHE[key] = evaluation.fit_informed(
      restored.dataset,
      restored.model,
      restored.state.server_params,
      transcript,
      split_name,
      seed=config.seed,
      label_epsilon=restored.config.label_dp_epsilon,
    )
  return _INFORMED_CACHE[key]


def bottom_informed_log_prior(restored, config, transcript, split_name: str) -> np.ndarray:
  """device_bottom's informed prior, ``[N, C]`` log P(x_priv | the server's own features) of the
  attacked rows: `attacks.fit_informed_prior` on the server's feature space only (in this
  orientation ``h`` is the device's activation, the very signal under attack), fitted on the
  split not attacked."""
  dataset = restored.dataset
  ref = dataset.test if split_name == "train" else dataset.train
  query = getattr(dataset, split_name).take(transcript.example_index)
  space = lambda s: attacks.server_feature_matrix(s.pub_cat, s.pub_dense, dataset.pub_cardinalities)
  fit = attacks.fit_informed_prior(
    {"server": space(ref)},
    ref.priv_cat,
    dataset.priv_cardinalities,
    query_spaces={"server": space(query)},
    seed=config.seed,
  )
  return np.log(np.maximum(np.asarray(fit.probs, np.float64), 1e-300))


def device_test_split(restored):
  """The test split as the device holds it: under label DP each row's randomized-response
  label, drawn once (the device only ever uses that one)."""
  test_split = restored.dataset.test
  if restored.config.label_dp_epsilon:
    rng = np.random.default_rng([restored.config.seed, 8])
    test_split = dataclasses.replace(
      test_split,
      y=label_dp.randomized_response(test_split.y, restored.config.label_dp_epsilon, rng=rng),
    )
  return test_split


def observed_transcript(
  restored, config, clip: float, sigma: float, batch_size: int = defending.BATCH
):
  """What the server observed: ``(transcript, split name)``.

  Test users are replayed once through the final model with the public DP
  parameters (under label DP with their own randomized-response label, drawn
  once, as the device only ever uses that one), in batches of ``batch_size`` (the batches
  whose statistics `defending` recomputes; the joint attack passes the device's batch); train
  users come from the recorded last-epoch transcript.
  """
  model, state = restored.model, restored.state
  if config.users == "test":
    test_split = device_test_split(restored)
    transcript = training.replay_transcript(
      model,
      state,
      test_split,
      dp=training.DPConfig(np.float32(clip), np.float32(sigma)),
      seed=config.seed + 1000,
      num_examples=config.num_examples or None,
      batch_size=batch_size,
      defenses=pipeline.defense_plan(restored.config),
    )
    return transcript, "test"
  transcript = restored.transcript()
  if config.num_examples:
    transcript = transcript.take(np.arange(min(config.num_examples, transcript.num_rows)))
  return transcript, "train"


def _expected_accuracy(record, dataset, state, true_feats, true_y, label_eps) -> None:
  """Each secret's ``expected_accuracy``: the mean posterior mass on the truth (the credit of a
  prior-weighted choice among tied pairs, or a likelihood's posterior), beside its accuracy."""
  offsets = np.concatenate([[0], np.cumsum(dataset.priv_cardinalities)])
  rows = np.arange(len(true_y))
  post = state["posteriors"]
  for j, name in enumerate(dataset.roles.private_categorical):
    mass = post[rows, offsets[j] + true_feats[:, j]]
    record["features"][name]["expected_accuracy"] = float(np.mean(mass))
  label_post = state["label_posterior"]
  if not label_eps and not np.isnan(label_post).any():
    record["label"]["expected_accuracy"] = float(np.mean(label_post[rows, true_y]))


RELEASES_NOTE = (
  "partial likelihood: the per-release Gaussian log-likelihoods of a user's releases summed, each "
  "under the parameters that produced it; the exact likelihood of the cut releases only when "
  "those parameters depend on the example through earlier released outputs alone (device "
  "DP-SGD on), else compare its gain with the prior-only attacker, not with a DP bound"
)


def all_releases(restored, last: protocol.Transcript):
  """``(every release, one row per user)`` of the training users in ``last`` (the attacked
  rows of the last-epoch transcript, so ``--num_examples`` picks the same users for both
  ``--releases`` values). The per-user rows are each user's last release, users ascending.

  FSL: a release after a round's first local step was made with the device's locally updated
  parameters, which the recording does not hold (its row points at the round-start version), so
  only first-step releases are combined."""
  every = restored.releases()
  users = np.unique(last.example_index)
  keep = np.isin(every.example_index, users) & (every.local_step == 0)
  every = every.take(np.flatnonzero(keep))
  # the last release of each user: the last row of each example index
  order = np.lexsort((np.arange(every.num_rows), every.example_index))
  ids = every.example_index[order]
  last_of = order[np.r_[ids[1:] != ids[:-1], True]]
  return every, every.take(last_of)


def _releases_of_users(every: protocol.Transcript, per_user: protocol.Transcript, public):
  """``take(rows)`` for the attack loop: every release of the users at ``rows`` of
  ``per_user`` (ascending ids), with their public knowledge."""

  def take(rows):
    users = per_user.example_index[rows]
    return every.take(np.flatnonzero(np.isin(every.example_index, users))), public.take(rows)

  return take


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
  options: SearchOptions | None = None,
) -> dict:
  """Runs ``config`` against the trained ``workdir``; writes and returns the attack record.

  Holds the workdir's lock shared (exclusive with ``overwrite``) and the record's exclusive, so
  several attacks of other configurations can run on one workdir at once (experiments/workdir.py).
  With ``check_memory``, an EXACT run whose smallest possible peak memory exceeds 80 % of the
  free memory is refused before it starts (``common.check_memory``). ``options``: the knobs of
  the optimisation attacks (default: ``options_of(config)``).

  Raises:
    pipeline.ConfigError: the attack does not fit the workdir's model (e.g. a label attack on a
      device_bottom model).
    results.WorkdirError: the results file holds another configuration (use ``overwrite``).
  """
  validate(config)
  with owned_for_attack(workdir, config, overwrite=overwrite):
    restored = pipeline.Restored(workdir)
    check_knn_k(config, restored.dataset)
    name = resolve_attack(config, restored.model)
    if (
      name == "exact"
      and config.attack == "exact"
      and config.defense_model != "naive"
      and config.users == "test"
      and joint_attacking.has_batch_average(restored)
    ):
      name = joint_attacking.NAME  # the adaptive attack of batch_average
    if name != "exact" and config.screen_dtype != "none" and config.attack == "exact":
      raise pipeline.ConfigError(
        "--screen_dtype applies to EXACT on device_top models without "
        "private dense features; this workdir's model needs the "
        "activation or hybrid attack: use --screen_dtype=none"
      )
    if name == "fsl_tracking":
      return _attack_tracking(
        restored, pathlib.Path(workdir), config, overwrite=overwrite, progress=progress
      )
    run = _attack_enumerable if name == "exact" else _attack_searched
    extra = {"check_memory": check_memory} if name == "exact" else {"options": options}
    return run(
      restored,
      pathlib.Path(workdir),
      config,
      name,
      resume=resume,
      overwrite=overwrite,
      progress=progress,
      kill_switch=kill_switch,
      **extra,
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


def _attack_blocks(
  name: str,
  transcript,
  public: attacks.Public,
  blocks,
  *,
  variant: str,
  take: Callable | None = None,
  block_options: Callable[[np.ndarray], dict],
  keep: Callable,
  state: dict,
  run_key: str,
  partial_path: pathlib.Path,
  bar,
  kill_switch,
) -> float:
  """The resumable attack loop: ``attacks.run`` on each block of rows, then its answers kept.

  ``take(rows)`` gives the attack's ``(transcript, public)`` of a block (default: those rows of
  both; ``--releases=all``: every release of those users). After each block
  ``keep(result, rows)`` stores the answers in the arrays of ``state`` (which
  holds ``finished``), the partial file is rewritten from them (``--resume`` continues after
  the last block written) and the kill switch ticks. Returns the seconds spent attacking.
  """
  n = transcript.num_rows
  seconds = 0.0
  for rows in blocks:
    ta = time.time()
    part = take(rows) if take else (transcript.take(rows), public.take(rows))
    res = attacks.run(name, *part, variant=variant, **block_options(rows))
    seconds += time.time() - ta
    keep(res, rows)
    state["finished"][rows] = True
    if workdir_lib.is_writer():
      results.atomic_write_bytes(partial_path, _npz(**state, run_key=np.str_(run_key)))
    common.checkpointed(f"{int(state['finished'].sum()):,} of {n:,} attacked users")
    if bar:
      bar(int(state["finished"].sum()))
    if kill_switch is not None:
      kill_switch.tick()
  return seconds


def _existing_record(
  out_path: pathlib.Path,
  config: dict,
  restored,
  *,
  overwrite: bool,
  progress,
  legacy_is_stale: bool = False,
) -> dict | None:
  """The record at ``out_path`` when it holds this attack of this model (nothing to do), else None.

  None also when there is none, ``overwrite`` is set, or it holds this attack of an earlier model
  of the workdir (stale: the caller recomputes it). A record without a schema version was written
  by splitjax < 0.2 (refused), or, with ``legacy_is_stale``, is a record of an attack beyond
  enumeration written before its records carried the model (recomputed).

  Raises:
    WorkdirError: the record holds another attack configuration or an older schema.
  """
  if overwrite or not out_path.exists():
    return None
  old = read_record(out_path)
  version = old.get("schema_version")
  if version != SCHEMA_VERSION and not (version is None and legacy_is_stale):
    raise results.WorkdirError(
      f"{out_path} was written by splitjax < 0.2 (attack record schema "
      f"{old.get('schema_version', 1)}, this splitjax writes "
      f"{SCHEMA_VERSION}): --overwrite to recompute it"
    )
  if _with_defaults(old.get("config")) != results.to_jsonable(config):
    raise results.WorkdirError(
      f"{out_path} holds another attack configuration: use --overwrite or another --workdir"
    )
  if old.get("model_fingerprint") != restored.fingerprint:
    return None  # the same attack of an earlier model of this workdir: stale
  if progress:
    progress(f"{out_path} already holds this attack; nothing to do")
  return old


def _write_record(record: dict, restored, out_path: pathlib.Path, partial_path: pathlib.Path):
  """Stamps the record (schema, model, environment), writes it atomically, drops the partial."""
  record["schema_version"] = SCHEMA_VERSION
  record["model_fingerprint"] = restored.fingerprint
  if getattr(restored.config, "defenses", ()):
    # EXACT records the defence model it ran (defense_model_of); every other attack scores the DP
    # chain only, so against a defence it is naive: what a defence-unaware server reaches.
    record["defense_chain"] = list(restored.config.defenses)
    chain = pipeline.defense_plan(restored.config)
    if record.get("attack") == "exact_activations" and chain is not None and chain.nopeek:
      # nopeek shapes phi in training only; matching with the trained phi models it fully.
      record.setdefault("defense_model", "adaptive (nopeek: matched with the trained encoder)")
    record.setdefault("defense_model", "naive")
  record["environment"] = records.environment()
  if workdir_lib.is_writer():  # under jax.distributed, process 0 writes
    results.atomic_write_json(out_path, record)
    partial_path.unlink(missing_ok=True)
  return record


def _attack_enumerable(
  restored,
  workdir: pathlib.Path,
  config: configs_base.AttackConfig,
  name: str,
  *,
  resume: bool,
  overwrite: bool,
  progress,
  kill_switch,
  check_memory: bool = True,
) -> dict:
  """EXACT on a device_top model with categorical private features only -> the attack record."""
  dataset = restored.dataset
  record_name = results_name(config)
  out_path = workdir / record_name
  cfg = dataclasses.asdict(config)
  partial_path = workdir / (record_name + ".partial.npz")
  run_key = results.fingerprint(
    {"attack": cfg, "model": restored.fingerprint, "schema_version": SCHEMA_VERSION}
  )
  old = _existing_record(out_path, cfg, restored, overwrite=overwrite, progress=progress)
  if old is not None:
    return old
  clip, sigma = dp_of(restored)
  label_eps = restored.config.label_dp_epsilon or 0.0
  defense_model, defense_note = defense_model_of(restored, config, sigma, clip)
  variant, prior = resolve(config, clip, sigma, label_eps, defended=defense_model is not None)

  transcript, split_name = observed_transcript(restored, config, clip, sigma)
  # --releases=all: `transcript` holds one row per user (its last release, for the baselines and
  # the informed prior), `every` all of the users' releases, which the attack combines.
  attack_name, every = "exact", None
  if config.releases == "all":
    attack_name = "exact_releases"
    every, transcript = all_releases(restored, transcript)
  n = transcript.num_rows
  cards = dataset.priv_cardinalities
  # One estimate of the run (linear in rows) serves the memory check and the progress line.
  est = None
  if check_memory or progress:
    est = attacks.estimate(
      models.device_logit_fn(restored.model),
      transcript.params_at(int(transcript.param_index[0])),
      transcript.h.shape[1],
      cards,
      n if every is None else every.num_rows,
    )
  if check_memory:  # before anything sized by the candidates (the informed prior's pair table)
    common.check_memory(
      est.min_peak_bytes,
      f"EXACT over {est.num_pairs:,} (candidate, label) pairs per user",
      "--skip_memory_check",
    )
  informed = informed_prior(restored, config, transcript, split_name)
  priors = {}
  if prior == "informed":
    priors["user_log_prior"] = attacks.pair_log_prior(informed.fit.probs, informed.label_noisy_p1)
  elif prior == "marginal":
    priors["log_prior"] = evaluation.marginal_log_prior(dataset)
  public = public_of(restored, clip, sigma, **priors)
  options = {"top_k": config.top_k, "distance": config.distance}
  if config.screen_dtype != "none":
    options["screen_dtype"] = config.screen_dtype
  if defense_model is not None:
    options["defense"] = defense_model
    if defense_model.likelihood is not None and defense_model.likelihood.name in (
      defenses_lib.NEEDS_BATCH_INFO
    ):
      info, how = defending.side_info(
        restored,
        transcript,
        device_test_split(restored),
        public,
        defense_model,
        config.defense_model,
        variant,
        options,
      )
      public = public._replace(defense_info=info)
      defense_note = f"{defense_note[:-1]}: {how})"
  take = None
  if every is not None:
    options = {}  # exact_releases: l2 (squared) distances, the nearest pair (validated)
    take = _releases_of_users(every, transcript, public)
    if defense_note:  # the multi-release attack scores the DP chain only
      defense_note = "naive (the every-release attack does not model defences)"

  # Resumable: blocks of rows; the parameter versions of a block go in one call (param_index).
  done = {}
  if resume:
    done = read_partial(partial_path, run_key, n)
  state = {
    "features": done.get("features", np.full((n, len(cards)), -1, np.int32)),
    "labels": done.get("labels", np.full(n, -1, np.int32)),
    "ties": done.get("ties", np.zeros(n, np.int32)),
    # users the bf16 screen left undecided
    "screen_fallback": done.get("screen_fallback", np.zeros(n, bool)),
    "finished": done.get("finished", np.zeros(n, bool)),
    # P(label | g), Bayes only
    "label_posterior": done.get("label_posterior", np.full((n, 2), np.nan)),
    # joint MAP / nearest tuple
    "map_codes": done.get("map_codes", np.full(n, -1, np.int64)),
    # under a defence model: each feature's marginal posterior, concatenated (expected accuracy)
    "posteriors": done.get("posteriors", np.full((n, int(sum(cards))), np.nan, np.float32)),
  }
  if progress:
    remaining = int((~state["finished"]).sum())
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
  block = _block_rows()
  first = np.arange(min(block, n))
  first_part = take(first) if take else (transcript.take(first), public.take(first))
  attacks.run(attack_name, *first_part, variant=variant, **options)
  compile_seconds = time.time() - tc

  def keep(res, rows):
    if every is not None:  # a ReleasesResult: users in ascending order, as `rows` are
      res = res.result
    state["features"][rows], state["labels"][rows] = res.features, res.labels
    state["ties"][rows] = res.num_ties
    state["map_codes"][rows] = attacks.tuple_codes(res.map_features, cards)
    if res.label_posterior is not None:
      state["label_posterior"][rows] = res.label_posterior
    if defense_model is not None and res.feature_posteriors is not None:
      state["posteriors"][rows] = np.concatenate(res.feature_posteriors, axis=1)
    if res.screen_fallback is not None:
      state["screen_fallback"][rows] = res.screen_fallback

  todo = np.flatnonzero(~state["finished"])
  attack_seconds = _attack_blocks(
    attack_name,
    transcript,
    public,
    [todo[start : start + block] for start in range(0, len(todo), block)],
    variant=variant,
    take=take,
    block_options=lambda rows: options,
    keep=keep,
    state=state,
    run_key=run_key,
    partial_path=partial_path,
    bar=bar,
    kill_switch=kill_switch,
  )
  feats, labels, ties = state["features"], state["labels"], state["ties"]
  if label_eps and prior == "informed":
    # The gradient reveals the noisy label; the true label's answer goes through the RR channel
    # with the device model's (debiased) P(y | h, x) at the recovered tuple.
    p1_at = informed.label_p1[np.arange(n), state["map_codes"]]
    label_post = state["label_posterior"]
    noisy_post = (
      label_post if variant == "bayes" and not np.isnan(label_post).any() else (np.eye(2)[labels])
    )
    labels = (evaluation.rr_label_answer(p1_at, noisy_post, informed.flip) > 0.5).astype(np.int32)
  true_feats, true_y = _targets(dataset, split_name, transcript.example_index)
  record = evaluation.score(
    dataset,
    setting_of(restored, config),
    restored.model,
    restored.state.server_params,
    transcript,
    feats,
    labels,
    ties,
    true_feats,
    true_y,
    prior=prior,
    informed=informed,
  )
  record["variant"], record["prior"] = variant, prior
  if defense_note:
    record["defense_model"] = defense_note
  if defense_model is not None and not np.isnan(state["posteriors"]).any():
    _expected_accuracy(record, dataset, state, true_feats, true_y, label_eps)
  candidates = int(np.prod(cards)) * 2
  if config.screen_dtype != "none":
    redone = state["screen_fallback"]
    record["screen_fallback_fraction"] = float(redone.mean()) if n else 0.0
  record.update(
    {
      "seconds": time.time() - t0,
      "attack_seconds": attack_seconds,
      "compile_seconds": compile_seconds,
      "candidates_per_second": n * candidates / max(attack_seconds, 1e-9),
      "config": cfg,
    }
  )
  if every is not None:
    record["releases_combined"] = {
      "rows": int(every.num_rows),
      "per_user": float(every.num_rows / max(n, 1)),
      "likelihood": RELEASES_NOTE,
    }
  if config.users == "train":
    attacked = transcript if every is None else every
    record["local_steps_attacked"] = sorted(set(int(s) for s in attacked.local_step))
    # per attacked user (with every: first-step releases only, so none is stale)
    stale = transcript.local_step > 0
    if stale.any():
      record["stale_model"] = evaluation.stale_report(
        dataset, feats, labels, true_feats, true_y, stale
      )
      record["first_local_step"] = evaluation.stale_report(
        dataset, feats, labels, true_feats, true_y, ~stale
      )
  return _write_record(record, restored, out_path, partial_path)


# The match's hypotheses: each row's best pairs by the tracking score, and greedy sweeps.
MATCH_TOP_K, MATCH_PASSES = 8, 2

TRACKING_NOTE = (
  "stale_model: each release after a round's first local step scored alone under the round-start "
  "parameters (what exact does); tracked_later_steps: the same releases under the parameters "
  "recomputed from the device's decoded step-0 rows (fsl_tracking); fsl_tracking: each example "
  "from all its releases of the round (summed log-likelihoods under the tracked parameters); "
  "device_update_match: each device's hypotheses re-ranked by their simulated local update "
  "against the update it returned (at update_coords coordinates). With device DP-SGD the local "
  "noise is unknown to the server: tracked parameters after step 0 miss it."
)


def _whole_rounds(transcript: protocol.Transcript, num_examples: int) -> protocol.Transcript:
  """The first rounds of ``transcript`` that hold at least ``num_examples`` examples (all when
  0): tracking needs every row of a device."""
  if not num_examples:
    return transcript
  per_round = np.bincount(transcript.param_index[transcript.local_step == 0])  # examples
  last = min(int(np.searchsorted(np.cumsum(per_round), num_examples)), len(per_round) - 1)
  return transcript.take(np.flatnonzero(transcript.param_index <= last))


def _attack_tracking(restored, workdir: pathlib.Path, config, *, overwrite: bool, progress):
  """``fsl_tracking`` and ``device_update_match`` on the last epoch of an FSL workdir -> record."""
  record_name = results_name(config)
  out_path, partial_path = workdir / record_name, workdir / (record_name + ".partial.npz")
  cfg = dataclasses.asdict(config)
  old = _existing_record(out_path, cfg, restored, overwrite=overwrite, progress=progress)
  if old is not None:
    return old
  tcfg, dataset = restored.config, restored.dataset
  if tcfg.protocol != "fsl":
    raise pipeline.ConfigError(
      "--attack=fsl_tracking follows FSL devices through their local steps; this workdir "
      "trained with SL (every step's parameters are recorded: use --attack=exact)"
    )
  clip, sigma = dp_of(restored)
  variant, prior = resolve(config, clip, sigma, tcfg.label_dp_epsilon or 0.0)
  transcript = _whole_rounds(restored.transcript(), config.num_examples)
  if transcript.device_slot is None or transcript.device_opt is None:
    raise pipeline.ConfigError(
      f"{workdir} was recorded before the tracking attacks (no device slots or optimiser "
      "states in its transcript): retrain with experiments.train --overwrite"
    )
  t0 = time.time()
  first_rows = np.flatnonzero(transcript.local_step == 0)
  first = transcript.take(first_rows)
  priors = {}
  informed = None
  if prior == "informed":
    informed = informed_prior(restored, config, first, "train")
    per_row = np.zeros((transcript.num_rows, int(np.prod(dataset.priv_cardinalities)), 2))
    per_row[first_rows] = attacks.pair_log_prior(informed.fit.probs, informed.label_noisy_p1)
    priors["user_log_prior"] = per_row
  elif prior == "marginal":
    priors["log_prior"] = evaluation.marginal_log_prior(dataset)
  public = public_of(restored, clip, sigma, **priors)._replace(
    device_optimizer=training.make_optimizer(pipeline.recipe_of(tcfg)),
    device_l2_clip_norm=float(tcfg.device_dp_clip) if tcfg.device_dp_clip else None,
  )
  if progress:
    progress(
      f"fsl_tracking: {len(first_rows):,} training users in "
      f"{len(np.unique(transcript.param_index))} rounds ({variant}, prior {prior})"
    )
  res = attacks.run(
    "fsl_tracking",
    transcript,
    public,
    variant=variant,
    match=transcript.device_updates is not None,
    top_k=MATCH_TOP_K,
    passes=MATCH_PASSES,
  )
  attack_seconds = time.time() - t0
  record = tracking_record(dataset, transcript, res, informed)
  record.update(
    attack="fsl_tracking",
    variant=variant,
    prior=prior,
    users="train",
    dataset=tcfg.dataset,
    protocol=tcfg.protocol,
    device_dp_sgd=bool(tcfg.device_dp_clip and tcfg.device_dp_noise_multiplier > 0),
    l2_clip_norm=clip,
    noise_multiplier=sigma,
    local_steps=int(tcfg.local_steps),
    learning_rate=float(pipeline.recipe_of(tcfg).learning_rate),
    match_top_k=MATCH_TOP_K,
    match_passes=MATCH_PASSES,
    note=TRACKING_NOTE,
    seconds=time.time() - t0,
    attack_seconds=attack_seconds,
    config=cfg,
  )
  return _write_record(record, restored, out_path, partial_path)


def tracking_record(dataset, transcript, res, informed=None) -> dict:
  """Accuracy per secret of the stale model, tracking and the match, and the devices' figures."""
  cards = dataset.priv_cardinalities
  dev = res.devices
  real = dev.rows[:, 0] >= 0  # [G, S]
  ex = transcript.example_index[np.maximum(dev.rows[:, 0], 0)]
  true_feats, true_y = dataset.train.priv_cat[ex], dataset.train.y[ex]  # [G, S, P], [G, S]
  true_code = attacks.tuple_codes(true_feats.reshape(-1, len(cards)), cards).reshape(ex.shape)
  true_pair = true_code * 2 + true_y

  def acc(feats, labels, truth_f, truth_y):
    return evaluation.accuracy_per_secret(dataset, feats, labels, truth_f, truth_y)

  def of_codes(codes, rows):  # codes [G, S] -> accuracy over the real rows
    f, y = attacks.tracking.pair_features(codes, cards)
    return {
      "num_examples": int(rows.sum()),
      **acc(f[rows], y[rows], true_feats[rows], true_y[rows]),
    }

  def later(codes):  # [G, T, S] releases after step 0, each alone
    later_codes = np.moveaxis(codes[:, 1:], 1, 0)  # [T-1, G, S]
    f, y = attacks.tracking.pair_features(later_codes, cards)
    rows = np.broadcast_to(real, later_codes.shape)
    tf = np.broadcast_to(true_feats, later_codes.shape + (len(cards),))
    ty = np.broadcast_to(true_y, later_codes.shape)
    return {"num_releases": int(rows.sum()), **acc(f[rows], y[rows], tf[rows], ty[rows])}

  entirely = lambda codes: float(np.mean(np.all((codes == true_pair) | ~real, axis=1)))
  out = {
    "num_examples": int(real.sum()),
    "first_local_step": of_codes(res.first_step, real),
    "stale_model": later(res.stale),
    "tracked_later_steps": later(res.tracked),
    "fsl_tracking": {
      "num_examples": int(real.sum()),
      **acc(res.features[real], res.labels[real], true_feats[real], true_y[real]),
    },
  }
  devices = {
    "count": int(len(dev.version)),
    "entirely_right": {
      "first_local_step": entirely(res.first_step),
      "fsl_tracking": entirely(res.tracking),
    },
  }
  if res.match is not None:
    out["device_update_match"] = {
      "num_examples": int(real.sum()),
      **acc(res.match_features[real], res.match_labels[real], true_feats[real], true_y[real]),
    }
    right = np.all(res.match_features == true_feats, axis=-1) & (res.match_labels == true_y)
    devices["entirely_right"]["device_update_match"] = float(np.mean(np.all(right | ~real, 1)))
    devices["exact_update_match"] = float(np.mean(res.exact_match))
    devices["median_update_distance"] = {
      "fsl_tracking": float(np.median(res.tracking_update_distance)),
      "device_update_match": float(np.median(res.update_distance)),
    }
    tau = np.asarray(res.update_stddev, np.float64)
    devices["update_stddev"] = float(np.median(tau))
    devices["update_coords"] = int(len(transcript.update_coords))
  out["devices"] = devices
  if informed is not None:  # the informed prior's own answers (no gradient)
    pf, py, _, _ = attacks.prior_guess(informed.fit.probs, informed.label_p1, cards)
    first_ex = transcript.example_index[transcript.local_step == 0]
    order = np.argsort(first_ex)
    pos = order[np.searchsorted(first_ex[order], ex[real])]
    out["prior_only"] = {
      "num_examples": int(real.sum()),
      **acc(pf[pos], py[pos], true_feats[real], true_y[real]),
    }
  return out


def _attack_searched(
  restored,
  workdir: pathlib.Path,
  config: configs_base.AttackConfig,
  name: str,
  *,
  resume: bool,
  overwrite: bool,
  progress,
  kill_switch,
  options: SearchOptions | None = None,
) -> dict:
  """The attacks beyond enumeration (``name``: the resolved one) -> the attack record."""
  options = options or options_of(config)
  out_path = workdir / results_name(config)
  partial_path = workdir / (out_path.name + ".partial.npz")
  cfg = dataclasses.asdict(config)
  cfg_record = dict(cfg, options=dataclasses.asdict(options), resolved_attack=name)
  old = _existing_record(
    out_path, cfg_record, restored, overwrite=overwrite, progress=progress, legacy_is_stale=True
  )
  if old is not None:
    return old
  clip, sigma = dp_of(restored)
  t0 = time.time()
  if name == joint_attacking.NAME:
    record = joint_attacking.attack(restored, config, clip, sigma, progress=progress)
    record["seconds"] = time.time() - t0
    record["config"] = cfg_record
    return _write_record(record, restored, out_path, partial_path)
  transcript, split_name = observed_transcript(restored, config, clip, sigma)
  if name in LABEL_ATTACKS:
    record = _label_attack(name, restored, config, transcript, split_name, clip, sigma)
  else:
    record = _feature_attack(
      name,
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
  return _write_record(record, restored, out_path, partial_path)


def _label_attack(name, restored, config, transcript, split_name, clip, sigma) -> dict:
  dataset = restored.dataset
  res = attacks.run(name, transcript, public_of(restored, clip, sigma))
  split = getattr(dataset, split_name)
  true_feats = split.priv_cat[transcript.example_index]
  true_y = split.y[transcript.example_index]
  # evaluation.score reports the label with its baselines and bounds; the features are not
  # attacked (zeros are passed and their entries dropped).
  dummy = np.zeros_like(true_feats)
  record = evaluation.score(
    dataset,
    setting_of(restored, config),
    restored.model,
    restored.state.server_params,
    transcript,
    dummy,
    res.labels,
    np.ones(len(res.labels), np.int32),
    true_feats,
    true_y,
    prior="uniform",
    informed=informed_prior(restored, config, transcript, split_name),
  )
  record["features"] = {}
  record["ties"] = 0
  record["label"]["auc"] = metrics.roc_auc(res.scores, true_y)
  return record


def _search_options(name: str, options: SearchOptions, config) -> dict:
  """Keyword arguments of the optimisation attack ``name`` (the ``key`` comes per block)."""
  if name == "optimize":
    return dict(
      optimizer=attacks.default_optimizer(options.learning_rate, options.num_steps),
      num_steps=options.num_steps,
      num_restarts=options.num_restarts,
      distance=config.distance,
    )
  shared = dict(
    num_steps=options.hybrid_steps,
    num_restarts=options.hybrid_starts,
    num_refine=options.num_refine,
    refine_starts=options.refine_starts,
    distance=config.distance,
  )
  if name == "hybrid":
    shared["optimizer"] = attacks.default_optimizer(options.learning_rate, options.hybrid_steps)
  return shared


def _feature_attack(
  name,
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
  dataset, model = restored.dataset, restored.model
  n = transcript.num_rows
  num_cat = len(dataset.priv_cardinalities)
  num_dense = int(dataset.train.priv_dense.shape[1])
  clip_arg = clip if (math.isfinite(clip) and config.variant != "paper") else None
  bayes = config.variant == "bayes" and sigma > 0 and math.isfinite(clip)
  # 'auto' scores as clip_aware for the searches; exact_activations resolves it as EXACT does
  # (`resolve`: Bayes with the informed prior under noise).
  variant = "clip_aware" if config.variant == "auto" else config.variant
  log_prior, user_log_prior, prior_used = None, None, None
  if name == "hybrid":
    log_prior, prior_used = evaluation.marginal_log_prior(dataset), "marginal"
  elif name == "exact_activations":
    # The server holds the label here: no label DP to weigh in.
    variant, prior_used = resolve(config, clip, sigma, 0.0)
    if prior_used == "informed":
      user_log_prior = bottom_informed_log_prior(restored, config, transcript, split_name)
    elif prior_used == "marginal":
      log_prior = evaluation.marginal_log_prior(dataset, with_label=False)
  public = public_of(restored, clip, sigma, log_prior=log_prior, user_log_prior=user_log_prior)
  run_key = results.fingerprint(
    {
      "attack": dataclasses.asdict(config),
      "options": dataclasses.asdict(options),
      "model": restored.fingerprint,
    }
  )
  done = read_partial(partial_path, run_key, n) if resume else {}
  state = {
    "features": done.get("features", np.full((n, num_cat), -1, np.int32)),
    "dense": done.get("dense", np.full((n, num_dense), np.nan, np.float32)),
    "labels": done.get("labels", np.full(n, -1, np.int32)),
    "ties": done.get("ties", np.zeros(n, np.int32)),
    "label_scores": done.get("label_scores", np.full(n, np.nan, np.float32)),
    "finished": done.get("finished", np.zeros(n, bool)),
  }
  bar = (
    common.ProgressPrinter(n, f"attack {name} {config.variant} {config.users}", printer=progress)
    if progress
    else None
  )
  key = jax.random.key(config.seed)

  def block_options(rows):
    version = int(transcript.param_index[rows[0]])
    block_key = jax.random.fold_in(jax.random.fold_in(key, version), int(rows[0]))
    return dict(_search_options(name, options, config), key=block_key)

  def keep(res, rows):
    state["features"][rows], state["dense"][rows] = res.features, res.dense
    state["ties"][rows] = res.num_ties if name != "optimize" else 1
    if name != "exact_activations":  # the activations carry no label
      state["labels"][rows] = res.labels
    if name == "hybrid" and res.label_posterior is not None:
      state["label_scores"][rows] = res.label_posterior[:, 1]

  # These attacks take one parameter version per call: blocks of rows of one version each.
  block = _block_rows()
  blocks = []
  for version in np.unique(transcript.param_index):
    rows_v = np.flatnonzero((transcript.param_index == version) & ~state["finished"])
    blocks += [rows_v[start : start + block] for start in range(0, len(rows_v), block)]
  attack_seconds = _attack_blocks(
    name,
    transcript,
    public,
    blocks,
    variant=variant,
    block_options=block_options,
    keep=keep,
    state=state,
    run_key=run_key,
    partial_path=partial_path,
    bar=bar,
    kill_switch=kill_switch,
  )
  feats, dense, labels = state["features"], state["dense"], state["labels"]
  ties, label_scores = state["ties"], state["label_scores"]

  rows = transcript.example_index
  split = getattr(dataset, split_name)
  true_feats, true_y = split.priv_cat[rows], split.y[rows]
  setting = setting_of(restored, config)
  if model.spec.topology == "device_top":
    record = evaluation.score(
      dataset,
      setting,
      model,
      restored.state.server_params,
      transcript,
      feats,
      labels,
      ties,
      true_feats,
      true_y,
      prior="marginal",
      informed=informed_prior(restored, config, transcript, split_name),
    )
    if np.isfinite(label_scores).all():
      record["label"]["auc"] = metrics.roc_auc(label_scores, true_y)
  else:
    record = evaluation.score_bottom(dataset, setting, transcript, feats, ties, true_feats)
  record["attack"] = name
  if name == "exact_activations":
    record["resolved_variant"], record["prior"] = variant, prior_used
  names = dataset.roles.private_dense
  for j, (prior_pred, knn_pred) in enumerate(
    evaluation.dense_baselines(dataset, config.users, rows, config.knn_k)
  ):
    record["features"][names[j]] = evaluation.dense_report(
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
    kwargs.update(noise_stddev=sigma * clip, log_prior=evaluation.marginal_log_prior(dataset))
  versions = np.unique(transcript.param_index)
  if len(versions) > 1:  # every parameter version in one batched call
    params = transcript.device_params
    kwargs["param_index"] = transcript.param_index
  else:
    params = transcript.params_at(int(versions[0]) if len(versions) else 0)
  r = attacks.exact(apply, params, h_ext, g_ext, dataset.priv_cardinalities, **kwargs)
  return {
    "note": "EXACT told the true private dense values: the categorical level to compare "
    "with, not an attack",
    **evaluation.accuracy_per_secret(dataset, r.features, r.labels, true_feats, true_y),
  }


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


def _npz(**arrays) -> bytes:
  buf = _pyio.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def markdown_table(record: dict) -> str:
  """The attack record as a Markdown table (one row per private feature and the label)."""
  if record.get("attack") == "fsl_tracking":
    return _tracking_table(record)
  if "resolved_attack" in (record.get("config") or {}) and "joint" not in record:
    return _search_table(record)
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
  if "joint" in record:
    j = record["joint"]
    lines.append(
      f"joint attack: {j['batches']} batch-averaged releases of {j['batch_size']} rows; "
      f"{j['fitted_batches']:.3f} of them fitted exactly (the others answered from the prior); "
      f"positive count exact in {j['positive_count_exact']:.3f} (MAE "
      f"{j['positive_count_mae']:.2f}); {record['users_per_second']:.3g} users/s"
    )
  else:
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


def _tracking_table(record: dict) -> str:
  """The FSL tracking record as Markdown: one row per attacker, one column per secret."""
  sections = [
    ("prior_only", "informed prior alone"),
    ("first_local_step", "step-0 releases"),
    ("stale_model", "later releases, stale model"),
    ("tracked_later_steps", "later releases, tracked model"),
    ("fsl_tracking", "fsl_tracking (all releases)"),
    ("device_update_match", "device_update_match"),
  ]
  secrets = [k for k in record["first_local_step"] if k != "num_examples"]
  lines = [
    f"### fsl_tracking ({record['variant']}, prior {record['prior']}) on "
    f"{record['num_examples']} training users of {record['dataset']} (FSL, "
    f"{record['local_steps']} local steps, lr {record['learning_rate']:g}, device DP-SGD "
    f"{'on' if record['device_dp_sgd'] else 'off'})",
    "",
    "| attacker | " + " | ".join(secrets) + " |",
    "|---|" + "---|" * len(secrets),
  ]
  for key, title in sections:
    if key in record:
      lines.append(f"| {title} | " + " | ".join(f"{record[key][s]:.4f}" for s in secrets) + " |")
  d = record["devices"]
  right = ", ".join(f"{k} {v:.3f}" for k, v in d["entirely_right"].items())
  lines += ["", f"devices: {d['count']}; decoded entirely right: {right}"]
  if "exact_update_match" in d:
    lines.append(
      f"exact update match (to {attacks.tracking.EXACT_ULPS:g} float32 ulps): "
      f"{d['exact_update_match']:.3f}; median relative update distance "
      f"{d['median_update_distance']['fsl_tracking']:.3g} (tracking) -> "
      f"{d['median_update_distance']['device_update_match']:.3g} (match)"
    )
  return "\n".join(lines)


def _search_table(record: dict) -> str:
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
