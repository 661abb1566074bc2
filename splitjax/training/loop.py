"""The training loop (`fit`) and its transcript recorder, and the test replay."""

import dataclasses
import math
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from splitjax import models
from splitjax import protocol
from splitjax.data.batching import device_partition
from splitjax.data.batching import fsl_rounds
from splitjax.data.batching import sl_batches
from splitjax.data.batching import split_to_batch
from splitjax.multihost import put_global
from splitjax.multihost import to_host
from splitjax.training.state import DPConfig
from splitjax.training.state import Recipe
from splitjax.training.state import TrainState
from splitjax.training.state import init_state
from splitjax.training.state import no_dp
from splitjax.training.steps import fsl_round
from splitjax.training.steps import replay
from splitjax.training.steps import sl_step

RECORD = ("last_epoch", "all", "none")  # the epochs `fit` records (its `record` argument)


class FitResult(NamedTuple):
  """Output of :func:`fit`.

  Attributes:
    state: final :class:`TrainState`.
    transcript: the cut-layer traffic of the last epoch
      (:class:`splitjax.protocol.Transcript`), or None when not recorded (with
      ``record='all'`` the earlier epochs went to ``on_transcript`` only).
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
  record: str = "last_epoch",
  on_epoch_end: Callable[[int, TrainState, dict], None] | None = None,
  on_transcript: Callable[[int, Any], None] | None = None,
  on_step: Callable[[int, int, int], None] | None = None,
  defenses=None,
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
    record: which epochs' cut-layer traffic is recorded (a name in ``RECORD``): ``'last_epoch'``
      (the default), ``'all'`` (every release of every example, one transcript per epoch with
      the device parameters behind each row, handed to ``on_transcript`` as the epoch ends and
      then dropped, so host memory holds one epoch) or ``'none'``.
    on_epoch_end: ``callback(epoch, state, epoch_log)`` after each epoch
      (checkpointing). The state is donated to the next step afterwards: copy
      what must outlive the callback.
    on_transcript: ``callback(epoch, transcript)`` once a recorded epoch's transcript is
      complete, before that epoch's ``on_epoch_end``.
    defenses: a `splitjax.defenses.Plan` the device wraps around its DP chain (None: the DP
      chain alone), its label smoothing included; static for the jitted steps.
    on_step: ``callback(epoch, done, total)`` after each step (SL) or round (FSL) of an epoch,
      ``done`` of ``total``; progress lines are the caller's (the library prints nothing).
      The step has been dispatched, not necessarily finished (JAX is asynchronous).

  Returns:
    :class:`FitResult`.
  """
  if protocol_name not in ("sl", "fsl"):
    raise ValueError(f"unknown protocol {protocol_name!r}: choose 'sl' or 'fsl'")
  if record not in RECORD:
    raise ValueError(f"unknown record {record!r}: choose one of {RECORD}")
  dp = no_dp() if dp is None else DPConfig(*dp).as_arrays()
  if labels is not None:
    train_split = dataclasses.replace(train_split, y=np.asarray(labels, np.int32))
  if state is None:
    state = init_state(model, recipe, seed, freeze_server=freeze_server)
  else:  # the arguments decide, as they did before the state carried them
    state = state.replace(model=model, recipe=recipe, freeze_server=bool(freeze_server))
  device_dp = dp.device_dp
  if protocol_name == "sl":
    steps_per_epoch = math.ceil(len(train_split) / recipe.batch_size)
  else:
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
    last = epoch == recipe.epochs - 1
    rec = _Recorder() if (record == "all" or (record == "last_epoch" and last)) else None
    losses, nonfinite = [], []
    if protocol_name == "sl":
      it = sl_batches(train_split, recipe.batch_size, seed, epoch)
      for i, batch in enumerate(it):
        np.add.at(releases, batch.index[batch.mask > 0], 1)
        if shard is not None:
          batch = put_global(batch, shard.batch)
        if rec is not None:
          rec.add_params(state.device_params)
        state, loss, h, g, bad = sl_step(
          state,
          batch,
          dp,
          device_dp=device_dp,
          defenses=defenses,
        )
        losses.append(loss)
        nonfinite.append(bad)
        if rec is not None:
          rec.add(h, g, batch.index, batch.mask, np.zeros(len(batch.mask), np.int32))
        if on_step is not None:
          on_step(epoch, i + 1, steps_per_epoch)
    else:
      for i, (batch, dmask) in enumerate(
        fsl_rounds(train_split, partition, devices_per_round, seed, epoch)
      ):
        np.add.at(releases, batch.index[batch.mask > 0], local_steps)
        if shard is not None:
          batch, dmask = put_global((batch, dmask), shard.batch)
        if rec is not None:
          rec.add_params(state.device_params)
          rec.add_opt(state.device_opt)
        # One compiled round for recorded and unrecorded epochs: the returned parameters stay on
        # the device unless recorded.
        state, loss, hs, gs, bad, returned = fsl_round(
          state,
          batch,
          dmask,
          dp,
          local_steps=local_steps,
          device_dp=device_dp,
          return_device_params=True,
          defenses=defenses,
        )
        losses.append(jnp.mean(loss))
        nonfinite.append(bad)
        if rec is not None:
          rec.add_update(returned)
          num_dev, per_dev = batch.mask.shape
          flat_mask = to_host(batch.mask).reshape(-1)
          flat_index = to_host(batch.index).reshape(-1)
          slot = np.repeat(np.arange(num_dev, dtype=np.int32), per_dev)
          hs, gs = to_host(hs), to_host(gs)
          for t in range(local_steps):
            rec.add(
              hs[t].reshape(-1, hs.shape[-1]),
              gs[t].reshape(-1, gs.shape[-1]),
              flat_index,
              flat_mask,
              np.full(len(flat_mask), t, np.int32),
              slot,
            )
        if on_step is not None:
          on_step(epoch, i + 1, steps_per_epoch)
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
    if rec is not None:
      epoch_transcript = rec.finish(dp)
      if last:
        transcript = epoch_transcript
      if on_transcript is not None:
        on_transcript(epoch, epoch_transcript)
      del rec, epoch_transcript
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
  """Accumulates the cut-layer traffic of one epoch on the host (FSL: with what the tracking
  attacks need: the device of each row, the optimiser state at each round start, and each
  device's returned update at `UPDATE_COORDS` public coordinates)."""

  def __init__(self):
    self.h, self.g, self.index, self.pidx, self.local, self.slot = [], [], [], [], [], []
    self.params, self.opts, self.updates = [], [], []
    self.coords = None

  def add_params(self, params):
    self.params.append(jax.tree.map(to_host, params))

  def add_opt(self, opt_state):
    self.opts.append(jax.tree.map(to_host, opt_state))

  def add_update(self, returned):
    """``returned``: leaves ``[D, ...]``, each device's parameters at the round's end."""
    start = protocol.flatten_params(self.params[-1])
    end = protocol.flatten_params(jax.tree.map(to_host, returned), batch_dims=1)
    if self.coords is None:
      self.coords = update_coordinates(start.shape[0])
    self.updates.append((end[:, self.coords] - start[self.coords]).astype(np.float32))

  def add(self, h, g, index, mask, local_step, slot=None):
    keep = to_host(mask) > 0
    self.h.append(to_host(h)[keep])
    self.g.append(to_host(g)[keep])
    self.index.append(to_host(index)[keep])
    self.pidx.append(np.full(int(keep.sum()), len(self.params) - 1, np.int32))
    self.local.append(to_host(local_step)[keep])
    if slot is not None:
      self.slot.append(np.asarray(slot, np.int32)[keep])

  def finish(self, dp: DPConfig) -> protocol.Transcript:
    stack = lambda trees: jax.tree.map(lambda *xs: np.stack(xs), *trees)
    fsl = {}
    if self.updates:
      fsl = {
        "device_slot": np.concatenate(self.slot),
        "device_opt": stack(self.opts),
        "device_updates": np.stack(self.updates),
        "update_coords": self.coords,
      }
    return protocol.Transcript(
      h=np.concatenate(self.h),
      g=np.concatenate(self.g),
      example_index=np.concatenate(self.index).astype(np.int32),
      param_index=np.concatenate(self.pidx),
      local_step=np.concatenate(self.local),
      device_params=stack(self.params),
      l2_clip_norm=float(dp.l2_clip_norm),
      noise_multiplier=float(dp.noise_multiplier),
      **fsl,
    )


