"""Jitted split-learning (SL) and federated split-learning (FSL) training, evaluation, resume.

SL (DESIGN.md §1): one device, mini-batches; per step the server sends ``h``,
the device returns per-example ``g_i`` (after the cut-layer DP chain), both
sides update.

FSL: devices of ``samples_per_device`` examples share the device parameters.
Each round ``devices_per_round`` devices take ``local_steps`` steps from the
parameters at the start of the round (which the server therefore knows); the
server updates its own model after every local step with the gradients of all
devices of the round, then averages the devices' parameters and optimizer
states (FedAvg, equal weights). With ``local_steps=1`` and plain SGD a round
equals one SL step on the union of the round's examples.

Randomness: the data order of epoch ``e`` comes from
``np.random.default_rng([seed, e])``; the DP noise of step ``t`` from
``jax.random.fold_in(key, t)``. A run resumed from a checkpoint therefore
replays exactly the same computation.
"""

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from splitjax import models
from splitjax import protocol
from splitjax.multihost import put_global  # re-exported: training.put_global etc.
from splitjax.multihost import to_host  # re-exported: training.put_global etc.
from splitjax.privacy import transforms as dp_transforms


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
  """Optimiser recipe for both sides.

  Attributes:
    optimizer: ``'adam'``, ``'adagrad_torch'`` (PyTorch's Adagrad) or ``'sgd'``.
    learning_rate: step size.
    batch_size: SL batch size (FSL uses devices_per_round x samples_per_device).
    epochs: passes over the training data (= cut-layer releases per example in SL).
  """

  optimizer: str = "adam"
  learning_rate: float = 1e-3
  batch_size: int = 256
  epochs: int = 10


RECIPES = {
  # splitjax's tuned recipe.
  "tuned": Recipe(optimizer="adam", learning_rate=1e-3, batch_size=256, epochs=10),
  # The authors': PyTorch Adagrad(lr=0.01), batch 1024, 2 epochs.
  "paper": Recipe(optimizer="adagrad_torch", learning_rate=0.01, batch_size=1024, epochs=2),
}


@functools.cache
def make_optimizer(recipe: Recipe) -> optax.GradientTransformation:
  """One optax chain per side from the recipe.

  ``adagrad_torch`` is PyTorch's Adagrad (accumulator starts at 0; optax puts
  eps inside the square root and defaults differ, DESIGN.md §5). Cached, so
  the same recipe gives the same object and the jitted steps are reused.
  """
  if recipe.optimizer == "adam":
    return optax.adam(recipe.learning_rate)
  if recipe.optimizer == "adagrad_torch":
    return optax.adagrad(recipe.learning_rate, initial_accumulator_value=0.0, eps=0.0)
  if recipe.optimizer == "sgd":
    return optax.sgd(recipe.learning_rate)
  raise ValueError(f"unknown optimizer {recipe.optimizer!r}: choose adam, adagrad_torch or sgd")


@functools.cache
def server_optimizer(recipe: Recipe, freeze_server: bool = False) -> optax.GradientTransformation:
  """The server's optimiser; ``freeze_server`` keeps its parameters fixed."""
  return optax.set_to_zero() if freeze_server else make_optimizer(recipe)


class Batch(NamedTuple):
  """One batch; axis 0 is the example axis (FSL adds a leading device axis)."""

  pub_cat: Any
  pub_dense: Any
  priv_cat: Any
  priv_dense: Any
  y: Any
  mask: Any
  index: Any


class TrainState(NamedTuple):
  """Both sides' parameters and optimiser states, the step counter and the DP key."""

  server_params: Any
  device_params: Any
  server_opt: Any
  device_opt: Any
  step: jax.Array
  key: jax.Array


