"""The jitted SL step and FSL round, and the one-release replay, over `protocol.split_step`."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from splitjax import defenses as defenses_lib
from splitjax import protocol
from splitjax.data.batching import Batch
from splitjax.privacy import transforms as dp_transforms
from splitjax.training.state import DPConfig
from splitjax.training.state import TrainState


def sides(model, batch) -> tuple[str, tuple[Any, Any], tuple[Any, Any]]:
  """(encoder params name, encoder inputs, head inputs) for the topology."""
  if model.spec.topology == "device_top":
    return "server", (batch.pub_cat, batch.pub_dense), (batch.priv_cat, batch.priv_dense)
  return "device", (batch.priv_cat, batch.priv_dense), (batch.pub_cat, batch.pub_dense)


def _privatizer(dp: DPConfig, key, defenses, y=None):
  """What the device applies to the rows it sends: the DP chain, or the defence chain around it
  (`splitjax.defenses.Plan`, static; None = the DP chain alone); ``y`` the rows' labels."""
  if defenses is None:
    return lambda x, mask: cut_layer_dp(x, dp, key, mask)
  return lambda x, mask: defenses_lib.defended_release(
    x, mask, key, dp.l2_clip_norm, dp.noise_multiplier, defenses, y
  )


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


def _head_privatizer(dp: DPConfig, key, device_dp: bool):
  """Device DP-SGD on the head's per-example gradients (noise key ``fold_in(key, 1)``), or None."""
  if not device_dp:
    return None
  return lambda grads, mask: device_dp_sgd(grads, dp, jax.random.fold_in(key, 1), mask)


def _head_step(model, params, h, head_in: tuple[Any, Any], y, mask, dp, key, device_dp: bool):
  """One device's head step (FSL); with ``device_dp`` its parameter gradient is privatised."""
  privatize = _head_privatizer(dp, key, device_dp)
  if privatize is None:
    return protocol.top_step(model, params, h, *head_in, y, mask)
  out = protocol.top_step_per_example(model, params, h, *head_in, y, mask)
  return out._replace(param_grads=privatize(out.param_grads, mask))


def smoothed_labels(y, defenses):
  """The device's training targets: ``y (1 - eps) + eps / 2`` with the chain's label smoothing
  eps (`splitjax.defenses.Plan.label_smoothing`); ``y`` itself without a chain or smoothing."""
  eps = 0.0 if defenses is None else defenses.label_smoothing
  if not eps:
    return y
  return y.astype(jnp.float32) * (1.0 - eps) + 0.5 * eps


def private_design(model, priv_cat, priv_dense) -> jax.Array:
  """``[N, sum(cards) + Pd]`` the rows' private features as numbers: one-hot codes, dense as is."""
  cards = model.spec.priv_cardinalities
  parts = [jax.nn.one_hot(priv_cat[:, j], k) for j, k in enumerate(cards)]
  return jnp.concatenate(parts + [jnp.asarray(priv_dense, jnp.float32)], axis=1)


def nopeek_grads(model, enc_params, enc_in, mask, alpha: float):
  """The device encoder's gradient of ``alpha dCor(x_priv, a)`` over a batch (``nopeek``;
  `splitjax.defenses.distance_correlation`), added to the gradient pulled back from the server."""
  encoder_apply = protocol.apply_fns(model)[0]
  x = private_design(model, *enc_in)

  def loss(params):
    a = protocol.encoder_forward(encoder_apply, params, enc_in)
    return alpha * defenses_lib.distance_correlation(x, a, mask)

  return jax.grad(loss)(enc_params)


def _split_forward_backward(
  model,
  enc_params,
  head_params,
  batch,
  dp,
  key,
  device_dp: bool = False,
  defenses=None,
):
  """One pass through the cut; (loss, enc_grads, head_grads, h_sent, g_sent, logits, nonfinite)."""
  _, enc_in, head_in = sides(model, batch)
  encoder_apply, head_apply = protocol.apply_fns(model)
  out = protocol.split_step(
    encoder_apply,
    head_apply,
    enc_params,
    head_params,
    enc_in,
    head_in,
    smoothed_labels(batch.y, defenses),
    batch.mask,
    topology=model.spec.topology,
    privatize=_privatizer(dp, key, defenses, batch.y),
    privatize_head_grads=_head_privatizer(dp, key, device_dp),
  )
  enc_grads = out.encoder_grads
  if defenses is not None and defenses.nopeek and model.spec.topology == "device_bottom":
    extra = nopeek_grads(model, enc_params, enc_in, batch.mask, defenses.nopeek)
    enc_grads = jax.tree.map(jnp.add, enc_grads, extra)
  return (
    out.loss,
    enc_grads,
    out.head_grads,
    out.h_sent,
    out.g_sent,
    out.logits,
    out.nonfinite,
  )


def _encoder_and_head(state: TrainState):
  """``(encoder params, head params)`` of ``state`` for its model's topology."""
  if state.model.spec.topology == "device_top":
    return state.server_params, state.device_params
  return state.device_params, state.server_params


