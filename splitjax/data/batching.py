"""Host-side batching for training: fixed-size padded batches (SL) and device rounds (FSL).

Everything here is numpy on the host; the data order of epoch ``e`` comes from
``np.random.default_rng([seed, e])``, so a resumed run replays the same batches.
"""

import math
from collections.abc import Iterator
from typing import Any
from typing import NamedTuple

import jax
import numpy as np


class Batch(NamedTuple):
  """One batch; axis 0 is the example axis (FSL adds a leading device axis)."""

  pub_cat: Any
  pub_dense: Any
  priv_cat: Any
  priv_dense: Any
  y: Any
  mask: Any
  index: Any


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
