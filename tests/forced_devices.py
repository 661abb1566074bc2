"""Runs a Python script in a fresh process that sees N forced host (CPU) devices.

`XLA_FLAGS=--xla_force_host_platform_device_count=N` only takes effect before JAX starts, so
multi-device tests run their body in a subprocess; the script should assert
`jax.device_count() == N` itself.
"""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(script: str, *args: str, num_devices: int = 4, timeout: int = 600):
  """`python -c script *args` with N forced CPU devices, the repo and tests/ importable."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = (
    env.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={num_devices}'
  ).strip()
  env['JAX_PLATFORMS'] = 'cpu'
  # The repo (splitjax, experiments) and tests/ (scripts may load a test module by path).
  env['PYTHONPATH'] = os.pathsep.join([str(REPO), str(REPO / 'tests'), env.get('PYTHONPATH', '')])
  return subprocess.run(
    [sys.executable, '-c', script, *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
