"""Your own optax training loop with splitjax's cut-layer DP, its accounting and its attacks.

  python examples/own_optax_loop.py            # about 20 s on 2 CPU cores

The loop is written out here: the server computes h, the device computes each example's
gradient g_i = dl_i/dh_i and releases it through `privacy.cut_layer_dp` (clip each row to C, add
N(0, (sigma C)^2)), the server back-propagates what it received. sigma is calibrated so that the
training run is (4, 1e-5)-DP for each example's cut-layer releases; then the server attacks the
last epoch's noisy gradients with EXACT's Bayes variant.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import splitjax
from splitjax import attacks
from splitjax import models
from splitjax import privacy

EPOCHS, BATCH, CLIP, TARGET_EPS, DELTA = 4, 50, 0.05, 4.0, 1e-5

data = splitjax.data.load("synthetic", num_examples=1000, seed=1)
train = data.train
model = models.make_model(
  models.ModelSpec(
    pub_cardinalities=data.pub_cardinalities,
    num_pub_dense=train.pub_dense.shape[1],
    priv_cardinalities=data.priv_cardinalities,
    hidden=(32, 16),
  )
)
theta = model.server_init(jax.random.key(0))
phi = model.device_init(jax.random.key(1))
server_opt, device_opt = optax.adam(1e-2), optax.adam(1e-2)
server_state, device_state = server_opt.init(theta), device_opt.init(phi)

# Each example sends one gradient per epoch: EPOCHS releases, composed exactly (mu-GDP).
sigma = privacy.calibrate_noise_multiplier(
  target_epsilon=TARGET_EPS, target_delta=DELTA, releases=EPOCHS
)
dp = privacy.cut_layer_dp(CLIP, sigma, key=jax.random.key(2))
dp_state = dp.init(None)


def device_loss(phi, h, cat, dense, y):  # one example
  logit = model.head_apply(phi, h, cat, dense)
  return optax.sigmoid_binary_cross_entropy(logit, y.astype(jnp.float32))


@jax.jit
def step(theta, phi, server_state, device_state, dp_state, pub_cat, pub_dense, cat, dense, y):
  h, server_vjp = jax.vjp(lambda t: model.encode_batch(t, pub_cat, pub_dense), theta)
  # Device: per-example gradients with respect to h (the cut) and to its own parameters.
  g_phi, g_h = jax.vmap(jax.grad(device_loss, argnums=(0, 1)), in_axes=(None, 0, 0, 0, 0))(
    phi, h, cat, dense, y
  )
  g_sent, dp_state = dp.update(g_h, dp_state)  # what crosses the wire
  (g_theta,) = server_vjp(g_sent / y.shape[0])
  updates, server_state = server_opt.update(g_theta, server_state, theta)
  theta = optax.apply_updates(theta, updates)
  updates, device_state = device_opt.update(
    jax.tree.map(lambda x: x.mean(0), g_phi), device_state, phi
  )
  return theta, optax.apply_updates(phi, updates), server_state, device_state, dp_state, h, g_sent


for epoch in range(EPOCHS):
  order = np.random.default_rng(epoch).permutation(len(train))
  rows = train.take(order[: len(train) // BATCH * BATCH])
  for i in range(0, len(rows), BATCH):
    b = rows.take(slice(i, i + BATCH))
    if epoch == EPOCHS - 1 and i == 0:
      users, users_phi = b, phi  # the server attacks this batch, with the device model behind it
    theta, phi, server_state, device_state, dp_state, h, g = step(
      theta,
      phi,
      server_state,
      device_state,
      dp_state,
      b.pub_cat,
      b.pub_dense,
      b.priv_cat,
      b.priv_dense,
      b.y,
    )
    if epoch == EPOCHS - 1 and i == 0:
      users_h, users_g = h, g

eps = privacy.epsilon(sigma, EPOCHS, DELTA)
print(
  f"sigma = {sigma:.3f} for {EPOCHS} releases: training cut-layer epsilon {eps:.3f} at "
  f"delta {DELTA:g} (target {TARGET_EPS})"
)
assert eps <= TARGET_EPS * (1 + 1e-6)

# The attack: the last epoch's first batch, scored with the device parameters that produced it.
# Bayes variant: the Gaussian likelihood of each noisy gradient times a prior over (features,
# label) from the training marginals; beside it, the same prior's guess without any gradient.
cards = data.priv_cardinalities
tuple_prior = attacks.priors.marginal_tuple_prior(train.priv_cat, cards)  # [C]
label_p1 = np.full_like(tuple_prior, train.y.mean())
log_prior = attacks.pair_log_prior(tuple_prior[None], label_p1[None])[0]  # [C, 2]
found = attacks.exact(
  models.device_logit_fn(model),
  users_phi,
  users_h,
  users_g,
  cards,
  l2_clip_norm=CLIP,
  noise_stddev=sigma * CLIP,
  log_prior=log_prior,
)
guess = [np.bincount(col).argmax() for col in np.c_[train.priv_cat, train.y].T]
for j, name in enumerate(list(data.roles.private_categorical) + ["label"]):
  truth = users.priv_cat[:, j] if j < len(data.priv_cardinalities) else users.y
  pred = found.features[:, j] if j < len(data.priv_cardinalities) else found.labels
  print(
    f"{name}: EXACT {np.mean(np.asarray(pred) == truth):.2f}, prior only "
    f"{np.mean(guess[j] == truth):.2f} ({BATCH} users)"
  )
