"""Evaluation of a trained split model: test logits and metrics, and the public clip norm.

The clip norm of ``--dp_clip=auto`` (`auto_clip_norm`) sits here beside the no-DP cut-gradient
norm it is computed from (`mean_cut_grad_norm`), on the public view of the training rows
(`public_clip_split`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from splitjax import models
from splitjax import protocol
from splitjax.data.batching import Batch
from splitjax.data.batching import split_to_batch
from splitjax.training.state import TrainState
from splitjax.training.steps import sides

# What `auto_clip_norm` reads, in the words of the run's records (``clip_source``).
AUTO_CLIP_SOURCE = (
  "public: half the mean ||g_i|| under the initial model on the server's own rows, "
  "private values and labels drawn uniformly from their domains"
)


@functools.partial(jax.jit, static_argnums=(0, 4))
def predict(
  model: models.SplitModel, server, device, batch: Batch, zero_cut: bool = False
) -> jax.Array:
  """Jitted ``(model, server, device, batch) -> logits [N]`` (no DP: evaluation only).

  ``model`` is static (jit's cache is keyed on it). ``zero_cut`` (static): the head reads zero
  rows in place of the cut activations, as it did in training when nothing was sent (device_bottom
  at noise multiplier inf: the server's model of its own features alone).
  """
  device_top = model.spec.topology == "device_top"
  enc, head = (server, device) if device_top else (device, server)
  _, enc_in, head_in = sides(model, batch)
  h = protocol.bottom_forward(model, enc, *enc_in)
  if zero_cut:
    h = jnp.zeros_like(h)
  return model.head_batch(head, h, *head_in)


def predict_logits(
  model, state: TrainState, split, batch_size: int = 4096, *, zero_cut: bool = False
) -> np.ndarray:
  """Test-time logits of every row of ``split`` (fixed-size padded batches). ``[len(split)]``.

  ``zero_cut``: see `predict`.
  """
  out = []
  idx = np.arange(len(split), dtype=np.int32)
  for start in range(0, len(idx), batch_size):
    part = idx[start : start + batch_size]
    logits = predict(
      model,
      state.server_params,
      state.device_params,
      split_to_batch(split, part, batch_size),
      zero_cut,
    )
    out.append(np.asarray(logits)[: len(part)])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def evaluate(model, state: TrainState, split, *, zero_cut: bool = False) -> dict[str, float]:
  """Test AUC, log-loss and accuracy (``zero_cut``: see `predict`)."""
  from splitjax import metrics  # local: metrics imports nothing from here

  logits = predict_logits(model, state, split, zero_cut=zero_cut)
  return {
    "auc": float(metrics.roc_auc(logits, split.y)),
    "log_loss": float(metrics.log_loss(logits, split.y)),
    "accuracy": float(metrics.binary_accuracy(logits, split.y)),
  }


@functools.partial(jax.jit, static_argnums=(0,))
def cut_grad_norms(model: models.SplitModel, server, device, batch: Batch) -> jax.Array:
  """Jitted ``(model, server, device, batch) -> ||g_i|| [N]`` without DP (``device_top``)."""
  _, enc_in, head_in = sides(model, batch)
  h = protocol.bottom_forward(model, server, *enc_in)
  out = protocol.top_step(model, device, h, *head_in, batch.y, batch.mask)
  return jnp.linalg.norm(out.cut_grads, axis=-1)


def mean_cut_grad_norm(model, state: TrainState, split, batch_size: int = 4096) -> float:
  """Mean no-DP ``||g_i||`` over ``split`` under the parameters in ``state``."""
  if model.spec.topology != "device_top":
    raise ValueError("mean_cut_grad_norm is for device_top (g is a gradient)")
  total, count = 0.0, 0
  idx = np.arange(len(split), dtype=np.int32)
  for start in range(0, len(idx), batch_size):
    part = idx[start : start + batch_size]
    norms = cut_grad_norms(
      model, state.server_params, state.device_params, split_to_batch(split, part, batch_size)
    )
    total += float(np.sum(np.asarray(norms)[: len(part)]))
    count += len(part)
  return total / max(count, 1)


def public_clip_split(dataset, seed: int):
  """The training rows of ``dataset`` (a `splitjax.data.TabularData`) as the server sees them.

  Server features are the server's own; private categorical values, private dense values (in
  their scaled range [0, 1]) and labels are drawn uniformly from the public domains with
  ``np.random.default_rng([seed, 11])``, so anything computed from it is public.
  """
  train = dataset.train
  rng = np.random.default_rng([seed, 11])
  n = len(train)
  priv_cat = (
    np.stack([rng.integers(0, k, n) for k in dataset.priv_cardinalities], axis=1)
    if dataset.priv_cardinalities
    else train.priv_cat
  )
  return dataclasses.replace(
    train,
    priv_cat=priv_cat.astype(np.int32),
    priv_dense=rng.random(train.priv_dense.shape).astype(np.float32),
    y=rng.integers(0, 2, n).astype(np.int32),
    p_y_pub=None,
    p_y_full=None,
    p_priv_pub=None,
  )


def auto_clip_norm(model, init_state: TrainState, dataset, seed: int) -> tuple[float, float]:
  """The clip norm of ``--dp_clip=auto``: ``(C, mean_norm)`` with ``C = mean_norm / 2``.

  ``mean_norm`` is `mean_cut_grad_norm` under the initial parameters ``init_state`` on
  `public_clip_split` ``(dataset, seed)``: public information only (the server's own features,
  hence ``h``, under the initial model; private values and labels uniform over their public
  domains). A C computed from the private gradients would itself be an unaccounted release (and
  would read the true labels, voiding label DP). ``device_top`` only (ValueError otherwise).
  """
  if model.spec.topology != "device_top":
    raise ValueError("the auto clip is defined for gradients (device_top): give a clip norm")
  mean_norm = mean_cut_grad_norm(model, init_state, public_clip_split(dataset, seed))
  return 0.5 * mean_norm, mean_norm


@functools.partial(jax.jit, static_argnums=(0,))
def predict_h(model: models.SplitModel, params, cat, dense) -> jax.Array:
  """Jitted ``(model, encoder_params, cat [N, P], dense [N, Pd]) -> h [N, d]`` (the encoder)."""
  return protocol.bottom_forward(model, params, cat, dense)