class DPConfig(NamedTuple):
  """DP knobs, traced (a sweep does not recompile per point).

  ``l2_clip_norm``/``noise_multiplier`` act on the cut layer (``inf``/0 = none).
  ``device_l2_clip_norm``/``device_noise_multiplier`` are device DP-SGD on the
  device parameters' per-example gradients (``inf``/0 = off): each device
  update (SL step, FSL local step) is clipped per example, summed, noised with
  N(0, (sigma_d C_d)^2) and averaged before it is applied (and, in FSL, before
  the server averages it).
  """

  l2_clip_norm: Any
  noise_multiplier: Any
  device_l2_clip_norm: Any = float("inf")
  device_noise_multiplier: Any = 0.0

  @property
  def device_dp(self) -> bool:
    """Whether device DP-SGD is on (a static, host-side decision)."""
    return bool(
      np.isfinite(float(self.device_l2_clip_norm)) or float(self.device_noise_multiplier) > 0
    )

  def as_arrays(self) -> "DPConfig":
    return DPConfig(*(jnp.float32(x) for x in self))


def no_dp() -> DPConfig:
  return DPConfig(jnp.float32(jnp.inf), jnp.float32(0.0), jnp.float32(jnp.inf), jnp.float32(0.0))


def init_state(model: models.SplitModel, tx_server, tx_device, seed: int) -> TrainState:
  """Initial parameters from ``jax.random.key(seed)``."""
  key = jax.random.key(seed)
  k_server, k_device, k_dp = jax.random.split(key, 3)
  server = model.server_init(k_server)
  device = model.device_init(k_device)
  return TrainState(
    server, device, tx_server.init(server), tx_device.init(device), jnp.zeros((), jnp.int32), k_dp
  )


def _sides(model, batch) -> tuple[str, tuple[Any, Any], tuple[Any, Any]]:
  """(encoder params name, encoder inputs, head inputs) for the topology."""
  if model.spec.topology == "device_top":
    return "server", (batch.pub_cat, batch.pub_dense), (batch.priv_cat, batch.priv_dense)
  return "device", (batch.priv_cat, batch.priv_dense), (batch.pub_cat, batch.pub_dense)


def cut_layer_dp(x, dp: DPConfig, key, mask):
  """The device's DP chain (clip each row, add Gaussian noise) on ``x [N, d]``.

  Returns ``(x_sent [N, d], nonfinite)``: padded rows are zero, and ``nonfinite`` (int32) counts
  the real rows that held an inf or NaN and were sent as zero rows (reported with the privacy
  report: a model that produces them needs attention, though the bound still holds).
  """
  tx = dp_transforms.cut_layer_dp(dp.l2_clip_norm, dp.noise_multiplier, key=key)
  out, _ = tx.update(x, tx.init(x))
  nonfinite = jnp.sum(dp_transforms.nonfinite_rows(x) & (mask > 0)).astype(jnp.int32)
  return out * mask[:, None].astype(out.dtype), nonfinite


def device_dp_sgd(per_example_grads, dp: DPConfig, key, mask):
  """Device DP-SGD: clip each example's gradient, sum, add noise, average over real rows.

  Padded rows' gradients are zero (the head step masks them); the number of real rows of the
  batch is public (fixed by the dataset and batch sizes), so dividing by it is post-processing.
  """
  tx = dp_transforms.dp_aggregate(
    dp.device_l2_clip_norm,
    dp.device_noise_multiplier,
    key=key,
    normalize_by=jnp.maximum(jnp.sum(mask), 1.0),
  )
  noisy_mean, _ = tx.update(per_example_grads, tx.init(per_example_grads))
  return noisy_mean


def _head_step(model, params, h, head_in: tuple[Any, Any], y, mask, dp, key, device_dp: bool):
  """One device's head step (FSL); with ``device_dp`` its parameter gradient is privatised."""
  if not device_dp:
    return protocol.top_step(model, params, h, *head_in, y, mask)
  out = protocol.top_step_per_example(model, params, h, *head_in, y, mask)
  grads = device_dp_sgd(out.param_grads, dp, jax.random.fold_in(key, 1), mask)
  return out._replace(param_grads=grads)


