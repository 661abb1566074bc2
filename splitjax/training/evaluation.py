"""Evaluation of a trained split model: test logits and metrics, the no-DP cut-gradient norm."""

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


@functools.cache
def make_predict(model: models.SplitModel):
  """Jitted ``(server, device, batch) -> logits [N]`` (no DP: evaluation only)."""

  def predict(server, device, batch: Batch):
    device_top = model.spec.topology == "device_top"
    enc, head = (server, device) if device_top else (device, server)
    _, enc_in, head_in = sides(model, batch)
    h = protocol.bottom_forward(model, enc, *enc_in)
    return model.head_batch(head, h, *head_in)

  return jax.jit(predict)


def predict_logits(model, state: TrainState, split, batch_size: int = 4096) -> np.ndarray:
  """Test-time logits of every row of ``split`` (fixed-size padded batches)."""
  predict = make_predict(model)
  out = []
  idx = np.arange(len(split), dtype=np.int32)
  for start in range(0, len(idx), batch_size):
    part = idx[start : start + batch_size]
    logits = predict(
      state.server_params, state.device_params, split_to_batch(split, part, batch_size)
    )
    out.append(np.asarray(logits)[: len(part)])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def evaluate(model, state: TrainState, split) -> dict[str, float]:
  """Test AUC, log-loss and accuracy."""
  from splitjax import metrics  # local: metrics imports nothing from here

  logits = predict_logits(model, state, split)
  return {
    "auc": float(metrics.roc_auc(logits, split.y)),
    "log_loss": float(metrics.log_loss(logits, split.y)),
    "accuracy": float(metrics.binary_accuracy(logits, split.y)),
  }


@functools.cache
def make_cut_grad_norms(model: models.SplitModel):
  """Jitted ``(server, device, batch) -> ||g_i|| [N]`` without DP (for ``--dp_clip=auto``)."""

  def norms(server, device, batch: Batch):
    _, enc_in, head_in = sides(model, batch)
    h = protocol.bottom_forward(model, server, *enc_in)
    out = protocol.top_step(model, device, h, *head_in, batch.y, batch.mask)
    return jnp.linalg.norm(out.cut_grads, axis=-1)

  return jax.jit(norms)


def mean_cut_grad_norm(model, state: TrainState, split, batch_size: int = 4096) -> float:
  """Mean no-DP ``||g_i||`` over ``split`` under the parameters in ``state``."""
  if model.spec.topology != "device_top":
    raise ValueError("mean_cut_grad_norm is for device_top (g is a gradient)")
  fn = make_cut_grad_norms(model)
  total, count = 0.0, 0
  idx = np.arange(len(split), dtype=np.int32)
  for start in range(0, len(idx), batch_size):
    part = idx[start : start + batch_size]
    norms = fn(state.server_params, state.device_params, split_to_batch(split, part, batch_size))
    total += float(np.sum(np.asarray(norms)[: len(part)]))
    count += len(part)
  return total / max(count, 1)


@functools.cache
def make_predict_h(model: models.SplitModel):
  """Jitted ``(encoder_params, cat [N, P], dense [N, Pd]) -> h [N, d]`` (the encoder side)."""
  return jax.jit(lambda params, cat, dense: protocol.bottom_forward(model, params, cat, dense))
