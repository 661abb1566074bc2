"""Split models as pure ``(init, apply)`` functions: an embedding encoder and a DeepFM or MLP head.

Two topologies (DESIGN.md §1):

* ``device_top`` (the paper's): the server encodes its own features into the cut
  activation ``h``; the device holds the private features and the label and runs
  the head ``f_phi(h, x_priv)``.
* ``device_bottom`` (classic split learning): the device encodes its private
  features into ``a``; the server holds its features, the label and the head.

In both, the *encoder* embeds categorical features (``embed_dim`` each) and
concatenates the min-max scaled dense features; the *head* is a DeepFM (or a
plain MLP) on the encoder output plus the head side's own features. The head's
first DNN layer is factored as ``W_h h + sum_j T_j[x_j] + b`` with
``T_j = E_j W_j`` (the embedding table of feature j already multiplied by its
block of ``W``): mathematically the same as a dense layer on the concatenation,
but under ``vmap`` over candidate ``x`` the ``W_h h`` term stays unbatched.

All apply functions act on ONE example (unbatched); use ``jax.vmap`` for
batches (:func:`SplitModel.encode_batch`, :func:`SplitModel.head_batch`).
"""

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HEADS = ("deepfm", "mlp")
TOPOLOGIES = ("device_top", "device_bottom")


