"""The transcript-level runner: `run(name, transcript, public, **options)` by attack name.

The attacks of this package take arrays (`exact(device_apply, device_params, h, g_obs, ...)`);
`run` takes what crossed the wire (a `protocol.Transcript`) and what the server knows besides
(`Public`: the model's apply functions, the private domains, the public DP parameters, priors)
and calls the named attack with the arguments `experiments.attack` uses:

| name | attack | parameter versions |
|---|---|---|
| `exact` | `enumeration.exact` on `models.device_logit_fn(model)` | any number (`param_index`) |
| `exact_releases` | `releases.exact_releases`, a user's rows combined (`example_index`) | any |
| `fsl_tracking` | `tracking.fsl_tracking` (and `device_update_match`), FSL rows by device | any |
| `hybrid` | `hybrid_search.hybrid` on `model.head_apply` | one |
| `optimize` | `relaxed.optimize` on `models.soft_device_apply(model)` | one |
| `exact_activations` | `activations.exact_activations` on `model.encoder_apply` | one |
| `label_norm`, `label_direction` | `label_only` on `g` | any (unused) |
| `joint` | `joint.attack_batches` (``batch_average``: consecutive rows of `batch_size`) | one |

`variant` (an option of the gradient and activation attacks) names the scoring: `clip_aware`
(candidates clipped with the public C, nearest wins), `paper` (the authors' clip-unaware scoring)
or `bayes` (Gaussian likelihood of the public noise plus the public log prior; only where the
channel is noised: sigma > 0 and a finite C, else it scores as `clip_aware`).
"""

import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import numpy as np

from splitjax import models
from splitjax import protocol
from splitjax.attacks import activations
from splitjax.attacks import checks
from splitjax.attacks import enumeration
from splitjax.attacks import hybrid_search
from splitjax.attacks import joint
from splitjax.attacks import label_only
from splitjax.attacks import relaxed
from splitjax.attacks import releases
from splitjax.attacks import tracking

VARIANTS = ('clip_aware', 'paper', 'bayes')

# Name -> attack function (array API); `run` calls these on a transcript.
ATTACKS: dict[str, Callable[..., Any]] = {
  'exact': enumeration.exact,
  'exact_releases': releases.exact_releases,
  'fsl_tracking': tracking.fsl_tracking,
  'optimize': relaxed.optimize,
  'hybrid': hybrid_search.hybrid,
  'label_norm': label_only.label_norm,
  'label_direction': label_only.label_direction,
  'exact_activations': activations.exact_activations,
  'joint': joint.attack_batches,
}


class Public(NamedTuple):
  """What the honest-but-curious server knows besides the transcript (DESIGN.md §2).

  Attributes:
    model: the split model's pure functions (its device parameters are in the transcript).
    cardinalities: P ints, the number of values of each private categorical feature.
    num_dense: Pd, the number of private dense features.
    dense_bounds: `(lo, hi)`, the box of the private dense features (min-max scaled: (0, 1)).
    l2_clip_norm: the public clip norm C of the device's DP transform (inf: no clipping).
    noise_multiplier: the public sigma (0: no noise); the noise per coordinate is sigma * C.
    log_prior: the Bayes variant's log prior shared by every user: `[C * 2]` over (candidate,
      label) pairs, label fastest (`exact`, `hybrid`), or `[C]` over candidates
      (`exact_activations`); candidates in `candidate_table` order; None is uniform.
    user_log_prior: a log prior per transcript row, `[N, C, 2]` (`exact`) or `[N, C]`
      (`exact_activations`); it replaces `log_prior` where given.
    positive_fraction: P(y = 1) the label-only attacks answer with (None: their default).
    device_optimizer: FSL: the device optimiser as trained (`training.make_optimizer(recipe)`),
      which `fsl_tracking` recomputes each device's local steps with.
    device_l2_clip_norm: FSL with device DP-SGD: its per-example clip norm (None: trained
      without device DP-SGD).
    defense_info: `[N, k]` per transcript row, the side information of a randomized defence's
      likelihood (`exact`'s `defense_info`; None: none).
  """

  model: models.SplitModel
  cardinalities: tuple[int, ...]
  num_dense: int = 0
  dense_bounds: tuple[float, float] = (0.0, 1.0)
  l2_clip_norm: float = math.inf
  noise_multiplier: float = 0.0
  log_prior: np.ndarray | None = None
  user_log_prior: np.ndarray | None = None
  positive_fraction: float | None = None
  device_optimizer: Any = None
  device_l2_clip_norm: float | None = None
  defense_info: np.ndarray | None = None

  @property
  def noisy(self) -> bool:
    """Whether the channel is noised: sigma > 0 with a finite C (the Bayes variant's case)."""
    return self.noise_multiplier > 0 and math.isfinite(self.l2_clip_norm)

  @property
  def clip(self) -> float | None:
    """C as the attacks take it: None for no clipping."""
    return float(self.l2_clip_norm) if math.isfinite(self.l2_clip_norm) else None

  def take(self, idx) -> 'Public':
    """The public knowledge of transcript rows `idx` (`Transcript.take`'s twin)."""
    rows = np.asarray(idx)
    out = self
    if self.user_log_prior is not None:
      out = out._replace(user_log_prior=np.asarray(self.user_log_prior)[rows])
    if self.defense_info is not None:
      out = out._replace(defense_info=np.asarray(self.defense_info)[rows])
    return out


