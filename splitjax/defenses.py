"""Defences on what crosses the cut, composed with the DP chain, and whether epsilon still holds.

A defence here is a transform of the per-example rows the device sends (``x [N, d]``: the cut
gradients in ``device_top``), written as an optax ``GradientTransformation`` whose ``update``
takes the rows and returns the rows sent. A chain is a sequence of names with two markers for
the DP chain's steps, ``clip`` and ``noise`` (appended at the end when absent)::

    ("max_norm", "clip", "noise")          max_norm is pre-processing: epsilon holds
    ("clip", "noise", "topk:0.1")          top-k after the noise: post-processing, epsilon holds
    ("clip", "quantize:8", "noise")        between clip and noise: the Gaussian accounting is void

What the accounting needs (`plan`): between the clip and the noise nothing may touch the rows
(the noise's sensitivity is the clip's 2C), and no defence before the noise may mix rows of a
batch (``max_norm`` uses the batch's largest norm, so one example's data moves every other row's
release). A chain that breaks either is `Plan.covered` False with the reason; training with
noise refuses it (`check_covered`). Defences after the noise are post-processing of the released
rows and keep every guarantee.

The defences (``NAME[:PARAM]``):

- ``max_norm`` (Li et al., "Label Leakage and Protection in Two-party Split Learning", ICLR 2022,
  arXiv 2102.08504, section 4): each row ``g_j`` gets isotropic Gaussian noise of per-coordinate
  variance ``(||g_max||^2 - ||g_j||^2) / d``, ``g_max`` the batch's largest row, so every row's
  expected squared norm is ``||g_max||^2``. The paper's intent is to equalise the norms that
  separate the labels; its public implementations differ (one draws a single scalar per row and
  broadcasts it over the coordinates, which leaves the direction and adds a visible common
  offset); the isotropic form is the one whose expected norm matches the paper's argument exactly.
  Batch-dependent: voids the accounting before the noise.
- ``topk:FRACTION``: keep the ``ceil(FRACTION d)`` largest-magnitude entries of each row, zero the
  rest (gradient sparsification). Row-local, deterministic.
- ``sign``: send ``sign(g_j) ||g_j|| / sqrt(d)`` (signSGD-style, the row norm kept: it alone
  separates labels and most candidates). Row-local, deterministic.
- ``quantize:BITS`` / ``quantize_stochastic:BITS``: each entry on a uniform grid of ``2^BITS``
  levels over the fixed range ``[-C, C]`` (after the clip, so C is the clip norm: a per-row scale
  would itself identify the candidate); the stochastic form rounds up with probability equal to
  the remainder (unbiased). Row-local; needs a finite clip before it.

- ``marvell:S`` (Li et al. 2022, section 4.2; binary labels): per batch, from the true labels,
  the class means' difference Delta, each class's average coordinate variance u_y and the
  positive fraction p; on the host (`marvell_lambdas`, scipy SLSQP, out of jit through
  ``jax.pure_callback``) the four scalars lambda1_y (along Delta) and lambda2_y (across) that
  minimise the symmetrised KL between the two classes' perturbed Gaussians N(mu_y, u_y I +
  Sigma_y) under the power constraint p tr Sigma_1 + (1 - p) tr Sigma_0 <= P = S ||Delta||^2; each
  row of class y gets N(0, Sigma_y), Sigma_y = (lambda1_y - lambda2_y) Delta Delta^T / ||Delta||^2
  + lambda2_y I. The static variant (S fixed; the dynamic one that raises S until sum-KL falls
  under a threshold is not used). A batch with one class only gets no noise (Delta undefined).
  In FSL one batch is a round's rows of all its devices. Batch-dependent; it protects the label
  only (the features' direction dz/dh is untouched).

- ``batch_average`` (SecretFlow's gradient averaging): every real row of the batch is replaced by
  the batch's mean row, so the server back-propagates the same averaged gradient through every
  row (a change of the protocol: the AUC says what it costs). Batch-dependent; in FSL one batch
  is a round's rows of all its devices. Per-row attacks cannot model it: its adaptive attack
  solves a batch's rows jointly (`splitjax.attacks.joint`, the runner's ``joint``; what
  ``experiments.attack`` runs on such a workdir by default; ``benchmarks/batch_average.py``
  measures it by batch size).
- ``label_smoothing:EPS``: not a transform of the rows but an option of the device's loss, which
  trains on ``y (1 - EPS) + EPS / 2`` (the training steps' ``label_smoothing``); it shrinks the
  gradient's label-dependent scale. Deterministic; the DP chain's accounting is unchanged.
- ``nopeek:ALPHA`` (``device_bottom``; Vepakomma et al., "NoPeek: Information leakage reduction
  to share activations in distributed deep learning", arXiv 2008.09161): not a transform of the
  rows but a term of the device encoder's loss, ``ALPHA dCor(x_priv, a)`` over each batch
  (`distance_correlation`: the sample distance correlation of Szekely et al. 2007 between the
  rows' one-hot private features and their activations), added to the gradient the server sends
  back. It keeps the encoder deterministic, so against a server that knows ``phi`` activation
  matching (`splitjax.attacks.activations`) still recovers ``x_priv`` wherever the encoder
  separates the candidates; it was designed against an inversion model without ``phi``.
- ``activation_noise:SIGMA`` (``device_bottom``): the DP chain on the activations, i.e.
  ``--dp_noise_multiplier=SIGMA`` with the clip of ``--dp_clip``; ``experiments.train`` resolves
  the alias, so the Gaussian mechanism is accounted by the DP machinery (the cut-layer epsilon).

All are jit-friendly; keys are ``fold_in(key, 100 + position in the chain)``.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

# Marvell's solver and statistics, re-exported (callers use splitjax.defenses.marvell_*).
from splitjax.marvell import marvell_estimate as marvell_estimate
from splitjax.marvell import marvell_lambdas as marvell_lambdas
from splitjax.marvell import marvell_noise
from splitjax.marvell import marvell_params as marvell_params
from splitjax.marvell import marvell_sum_kl as marvell_sum_kl
from splitjax.privacy import _checks
from splitjax.privacy import transforms as dp_transforms

MARKERS = ("clip", "noise")
# name -> (takes a parameter, batch-dependent, randomized, needs the clip before it)
_KINDS = {
  "max_norm": (False, True, True, False),
  "topk": (True, False, False, False),
  "sign": (False, False, False, False),
  "quantize": (True, False, False, True),
  "quantize_stochastic": (True, False, True, True),
  "marvell": (True, True, True, False),
  "label_smoothing": (True, False, False, False),  # the device's loss, not a transform of g
  "batch_average": (False, True, False, False),
  "nopeek": (True, False, False, False),  # device_bottom: the device encoder's loss
}
NAMES = tuple(_KINDS)


class DefenseError(ValueError):
  """A defence or chain that cannot be built as given (the message names the fix)."""


class Defense(NamedTuple):
  """One parsed chain entry: ``name`` and its parameter (None when it takes none)."""

  name: str
  param: float | None = None

  def text(self) -> str:
    return self.name if self.param is None else f"{self.name}:{self.param:g}"


class Plan(NamedTuple):
  """A chain split around the DP steps.

  Attributes:
    pre: defences before the clip; between: after the clip, before the noise; post: after the
      noise (each a tuple of `Defense`).
    covered: whether the Gaussian accounting still holds with noise on.
    reason: why not ('' when covered).
    label_smoothing: eps of the device's loss (0: none); not a transform of the rows.
    nopeek: alpha of the distance-correlation term of the device encoder's loss
      (``device_bottom``; 0: none); not a transform of the rows.
  """

  pre: tuple
  between: tuple
  post: tuple
  covered: bool
  reason: str
  label_smoothing: float = 0.0
  nopeek: float = 0.0

  def stages(self) -> list[dict]:
    """``[{"defense", "stage"}]`` in chain order (what config.json and metrics.json record)."""
    smooth = (
      [{"defense": f"label_smoothing:{self.label_smoothing:g}", "stage": "device loss"}]
      if self.label_smoothing
      else []
    )
    if self.nopeek:
      smooth.append({"defense": f"nopeek:{self.nopeek:g}", "stage": "device encoder loss"})
    return smooth + [
      {"defense": d.text(), "stage": stage}
      for stage, part in (
        ("pre-processing", self.pre),
        ("between clip and noise", self.between),
        ("post-processing", self.post),
      )
      for d in part
    ]


def parse(entry: str) -> Defense | str:
  """``'topk:0.1'`` -> ``Defense('topk', 0.1)``; ``'clip'``/``'noise'`` are returned as is."""
  text = entry.strip()
  if text in MARKERS:
    return text
  name, _, value = text.partition(":")
  if name == "activation_noise":
    raise DefenseError(
      f"--defense={entry} is the DP chain on device_bottom's activations, not a transform in "
      "the chain: pass it to experiments.train (which sets --dp_noise_multiplier) or set the "
      "DP chain's noise_multiplier"
    )
  if name not in _KINDS:
    raise DefenseError(
      f"unknown defence {name!r} in --defense={entry}: choose among {', '.join(NAMES)} "
      f"(and the markers {', '.join(MARKERS)} for the DP chain's place)"
    )
  takes = _KINDS[name][0]
  if takes and not value:
    raise DefenseError(f"--defense={entry}: {name} takes a parameter, e.g. {name}:{_EXAMPLE[name]}")
  if not takes and value:
    raise DefenseError(f"--defense={entry}: {name} takes no parameter")
  if not takes:
    return Defense(name)
  try:
    param = float(value)
  except ValueError:
    raise DefenseError(f"--defense={entry}: {value!r} is not a number") from None
  if name == "topk" and not 0 < param <= 1:
    raise DefenseError(f"--defense={entry}: the fraction must be in (0, 1]")
  if name == "label_smoothing" and not 0 < param < 1:
    raise DefenseError(f"--defense={entry}: eps must be in (0, 1), e.g. label_smoothing:0.1")
  if name == "nopeek" and not (param > 0 and math.isfinite(param)):
    raise DefenseError(f"--defense={entry}: alpha must be a positive number, e.g. nopeek:0.5")
  if name == "marvell" and not (param > 0 and math.isfinite(param)):
    raise DefenseError(f"--defense={entry}: the power S must be a positive number, e.g. marvell:4")
  if name.startswith("quantize") and not (param >= 1 and param == int(param) and param <= 16):
    raise DefenseError(f"--defense={entry}: BITS must be an integer in [1, 16]")
  return Defense(name, param)


_EXAMPLE = {
  "topk": "0.1",
  "quantize": "8",
  "quantize_stochastic": "8",
  "marvell": "4",
  "label_smoothing": "0.1",
  "nopeek": "0.5",
}


def plan(chain: Sequence[str], *, finite_clip: bool = True) -> Plan:
  """Parses ``chain`` and places the DP steps; DefenseError for a chain that cannot run."""
  items = [parse(e) for e in chain]
  losses = {}  # the options of the device's losses, not transforms of the rows
  for name in ("label_smoothing", "nopeek"):
    found = [d for d in items if isinstance(d, Defense) and d.name == name]
    if len(found) > 1:
      raise DefenseError(f"{name} appears twice in the --defense chain")
    losses[name] = float(found[0].param) if found and found[0].param is not None else 0.0
    items = [d for d in items if not (isinstance(d, Defense) and d.name == name)]
  for m in MARKERS:
    if items.count(m) > 1:
      raise DefenseError(f"the marker {m!r} appears twice in the --defense chain")
  if "clip" not in items and "noise" in items:
    items.insert(items.index("noise"), "clip")
  if "clip" not in items:
    items.append("clip")
  if "noise" not in items:
    items.append("noise")
  ci, ni = items.index("clip"), items.index("noise")
  if ni < ci:
    raise DefenseError("the --defense chain puts noise before clip: the DP chain clips first")
  pre = tuple(d for d in items[:ci] if isinstance(d, Defense))
  between = tuple(d for d in items[ci + 1 : ni] if isinstance(d, Defense))
  post = tuple(d for d in items[ni + 1 :] if isinstance(d, Defense))
  for d in pre:
    if _KINDS[d.name][3]:
      raise DefenseError(
        f"{d.text()} quantizes over [-C, C] after the clip: place it after 'clip' "
        f"(--defense=clip --defense={d.text()} ...)"
      )
  if any(_KINDS[d.name][3] for d in between + post) and not finite_clip:
    raise DefenseError("quantize needs a finite clip norm: give --dp_clip=auto or a number")
  reasons = []
  if between:
    reasons.append(
      f"{', '.join(d.text() for d in between)} between the clip and the noise (the noise's "
      "sensitivity 2C no longer bounds what it protects)"
    )
  mixed = [d.text() for d in pre + between if _KINDS[d.name][1]]
  if mixed:
    reasons.append(
      f"{', '.join(mixed)} before the noise mixes a batch's rows (one example moves every "
      "other row's release)"
    )
  return Plan(
    pre, between, post, not reasons, "; ".join(reasons), losses["label_smoothing"], losses["nopeek"]
  )


def distance_correlation(x: jax.Array, z: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """The sample distance correlation dCor(x, z) of the real rows (Szekely, Rizzo, Bakirov 2007).

  ``dCor^2 = dCov^2(x, z) / sqrt(dVar^2(x) dVar^2(z))`` from the double-centred Euclidean
  distance matrices of the rows; 0 for independent samples in the limit, 1 when ``z`` is a
  similarity transform of ``x``. Padding rows (``mask`` 0) carry zero weight. Differentiable
  (distances through a smoothed square root, so the diagonal's gradient is finite).

  Args:
    x: [N, p] and z: [N, q] the paired rows.
    mask: [N] 1 for a real row (None: all).

  Returns:
    scalar dCor in [0, 1].
  """
  n = x.shape[0]
  w = jnp.ones(n, x.dtype) if mask is None else mask.astype(x.dtype)
  w = w / jnp.maximum(jnp.sum(w), 1.0)

  def centred(u):
    sq = jnp.sum(jnp.square(u[:, None, :] - u[None, :, :]), axis=-1)
    d = jnp.sqrt(sq + 1e-12)
    row = d @ w
    return d - row[:, None] - row[None, :] + w @ row

  a, b = centred(x.astype(jnp.float32)), centred(z.astype(jnp.float32))
  ww = w[:, None] * w[None, :]
  xy, xx, zz = jnp.sum(ww * a * b), jnp.sum(ww * a * a), jnp.sum(ww * b * b)
  dcor_sq = jnp.maximum(xy, 0.0) / jnp.sqrt(jnp.maximum(xx * zz, 1e-30))
  return jnp.sqrt(dcor_sq + 1e-12)


def check_covered(p: Plan, noise_multiplier: float) -> None:
  """Refuses a chain that voids the Gaussian accounting of a run with noise (one clear line)."""
  if noise_multiplier > 0 and not p.covered:
    raise DefenseError(
      f"the --defense chain voids the cut-layer epsilon: {p.reason}; move the defence before "
      "'clip' (row-local ones) or after 'noise' (post-processing), or train without noise"
    )


DETERMINISTIC = ("topk", "sign", "quantize")


class AttackModel(NamedTuple):
  """What an adaptive attack simulates on every candidate (static, hashable).

  ``pre``: deterministic row transforms before the clip; ``between``: after the clip (and, with
  no noise, after the noise too: then nothing is between them); ``label_smoothing``: eps of the
  device's loss; ``likelihood``: the one randomized defence whose likelihood scores the pairs
  (`splitjax.attacks.likelihoods`; None: distance or Gaussian scoring), with ``pre`` and
  ``between`` empty.
  """

  pre: tuple = ()
  between: tuple = ()
  label_smoothing: float = 0.0
  likelihood: Defense | None = None


# The randomized defences with a likelihood, and where in the chain it holds.
LIKELIHOOD_BEFORE_CLIP = ("max_norm", "marvell")
LIKELIHOOD_AFTER_CLIP = ("quantize_stochastic",)
# The likelihoods that read per-batch side information (`batch_info`): an attack passes it as
# `exact(defense_info=)`.
NEEDS_BATCH_INFO = ("max_norm", "marvell")


def attack_model(
  p: Plan, noise_multiplier: float, l2_clip_norm: float = math.inf
) -> tuple[AttackModel | None, str]:
  """The adaptive attack's model of a chain, or ``(None, why not)``.

  Deterministic row transforms (topk, sign, quantize) are simulated exactly. A randomized defence
  is scored by its likelihood when it is the chain's only transform: max_norm and marvell before
  an infinite clip (the clip of a noisy row has no closed-form density), quantize_stochastic
  after the clip without noise. A deterministic transform after the noise makes the noise
  non-Gaussian in what is observed, and batch_average needs a joint attack: neither is modelled.
  """
  parts = p.pre + p.between + p.post
  joint = [d.text() for d in parts if d.name == "batch_average"]
  if joint:
    return None, (
      "batch_average mixes a batch's rows: per-row attacks do not apply; its joint attack is "
      "splitjax.attacks.joint (experiments.attack --attack=joint)"
    )
  random_ = [d for d in parts if d.name not in DETERMINISTIC]
  if random_:
    d = random_[0]
    if len(parts) > 1:
      return None, (
        f"a randomized defence ({d.text()}) is modelled only as the chain's one transform"
      )
    if d.name in LIKELIHOOD_BEFORE_CLIP:
      if not p.pre or math.isfinite(l2_clip_norm) or noise_multiplier > 0:
        return None, f"{d.text()}'s likelihood is modelled before an infinite clip, without noise"
    elif d.name in LIKELIHOOD_AFTER_CLIP:
      if p.pre or noise_multiplier > 0:
        return None, f"{d.text()}'s likelihood is modelled after the clip, without noise"
    return AttackModel(label_smoothing=p.label_smoothing, likelihood=d), ""
  if p.post and noise_multiplier > 0:
    return None, "a deterministic transform after the noise is not modelled (non-Gaussian)"
  return AttackModel(p.pre, p.between + p.post, p.label_smoothing), ""


def row_transform(d: Defense, x: jax.Array, l2_clip_norm) -> jax.Array:
  """A deterministic defence on rows ``x [..., d]`` (topk, sign, quantize): every leading axis
  is a row, so an attack applies it to each candidate's simulated gradient."""
  dim = x.shape[-1]
  if d.name == "topk":
    assert d.param is not None
    keep = max(1, math.ceil(d.param * dim))
    # lax.top_k takes the lower index first among equal magnitudes: ties go to the first by
    # position. A partial selection (not a full sort) keeps the adaptive attack's cost down.
    _, idx = jax.lax.top_k(jnp.abs(x), keep)
    kept = jnp.sum(jax.nn.one_hot(idx, dim, dtype=x.dtype), axis=-2)
    return jnp.where(kept > 0, x, 0.0)
  if d.name == "sign":
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return jnp.sign(x) * norm / math.sqrt(dim)
  if d.name == "quantize":
    assert d.param is not None
    levels = 2 ** int(d.param) - 1
    c = jnp.asarray(l2_clip_norm, x.dtype)
    u = (jnp.clip(x, -c, c) + c) / (2 * c) * levels
    return jnp.round(u) / levels * (2 * c) - c
  raise DefenseError(f"{d.text()} is not a deterministic row transform")


def simulate(model: AttackModel, g: jax.Array, l2_clip_norm, clip) -> jax.Array:
  """What the device sends for simulated gradients ``g [..., d]`` under the chain (no noise):
  the pre transforms, the clip (``clip``: a callable on rows), the transforms after it."""
  for d in model.pre:
    g = row_transform(d, g, l2_clip_norm)
  g = clip(g)
  for d in model.between:
    g = row_transform(d, g, l2_clip_norm)
  return g


def max_norm_level(x, mask):
  """The squared norm max_norm equalises a batch's rows to: its largest real row's (scalar)."""
  return jnp.max(jnp.sum(jnp.square(x), axis=1) * mask)


def batch_info(d: Defense, x, y, mask):
  """The white-box side information of one batch for the likelihood of ``d`` (max_norm: [1],
  ``G^2``; marvell: [d + 4], ``u`` and the four lambdas; else [1] zeros), from the rows the
  defence saw (``x [N, d]``, labels ``y [N]``, ``mask [N]``)."""
  if d.name == "max_norm":
    return max_norm_level(x, mask.astype(x.dtype))[None]
  if d.name == "marvell":
    assert d.param is not None
    unit, lams = marvell_params(x, y, mask, d.param)
    return jnp.concatenate([unit, lams.astype(x.dtype)])
  return jnp.zeros((1,), x.dtype)


def apply_one(d: Defense, x: jax.Array, key, mask, l2_clip_norm, y=None) -> jax.Array:
  """One defence on rows ``x [N, d]`` (padded rows, ``mask == 0``, stay as they are); ``y [N]``
  the rows' labels (what the device trains on), needed by ``marvell``."""
  n, dim = x.shape
  m = mask.astype(x.dtype)[:, None]
  if d.name == "batch_average":
    w = mask.astype(x.dtype)
    mean = jnp.sum(w[:, None] * x, axis=0) / jnp.maximum(jnp.sum(w), 1.0)
    out = jnp.broadcast_to(mean, x.shape)
  elif d.name == "marvell":
    if y is None:
      raise DefenseError("marvell needs the batch's labels")
    assert d.param is not None
    out = marvell_noise(x, y, mask, key, d.param)
  elif d.name == "max_norm":
    sq = jnp.sum(jnp.square(x), axis=1) * mask
    var = jnp.maximum(max_norm_level(x, mask) - sq, 0.0) / dim
    out = x + jnp.sqrt(var)[:, None] * jax.random.normal(key, x.shape, x.dtype)
  elif d.name in DETERMINISTIC:
    out = row_transform(d, x, l2_clip_norm)
  else:  # quantize_stochastic over [-C, C]
    assert d.param is not None
    levels = 2 ** int(d.param) - 1
    c = jnp.asarray(l2_clip_norm, x.dtype)
    u = (jnp.clip(x, -c, c) + c) / (2 * c) * levels
    low = jnp.floor(u)
    q = low + (jax.random.uniform(key, x.shape, x.dtype) < (u - low)).astype(x.dtype)
    out = q / levels * (2 * c) - c
  return jnp.where(m > 0, out, x)


def _apply(part: tuple, offset: int, x, key, mask, clip, y) -> jax.Array:
  for i, d in enumerate(part):
    x = apply_one(d, x, jax.random.fold_in(key, 100 + offset + i), mask, clip, y)
  return x


def defended_release(x, mask, key, l2_clip_norm, noise_multiplier, chain: Plan, y=None):
  """The device's whole chain on rows ``x [N, d]``: pre, clip, between, noise, post.

  Returns ``(x_sent [N, d], nonfinite)`` like `splitjax.training.cut_layer_dp` (padded rows
  zero). With an empty chain it is exactly the DP chain (the same operations and keys). ``y
  [N]``: the rows' training labels (``marvell`` uses them).
  """
  n_pre, n_between = len(chain.pre), len(chain.between)
  x = _apply(chain.pre, 0, x, key, mask, l2_clip_norm, y)
  nonfinite = jnp.sum(dp_transforms.nonfinite_rows(x) & (mask > 0)).astype(jnp.int32)
  if not chain.between:
    tx = dp_transforms.cut_layer_dp(l2_clip_norm, noise_multiplier, key=key)
    out, _ = tx.update(x, tx.init(x))
  else:
    out = dp_transforms.clip_rows(x, l2_clip_norm)
    out = _apply(chain.between, n_pre, out, key, mask, l2_clip_norm, y)
    std = jnp.asarray(noise_multiplier, out.dtype) * jnp.asarray(l2_clip_norm, out.dtype)
    out = out + jnp.where(std > 0, std, 0.0) * jax.random.normal(key, out.shape, out.dtype)
  out = _apply(chain.post, n_pre + n_between, out, key, mask, l2_clip_norm, y)
  return out * mask[:, None].astype(out.dtype), nonfinite


def as_transform(d: Defense, key, l2_clip_norm=jnp.inf) -> optax.GradientTransformation:
  """One defence as an optax transform of per-example rows (every row real)."""
  _checks.nonnegative(l2_clip_norm, "l2_clip_norm")

  def init(updates):
    del updates
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    mask = jnp.ones(updates.shape[0], updates.dtype)
    return apply_one(d, updates, key, mask, l2_clip_norm), state

  return optax.GradientTransformation(init, update)