def _split_forward_backward(
  model, enc_params, head_params, batch, dp, key, device_dp: bool = False
):
  """One pass through the cut; (loss, enc_grads, head_grads, h_sent, g_sent, logits, nonfinite)."""
  _, enc_in, head_in = _sides(model, batch)
  encoder_apply, head_apply = protocol.apply_fns(model)
  head_privatizer = None
  if device_dp:  # the device's parameter gradient is privatised too (device DP-SGD)
    head_privatizer = lambda grads, mask: device_dp_sgd(grads, dp, jax.random.fold_in(key, 1), mask)
  out = protocol.split_step(
    encoder_apply,
    head_apply,
    enc_params,
    head_params,
    enc_in,
    head_in,
    batch.y,
    batch.mask,
    topology=model.spec.topology,
    privatize=lambda x, mask: cut_layer_dp(x, dp, key, mask),
    privatize_head_grads=head_privatizer,
  )
  return (
    out.loss,
    out.encoder_grads,
    out.head_grads,
    out.h_sent,
    out.g_sent,
    out.logits,
    out.nonfinite,
  )


@functools.cache
def make_sl_step(model: models.SplitModel, tx_server, tx_device, device_dp: bool = False):
  """Jitted SL step ``(state, batch, dp) -> (state, loss, h_sent[N, d], g_sent[N, d], nonfinite)``.

  The state is donated. ``h_sent``/``g_sent`` are what crossed the wire; ``nonfinite`` (int32)
  counts the rows the DP clip zeroed because they held an inf or NaN.
  ``device_dp`` (static) turns on device DP-SGD with ``dp``'s device fields.
  """

  def step(state: TrainState, batch: Batch, dp: DPConfig):
    key = jax.random.fold_in(state.key, state.step)
    device_top = model.spec.topology == "device_top"
    enc, head = (
      (state.server_params, state.device_params)
      if device_top
      else (state.device_params, state.server_params)
    )
    loss, enc_g, head_g, h_sent, g_sent, _, nonfinite = _split_forward_backward(
      model, enc, head, batch, dp, key, device_dp
    )
    server_g, device_g = (enc_g, head_g) if device_top else (head_g, enc_g)
    upd, server_opt = tx_server.update(server_g, state.server_opt, state.server_params)
    server = optax.apply_updates(state.server_params, upd)
    upd, device_opt = tx_device.update(device_g, state.device_opt, state.device_params)
    device = optax.apply_updates(state.device_params, upd)
    new = TrainState(server, device, server_opt, device_opt, state.step + 1, state.key)
    return new, loss, h_sent, g_sent, nonfinite

  return jax.jit(step, donate_argnums=(0,))


def _masked_mean(tree, weights):
  w = weights / jnp.maximum(jnp.sum(weights), 1.0)

  def avg(x):
    wx = w.reshape((-1,) + (1,) * (x.ndim - 1))
    m = jnp.sum(x.astype(jnp.float32) * wx, axis=0)
    if jnp.issubdtype(x.dtype, jnp.integer):
      m = jnp.round(m)
    return m.astype(x.dtype)

  return jax.tree.map(avg, tree)