@functools.partial(jax.jit, static_argnames=("device_dp", "defenses"), donate_argnums=(0,))
def sl_step(
  state: TrainState,
  batch: Batch,
  dp: DPConfig,
  *,
  device_dp: bool = False,
  defenses=None,
):
  """One SL step: ``(state, batch, dp, *, device_dp=False) ->
  (state, loss, h_sent [N, d], g_sent [N, d], nonfinite)``.

  Jitted at module level; the state is donated (pass a copy to keep the old one). The model and the
  optimisers come from the state's static fields. ``h_sent``/``g_sent`` are what crossed the wire
  (padded rows zero); ``nonfinite`` (int32) counts the rows the DP clip zeroed because they held an
  inf or NaN. The noise key is ``fold_in(state.key, state.step)``. ``device_dp`` (static) turns on
  device DP-SGD with ``dp``'s device fields; ``defenses`` (static, a `splitjax.defenses.Plan`)
  wraps the DP chain in a defence chain, and its ``label_smoothing`` eps trains the device's loss
  on ``y (1 - eps) + eps / 2`` (a defence of the label: the gradient's scale changes).
  """
  key = jax.random.fold_in(state.key, state.step)
  model = state.model
  device_top = model.spec.topology == "device_top"
  enc, head = _encoder_and_head(state)
  loss, enc_g, head_g, h_sent, g_sent, _, nonfinite = _split_forward_backward(
    model, enc, head, batch, dp, key, device_dp, defenses
  )
  server_g, device_g = (enc_g, head_g) if device_top else (head_g, enc_g)
  upd, server_opt = state.tx_server.update(server_g, state.server_opt, state.server_params)
  server = optax.apply_updates(state.server_params, upd)
  upd, device_opt = state.tx_device.update(device_g, state.device_opt, state.device_params)
  device = optax.apply_updates(state.device_params, upd)
  new = state.replace(
    server_params=server,
    device_params=device,
    server_opt=server_opt,
    device_opt=device_opt,
    step=state.step + 1,
  )
  return new, loss, h_sent, g_sent, nonfinite


def _masked_mean(tree, weights):
  w = weights / jnp.maximum(jnp.sum(weights), 1.0)

  def avg(x):
    wx = w.reshape((-1,) + (1,) * (x.ndim - 1))
    m = jnp.sum(x.astype(jnp.float32) * wx, axis=0)
    if jnp.issubdtype(x.dtype, jnp.integer):
      m = jnp.round(m)
    return m.astype(x.dtype)

  return jax.tree.map(avg, tree)


@functools.partial(
  jax.jit,
  static_argnames=(
    "local_steps",
    "device_dp",
    "return_device_params",
    "defenses",
  ),
  donate_argnums=(0,),
)
def fsl_round(
  state: TrainState,
  batch: Batch,
  device_mask,
  dp: DPConfig,
  *,
  local_steps: int,
  device_dp: bool = False,
  return_device_params: bool = False,
  defenses=None,
):
  """One FSL round: ``(state, batch [D, S, ...], device_mask [D], dp, *,
  local_steps, device_dp=False) -> (state, losses [local_steps], h, g, nonfinite)``.

  Jitted at module level (``local_steps``, ``device_dp`` and ``return_device_params`` static);
  the state is donated. ``h``/``g`` are ``[local_steps, D, S, d]``: what crossed the wire at each
  local step; the noise of local step t of round r uses ``fold_in(state.key, r * local_steps +
  t)``. With ``return_device_params`` a sixth output holds the parameters each device returned
  (leaves ``[D, ...]``, before FedAvg averages them: what the server receives). Only
  ``device_top`` is supported for FSL (ValueError otherwise).
  """
  model, tx_server, tx_device = state.model, state.tx_server, state.tx_device
  if model.spec.topology != "device_top":
    raise ValueError("FSL is implemented for topology='device_top' only")
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
      smoothed_labels(flat.y, defenses),
      flat.mask,
      topology="device_top",
      privatize=_privatizer(dp, key, defenses, flat.y),
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
  new = state.replace(
    server_params=server,
    device_params=device,
    server_opt=server_opt,
    device_opt=device_opt,
    step=state.step + 1,
  )
  if return_device_params:
    return new, losses, hs, gs, jnp.sum(nonfinite), phis
  return new, losses, hs, gs, jnp.sum(nonfinite)


@functools.partial(jax.jit, static_argnames=("defenses",))
def replay(state: TrainState, batch: Batch, dp: DPConfig, key, defenses=None):
  """Jitted ``(state, batch, dp, key) -> (h_sent [N, d], g_sent [N, d])``: one release per row.

  Nothing is donated or updated; the noise key is ``key`` itself; ``defenses`` (static) as in
  `sl_step`.
  """
  model = state.model
  enc, head = _encoder_and_head(state)
  _, _, _, h, g, _, _ = _split_forward_backward(model, enc, head, batch, dp, key, defenses=defenses)
  return h, g
