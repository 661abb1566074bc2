"""The cut layer as explicit pure functions, and the transcript of what crosses the wire.

Paper orientation (``device_top``, DESIGN.md §1)::

    server: h = s_theta(x_pub)            ---- h ---->  device: z = f_phi(h, x_priv), loss l(z, y)
    server: theta <- theta - ... (vjp g)  <--- g -----  device: g_i = dl_i/dh_i, then DP(g_i)

Classic orientation (``device_bottom``): the device sends ``a = f_phi(x_priv)``
(after DP), the server holds the label and the head and sends back ``dl_i/da_i``.

Every function takes per-example apply functions, so any model works (Flax, Haiku, plain JAX):
``encoder_apply(params, x_i) -> h_i [d]`` and ``head_apply(params, h_i, x_i) -> scalar logit``,
where ``x_i`` is one example's features as a pytree (splitjax's own models use the tuple
``(cat [P] int32, dense [Pd])``; `apply_fns(model)` gives their two functions). Batches are
pytrees whose leaves have a leading batch axis ``N``; padded rows (``mask == 0``) contribute zero.

- `encoder_forward`, `head_step` (loss, per-example cut gradients, parameter gradients),
  `head_step_per_example`, `encoder_backward`: one implementation for both topologies;
- `server_forward`, `device_step`, `server_backward`: the paper's names for them in
  ``device_top``;
- `split_step`: one pass through the cut (forward, the head's step, the privatizer on what the
  device sends, the backward), what the SL and FSL training steps run.

All are pure and jit-friendly.
"""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from splitjax import models

# (x_sent [N, d], mask [N]) -> (x_sent [N, d] with padded rows zero, int32 count of rows zeroed)
Privatizer = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


class DeviceStepOut(NamedTuple):
  """What the head side computes on one batch.

  Attributes:
    loss: scalar, mean BCE over the valid rows.
    cut_grads: ``[N, d]``, row i = d l_i / d h_i (per example, NOT divided by
      the batch size; zero on padded rows).
    param_grads: gradient of the mean loss w.r.t. the head's parameters (with
      `head_step_per_example`: one per example, leaves ``[N, ...]``).
    logits: ``[N]``.
  """

  loss: jax.Array
  cut_grads: jax.Array
  param_grads: Any
  logits: jax.Array


# The name before 0.3 (the head side's step in both topologies).
TopStepOut = DeviceStepOut