@functools.cache
def make_fsl_round(
  model: models.SplitModel, tx_server, tx_device, local_steps: int, device_dp: bool = False
):
  """Jitted FSL round: ``(state, batch[D, S, ...], device_mask[D], dp)`` ->
  ``(state, losses, h, g, nonfinite)``.

  ``h``/``g`` are ``[local_steps, D, S, d]``: what crossed the wire at each
  local step. Only ``device_top`` is supported for FSL.
  """
  if model.spec.topology != "device_top":
    raise ValueError("FSL is implemented for topology='device_top' only")

  def round_fn(state: TrainState, batch: Batch, device_mask, dp: DPConfig):
    num_dev = batch.y.shape[0]
    bcast = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (num_dev,) + x.shape), t)
    phis, opts = bcast(state.device_params), bcast(state.device_opt)
    flat = jax.tree.map(lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), batch)
    encoder_apply, head_apply = protocol.apply_fns(model)

    def local(carry, t):
      server, server_opt, phis, opts = carry
      key = jax.random.fold_in(state.key, state.step * local_steps + t)
      dev_keys = jax.random.split(jax.random.fold_in(key, 2), num_dev)

      def device_heads(phis_, h, x_head, y, mask):  # each device's head on its own rows
        out = jax.vmap(
          lambda p, hh, c, dd, yy, mm, kk: _head_step(
            model, p, hh, (c, dd), yy, mm, dp, kk, device_dp
          )
        )(
          phis_,
          h.reshape(batch.y.shape + h.shape[-1:]),
          x_head[0],
          x_head[1],
          y.reshape(batch.y.shape),
          mask.reshape(batch.y.shape),
          dev_keys,
        )
        return out._replace(cut_grads=out.cut_grads.reshape(h.shape))

      cut = protocol.split_step(
        encoder_apply,
        head_apply,
        server,
        phis,
        (flat.pub_cat, flat.pub_dense),
        (batch.priv_cat, batch.priv_dense),
        flat.y,
        flat.mask,
        topology="device_top",
        privatize=lambda x, mask: cut_layer_dp(x, dp, key, mask),
        head_step_fn=device_heads,
      )
      hd = cut.h_sent.reshape(batch.y.shape + cut.h_sent.shape[-1:])
      upd, server_opt = tx_server.update(cut.encoder_grads, server_opt, server)
      server = optax.apply_updates(server, upd)
      upd, opts = jax.vmap(tx_device.update)(cut.head_grads, opts, phis)
      phis = jax.vmap(optax.apply_updates)(phis, upd)
      loss = jnp.sum(cut.loss * device_mask) / jnp.maximum(jnp.sum(device_mask), 1.0)
      g_sent = cut.g_sent.reshape(hd.shape)
      return (server, server_opt, phis, opts), (loss, hd, g_sent, cut.nonfinite)

    (server, server_opt, phis, opts), (losses, hs, gs, nonfinite) = jax.lax.scan(
      local, (state.server_params, state.server_opt, phis, opts), jnp.arange(local_steps)
    )
    device = _masked_mean(phis, device_mask.astype(jnp.float32))
    device_opt = _masked_mean(opts, device_mask.astype(jnp.float32))
    new = TrainState(server, device, server_opt, device_opt, state.step + 1, state.key)
    return new, losses, hs, gs, jnp.sum(nonfinite)

  return jax.jit(round_fn, donate_argnums=(0,))


# ---------------------------------------------------------------- host-side data


def split_to_batch(split, idx: np.ndarray, size: int) -> Batch:
  """Rows ``idx`` of a data split padded to ``size`` rows (mask marks real rows)."""
  n = len(idx)
  pad = size - n
  take = np.concatenate([idx, np.zeros(pad, idx.dtype)]) if pad else idx
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  index = np.concatenate([idx, np.full(pad, -1, idx.dtype)]).astype(np.int32)
  return Batch(
    split.pub_cat[take],
    split.pub_dense[take],
    split.priv_cat[take],
    split.priv_dense[take],
    split.y[take],
    mask,
    index,
  )


def sl_batches(split, batch_size: int, seed: int, epoch: int) -> Iterator[Batch]:
  """Shuffled fixed-size batches of one epoch (the last one padded)."""
  order = np.random.default_rng([seed, epoch]).permutation(len(split)).astype(np.int32)
  for start in range(0, len(order), batch_size):
    yield split_to_batch(split, order[start : start + batch_size], batch_size)