def _one_version(name: str, transcript: protocol.Transcript):
  """The device parameters of a transcript of one parameter version."""
  versions = np.unique(transcript.param_index)
  if len(versions) > 1:
    raise checks.AttackError(
      f'{name} attacks one parameter version per call; this transcript holds '
      f'{len(versions)}: attack transcript.take(rows) of each version (only exact batches '
      'versions through param_index)'
    )
  return transcript.params_at(int(versions[0]) if len(versions) else 0)


def _bayes(public: Public, variant: str) -> dict:
  """`noise_stddev` and the log prior of the Bayes variant on a noised channel, else {}."""
  if variant != 'bayes' or not public.noisy:
    return {}
  lp = public.user_log_prior if public.user_log_prior is not None else public.log_prior
  out: dict[str, Any] = {'noise_stddev': public.noise_multiplier * public.l2_clip_norm}
  if lp is not None:
    out['log_prior'] = lp
  return out


def _likelihood_args(public: Public, variant: str) -> dict:
  """Scoring under a defence model without DP noise: a randomized defence's side information,
  and the log prior under the Bayes variant (the likelihood is the defence's own, or the
  posterior of a deterministic one's ties)."""
  out: dict[str, Any] = {}
  if public.defense_info is not None:
    out['defense_info'] = public.defense_info
  lp = public.user_log_prior if public.user_log_prior is not None else public.log_prior
  if variant == 'bayes' and lp is not None:
    out['log_prior'] = lp
  return out


def _exact(transcript, public, variant, options):
  versions = np.unique(transcript.param_index)
  if len(versions) > 1:  # every version in one batched call
    params, index = transcript.device_params, np.asarray(transcript.param_index)
    options = dict(options, param_index=index)
  else:
    params = transcript.params_at(int(versions[0]) if len(versions) else 0)
  defense = options.get('defense')
  if defense is not None and (defense.likelihood is not None or not public.noisy):
    # A randomized defence's likelihood, or a deterministic one's ties answered by the prior
    # (the log prior under the Bayes variant, with no DP noise on the channel).
    scoring_args = _likelihood_args(public, variant)
  else:
    scoring_args = _bayes(public, variant)
  return enumeration.exact(
    models.device_logit_fn(public.model),
    params,
    transcript.h,
    transcript.g,
    public.cardinalities,
    l2_clip_norm=public.clip,
    clip_aware=variant != 'paper',
    **scoring_args,
    **options,
  )


def _exact_releases(transcript, public, variant, options):
  # One answer per user: rows grouped by example_index, results in ascending user order.
  # A per-user prior (`public.user_log_prior`) is [U, C, 2] in ascending user order here.
  bayes = _bayes(public, variant)
  return releases.exact_releases(
    models.device_logit_fn(public.model),
    transcript.device_params,
    transcript.h,
    transcript.g,
    public.cardinalities,
    user_index=transcript.example_index,
    param_index=np.asarray(transcript.param_index),
    l2_clip_norm=public.clip,
    clip_aware=variant != 'paper',
    **bayes,
    **options,
  )


def _fsl_tracking(transcript, public, variant, options):
  # Rows grouped by device; the per-row prior (`public.user_log_prior`, [N, C, 2]) is read at
  # each example's step-0 row.
  if variant == 'paper':
    raise checks.AttackError(
      'fsl_tracking recomputes the device update from clip-aware decodes: use variant '
      "'clip_aware' or 'bayes'"
    )
  if public.device_optimizer is None:
    raise checks.AttackError(
      'fsl_tracking needs public.device_optimizer (training.make_optimizer(recipe))'
    )
  return tracking.fsl_tracking(
    public.model,
    public.device_optimizer,
    transcript,
    public.cardinalities,
    l2_clip_norm=public.clip,
    device_clip=public.device_l2_clip_norm,
    **_bayes(public, variant),
    **options,
  )


