"""FSL devices in a transcript: their rows, their pair codes, and their local steps simulated.

What `tracking` (`fsl_tracking`) and `update_match` (`device_update_match`) share: the rows of a
transcript grouped by device (`device_rows`), a block of devices' inputs padded to a fixed size
(`device_block`), and one local step of a device's head as trained (`local_step`: the gradient of
the mean loss, clipped per example and averaged under device DP-SGD, then the device optimiser).
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from splitjax import protocol
from splitjax.attacks import checks
from splitjax.attacks import scoring
from splitjax.privacy import transforms as dp_transforms


class DeviceRows(NamedTuple):
  """The rows of a transcript grouped by device (host arrays).

  Attributes:
    rows: [G, T, S] int64, the transcript row of device g's j-th example at local step t (-1:
      the device has fewer than S examples).
    version: [G] int, the round (parameter version) of each device.
    slot: [G] int, the device's slot within its round (`Transcript.device_slot`).
  """

  rows: np.ndarray
  version: np.ndarray
  slot: np.ndarray


def device_rows(transcript: protocol.Transcript) -> DeviceRows:
  """Groups an FSL transcript's rows by device: `(param_index, device_slot)`.

  Raises:
    AttackError: the transcript has no device slots (an SL transcript, or an FSL one recorded
      before the tracking attacks), or a device lacks a local step or sent other examples at
      other steps (the transcript was cut inside a device: take whole rounds).
  """
  if transcript.device_slot is None:
    raise checks.AttackError(
      "the transcript has no device slots: tracking needs an FSL transcript recorded by this "
      "splitjax (retrain with experiments.train --overwrite)"
    )
  pidx = np.asarray(transcript.param_index, np.int64)
  slot = np.asarray(transcript.device_slot, np.int64)
  step = np.asarray(transcript.local_step, np.int64)
  num_rows = len(pidx)
  if num_rows == 0:
    return DeviceRows(np.zeros((0, 1, 1), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
  num_steps = int(step.max()) + 1
  groups, group_of = np.unique(np.stack([pidx, slot], 1), axis=0, return_inverse=True)
  group_of = group_of.reshape(-1)
  order = np.lexsort((np.arange(num_rows), step, group_of))
  key = group_of[order] * num_steps + step[order]
  starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
  counts = np.diff(np.r_[starts, num_rows])
  position = np.arange(num_rows) - np.repeat(starts, counts)
  width = int(counts.max())
  rows = np.full((len(groups), num_steps, width), -1, np.int64)
  rows[group_of[order], step[order], position] = order
  present = rows >= 0
  ex = np.where(present, np.asarray(transcript.example_index)[np.maximum(rows, 0)], -1)
  if not (present == present[:, :1]).all() or not (ex == ex[:, :1]).all():
    raise checks.AttackError(
      "a device of the transcript lacks a local step or sent other examples at other steps: "
      "pass whole rounds (every row of a param_index)"
    )
  return DeviceRows(rows, groups[:, 0], groups[:, 1])


def pair_features(codes: np.ndarray, cardinalities: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """`(features [..., P] int32, labels [...] int32)` of pair codes (-1 codes give -1)."""
  codes = np.asarray(codes, np.int64)
  table = scoring.candidate_table(cardinalities)
  feats = np.where(codes[..., None] >= 0, table[np.maximum(codes, 0) // 2], -1)
  labels = np.where(codes >= 0, np.maximum(codes, 0) % 2, -1)
  return feats.astype(np.int32), labels.astype(np.int32)


def device_grads(model, phi, h, cat, y, mask, device_clip):
  """One device's head step: (parameter gradient as trained without the noise, cut gradients)."""
  dense = jnp.zeros(cat.shape[:1] + (model.spec.num_priv_dense,), h.dtype)
  if device_clip is None:
    out = protocol.top_step(model, phi, h, cat, dense, y, mask)
    return out.param_grads, out.cut_grads
  out = protocol.top_step_per_example(model, phi, h, cat, dense, y, mask)
  # The device's own DP-SGD aggregate (clip each example, sum, divide by the real rows) with the
  # noise it drew left out: the server does not know it.
  tx = dp_transforms.dp_aggregate(
    device_clip, 0.0, key=jax.random.key(0), normalize_by=jnp.maximum(jnp.sum(mask), 1.0)
  )
  mean, _ = tx.update(out.param_grads, tx.init(out.param_grads))
  return mean, out.cut_grads


def local_step(model, tx, phi, opt, h, cat, y, mask, device_clip):
  """One local step of a device: (next parameters, next optimiser state, cut gradients [S, d]).

  ``device_clip`` None: trained without device DP-SGD; else its per-example clip norm (the noise,
  unknown to the server, is left out)."""
  grads, cut = device_grads(model, phi, h, cat, y, mask, device_clip)
  upd, opt = tx.update(grads, opt, phi)
  return optax.apply_updates(phi, upd), opt, cut


def device_block(dev: DeviceRows, sel, block: int, transcript, h_all, g_all, dtype):
  """A block of devices padded to ``block`` (repeating the first; padded devices masked out):
  (mask [B, S], h [B, T, S, d], g [B, T, S, d], round-start params and optimiser states
  (leaves [B, ...]), the device indices [B])."""
  idx = np.concatenate([sel, np.full(block - len(sel), sel[0])])
  rows = dev.rows[idx]
  mask = (rows[:, 0] >= 0).astype(np.float32)
  mask[len(sel) :] = 0.0
  hb = np.where(rows[..., None] >= 0, h_all[np.maximum(rows, 0)], 0).astype(dtype)
  gb = np.where(rows[..., None] >= 0, g_all[np.maximum(rows, 0)], 0).astype(dtype)
  version = dev.version[idx]
  gather = functools.partial(gather_versions, version)
  return mask, hb, gb, gather(transcript.device_params), gather(transcript.device_opt), idx


def gather_versions(version, tree):
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[version]), tree)
