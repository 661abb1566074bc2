"""Your own Flax split model, trained by splitjax and attacked by EXACT.

  python examples/own_flax_model.py            # about 20 s on 2 CPU cores

The server's tower and the device's tower are plain Flax linen modules; `from_apply_fns` turns
their init/apply functions into a `splitjax.models.SplitModel`, `training.fit` trains it with the
split protocol, and `attacks.exact` recovers the test users' private features and labels from the
cut-layer gradients their devices would send (no DP here, so it recovers them all up to ties).
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

import splitjax
from splitjax import attacks
from splitjax import models
from splitjax import protocol
from splitjax import training

# [library-snippet]
data = splitjax.data.load("synthetic", num_examples=600, seed=0)
num_pub_cat = data.train.pub_cat.shape[1]
num_pub_dense = data.train.pub_dense.shape[1]


class ServerTower(nn.Module):  # one example: server features -> h [16]
  cardinalities: tuple[int, ...]

  @nn.compact
  def __call__(self, cat, dense):
    embedded = [nn.Embed(c, 4)(cat[j]) for j, c in enumerate(self.cardinalities)]
    return nn.tanh(nn.Dense(16)(jnp.concatenate(embedded + [dense])))


class DeviceTower(nn.Module):  # one example: h and the private features -> logit
  cardinalities: tuple[int, ...]

  @nn.compact
  def __call__(self, h, cat, dense):
    embedded = [nn.Embed(c, 4)(cat[j]) for j, c in enumerate(self.cardinalities)]
    x = nn.relu(nn.Dense(32)(jnp.concatenate([h, dense] + embedded)))
    return nn.Dense(1)(x)[0]


server = ServerTower(data.pub_cardinalities)
device = DeviceTower(data.priv_cardinalities)
pub_example = (jnp.zeros(num_pub_cat, jnp.int32), jnp.zeros(num_pub_dense))
priv_example = (jnp.zeros(16), jnp.zeros(len(data.priv_cardinalities), jnp.int32), jnp.zeros(0))
model = models.SplitModel.from_apply_fns(
  server_init=lambda key: server.init(key, *pub_example)["params"],
  server_apply=lambda theta, cat, dense: server.apply({"params": theta}, cat, dense),
  device_init=lambda key: device.init(key, *priv_example)["params"],
  device_apply=lambda phi, h, cat, dense: device.apply({"params": phi}, h, cat, dense),
  priv_cardinalities=data.priv_cardinalities,
  cut_dim=16,
  name="my_towers",
)

recipe = training.Recipe(optimizer="adam", learning_rate=1e-2, batch_size=64, epochs=3)
result = training.fit(model, data.train, recipe=recipe, seed=0)
theta, phi = result.state.server_params, result.state.device_params

# What the server sees of each test user: h (it computed it) and g (the device sent it back).
test = data.test
h = model.encode_batch(theta, test.pub_cat, test.pub_dense)
# Per-example apply functions; features are the pytree (cat_i, dense_i).
server_apply, device_apply = protocol.apply_fns(model)
g = protocol.device_step(
  device_apply, phi, h, (test.priv_cat, test.priv_dense), test.y, jnp.ones(len(test))
).cut_grads
found = attacks.exact(models.device_logit_fn(model), phi, h, g, data.priv_cardinalities)
# [/library-snippet]

recovered = np.mean(
  np.all(np.asarray(found.features) == test.priv_cat, axis=1) & (np.asarray(found.labels) == test.y)
)
ties = int(np.sum(np.asarray(found.num_ties) > 1))
print(
  f"test AUC {training.evaluate(model, result.state, test)['auc']:.3f}; EXACT recovered "
  f"features and label of {recovered:.1%} of {len(test)} test users ({ties} ties)"
)
assert recovered >= 1.0 - ties / len(test), "without DP EXACT recovers every user up to ties"