class _SpecRecord:
  """`to_dict` and `fingerprint` of a spec dataclass (the functions are not hashed)."""

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)  # type: ignore[call-overload]  # subclasses are dataclasses
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

  def fingerprint(self) -> str:
    """Short hash identifying the architecture (checked when restoring)."""
    blob = json.dumps(self.to_dict(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec(_SpecRecord):
  """Static description of a split model.

  Attributes:
    pub_cardinalities: cardinality of each server categorical feature (Sc).
    num_pub_dense: number of server dense features (Sd).
    priv_cardinalities: cardinality of each private categorical feature (Pc).
    num_priv_dense: number of private dense features (Pd).
    embed_dim: embedding width of every categorical field (8 in the paper).
    hidden: widths of the head's DNN (ReLU).
    head: ``'deepfm'`` (the paper's) or ``'mlp'``.
    topology: ``'device_top'`` (the paper's) or ``'device_bottom'``.
  """

  pub_cardinalities: tuple[int, ...]
  num_pub_dense: int
  priv_cardinalities: tuple[int, ...]
  num_priv_dense: int = 0
  embed_dim: int = 8
  hidden: tuple[int, ...] = (256, 128)
  head: str = "deepfm"
  topology: str = "device_top"

  def __post_init__(self):
    if self.head not in HEADS:
      raise ValueError(f"unknown head {self.head!r}: choose one of {HEADS}")
    if self.topology not in TOPOLOGIES:
      raise ValueError(f"unknown topology {self.topology!r}: choose one of {TOPOLOGIES}")
    for name in ("pub_cardinalities", "priv_cardinalities"):
      cards = getattr(self, name)
      if any(int(c) < 1 for c in cards):
        raise ValueError(f"{name} must all be >= 1, got {cards}")
    if not self.priv_cardinalities and not self.num_priv_dense:
      raise ValueError("the device needs at least one private feature")

  @property
  def encoder_side(self) -> str:
    """Which party runs the encoder (the bottom)."""
    return "server" if self.topology == "device_top" else "device"

  @property
  def cut_dim(self) -> int:
    """Width d of the cut activation."""
    cards, dense = self._encoder_features()
    return len(cards) * self.embed_dim + dense

  def _encoder_features(self):
    if self.topology == "device_top":
      return self.pub_cardinalities, self.num_pub_dense
    return self.priv_cardinalities, self.num_priv_dense

  def _head_features(self):
    if self.topology == "device_top":
      return self.priv_cardinalities, self.num_priv_dense
    return self.pub_cardinalities, self.num_pub_dense


class Encoder(nn.Module):
  """Embeds categorical fields and appends dense features: one example -> [d]."""

  cardinalities: tuple[int, ...]
  num_dense: int
  embed_dim: int = 8

  @nn.compact
  def __call__(self, cat, dense):
    init = nn.initializers.normal(stddev=0.1)
    parts = []
    for j, card in enumerate(self.cardinalities):
      table = self.param(f"emb_{j}", init, (card, self.embed_dim))
      parts.append(table[cat[j]])
    if self.num_dense:
      parts.append(dense.astype(jnp.float32))
    return jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.float32)


class Head(nn.Module):
  """DeepFM or MLP head on the cut activation plus its own features -> logit.

  Inputs (one example): ``h: [d]`` whose first ``num_h_fields * embed_dim``
  entries are embedding fields (the rest dense), ``cat``, ``dense: [Pd] float32``.
  Returns a scalar logit.

  ``cat`` is either ``[P] int32`` (the model as trained and as EXACT enumerates it) or
  its soft form, a tuple of P probability vectors ``[K_j]`` (what relaxed attacks
  optimise): every lookup ``M[x_j]`` of a row of a per-category matrix (embeddings,
  the factored first layer ``T_j = E_j W_j``, the linear weights) becomes the mixture
  ``probs_j @ M``. One-hot ``probs`` give the integer model's logit (a test checks
  it), and the soft form is differentiable in ``probs``.
  """

  cardinalities: tuple[int, ...]
  num_dense: int
  num_h_fields: int
  embed_dim: int = 8
  hidden: tuple[int, ...] = (256, 128)
  kind: str = "deepfm"

  @nn.compact
  def __call__(self, h, cat, dense):
    soft = isinstance(cat, (tuple, list))
    if soft and len(cat) != len(self.cardinalities):
      raise ValueError(
        f"the soft form of cat must hold {len(self.cardinalities)} probability vectors "
        f"(one per private categorical feature), got {len(cat)}."
      )

    def lookup(matrix, j):  # row x_j of a per-category matrix, or its mixture under probs_j
      return cat[j] @ matrix if soft else matrix[cat[j]]

    e = self.embed_dim
    emb_init = nn.initializers.normal(stddev=0.1)
    dense_init = nn.initializers.lecun_normal()
    width0 = self.hidden[0]
    d_in_total = h.shape[-1] + len(self.cardinalities) * e + self.num_dense
    # First DNN layer, factored: W_h h + sum_j T_j[x_j] + W_d dense + b.
    w_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    w_h = self.param(
      "dnn0_w_h",
      lambda k, s: w_init(k, s) * (h.shape[-1] / d_in_total) ** 0.5,
      (h.shape[-1], width0),
    )
    b0 = self.param("dnn0_b", nn.initializers.zeros, (width0,))
    pre = h @ w_h + b0
    fields = []
    lin = jnp.zeros((), jnp.float32)
    for j, card in enumerate(self.cardinalities):
      table = self.param(f"emb_{j}", emb_init, (card, e))
      w_j = self.param(
        f"dnn0_w_{j}", lambda k, s: w_init(k, s) * (e / d_in_total) ** 0.5, (e, width0)
      )
      pre = pre + lookup(table @ w_j, j)  # T_j[x_j], T_j computed once per call
      fields.append(lookup(table, j))
      if self.kind == "deepfm":
        lin_j = self.param(f"lin_{j}", nn.initializers.zeros, (card,))
        lin = lin + lookup(lin_j, j)
    if self.num_dense:
      dense = dense.astype(jnp.float32)
      w_d = self.param("dnn0_w_dense", dense_init, (self.num_dense, width0))
      pre = pre + dense @ w_d
      if self.kind == "deepfm":
        v_d = self.param("emb_dense", emb_init, (self.num_dense, e))
        fields.append(dense[:, None] * v_d)
        lin = lin + dense @ self.param("lin_dense", nn.initializers.zeros, (self.num_dense,))
    x = nn.relu(pre)
    for i, width in enumerate(self.hidden[1:], start=1):
      x = nn.relu(nn.Dense(width, name=f"dnn{i}")(x))
    out = nn.Dense(1, name="dnn_out")(x)[0]
    if self.kind == "mlp":
      return out
    # DeepFM linear term and FM over fields.
    lin = lin + nn.Dense(1, name="lin_h")(h)[0]
    h_fields = h[: self.num_h_fields * e].reshape(self.num_h_fields, e)
    all_fields = [h_fields] + [f.reshape(-1, e) for f in fields]
    v = jnp.concatenate(all_fields, axis=0)
    s = v.sum(0)
    fm = 0.5 * (s @ s - jnp.sum(v * v))
    return out + lin + fm


@dataclasses.dataclass(frozen=True, kw_only=True)
class CustomSpec(_SpecRecord):
  """What splitjax needs to know of a split model it did not build (`SplitModel.from_apply_fns`).

  Always the paper's orientation (``device_top``): the server encodes its features into ``h``,
  the device holds the private features and the label and computes the logit.

  Attributes:
    priv_cardinalities: cardinality of each private categorical feature (what EXACT enumerates).
    num_priv_dense: number of private dense features.
    cut_dim: width d of ``h``, or None when not given.
    name: a label for the architecture (it enters the fingerprint).
  """

  priv_cardinalities: tuple[int, ...]
  num_priv_dense: int = 0
  cut_dim: int | None = None
  name: str = "custom"
  topology: str = dataclasses.field(default="device_top", init=False)
  head: str = dataclasses.field(default="custom", init=False)

  def __post_init__(self):
    cards = tuple(int(c) for c in self.priv_cardinalities)
    if any(c < 1 for c in cards):
      raise ValueError(f"priv_cardinalities must all be >= 1, got {self.priv_cardinalities}")
    if not cards and not self.num_priv_dense:
      raise ValueError(
        "the device needs at least one private feature: give priv_cardinalities or num_priv_dense"
      )
    object.__setattr__(self, "priv_cardinalities", cards)

  @property
  def encoder_side(self) -> str:
    return "server"


class SplitModel(NamedTuple):
  """Pure functions of a split model (see module docstring).

  ``encoder_apply(params, cat[P] int32, dense[Pd]) -> [d]`` and
  ``head_apply(params, h[d], cat, dense) -> scalar logit`` act on one example.
  In ``device_top`` the server owns the encoder and the device the head; in
  ``device_bottom`` the other way round. Build one with `make_model` (splitjax's DeepFM or
  MLP) or, for your own model, with `SplitModel.from_apply_fns`.
  ``head_soft_apply(params, h[d], probs, dense) -> logit`` is the head with its categorical
  inputs relaxed to a tuple of probability vectors ``probs[j]: [K_j]`` (one-hot ``probs``:
  ``head_apply``), for the relaxed attacks (`attacks.optimize`); None when a custom model
  gives none.
  """

  spec: ModelSpec | CustomSpec
  encoder_init: Callable[[jax.Array], Any]
  encoder_apply: Callable[..., jax.Array]
  head_init: Callable[[jax.Array], Any]
  head_apply: Callable[..., jax.Array]
  head_soft_apply: Callable[..., jax.Array] | None = None

  def encode_batch(self, params, cat, dense):
    """``cat: [N, P], dense: [N, Pd] -> [N, d]``."""
    return jax.vmap(self.encoder_apply, in_axes=(None, 0, 0))(params, cat, dense)

  def head_batch(self, params, h, cat, dense):
    """``h: [N, d], cat: [N, P], dense: [N, Pd] -> logits [N]``."""
    return jax.vmap(self.head_apply, in_axes=(None, 0, 0, 0))(params, h, cat, dense)

  @classmethod
  def from_apply_fns(
    cls,
    server_init: Callable[[jax.Array], Any],
    server_apply: Callable[..., jax.Array],
    device_init: Callable[[jax.Array], Any],
    device_apply: Callable[..., jax.Array],
    priv_cardinalities,
    *,
    num_priv_dense: int = 0,
    cut_dim: int | None = None,
    name: str = "custom",
    device_soft_apply: Callable[..., jax.Array] | None = None,
  ) -> "SplitModel":
    """A split model from your own functions (Flax linen or NNX, Haiku, plain JAX).

    Every function acts on ONE example; splitjax vmaps them.

    Args:
      server_init: ``key -> theta`` (a pytree).
      server_apply: ``(theta, pub_cat [Sc] int32, pub_dense [Sd] float32) -> h [d]``.
      device_init: ``key -> phi``.
      device_apply: ``(phi, h [d], priv_cat [P] int32, priv_dense [Pd] float32) -> logit``
        (a scalar).
      priv_cardinalities: cardinality of each private categorical feature, in the order of
        ``priv_cat`` (e.g. ``TabularData.priv_cardinalities``).
      num_priv_dense: Pd, the number of private dense features.
      cut_dim: d, if you want it recorded (nothing in training or EXACT needs it).
      name: names the architecture in fingerprints and records.

    Returns:
      device_soft_apply: optional ``(phi, h [d], probs, priv_dense [Pd]) -> logit``, the soft
        form of ``device_apply`` for `attacks.optimize`: ``probs`` is a tuple of P probability
        vectors ``[K_j]``, and every place ``device_apply`` looks a row up by ``priv_cat[j]``
        (``table[x_j]``) it takes the mixture ``probs[j] @ table`` instead; with one-hot
        ``probs`` it must equal ``device_apply``. A head that concatenates embeddings,
        ``concatenate([h, E_j[x_j], ...]) @ W``, becomes ``concatenate([h, probs[j] @ E_j,
        ...]) @ W``. (`attacks.exact` and `attacks.hybrid` need only ``device_apply``.)

    Returns:
      A `SplitModel` with a `CustomSpec` that `training.fit`, `protocol` and `attacks.exact`
      accept.
    """
    spec = CustomSpec(
      priv_cardinalities=tuple(priv_cardinalities),
      num_priv_dense=int(num_priv_dense),
      cut_dim=cut_dim,
      name=name,
    )
    return cls(spec, server_init, server_apply, device_init, device_apply, device_soft_apply)

  # Names of the paper's orientation.
  @property
  def server_init(self):
    return self.encoder_init if self.spec.topology == "device_top" else self.head_init

  @property
  def device_init(self):
    return self.head_init if self.spec.topology == "device_top" else self.encoder_init


@functools.cache
def make_model(spec: ModelSpec) -> SplitModel:
  """Builds the pure functions of ``spec``.

  Args:
    spec: the architecture.

  Returns:
    A :class:`SplitModel`. Parameters are plain nested dicts of arrays.

  Example:
    >>> spec = ModelSpec(pub_cardinalities=(3, 4), num_pub_dense=2,
    ...                  priv_cardinalities=(2, 5))
    >>> model = make_model(spec)
    >>> theta = model.encoder_init(jax.random.key(0))
    >>> h = model.encoder_apply(theta, jnp.array([1, 2]), jnp.array([0.5, 0.1]))
    >>> h.shape
    (18,)
  """
  enc_cards, enc_dense = spec._encoder_features()
  head_cards, head_dense = spec._head_features()
  encoder = Encoder(cardinalities=tuple(enc_cards), num_dense=enc_dense, embed_dim=spec.embed_dim)
  head = Head(
    cardinalities=tuple(head_cards),
    num_dense=head_dense,
    num_h_fields=len(enc_cards),
    embed_dim=spec.embed_dim,
    hidden=tuple(spec.hidden),
    kind=spec.head,
  )
  enc_example = (jnp.zeros((len(enc_cards),), jnp.int32), jnp.zeros((enc_dense,), jnp.float32))
  head_example = (
    jnp.zeros((spec.cut_dim,), jnp.float32),
    jnp.zeros((len(head_cards),), jnp.int32),
    jnp.zeros((head_dense,), jnp.float32),
  )

  def encoder_init(key):
    return encoder.init(key, *enc_example)["params"]

  def encoder_apply(params, cat, dense):
    return encoder.apply({"params": params}, cat, dense)

  def head_init(key):
    return head.init(key, *head_example)["params"]

  def head_apply(params, h, cat, dense):
    return head.apply({"params": params}, h, cat, dense)

  def head_soft_apply(params, h, probs, dense):
    return head.apply({"params": params}, h, tuple(probs), dense)

  return SplitModel(spec, encoder_init, encoder_apply, head_init, head_apply, head_soft_apply)


def soft_device_apply(model: SplitModel) -> Callable[..., jax.Array]:
  """The device head with soft categorical inputs, ``(phi, h, probs, dense) -> logit``.

  What `attacks.optimize` descends on: ``probs`` is a tuple of P probability vectors
  ``[K_j]``; one-hot ``probs`` give ``model.head_apply``.

  Raises:
    ValueError: the model is ``device_bottom`` (there the device holds the encoder: attack
      the activations, `attacks.exact_activations`), or a custom model without a soft form
      (pass ``device_soft_apply`` to `SplitModel.from_apply_fns`).
  """
  if model.spec.topology != "device_top":
    raise ValueError(
      f"soft_device_apply needs a device_top model (the device runs the head); got topology "
      f"{model.spec.topology!r}. For device_bottom attack the activations "
      "(splitjax.attacks.exact_activations)."
    )
  if model.head_soft_apply is None:
    raise ValueError(
      "this model has no soft form of its device head: pass device_soft_apply to "
      "SplitModel.from_apply_fns (see its docstring for how to write one), or use "
      "attacks.exact / attacks.hybrid, which need only device_apply."
    )
  return model.head_soft_apply


def device_logit_fn(model: SplitModel, priv_dense=None) -> Callable[..., jax.Array]:
  """The ``device_apply(params, h[d], x_priv[P] int32) -> logit`` EXACT expects.

  Only for ``device_top``. Private dense features, if any, are fixed to
  ``priv_dense`` (zeros by default); the hybrid attack handles them instead.
  """
  if model.spec.topology != "device_top":
    raise ValueError("device_logit_fn needs topology='device_top'")
  nd = model.spec.num_priv_dense
  fixed = jnp.zeros((nd,), jnp.float32) if priv_dense is None else priv_dense
  return _DeviceLogit(model.head_apply, fixed, model.spec.priv_cardinalities)


class _DeviceLogit:
  """Hashable callable so EXACT's compile cache recognises the same model.

  ``priv_cardinalities`` tells the attacks the model's private features, so that a wrong
  cardinality tuple is refused rather than clamped by JAX's out-of-range indexing.
  """

  def __init__(self, head_apply, dense, priv_cardinalities=None):
    self._head_apply = head_apply
    self._dense = dense
    self.priv_cardinalities = (
      None if priv_cardinalities is None else tuple(int(k) for k in priv_cardinalities)
    )

  def __call__(self, params, h, x_priv):
    return self._head_apply(params, h, x_priv, self._dense)

  def __hash__(self):
    return hash((self._head_apply, self._dense.shape))

  def __eq__(self, other):
    # JAX compares static callables while it traces (e.g. a jit cache lookup inside another
    # trace), so the comparison must not build a jnp operation: compare host copies, and a
    # traced ``dense`` only by identity.
    if not (
      isinstance(other, _DeviceLogit)
      and other._head_apply is self._head_apply
      and other._dense.shape == self._dense.shape
    ):
      return False
    if other._dense is self._dense:
      return True
    if isinstance(self._dense, jax.core.Tracer) or isinstance(other._dense, jax.core.Tracer):
      return False
    return bool(np.array_equal(np.asarray(other._dense), np.asarray(self._dense)))


def count_params(params) -> int:
  """Number of scalars in a parameter pytree."""
  return int(sum(x.size for x in jax.tree.leaves(params)))
