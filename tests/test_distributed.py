"""Two processes on localhost (jax.distributed, one CPU device each) run ``experiments.train`` on
one workdir: training is data-parallel, only process 0 locks and writes, and both agree with a
single-process run. Then both attack the trained model (exact, optimize: users sharded over both
processes) and agree again."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import importlib, sys
    import numpy as np
    pid, port, out, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    from absl import flags
    from splitjax import results as sj_results
    writes = []  # every atomic write and rename this process makes
    _atomic = sj_results.atomic_write_bytes
    def _counted(path, data):
      writes.append(str(path))
      return _atomic(path, data)
    sj_results.atomic_write_bytes = _counted
    from experiments import common, pipeline, train as train_bin
    argv = ["train", f"--workdir={workdir}", "--config=synthetic_tiny", "--epochs=2"]
    if pid >= 0:
      argv += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               f"--process_id={pid}"]
    flags.FLAGS(argv)
    try:
      common.run_main(train_bin.main)([])
    except SystemExit as e:
      assert not e.code, e.code
    import jax
    if pid >= 0:
      assert jax.process_count() == 2 and jax.device_count() == 2
    assert (writes == []) == (pid == 1), (pid, writes)  # process 1 writes nothing
    from splitjax import models, protocol, training
    from splitjax import attacks as sj_attacks
    restored = pipeline.Restored(workdir)  # process 0's files (the train binary synchronised)
    model, state, test = restored.model, restored.state, restored.dataset.test
    leaves = [training.to_host(x).ravel() for x in
              jax.tree.leaves((state.server_params, state.device_params))]
    g_train = restored.transcript().g.ravel()
    # Attacks under jax.distributed: users sharded over both processes' devices, results gathered
    # on every process. The trained model's gradients of 24 test users, attacked by exact/optimize.
    local = lambda tree: jax.tree.map(lambda x: jax.numpy.asarray(training.to_host(x)), tree)
    theta, phi = local(state.server_params), local(state.device_params)
    m = 24
    h = np.asarray(model.encode_batch(theta, test.pub_cat[:m], test.pub_dense[:m]))
    g = np.asarray(protocol.top_step(model, phi, h, test.priv_cat[:m], test.priv_dense[:m],
                                     test.y[:m], np.ones(m, np.float32)).cut_grads)
    cards = restored.dataset.priv_cardinalities
    ex = sj_attacks.exact(models.device_logit_fn(model), phi, h, g, cards)
    assert (ex.features == test.priv_cat[:m]).mean() > 0.9, ex.features
    op = sj_attacks.optimize(models.soft_device_apply(model), phi, h, g, cards, 0, num_steps=10,
                          num_restarts=2, key=jax.random.key(0))
    attacks = [ex.features, ex.labels, ex.distances, op.features, op.labels, op.distances]
    np.save(out, np.concatenate(leaves + [g_train]
                                + [np.asarray(a, np.float32).ravel() for a in attacks]))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_train_binary_as_two_processes_on_one_workdir_agrees_with_one_process(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  port = str(_free_port())
  shared, alone = tmp_path / "shared", tmp_path / "alone"
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(pid), port, str(tmp_path / f"p{pid}.npy"), str(shared)],
      env=env,
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for pid in (0, 1)
  ]
  single = subprocess.run(
    [sys.executable, str(script), "-1", port, str(tmp_path / "single.npy"), str(alone)],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  assert single.returncode == 0, single.stderr[-3000:]
  # Process 0 took the workdir's lock (its pid is in the lock file) and wrote the run.
  holder = json.loads((shared / ".lock").read_text())
  assert holder["pid"] == procs[0].pid and holder["mode"] == "exclusive", holder
  assert (shared / "run.json").exists() and (shared / "metrics.json").exists()
  p0, p1 = np.load(tmp_path / "p0.npy"), np.load(tmp_path / "p1.npy")
  ref = np.load(tmp_path / "single.npy")
  np.testing.assert_array_equal(p0, p1)
  np.testing.assert_allclose(p0, ref, rtol=1e-5, atol=1e-6)