def device_partition(num_examples: int, samples_per_device: int, seed: int) -> np.ndarray:
  """Fixed assignment of examples to devices: ``[num_devices, S]`` (``-1`` = empty slot)."""
  order = np.random.default_rng([seed, 10_000]).permutation(num_examples).astype(np.int32)
  num_dev = math.ceil(num_examples / samples_per_device)
  slots = np.full(num_dev * samples_per_device, -1, np.int32)
  slots[:num_examples] = order
  return slots.reshape(num_dev, samples_per_device)


def fsl_rounds(
  split, partition: np.ndarray, devices_per_round: int, seed: int, epoch: int
) -> Iterator[tuple[Batch, np.ndarray]]:
  """Rounds of one FSL epoch, each device once: yields ``(batch[D, S], device_mask[D])``."""
  num_dev, spd = partition.shape
  order = np.random.default_rng([seed, epoch]).permutation(num_dev)
  for start in range(0, num_dev, devices_per_round):
    devs = order[start : start + devices_per_round]
    slots = partition[devs]
    dmask = np.ones(devices_per_round, np.float32)
    if len(devs) < devices_per_round:
      pad = devices_per_round - len(devs)
      slots = np.concatenate([slots, np.full((pad, spd), -1, np.int32)])
      dmask[len(devs) :] = 0
    flat = slots.reshape(-1)
    valid = flat >= 0
    b = split_to_batch(split, np.where(valid, flat, 0).astype(np.int32), len(flat))
    b = b._replace(mask=valid.astype(np.float32), index=np.where(valid, flat, -1).astype(np.int32))
    yield jax.tree.map(lambda x: x.reshape((devices_per_round, spd) + x.shape[1:]), b), dmask


# ---------------------------------------------------------------- evaluation


@functools.cache
def make_predict(model: models.SplitModel):
  """Jitted ``(server, device, batch) -> logits [N]`` (no DP: evaluation only)."""

  def predict(server, device, batch: Batch):
    device_top = model.spec.topology == "device_top"
    enc, head = (server, device) if device_top else (device, server)
    _, enc_in, head_in = _sides(model, batch)
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
    _, enc_in, head_in = _sides(model, batch)
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


class ProgressPrinter:
  """Hands one progress line per ``every`` seconds to ``printer`` (progress on long runs).

  The first step includes compilation, so the rate behind the ETA is measured from the end of the
  first step on; until a second step has finished no ETA is given.
  """

  def __init__(
    self, total: int, label: str, every: float = 5.0, printer: Callable[[str], None] | None = None
  ):
    self.total, self.label, self.every = total, label, every
    self.printer = printer if printer is not None else (lambda line: None)
    self.start = self.last = time.time()
    self.first_done: float | None = None  # time at which the first (compiling) step finished

  def __call__(self, done: int, extra: str = ""):
    now = time.time()
    if done >= 1 and self.first_done is None:
      self.first_done = now
    if now - self.last >= self.every or done == self.total:
      self.last = now
      if done >= 2 and self.first_done is not None and now > self.first_done:
        rate = (done - 1) / (now - self.first_done)
        eta = f"eta {(self.total - done) / rate:.1f}s"
      else:
        eta = "eta after the first compiled step"
      self.printer(
        f"[{self.label}] {done}/{self.total} ({100.0 * done / max(self.total, 1):.0f}%)"
        f" {now - self.start:.1f}s elapsed, {eta} {extra}".rstrip()
      )


# ---------------------------------------------------------------- the training loop


class FitResult(NamedTuple):
  """Output of :func:`fit`.

  Attributes:
    state: final :class:`TrainState`.
    transcript: the cut-layer traffic of the last epoch
      (:class:`splitjax.protocol.Transcript`), or None when not recorded.
    history: one dict per epoch run in this call (loss, seconds).
    seconds: wall time of the epochs run in this call.
    releases: ``[num_train]`` int64, the cut-layer rows each training example sent in the
      epochs run in this call, counted by the loop (SL: one per epoch; FSL: ``local_steps`` per
      epoch). What the accountant's k must equal (``experiments`` checks it).
  """

  state: TrainState
  transcript: Any
  history: list
  seconds: float
  releases: np.ndarray | None = None