def _search(name: str, device_apply_of: Callable, bayes: bool):
  """The runner of the search attack `name` (`hybrid`, `optimize`): one version, a dense box."""

  def attack(transcript, public, variant, options):
    return ATTACKS[name](
      device_apply_of(public.model),
      _one_version(name, transcript),
      transcript.h,
      transcript.g,
      public.cardinalities,
      public.num_dense,
      l2_clip_norm=public.clip if variant != 'paper' else None,
      dense_bounds=public.dense_bounds,
      **(_bayes(public, variant) if bayes else {}),
      **options,
    )

  return attack


def _exact_activations(transcript, public, variant, options):
  # device_bottom: the device sent h (its activations a).
  return activations.exact_activations(
    public.model.encoder_apply,
    _one_version('exact_activations', transcript),
    transcript.h,
    public.cardinalities,
    num_dense=public.num_dense,
    dense_bounds=public.dense_bounds,
    l2_clip_norm=public.clip,
    clip_aware=variant != 'paper',
    **_bayes(public, variant),
    **options,
  )


def _joint(transcript, public, variant, options):
  # batch_average: a batch's rows in one release; the search is noise-free (it fits exactly).
  del variant
  if public.noisy:
    raise checks.AttackError(
      'the joint attack models a noise-free batch-averaged release (sigma = 0): this '
      f'transcript was noised (sigma {public.noise_multiplier})'
    )
  if public.num_dense:
    raise checks.AttackError('the joint attack enumerates categorical private features only')
  if 'batch_size' not in options:
    raise checks.AttackError("joint needs batch_size= (the device's rows per release)")
  return joint.attack_batches(
    models.device_logit_fn(public.model),
    _one_version('joint', transcript),
    transcript.h,
    transcript.g,
    public.cardinalities,
    log_prior=public.log_prior,
    user_log_prior=public.user_log_prior,
    **options,
  )


def _label(name):
  fn = ATTACKS[name]

  def attack(transcript, public, variant, options):
    del variant
    return fn(transcript.g, positive_fraction=public.positive_fraction, **options)

  return attack


_RUNNERS = {
  'exact': _exact,
  'exact_releases': _exact_releases,
  'fsl_tracking': _fsl_tracking,
  'hybrid': _search('hybrid', lambda model: model.head_apply, bayes=True),
  # The relaxed attack scores by distance only (no Bayes variant).
  'optimize': _search('optimize', models.soft_device_apply, bayes=False),
  'exact_activations': _exact_activations,
  'label_norm': _label('label_norm'),
  'label_direction': _label('label_direction'),
  'joint': _joint,
}


def run(
  name: str,
  transcript: protocol.Transcript,
  public: Public,
  *,
  variant: str = 'clip_aware',
  **options,
) -> Any:
  """Runs the attack named `name` on `transcript` with the server's public knowledge `public`.

  Args:
    name: a name in ATTACKS.
    transcript: what the server observed (`Transcript.take` selects rows); `exact` attacks every
      parameter version of it in one batched computation (`param_index`), the other gradient and
      activation attacks need rows of one version.
    public: what the server knows besides (`Public`); `public.take(rows)` goes with
      `transcript.take(rows)` when it holds a per-user prior.
    variant: a name in VARIANTS (the label-only attacks ignore it).
    **options: further keyword arguments of the attack function (e.g. `top_k`, `distance`,
      `screen_dtype` of `exact`; `key`, `num_steps`, `optimizer` of `optimize` and `hybrid`).

  Returns:
    The attack's own result (`ExactResult`, `HybridResult`, `OptimizeResult`, `ActivationResult`
    or `LabelResult`), rows in the order of the transcript.

  Raises:
    AttackError (a ValueError): `name` is not in ATTACKS (the message lists the valid names), an
      unknown `variant`, or several parameter versions for an attack that takes one.
  """
  if name not in _RUNNERS:
    raise checks.AttackError(f'unknown attack {name!r}; valid names: {sorted(_RUNNERS)}.')
  if variant not in VARIANTS:
    raise checks.AttackError(f'unknown variant {variant!r}; valid variants: {list(VARIANTS)}.')
  if (
    name != 'exact_releases'
    and public.user_log_prior is not None
    and len(public.user_log_prior) != transcript.num_rows
  ):
    raise checks.AttackError(
      f'public.user_log_prior has {len(public.user_log_prior)} rows for a transcript of '
      f'{transcript.num_rows}: take the same rows of both (public.take(rows))'
    )
  return _RUNNERS[name](transcript, public, variant, options)