# Coordinates of each FSL device's returned update that the recording keeps (storage: 16 KiB per
# device and round; the full update of adult's head, 51,009 parameters, is about 200 KiB).
UPDATE_COORDS = 4096


def update_coordinates(num_params: int, num: int = UPDATE_COORDS) -> np.ndarray:
  """The public, seeded choice of ``min(num, num_params)`` flattened-parameter coordinates
  (ascending int64) at which the FSL recording keeps each device's returned update."""
  if num >= num_params:
    return np.arange(num_params, dtype=np.int64)
  rng = np.random.default_rng(0)
  return np.sort(rng.choice(num_params, size=num, replace=False)).astype(np.int64)


def replay_chunks(
  model,
  state: TrainState,
  split,
  *,
  dp: DPConfig | None = None,
  seed: int = 0,
  num_examples: int | None = None,
  batch_size: int = 1024,
  defenses=None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """The test replay one chunk at a time: yields ``(rows [n_c] int32, h [n_c, d], g [n_c, d])``.

  Every row of ``split`` (its first ``num_examples``) is sent once through the final model (one
  DP release each); the DP noise of chunk ``c`` uses ``fold_in(key(seed), c)``. What
  `replay_transcript` concatenates, and what `splitjax.audit` counts without keeping.
  """
  dp = no_dp() if dp is None else DPConfig(*dp).as_arrays()
  n = len(split) if num_examples is None else min(num_examples, len(split))
  state = state.replace(model=model)
  key = jax.random.key(seed)
  for c, start in enumerate(range(0, n, batch_size)):
    part = np.arange(start, min(start + batch_size, n), dtype=np.int32)
    h, g = replay(
      state,
      split_to_batch(split, part, batch_size),
      dp,
      jax.random.fold_in(key, c),
      defenses,
    )
    yield part, np.asarray(h)[: len(part)], np.asarray(g)[: len(part)]


def replay_transcript(
  model,
  state: TrainState,
  split,
  *,
  dp: DPConfig | None = None,
  seed: int = 0,
  num_examples: int | None = None,
  batch_size: int = 1024,
  defenses=None,
) -> protocol.Transcript:
  """Sends every row of ``split`` once through the final model (one DP release each).

  This is what the server observes when test users are attacked (DESIGN.md §2).
  The DP noise of chunk ``c`` uses ``fold_in(key(seed), c)`` (`replay_chunks`); ``defenses`` as
  in `fit` (the device's chain as trained).
  """
  dp = no_dp() if dp is None else DPConfig(*dp).as_arrays()
  chunks = list(
    replay_chunks(
      model,
      state,
      split,
      dp=dp,
      seed=seed,
      num_examples=num_examples,
      batch_size=batch_size,
      defenses=defenses,
    )
  )
  n = sum(len(part) for part, _, _ in chunks)
  params = jax.tree.map(lambda x: np.asarray(x)[None], jax.device_get(state.device_params))
  return protocol.Transcript(
    h=np.concatenate([h for _, h, _ in chunks]),
    g=np.concatenate([g for _, _, g in chunks]),
    example_index=np.arange(n, dtype=np.int32),
    param_index=np.zeros(n, np.int32),
    local_step=np.zeros(n, np.int32),
    device_params=params,
    l2_clip_norm=float(dp.l2_clip_norm),
    noise_multiplier=float(dp.noise_multiplier),
  )


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