def fit(
  model: models.SplitModel,
  train_split,
  *,
  recipe: Recipe,
  seed: int,
  protocol_name: str = "sl",
  dp: DPConfig | None = None,
  samples_per_device: int = 16,
  devices_per_round: int = 16,
  local_steps: int = 2,
  labels: np.ndarray | None = None,
  state: TrainState | None = None,
  freeze_server: bool = False,
  data_parallel: bool | None = None,
  start_epoch: int = 0,
  record_last_epoch: bool = True,
  on_epoch_end: Callable[[int, TrainState, dict], None] | None = None,
  on_transcript: Callable[[Any], None] | None = None,
  progress: Callable[[str], None] | None = None,
) -> FitResult:
  """Trains a split model with SL or FSL.

  Args:
    model: the split model.
    train_split: a :class:`splitjax.data.Split`.
    recipe: optimiser, learning rate, batch size, epochs.
    seed: seeds the initial parameters, the data order and the DP noise.
    protocol_name: ``'sl'`` or ``'fsl'``.
    dp: cut-layer DP (traced); None = no DP.
    samples_per_device, devices_per_round, local_steps: FSL shape.
    labels: labels to train on instead of ``train_split.y`` (label DP draws
      them once, before training).
    freeze_server: keep the server's parameters at initialisation (what
      ``noise_multiplier = inf`` means: the server learns nothing from ``g``).
    data_parallel: shard every batch over all devices along a 1-D mesh axis
      ``'data'`` (the state is replicated; XLA inserts the reductions). None =
      whenever there is more than one device and the batch (FSL: devices per
      round) divides evenly. Results equal the single-device ones up to
      floating-point summation order.
    state: resume from this state (``start_epoch`` epochs already done).
    start_epoch: first epoch to run.
    record_last_epoch: keep the last epoch's transcript.
    on_epoch_end: ``callback(epoch, state, epoch_log)`` after each epoch
      (checkpointing). The state is donated to the next step afterwards: copy
      what must outlive the callback.
    on_transcript: ``callback(transcript)`` once the last epoch's transcript is
      complete, before that epoch's ``on_epoch_end``.
    progress: called with each progress line (per-step lines every few seconds and one line
      per epoch with its training loss), or None (the default: the library prints nothing).

  Returns:
    :class:`FitResult`.
  """
  if protocol_name not in ("sl", "fsl"):
    raise ValueError(f"unknown protocol {protocol_name!r}: choose 'sl' or 'fsl'")
  dp = no_dp() if dp is None else DPConfig(*dp).as_arrays()
  if labels is not None:
    train_split = dataclasses.replace(train_split, y=np.asarray(labels, np.int32))
  tx = make_optimizer(recipe)
  tx_server = server_optimizer(recipe, freeze_server)
  if state is None:
    state = init_state(model, tx_server, tx, seed)
  if protocol_name == "sl":
    step_fn = make_sl_step(model, tx_server, tx, dp.device_dp)
    steps_per_epoch = math.ceil(len(train_split) / recipe.batch_size)
  else:
    round_fn = make_fsl_round(model, tx_server, tx, local_steps, dp.device_dp)
    partition = device_partition(len(train_split), samples_per_device, seed)
    steps_per_epoch = math.ceil(partition.shape[0] / devices_per_round)
  shard = _data_sharding(
    data_parallel, recipe.batch_size if protocol_name == "sl" else devices_per_round
  )
  if shard is not None:
    state = put_global(state, shard.replicated)
  history, transcript = [], None
  releases = np.zeros(len(train_split), np.int64)  # rows each example sent, counted here
  t_all = time.time()
  for epoch in range(start_epoch, recipe.epochs):
    t0 = time.time()
    record = record_last_epoch and epoch == recipe.epochs - 1
    rec = _Recorder() if record else None
    bar = (
      ProgressPrinter(
        steps_per_epoch, f"{protocol_name} epoch {epoch + 1}/{recipe.epochs}", printer=progress
      )
      if progress
      else None
    )
    losses, nonfinite = [], []
    if protocol_name == "sl":
      it = sl_batches(train_split, recipe.batch_size, seed, epoch)
      for i, batch in enumerate(it):
        np.add.at(releases, batch.index[batch.mask > 0], 1)
        if shard is not None:
          batch = put_global(batch, shard.batch)
        if rec is not None:
          rec.add_params(state.device_params)
        state, loss, h, g, bad = step_fn(state, batch, dp)
        losses.append(loss)
        nonfinite.append(bad)
        if rec is not None:
          rec.add(h, g, batch.index, batch.mask, np.zeros(len(batch.mask), np.int32))
        if bar:
          bar(i + 1)
    else:
      for i, (batch, dmask) in enumerate(
        fsl_rounds(train_split, partition, devices_per_round, seed, epoch)
      ):
        np.add.at(releases, batch.index[batch.mask > 0], local_steps)
        if shard is not None:
          batch, dmask = put_global((batch, dmask), shard.batch)
        if rec is not None:
          rec.add_params(state.device_params)
        state, loss, hs, gs, bad = round_fn(state, batch, dmask, dp)
        losses.append(jnp.mean(loss))
        nonfinite.append(bad)
        if rec is not None:
          flat_mask = to_host(batch.mask).reshape(-1)
          flat_index = to_host(batch.index).reshape(-1)
          hs, gs = to_host(hs), to_host(gs)
          for t in range(local_steps):
            rec.add(
              hs[t].reshape(-1, hs.shape[-1]),
              gs[t].reshape(-1, gs.shape[-1]),
              flat_index,
              flat_mask,
              np.full(len(flat_mask), t, np.int32),
            )
        if bar:
          bar(i + 1)
    loss = float(np.mean([to_host(x) for x in losses])) if losses else float("nan")
    if not np.isfinite(loss):
      raise FloatingPointError(
        f"training loss became {loss} in epoch {epoch + 1}: "
        "lower the learning rate or check the data for extreme values"
      )
    log = {
      "epoch": epoch + 1,
      "train_loss": loss,
      "seconds": time.time() - t0,
      "nonfinite_rows_zeroed": int(sum(int(to_host(x)) for x in nonfinite)),
    }
    history.append(log)
    if progress:
      progress(
        f"[{protocol_name}] epoch {epoch + 1}/{recipe.epochs}: train loss {loss:.4f} "
        f"({log['seconds']:.1f} s)"
      )
    if rec is not None:
      transcript = rec.finish(dp)
      if on_transcript is not None:
        on_transcript(transcript)
    if on_epoch_end is not None:
      on_epoch_end(epoch, state, log)
  return FitResult(state, transcript, history, time.time() - t_all, releases)


