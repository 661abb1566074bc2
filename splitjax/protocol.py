"""The cut layer as explicit pure functions, and the transcript of what crosses the wire.

Paper orientation (``device_top``, DESIGN.md §1)::

    server: h = s_theta(x_pub)            ---- h ---->  device: z = f_phi(h, x_priv), loss l(z, y)
    server: theta <- theta - ... (vjp g)  <--- g -----  device: g_i = dl_i/dh_i, then DP(g_i)

Classic orientation (``device_bottom``): the device sends ``a = f_phi(x_priv)``
(after DP), the server holds the label and the head and sends back ``dl_i/da_i``.

Functions here are named after the *encoder* (bottom) and *head* (top) parts so
that one implementation serves both topologies; :func:`server_forward`,
:func:`device_step` and :func:`server_backward` are the paper's names for the
``device_top`` case. All of them are pure and jit-friendly; per-example rows
have axis 0 as the batch axis and padded rows (``mask == 0``) contribute zero.
"""

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from splitjax import models


class TopStepOut(NamedTuple):
  """What the head side computes on one batch.

  Attributes:
    loss: scalar, mean BCE over the valid rows.
    cut_grads: ``[N, d]``, row i = d l_i / d h_i (per example, NOT divided by
      the batch size; zero on padded rows).
    param_grads: gradient of the mean loss w.r.t. the head's parameters.
    logits: ``[N]``.
  """

  loss: jax.Array
  cut_grads: jax.Array
  param_grads: Any
  logits: jax.Array


def bce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example binary cross-entropy from logits (stable at any logit). ``[N] -> [N]``."""
  return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))


def top_step_per_example(model: models.SplitModel, params, h, cat, dense, y, mask) -> TopStepOut:
  """Like :func:`top_step`, but ``param_grads`` holds one gradient per example.

  Each leaf of ``param_grads`` gets a leading batch axis ``[N, ...]`` (zero on
  padded rows): what device DP-SGD clips per example before aggregating.
  """
  mask = mask.astype(jnp.float32)

  def loss_i(p, hi, ci, di, yi, mi):
    logit = model.head_apply(p, hi, ci, di)
    return mi * bce_loss(logit[None], yi[None])[0], logit

  grads_fn = jax.vmap(
    jax.value_and_grad(loss_i, argnums=(0, 1), has_aux=True), in_axes=(None, 0, 0, 0, 0, 0)
  )
  (losses, logits), (p_grads, h_grads) = grads_fn(params, h, cat, dense, y, mask)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  return TopStepOut(jnp.sum(losses) / n, h_grads, p_grads, logits)


def bottom_forward(model: models.SplitModel, params, cat, dense) -> jax.Array:
  """Encoder forward: ``cat [N, P] int32, dense [N, Pd] -> cut activation [N, d]``."""
  return model.encode_batch(params, cat, dense)


def top_step(model: models.SplitModel, params, h, cat, dense, y, mask) -> TopStepOut:
  """Head forward and backward on a batch (the receiving side of the cut).

  Args:
    model: the split model.
    params: head parameters.
    h: ``[N, d]`` cut activations received.
    cat: ``[N, P] int32`` the head side's categorical features.
    dense: ``[N, Pd]`` the head side's dense features.
    y: ``[N]`` labels in {0, 1}.
    mask: ``[N]`` 1 for real rows, 0 for padding.

  Returns:
    :class:`TopStepOut`. ``cut_grads[i]`` is the gradient of example i's own
    loss with respect to its own ``h_i`` (the sum of per-example losses is
    differentiated, and example i's loss depends only on ``h_i``).
  """
  mask = mask.astype(jnp.float32)

  def total_loss(p, hh):
    logits = model.head_batch(p, hh, cat, dense)
    return jnp.sum(mask * bce_loss(logits, y)), logits

  (total, logits), (p_grads, h_grads) = jax.value_and_grad(
    total_loss, argnums=(0, 1), has_aux=True
  )(params, h)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  p_grads = jax.tree.map(lambda x: x / n, p_grads)
  return TopStepOut(total / n, h_grads * mask[:, None], p_grads, logits)


def bottom_backward(model: models.SplitModel, params, cat, dense, cut_grads, num_valid):
  """Pulls the received per-example ``cut_grads [N, d]`` back through the encoder.

  Returns the gradient of the mean loss w.r.t. the encoder parameters: the
  receiver of ``g`` divides by the batch size itself (``num_valid``).
  The forward is recomputed inside ``jax.vjp`` (no stored closure).
  """
  _, vjp = jax.vjp(lambda p: bottom_forward(model, p, cat, dense), params)
  (grads,) = vjp(cut_grads / jnp.maximum(num_valid, 1.0))
  return grads


# The paper's names (device_top).
def server_forward(model, theta, pub_cat, pub_dense):
  """Server: ``x_pub -> h [N, d]`` (device_top)."""
  _check_top(model)
  return bottom_forward(model, theta, pub_cat, pub_dense)


def device_step(model, phi, h, priv_cat, priv_dense, y, mask) -> TopStepOut:
  """Device: loss, per-example ``g_i = dl_i/dh_i`` and its parameter gradients (device_top)."""
  _check_top(model)
  return top_step(model, phi, h, priv_cat, priv_dense, y, mask)


def server_backward(model, theta, pub_cat, pub_dense, g, num_valid):
  """Server: theta gradient of the mean loss from the received ``g [N, d]`` (device_top)."""
  _check_top(model)
  return bottom_backward(model, theta, pub_cat, pub_dense, g, num_valid)


def _check_top(model):
  if model.spec.topology != "device_top":
    raise ValueError(
      "server_forward/device_step/server_backward are the device_top "
      "names; use bottom_forward/top_step/bottom_backward"
    )


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
  """

  h: np.ndarray
  g: np.ndarray
  example_index: np.ndarray
  param_index: np.ndarray
  local_step: np.ndarray
  device_params: Any
  l2_clip_norm: float
  noise_multiplier: float

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
    )

  def to_arrays(self) -> dict[str, np.ndarray]:
    out: dict[str, Any] = {
      k: np.asarray(getattr(self, k))
      for k in ("h", "g", "example_index", "param_index", "local_step")
    }
    out["l2_clip_norm"] = np.float64(self.l2_clip_norm)
    out["noise_multiplier"] = np.float64(self.noise_multiplier)
    return out