def bce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example binary cross-entropy from logits (stable at any logit). ``[N] -> [N]``."""
  return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))


def apply_fns(
  model: models.SplitModel,
) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
  """``(encoder_apply(params, x_i), head_apply(params, h_i, x_i))`` of a `SplitModel`.

  ``x_i = (cat_i, dense_i)``. New closures on each call: inside a jitted function (where the
  model is static) that costs nothing.
  """

  def encoder_apply(params, x):
    return model.encoder_apply(params, *x)

  def head_apply(params, h, x):
    return model.head_apply(params, h, *x)

  return encoder_apply, head_apply


def encoder_forward(encoder_apply: Callable[..., jax.Array], params, x) -> jax.Array:
  """Encoder forward: ``x`` (pytree of ``[N, ...]`` leaves) ``-> cut activation [N, d]``."""
  return jax.vmap(encoder_apply, in_axes=(None, 0))(params, x)


def head_step(head_apply: Callable[..., jax.Array], params, h, x, y, mask) -> DeviceStepOut:
  """Head forward and backward on a batch (the receiving side of the cut).

  Args:
    head_apply: ``(params, h_i [d], x_i) -> scalar logit``.
    params: head parameters.
    h: ``[N, d]`` cut activations received.
    x: the head side's features, a pytree of ``[N, ...]`` leaves.
    y: ``[N]`` labels in {0, 1}.
    mask: ``[N]`` 1 for real rows, 0 for padding.

  Returns:
    `DeviceStepOut`. ``cut_grads[i]`` is the gradient of example i's own loss with respect to
    its own ``h_i`` (the sum of per-example losses is differentiated, and example i's loss
    depends only on ``h_i``); ``param_grads`` that of the mean loss over the real rows.
  """
  mask = mask.astype(jnp.float32)
  logits_fn = jax.vmap(head_apply, in_axes=(None, 0, 0))

  def total_loss(p, hh):
    logits = logits_fn(p, hh, x)
    return jnp.sum(mask * bce_loss(logits, y)), logits

  (total, logits), (p_grads, h_grads) = jax.value_and_grad(
    total_loss, argnums=(0, 1), has_aux=True
  )(params, h)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  p_grads = jax.tree.map(lambda g: g / n, p_grads)
  return DeviceStepOut(total / n, h_grads * mask[:, None], p_grads, logits)


def head_step_per_example(
  head_apply: Callable[..., jax.Array], params, h, x, y, mask
) -> DeviceStepOut:
  """Like `head_step`, but ``param_grads`` holds one gradient per example.

  Each leaf of ``param_grads`` gets a leading batch axis ``[N, ...]`` (zero on padded rows):
  what device DP-SGD clips per example before aggregating.
  """
  mask = mask.astype(jnp.float32)

  def loss_i(p, hi, xi, yi, mi):
    logit = head_apply(p, hi, xi)
    return mi * bce_loss(logit[None], yi[None])[0], logit

  grads_fn = jax.vmap(
    jax.value_and_grad(loss_i, argnums=(0, 1), has_aux=True), in_axes=(None, 0, 0, 0, 0)
  )
  (losses, logits), (p_grads, h_grads) = grads_fn(params, h, x, y, mask)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  return DeviceStepOut(jnp.sum(losses) / n, h_grads, p_grads, logits)


def encoder_backward(encoder_apply: Callable[..., jax.Array], params, x, cut_grads, num_valid):
  """Pulls the received per-example ``cut_grads [N, d]`` back through the encoder.

  Returns the gradient of the mean loss w.r.t. the encoder parameters: the receiver of ``g``
  divides by the number of real rows itself (``num_valid``). The forward is recomputed inside
  ``jax.vjp`` (no stored closure).
  """
  _, vjp = jax.vjp(lambda p: encoder_forward(encoder_apply, p, x), params)
  (grads,) = vjp(cut_grads / jnp.maximum(num_valid, 1.0))
  return grads


# The paper's names (device_top: the server runs the encoder, the device the head).
def server_forward(server_apply: Callable[..., jax.Array], theta, x_pub) -> jax.Array:
  """Server: ``x_pub`` (pytree of ``[N, ...]``) ``-> h [N, d]``; ``server_apply(theta, x_i)``."""
  return encoder_forward(server_apply, theta, x_pub)


def device_step(device_apply: Callable[..., jax.Array], phi, h, x_priv, y, mask) -> DeviceStepOut:
  """Device: loss, per-example ``g_i = dl_i/dh_i`` and its parameter gradients (see `head_step`).

  ``device_apply(phi, h_i [d], x_priv_i) -> logit``; ``h [N, d]``, ``x_priv`` a pytree of
  ``[N, ...]`` leaves, ``y, mask [N]``.
  """
  return head_step(device_apply, phi, h, x_priv, y, mask)


def server_backward(server_apply: Callable[..., jax.Array], theta, x_pub, g, num_valid):
  """Server: theta gradient of the mean loss from the received ``g [N, d]`` (see
  `encoder_backward`)."""
  return encoder_backward(server_apply, theta, x_pub, g, num_valid)


class SplitStepOut(NamedTuple):
  """One pass through the cut (`split_step`).

  Attributes:
    loss: scalar mean loss over the real rows.
    encoder_grads, head_grads: gradients of the mean loss for each side's parameters.
    h_sent: ``[N, d]`` the activations that crossed the wire (after the privatizer in
      ``device_bottom``).
    g_sent: ``[N, d]`` the gradients that crossed the wire (after the privatizer in
      ``device_top``).
    logits: ``[N]``.
    nonfinite: int32, rows the privatizer zeroed because they held an inf or NaN.
  """

  loss: jax.Array
  encoder_grads: Any
  head_grads: Any
  h_sent: jax.Array
  g_sent: jax.Array
  logits: jax.Array
  nonfinite: jax.Array


def _no_privatizer(x, mask):
  return x * mask[:, None].astype(x.dtype), jnp.zeros((), jnp.int32)


def split_step(
  encoder_apply: Callable[..., jax.Array],
  head_apply: Callable[..., jax.Array],
  encoder_params,
  head_params,
  x_encoder,
  x_head,
  y,
  mask,
  *,
  topology: str,
  privatize: Privatizer | None = None,
  privatize_head_grads: Callable[[Any, jax.Array], Any] | None = None,
  head_step_fn: Callable[..., DeviceStepOut] | None = None,
) -> SplitStepOut:
  """One pass through the cut: encoder forward, head step, the device's privatizer, backward.

  In ``device_top`` (the paper's) the device runs the head and privatizes the per-example
  cut gradients it sends back; in ``device_bottom`` it runs the encoder and privatizes the
  activations it sends. The encoder's gradient is pulled back from what was sent.

  Args:
    encoder_apply: ``(params, x_i) -> h_i [d]``.
    head_apply: ``(params, h_i [d], x_i) -> scalar logit``.
    encoder_params, head_params: each side's parameters.
    x_encoder, x_head: each side's features (pytrees of ``[N, ...]`` leaves).
    y, mask: ``[N]`` labels and 1 for real rows (0 for padding).
    topology: ``'device_top'`` or ``'device_bottom'`` (which side is the device).
    privatize: the device's chain on what it sends, ``(x [N, d], mask) -> (x_sent, nonfinite)``
      (e.g. clip and noise; padded rows must come back zero); None sends ``x`` as is.
    privatize_head_grads: ``device_top`` only: device DP-SGD, ``(per-example parameter
      gradients [N, ...], mask) -> the gradient used``; None uses the plain mean gradient.
    head_step_fn: ``device_top`` only: ``(head_params, h [N, d], x_head, y, mask) ->
      DeviceStepOut`` in place of `head_step` (federated split learning passes one that runs
      each device's own head on its own rows; its ``loss`` may then be per device).

  Returns:
    `SplitStepOut`.
  """
  if topology not in models.TOPOLOGIES:
    raise ValueError(f"unknown topology {topology!r}: choose one of {models.TOPOLOGIES}")
  if topology == "device_bottom" and (privatize_head_grads is not None or head_step_fn is not None):
    raise ValueError("device DP-SGD and a custom head step are implemented for device_top only")
  privatize = _no_privatizer if privatize is None else privatize
  mask = mask.astype(jnp.float32)
  n = jnp.sum(mask)
  h = encoder_forward(encoder_apply, encoder_params, x_encoder)
  if topology == "device_top":
    if head_step_fn is not None:
      out = head_step_fn(head_params, h, x_head, y, mask)
    elif privatize_head_grads is None:
      out = head_step(head_apply, head_params, h, x_head, y, mask)
    else:
      out = head_step_per_example(head_apply, head_params, h, x_head, y, mask)
      out = out._replace(param_grads=privatize_head_grads(out.param_grads, mask))
    g_sent, nonfinite = privatize(out.cut_grads, mask)
    enc_grads = encoder_backward(encoder_apply, encoder_params, x_encoder, g_sent, n)
    return SplitStepOut(out.loss, enc_grads, out.param_grads, h, g_sent, out.logits, nonfinite)
  # device_bottom: the device privatises its activations.
  h_sent, nonfinite = privatize(h, mask)
  out = head_step(head_apply, head_params, h_sent, x_head, y, mask)
  enc_grads = encoder_backward(encoder_apply, encoder_params, x_encoder, out.cut_grads, n)
  return SplitStepOut(
    out.loss, enc_grads, out.param_grads, h_sent, out.cut_grads, out.logits, nonfinite
  )


# The model-based forms (both topologies; ``cat, dense`` as separate arrays).
def bottom_forward(model: models.SplitModel, params, cat, dense) -> jax.Array:
  """Encoder forward of a `SplitModel`: ``cat [N, P] int32, dense [N, Pd] -> [N, d]``."""
  return encoder_forward(apply_fns(model)[0], params, (cat, dense))


def top_step(model: models.SplitModel, params, h, cat, dense, y, mask) -> DeviceStepOut:
  """`head_step` of a `SplitModel` (``cat [N, P] int32, dense [N, Pd]``)."""
  return head_step(apply_fns(model)[1], params, h, (cat, dense), y, mask)


def top_step_per_example(model: models.SplitModel, params, h, cat, dense, y, mask):
  """`head_step_per_example` of a `SplitModel`."""
  return head_step_per_example(apply_fns(model)[1], params, h, (cat, dense), y, mask)


def bottom_backward(model: models.SplitModel, params, cat, dense, cut_grads, num_valid):
  """`encoder_backward` of a `SplitModel`."""
  return encoder_backward(apply_fns(model)[0], params, (cat, dense), cut_grads, num_valid)


class Transcript(NamedTuple):
  """Everything that crossed the wire, plus the public facts the attacker knows.

  In ``device_top`` ``h`` is what the server sent and ``g`` what the device
  sent back (after DP). In ``device_bottom`` ``h`` holds the activations the
  device sent (after DP) and ``g`` the gradients the server returned.

  Attributes:
    h: ``[N, d]`` cut activations.
    g: ``[N, d]`` cut gradients.
    example_index: ``[N] int32`` row of the example in its split.
    param_index: ``[N] int32`` which entry of ``device_params`` produced row i.
    local_step: ``[N] int32`` FSL local step of row i (0 in SL).
    device_params: device parameters, each leaf stacked on a leading axis of
      versions (``param_index`` indexes it). Known to the server (DESIGN.md §2).
    l2_clip_norm: public clip norm C (``inf`` when none).
    noise_multiplier: public sigma (0 when none).
    device_slot: FSL only (else None): ``[N] int32``, the device of row i within its round
      (``param_index`` is the round): a device's rows are those with one ``(param_index,
      device_slot)``, in the same order at every local step.
    device_opt: FSL only: the device optimiser's state at each round start (the FedAvg'd state
      the server broadcast), each leaf stacked on a leading axis of versions like
      ``device_params``.
    device_updates: FSL only: ``[V, D, M] float32``, what each device of each round returned,
      as its update ``phi_end - phi_start`` at the ``M`` coordinates ``update_coords`` of the
      flattened parameters (``jax.flatten_util.ravel_pytree`` order); a server that keeps every
      coordinate knows more.
    update_coords: FSL only: ``[M] int64``, the flattened-parameter coordinates kept.
  """

  h: np.ndarray
  g: np.ndarray
  example_index: np.ndarray
  param_index: np.ndarray
  local_step: np.ndarray
  device_params: Any
  l2_clip_norm: float
  noise_multiplier: float
  device_slot: np.ndarray | None = None
  device_opt: Any = None
  device_updates: np.ndarray | None = None
  update_coords: np.ndarray | None = None

  @property
  def num_rows(self) -> int:
    """Number of rows N (NamedTuple's own len() is its field count)."""
    return int(self.h.shape[0])

  def params_at(self, version: int):
    """Device parameters of one version (a single, unstacked pytree)."""
    return jax.tree.map(lambda x: x[version], self.device_params)

  def take(self, idx) -> "Transcript":
    """Rows ``idx`` of the transcript (parameters kept whole)."""
    idx = np.asarray(idx)
    return self._replace(
      h=self.h[idx],
      g=self.g[idx],
      example_index=self.example_index[idx],
      param_index=self.param_index[idx],
      local_step=self.local_step[idx],
      device_slot=None if self.device_slot is None else self.device_slot[idx],
    )

  def to_arrays(self) -> dict[str, np.ndarray]:
    out: dict[str, Any] = {
      k: np.asarray(getattr(self, k))
      for k in ("h", "g", "example_index", "param_index", "local_step")
    }
    out["l2_clip_norm"] = np.float64(self.l2_clip_norm)
    out["noise_multiplier"] = np.float64(self.noise_multiplier)
    for k in ("device_slot", "device_updates", "update_coords"):
      if getattr(self, k) is not None:
        out[k] = np.asarray(getattr(self, k))
    if self.device_opt is not None:  # the leaves, in jax.tree.leaves order
      for i, leaf in enumerate(jax.tree.leaves(self.device_opt)):
        out[f"device_opt_leaf_{i}"] = np.asarray(leaf)
    return out


def concatenate(transcripts: Sequence[Transcript]) -> Transcript:
  """One transcript of several (e.g. the epochs of ``fit(record='all')``), rows in order.

  Every transcript's parameter versions are stacked after the previous ones' and its
  ``param_index`` shifted to match, so each row keeps the parameters that produced it. The
  public DP parameters are the first transcript's (they are fixed for a run).
  """
  if not transcripts:
    raise ValueError("concatenate needs at least one transcript")
  offsets = np.cumsum([0] + [_num_versions(t) for t in transcripts])
  rows = lambda name: np.concatenate([getattr(t, name) for t in transcripts])
  return transcripts[0]._replace(
    h=rows("h"),
    g=rows("g"),
    example_index=rows("example_index"),
    param_index=np.concatenate(
      [t.param_index + o for t, o in zip(transcripts, offsets[:-1], strict=True)]
    ).astype(np.int32),
    local_step=rows("local_step"),
    device_params=jax.tree.map(
      lambda *xs: np.concatenate(xs), *[t.device_params for t in transcripts]
    ),
    **_concatenate_fsl(transcripts),
  )


def _concatenate_fsl(transcripts: Sequence[Transcript]) -> dict:
  """The FSL fields of `concatenate`: joined where every transcript has them, else None."""
  out: dict[str, Any] = {}
  for name in ("device_slot", "device_opt", "device_updates"):
    parts = [getattr(t, name) for t in transcripts]
    if any(p is None for p in parts):
      out[name] = None
    elif name == "device_opt":
      out[name] = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    else:
      out[name] = np.concatenate(parts)
  coords = [np.asarray(t.update_coords) for t in transcripts]
  if out["device_updates"] is not None and any(not np.array_equal(c, coords[0]) for c in coords):
    raise ValueError("concatenate: the transcripts kept different update coordinates")
  out["update_coords"] = None if out["device_updates"] is None else coords[0]
  return out


def flatten_params(params, batch_dims: int = 0) -> np.ndarray:
  """The parameters as one flat vector: every leaf raveled, in ``jax.tree.leaves`` order
  (``ravel_pytree``'s). With ``batch_dims=1`` the leaves share a leading axis ``[B, ...]`` and the
  result is ``[B, num_params]``. Host (numpy) arrays."""
  leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
  lead = leaves[0].shape[:batch_dims] if leaves else ()
  return np.concatenate([x.reshape(lead + (-1,)) for x in leaves], axis=batch_dims)


def _num_versions(transcript: Transcript) -> int:
  return int(np.shape(jax.tree.leaves(transcript.device_params)[0])[0])