class _Sharding(NamedTuple):
  batch: jax.sharding.NamedSharding  # axis 0 split over the 'data' mesh axis
  replicated: jax.sharding.NamedSharding  # every device holds a copy


def _data_sharding(data_parallel: bool | None, leading: int) -> _Sharding | None:
  """Shardings of a 1-D ``'data'`` mesh over all devices, or None for one device."""
  n = jax.device_count()
  if data_parallel is False or n == 1:
    return None
  if leading % n:
    if data_parallel:
      raise ValueError(
        f"data_parallel needs the batch axis ({leading}) to be a multiple of "
        f"the {n} devices: change the batch size (FSL: devices_per_round)"
      )
    return None
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  P = jax.sharding.PartitionSpec
  return _Sharding(
    jax.sharding.NamedSharding(mesh, P("data")), jax.sharding.NamedSharding(mesh, P())
  )


class _Recorder:
  """Accumulates the cut-layer traffic of one epoch on the host."""

  def __init__(self):
    self.h, self.g, self.index, self.pidx, self.local = [], [], [], [], []
    self.params = []

  def add_params(self, params):
    self.params.append(jax.tree.map(to_host, params))

  def add(self, h, g, index, mask, local_step):
    keep = to_host(mask) > 0
    self.h.append(to_host(h)[keep])
    self.g.append(to_host(g)[keep])
    self.index.append(to_host(index)[keep])
    self.pidx.append(np.full(int(keep.sum()), len(self.params) - 1, np.int32))
    self.local.append(to_host(local_step)[keep])

  def finish(self, dp: DPConfig) -> protocol.Transcript:
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *self.params)
    return protocol.Transcript(
      h=np.concatenate(self.h),
      g=np.concatenate(self.g),
      example_index=np.concatenate(self.index).astype(np.int32),
      param_index=np.concatenate(self.pidx),
      local_step=np.concatenate(self.local),
      device_params=stacked,
      l2_clip_norm=float(dp.l2_clip_norm),
      noise_multiplier=float(dp.noise_multiplier),
    )


