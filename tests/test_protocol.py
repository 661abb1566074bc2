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


def test_paper_names_reject_device_bottom():
  spec = models.ModelSpec(
    pub_cardinalities=PUB_CARDS,
    num_pub_dense=2,
    priv_cardinalities=PRIV_CARDS,
    topology="device_bottom",
    hidden=(16, 8),
  )
  model = models.make_model(spec)
  with pytest.raises(ValueError, match="device_top"):
    protocol.server_forward(model, None, None, None)


def test_gradient_is_label_scaled_direction():
  """g = (sigmoid(z) - y) dz/dh: both labels give parallel gradients (DESIGN.md §1)."""
  spec = models.ModelSpec(
    pub_cardinalities=PUB_CARDS, num_pub_dense=2, priv_cardinalities=PRIV_CARDS, hidden=(16, 8)
  )
  model = models.make_model(spec)
  enc = model.encoder_init(jax.random.key(0))
  top = model.head_init(jax.random.key(1))
  pub_cat, pub_dense, priv_cat, priv_dense, y, mask = _batch(1)
  h = protocol.server_forward(model, enc, pub_cat, pub_dense)
  priv_dense = priv_dense[:, :0]
  g0 = protocol.device_step(model, top, h, priv_cat, priv_dense, np.zeros(N, np.int32), mask)
  g1 = protocol.device_step(model, top, h, priv_cat, priv_dense, np.ones(N, np.int32), mask)
  z = g0.logits
  dzdh = jax.vmap(jax.grad(model.head_apply, argnums=1), in_axes=(None, 0, 0, 0))(
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
