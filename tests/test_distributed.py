"""Two processes on localhost (jax.distributed, one CPU device each) train data-parallel, attack
(exact, optimize: users sharded over both processes) and agree with each other and with a
single-process run."""

import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if pid >= 0:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                 process_id=pid)
      assert jax.process_count() == 2 and jax.device_count() == 2
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
    res = training.fit(model, split, recipe=recipe, seed=0, progress=None,
                       data_parallel=pid >= 0)
    leaves = [training.to_host(x).ravel() for x in
              jax.tree.leaves((res.state.server_params, res.state.device_params))]
    # Attacks under jax.distributed: users sharded over both processes' devices, results gathered
    # on every process. The trained model's gradients of 24 examples, attacked by exact/optimize.
    import importlib
    from splitjax import protocol
    exact_lib = importlib.import_module("splitjax.attacks.exact")
    opt_lib = importlib.import_module("splitjax.attacks.optimize")
    local = lambda tree: jax.tree.map(lambda x: jax.numpy.asarray(training.to_host(x)), tree)
    theta, phi = local(res.state.server_params), local(res.state.device_params)
    m = 24
    h = np.asarray(model.encode_batch(theta, split.pub_cat[:m], split.pub_dense[:m]))
    g = np.asarray(protocol.top_step(model, phi, h, split.priv_cat[:m], split.priv_dense[:m],
                                     split.y[:m], np.ones(m, np.float32)).cut_grads)
    ex = exact_lib.exact(models.device_logit_fn(model), phi, h, g, cards)
    assert (ex.features == split.priv_cat[:m]).all() and (ex.labels == split.y[:m]).all()
    op = opt_lib.optimize(opt_lib.relaxed_device_apply(model), phi, h, g, cards, 0, num_steps=10,
                          num_restarts=2, key=jax.random.key(0))
    attacks = [ex.features, ex.labels, ex.distances, op.features, op.labels, op.distances]
    np.save(out, np.concatenate(leaves + [res.transcript.g.ravel()]
                                + [np.asarray(a, np.float32).ravel() for a in attacks]))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_agree_with_single_process(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, str(script), str(pid), port,
                             str(tmp_path / f"p{pid}.npy")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
  single = subprocess.run([sys.executable, str(script), "-1", port, str(tmp_path / "single.npy")],
                          env=env, capture_output=True, text=True, timeout=300)
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert single.returncode == 0, single.stderr[-3000:]
  p0, p1 = np.load(tmp_path / "p0.npy"), np.load(tmp_path / "p1.npy")
  ref = np.load(tmp_path / "single.npy")
  np.testing.assert_array_equal(p0, p1)
  np.testing.assert_allclose(p0, ref, rtol=1e-5, atol=1e-6)