@functools.cache
def make_replay(model: models.SplitModel):
  """Jitted ``(server, device, batch, dp, key) -> (h_sent, g_sent)``: one release per row."""

  def replay(server, device, batch: Batch, dp: DPConfig, key):
    device_top = model.spec.topology == "device_top"
    enc, head = (server, device) if device_top else (device, server)
    _, _, _, h, g, _, _ = _split_forward_backward(model, enc, head, batch, dp, key)
    return h, g

  return jax.jit(replay)


def replay_transcript(
  model,
  state: TrainState,
  split,
  *,
  dp: DPConfig | None = None,
  seed: int = 0,
  num_examples: int | None = None,
  batch_size: int = 1024,
) -> protocol.Transcript:
  """Sends every row of ``split`` once through the final model (one DP release each).

  This is what the server observes when test users are attacked (DESIGN.md §2).
  The DP noise of chunk ``c`` uses ``fold_in(key(seed), c)``.
  """
  dp = no_dp() if dp is None else DPConfig(*dp).as_arrays()
  n = len(split) if num_examples is None else min(num_examples, len(split))
  fn = make_replay(model)
  key = jax.random.key(seed)
  hs, gs = [], []
  for c, start in enumerate(range(0, n, batch_size)):
    part = np.arange(start, min(start + batch_size, n), dtype=np.int32)
    h, g = fn(
      state.server_params,
      state.device_params,
      split_to_batch(split, part, batch_size),
      dp,
      jax.random.fold_in(key, c),
    )
    hs.append(np.asarray(h)[: len(part)])
    gs.append(np.asarray(g)[: len(part)])
  params = jax.tree.map(lambda x: np.asarray(x)[None], jax.device_get(state.device_params))
  return protocol.Transcript(
    h=np.concatenate(hs),
    g=np.concatenate(gs),
    example_index=np.arange(n, dtype=np.int32),
    param_index=np.zeros(n, np.int32),
    local_step=np.zeros(n, np.int32),
    device_params=params,
    l2_clip_norm=float(dp.l2_clip_norm),
    noise_multiplier=float(dp.noise_multiplier),
  )


@functools.cache
def make_predict_h(model: models.SplitModel):
  """Jitted ``(encoder_params, cat [N, P], dense [N, Pd]) -> h [N, d]`` (the encoder side)."""
  return jax.jit(lambda params, cat, dense: protocol.bottom_forward(model, params, cat, dense))


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int) -> None:
  """``jax.distributed.initialize`` for multi-host runs (CPU collectives over gloo).

  Every process runs the same program on the same data; :func:`fit` with
  ``data_parallel`` then shards each batch across all processes' devices.
  """
  # Must run before any backend starts; only the CPU client reads this option.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
