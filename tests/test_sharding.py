"""Data-parallel training over a 4-device mesh equals single-device training (subprocess)."""

import textwrap

import forced_devices

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    assert jax.device_count() == 4, jax.devices()
    from splitjax import models, training
    from splitjax.data import base
    cards, pub = (2, 3), (3, 4)
    rng = np.random.default_rng(0)
    n = 96
    split = base.Split(
        priv_cat=np.stack([rng.integers(0, c, n) for c in cards], 1).astype(np.int32),
        priv_dense=np.zeros((n, 0), np.float32),
        pub_cat=np.stack([rng.integers(0, c, n) for c in pub], 1).astype(np.int32),
        pub_dense=rng.random((n, 2)).astype(np.float32),
        y=rng.integers(0, 2, n).astype(np.int32))
    model = models.make_model(models.ModelSpec(pub_cardinalities=pub, num_pub_dense=2,
                                               priv_cardinalities=cards, hidden=(16, 8)))
    recipe = training.Recipe(optimizer="adam", learning_rate=1e-2, batch_size=32, epochs=2)
    dp = training.DPConfig(np.float32(0.05), np.float32(0.0))
    for proto in ("sl", "fsl"):
      kw = dict(recipe=recipe, seed=0, protocol_name=proto, dp=dp, samples_per_device=8,
                devices_per_round=4, local_steps=2)
      one = training.fit(model, split, data_parallel=False, **kw)
      many = training.fit(model, split, data_parallel=True, **kw)
      leaf = jax.tree.leaves(many.state.device_params)[0]
      assert len(leaf.sharding.device_set) == 4, leaf.sharding
      for a, b in zip(jax.tree.leaves((one.state.server_params, one.state.device_params)),
                      jax.tree.leaves((many.state.server_params, many.state.device_params))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(one.transcript.g, many.transcript.g, rtol=1e-5, atol=1e-6)
    print("SHARDED_OK")
""")


def test_data_parallel_training_equals_single_device():
  res = forced_devices.run(SCRIPT)
  assert res.returncode == 0 and "SHARDED_OK" in res.stdout, res.stderr[-3000:]
