"""The cut layer: split gradients equal end-to-end gradients, in both topologies."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from splitjax import models
from splitjax import protocol

N = 12
PUB_CARDS, PRIV_CARDS = (3, 4, 5), (2, 3)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  pub_cat = np.stack([rng.integers(0, c, N) for c in PUB_CARDS], 1).astype(np.int32)
  priv_cat = np.stack([rng.integers(0, c, N) for c in PRIV_CARDS], 1).astype(np.int32)
  pub_dense = rng.random((N, 2)).astype(np.float32)
  priv_dense = rng.random((N, 1)).astype(np.float32)
  y = rng.integers(0, 2, N).astype(np.int32)
  mask = np.ones(N, np.float32)
  mask[-3:] = 0.0
  return pub_cat, pub_dense, priv_cat, priv_dense, y, mask


@pytest.mark.parametrize("topology", ["device_top", "device_bottom"])
@pytest.mark.parametrize("head", ["deepfm", "mlp"])
def test_split_gradients_equal_end_to_end(topology, head):
  spec = models.ModelSpec(
    pub_cardinalities=PUB_CARDS,
    num_pub_dense=2,
    priv_cardinalities=PRIV_CARDS,
    num_priv_dense=1,
    hidden=(16, 8),
    head=head,
    topology=topology,
  )
  model = models.make_model(spec)
  enc = model.encoder_init(jax.random.key(0))
  top = model.head_init(jax.random.key(1))
  pub_cat, pub_dense, priv_cat, priv_dense, y, mask = _batch()
  if topology == "device_top":
    enc_in, head_in = (pub_cat, pub_dense), (priv_cat, priv_dense)
  else:
    enc_in, head_in = (priv_cat, priv_dense), (pub_cat, pub_dense)

  def composed(enc_p, head_p):
    h = model.encode_batch(enc_p, *enc_in)
    logits = model.head_batch(head_p, h, *head_in)
    return jnp.sum(mask * protocol.bce_loss(logits, y)) / jnp.sum(mask)

  # Jitted (op-by-op dispatch of the Flax modules is slow); the maths is the same.
  ref_enc, ref_head = jax.jit(jax.grad(composed, argnums=(0, 1)))(enc, top)
  h = jax.jit(functools.partial(protocol.bottom_forward, model))(enc, *enc_in)
  out = jax.jit(functools.partial(protocol.top_step, model))(top, h, *head_in, y, mask)
  enc_grads = jax.jit(functools.partial(protocol.bottom_backward, model))(
    enc, *enc_in, out.cut_grads, jnp.sum(mask)
  )
  np.testing.assert_allclose(out.loss, jax.jit(composed)(enc, top), rtol=1e-5)
  for got, want in zip(jax.tree.leaves(out.param_grads), jax.tree.leaves(ref_head), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  for got, want in zip(jax.tree.leaves(enc_grads), jax.tree.leaves(ref_enc), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # Row i of g is example i's own dl_i/dh_i; padded rows are zero.
  i = 2
  g_i = jax.jit(
    jax.grad(
      lambda hi: protocol.bce_loss(
        model.head_apply(top, hi, head_in[0][i], head_in[1][i])[None], y[i : i + 1]
      )[0]
    )
  )(h[i])
  np.testing.assert_allclose(out.cut_grads[i], g_i, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(out.cut_grads[-3:]) == 0)


def test_split_step_refuses_device_dp_sgd_in_device_bottom():
  spec = models.ModelSpec(
    pub_cardinalities=PUB_CARDS,
    num_pub_dense=2,
    priv_cardinalities=PRIV_CARDS,
    topology="device_bottom",
    hidden=(16, 8),
  )
  model = models.make_model(spec)
  enc_apply, head_apply = protocol.apply_fns(model)
  pub_cat, pub_dense, priv_cat, priv_dense, y, mask = _batch()
  with pytest.raises(ValueError, match="device_top only"):
    protocol.split_step(
      enc_apply,
      head_apply,
      None,
      None,
      (priv_cat, priv_dense),
      (pub_cat, pub_dense),
      y,
      mask,
      topology="device_bottom",
      privatize_head_grads=lambda g, m: g,
    )


def test_gradient_is_label_scaled_direction():
  """g = (sigmoid(z) - y) dz/dh: both labels give parallel gradients (DESIGN.md §1)."""
  spec = models.ModelSpec(
    pub_cardinalities=PUB_CARDS, num_pub_dense=2, priv_cardinalities=PRIV_CARDS, hidden=(16, 8)
  )
  model = models.make_model(spec)
  enc = model.encoder_init(jax.random.key(0))
  top = model.head_init(jax.random.key(1))
  pub_cat, pub_dense, priv_cat, priv_dense, y, mask = _batch(1)
  server_apply, device_apply = protocol.apply_fns(model)  # per example, features (cat, dense)
  # (jitted: op-by-op dispatch of the Flax modules is slow; the maths is the same)
  h = jax.jit(protocol.server_forward, static_argnums=0)(server_apply, enc, (pub_cat, pub_dense))
  priv_dense = priv_dense[:, :0]
  x_priv = (priv_cat, priv_dense)
  step = jax.jit(protocol.device_step, static_argnums=0)
  g0 = step(device_apply, top, h, x_priv, np.zeros(N, np.int32), mask)
  g1 = step(device_apply, top, h, x_priv, np.ones(N, np.int32), mask)
  z = g0.logits
  dzdh = jax.jit(jax.vmap(jax.grad(model.head_apply, argnums=1), in_axes=(None, 0, 0, 0)))(
    top, h, priv_cat, priv_dense
  )
  s = jax.nn.sigmoid(z)[:, None] * mask[:, None]
  np.testing.assert_allclose(g0.cut_grads, s * dzdh, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g1.cut_grads, (s - mask[:, None]) * dzdh, rtol=1e-5, atol=1e-7)


def test_model_shapes_and_param_counts():
  spec = models.ModelSpec(
    pub_cardinalities=(9, 16, 15, 42), num_pub_dense=4, priv_cardinalities=(2, 5, 6, 7)
  )
  model = models.make_model(spec)
  assert spec.cut_dim == 36
  theta = model.server_init(jax.random.key(0))
  phi = model.device_init(jax.random.key(1))
  assert models.count_params(theta) == 8 * (9 + 16 + 15 + 42)
  e, d, w0, w1 = 8, 36, 256, 128
  cards = (2, 5, 6, 7)
  expected = (
    d * w0 + w0 + len(cards) * e * w0 + sum(cards) * e + sum(cards) + w0 * w1 + w1 + w1 + 1 + d + 1
  )
  assert models.count_params(phi) == expected
  h = model.encode_batch(theta, np.zeros((3, 4), np.int32), np.zeros((3, 4), np.float32))
  assert h.shape == (3, 36)
  logits = model.head_batch(phi, h, np.zeros((3, 4), np.int32), np.zeros((3, 0), np.float32))
  assert logits.shape == (3,)


def test_spec_rejects_bad_values():
  with pytest.raises(ValueError, match="unknown head"):
    models.ModelSpec(
      pub_cardinalities=(2,), num_pub_dense=0, priv_cardinalities=(2,), head="resnet"
    )
  with pytest.raises(ValueError, match=">= 1"):
    models.ModelSpec(pub_cardinalities=(2,), num_pub_dense=0, priv_cardinalities=(0,))


def _foreign(key):
  """A plain-JAX split model with dict features: no SplitModel, no Flax."""
  k1, k2, k3 = jax.random.split(key, 3)
  theta = dict(emb=0.3 * jax.random.normal(k1, (5, 4)), w=0.3 * jax.random.normal(k2, (2, 4)))
  phi = dict(
    emb=0.3 * jax.random.normal(k3, (3, 4)), w1=jnp.linspace(-1.0, 1.0, 8 * 6).reshape(8, 6)
  )
  phi["w2"] = jnp.linspace(0.5, -0.5, 6)

  def server_apply(t, x):  # x: {"code": int32 scalar, "num": [2]}
    return jnp.tanh(t["emb"][x["code"]] + x["num"] @ t["w"])

  def device_apply(p, h, x):  # x: (int32 scalar,) + a scalar weight
    z = jnp.concatenate([h, p["emb"][x[0]] * x[1]])
    return jnp.tanh(z @ p["w1"]) @ p["w2"]

  rng = np.random.default_rng(3)
  x_pub = dict(code=rng.integers(0, 5, N).astype(np.int32), num=rng.normal(size=(N, 2)))
  x_priv = (rng.integers(0, 3, N).astype(np.int32), rng.uniform(size=N).astype(np.float32))
  x_pub["num"] = x_pub["num"].astype(np.float32)
  y = rng.integers(0, 2, N).astype(np.float32)
  return server_apply, device_apply, theta, phi, x_pub, x_priv, y


@pytest.mark.parametrize("topology", ["device_top", "device_bottom"])
def test_split_step_of_a_foreign_model_equals_the_composed_gradient(topology):
  server_apply, device_apply, theta, phi, x_pub, x_priv, y = _foreign(jax.random.key(0))
  mask = np.ones(N, np.float32)
  mask[-2:] = 0.0
  # The same functions in either orientation (without a privatizer the maths is the same; the
  # topology says which side is the device, i.e. what a privatizer would touch).

  def composed(t, p):
    h = jax.vmap(server_apply, in_axes=(None, 0))(t, x_pub)
    logits = jax.vmap(device_apply, in_axes=(None, 0, 0))(p, h, x_priv)
    return jnp.sum(mask * protocol.bce_loss(logits, y)) / jnp.sum(mask)

  ref_t, ref_p = jax.jit(jax.grad(composed, argnums=(0, 1)))(theta, phi)
  out = jax.jit(
    lambda t, p: protocol.split_step(
      server_apply, device_apply, t, p, x_pub, x_priv, y, mask, topology=topology
    )
  )(theta, phi)
  np.testing.assert_allclose(out.loss, jax.jit(composed)(theta, phi), rtol=1e-6)
  for got, want in zip(jax.tree.leaves(out.encoder_grads), jax.tree.leaves(ref_t), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  for got, want in zip(jax.tree.leaves(out.head_grads), jax.tree.leaves(ref_p), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(out.g_sent[-2:]) == 0) and out.nonfinite == 0
  # The paper's names on the same functions give the same pieces (device_top).
  h = jax.jit(protocol.server_forward, static_argnums=0)(server_apply, theta, x_pub)
  real = mask > 0  # (device_bottom sends zero activations for padded rows)
  np.testing.assert_allclose(h[real], out.h_sent[real], rtol=1e-6)
  step = jax.jit(protocol.device_step, static_argnums=0)(device_apply, phi, h, x_priv, y, mask)
  np.testing.assert_allclose(step.cut_grads, out.g_sent, rtol=1e-5, atol=1e-8)
  back = jax.jit(protocol.server_backward, static_argnums=0)(
    server_apply, theta, x_pub, step.cut_grads, mask.sum()
  )
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(ref_t), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_split_step_applies_the_privatizer_to_what_the_device_sends():
  server_apply, device_apply, theta, phi, x_pub, x_priv, y = _foreign(jax.random.key(1))
  mask = np.ones(N, np.float32)
  halve = lambda x, m: (0.5 * x * m[:, None], jnp.ones((), jnp.int32))
  top = protocol.split_step(
    server_apply,
    device_apply,
    theta,
    phi,
    x_pub,
    x_priv,
    y,
    mask,
    topology="device_top",
    privatize=halve,
  )
  plain = protocol.split_step(
    server_apply, device_apply, theta, phi, x_pub, x_priv, y, mask, topology="device_top"
  )
  np.testing.assert_allclose(top.g_sent, 0.5 * plain.g_sent, rtol=1e-6)
  for a, b in zip(
    jax.tree.leaves(top.encoder_grads), jax.tree.leaves(plain.encoder_grads), strict=True
  ):
    np.testing.assert_allclose(a, 0.5 * b, rtol=1e-5, atol=1e-8)  # pulled back from what was sent
  assert int(top.nonfinite) == 1
  bottom = protocol.split_step(
    server_apply,
    device_apply,
    theta,
    phi,
    x_pub,
    x_priv,
    y,
    mask,
    topology="device_bottom",
    privatize=halve,
  )
  np.testing.assert_allclose(bottom.h_sent, 0.5 * plain.h_sent, rtol=1e-6)
  with pytest.raises(ValueError, match="topology"):
    protocol.split_step(
      server_apply, device_apply, theta, phi, x_pub, x_priv, y, mask, topology="sideways"
    )
