"""The training state and its static pieces: the optimiser recipe, the DP knobs, initialisation."""

import dataclasses
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from splitjax import models


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
  """Optimiser recipe for both sides (frozen, hashed by value: a static field of `TrainState`).

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


def make_optimizer(recipe: Recipe) -> optax.GradientTransformation:
  """One optax chain per side from the recipe.

  ``adagrad_torch`` is PyTorch's Adagrad (accumulator starts at 0; optax puts
  eps inside the square root and defaults differ, DESIGN.md §5). A pure function of the recipe:
  the jitted steps build it inside the trace from the state's static `Recipe`.
  """
  if recipe.optimizer == "adam":
    return optax.adam(recipe.learning_rate)
  if recipe.optimizer == "adagrad_torch":
    return optax.adagrad(recipe.learning_rate, initial_accumulator_value=0.0, eps=0.0)
  if recipe.optimizer == "sgd":
    return optax.sgd(recipe.learning_rate)
  raise ValueError(f"unknown optimizer {recipe.optimizer!r}: choose adam, adagrad_torch or sgd")


def server_optimizer(recipe: Recipe, freeze_server: bool = False) -> optax.GradientTransformation:
  """The server's optimiser; ``freeze_server`` keeps its parameters fixed."""
  return optax.set_to_zero() if freeze_server else make_optimizer(recipe)


class TrainState(struct.PyTreeNode):
  """Both sides' parameters and optimiser states, the step counter and the DP key.

  A pytree (`flax.struct.PyTreeNode`, a frozen dataclass) whose array fields are its leaves and
  whose last three fields are static (part of the tree structure, compared and hashed by value):
  the jitted steps
  (`splitjax.training.sl_step`, `fsl_round`) build the model's apply functions and both
  optimisers inside the trace from them, so ``jax.jit``'s own cache, keyed on the structure, is
  the only cache. Checkpoints hold the array fields only (their names are those of the
  NamedTuple state before splitjax 0.3, so older checkpoints restore).

  Attributes:
    server_params, device_params: the two sides' parameters (pytrees).
    server_opt, device_opt: their optax states.
    step: int32 scalar, steps (SL) or rounds (FSL) taken; the noise of step t uses
      ``fold_in(key, t)``.
    key: the typed PRNG key of the DP noise.
    model: the `models.SplitModel` (static: its spec by value and its functions; `make_model`
      returns the same functions for equal specs).
    recipe: the `Recipe` (static).
    freeze_server: whether the server's optimiser is ``set_to_zero`` (static).
  """

  server_params: Any
  device_params: Any
  server_opt: Any
  device_opt: Any
  step: jax.Array
  key: jax.Array
  model: models.SplitModel = struct.field(pytree_node=False)
  recipe: Recipe = struct.field(pytree_node=False)
  freeze_server: bool = struct.field(pytree_node=False, default=False)

  @property
  def tx_server(self) -> optax.GradientTransformation:
    """The server's optimiser, from the static recipe."""
    return server_optimizer(self.recipe, self.freeze_server)

  @property
  def tx_device(self) -> optax.GradientTransformation:
    """The device's optimiser, from the static recipe."""
    return make_optimizer(self.recipe)


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


def init_state(
  model: models.SplitModel, recipe: Recipe, seed: int, *, freeze_server: bool = False
) -> TrainState:
  """Initial parameters from ``jax.random.key(seed)`` and both optimisers' initial states.

  Args:
    model: the split model (a static field of the state).
    recipe: the optimiser recipe (a static field).
    seed: ``jax.random.key(seed)`` is split into the server's, the device's and the DP key.
    freeze_server: the server's optimiser is ``optax.set_to_zero()``.
  """
  key = jax.random.key(seed)
  k_server, k_device, k_dp = jax.random.split(key, 3)
  server = model.server_init(k_server)
  device = model.device_init(k_device)
  tx_server, tx_device = server_optimizer(recipe, freeze_server), make_optimizer(recipe)
  return TrainState(
    server_params=server,
    device_params=device,
    server_opt=tx_server.init(server),
    device_opt=tx_device.init(device),
    step=jnp.zeros((), jnp.int32),
    key=k_dp,
    model=model,
    recipe=recipe,
    freeze_server=bool(freeze_server),
  )
