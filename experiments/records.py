"""What every record the binaries write carries besides its results: the environment, the
resolved config, and the per-epoch history file.

``environment()`` names the software and hardware a record came from (splitjax version, git
commit when known, Python and library versions, backend and device kinds, UTC time). It changes
between machines and runs, so every comparison the project makes (resume tests, report diffs,
"identical rerun" checks) drops it with ``without_environment``.
"""

import datetime
import functools
import importlib.metadata
import json
import pathlib
import platform
import subprocess

from splitjax import results

ENVIRONMENT_KEY = "environment"
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "dp-accounting", "numpy")
_REPO = pathlib.Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def _static_environment() -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  def version(name):
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return None

  commit = None
  if (_REPO / ".git").exists():
    try:
      out = subprocess.run(
        ["git", "-C", str(_REPO), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
      )
      if out.returncode == 0:
        commit = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
      commit = None
  return {
    "splitjax": version("splitjax"),
    "git_commit": commit,
    "python": platform.python_version(),
    **{name: version(name) for name in _PACKAGES},
    "backend": jax.default_backend(),
    "devices": sorted({d.device_kind for d in jax.devices()}),
    "device_count": jax.device_count(),
    "process_count": jax.process_count(),
    # XLA's CPU kernels sum in a CPU-dependent order: reports from different CPUs differ in the
    # last digits of trained models (compare a change on one machine, old and new side by side).
    "cpu": _cpu_model(),
  }


def _cpu_model() -> str | None:
  """The host CPU's model name (Linux /proc/cpuinfo; else platform.processor()), or None."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.lower().startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or None


def environment() -> dict:
  """The software and hardware of this process, and the UTC time (a fresh dict each call)."""
  return {
    **_static_environment(),
    "utc_time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }


def without_environment(record):
  """``record`` with every ``environment`` block removed, at any depth (for comparisons)."""
  if isinstance(record, dict):
    return {k: without_environment(v) for k, v in record.items() if k != ENVIRONMENT_KEY}
  if isinstance(record, list):
    return [without_environment(v) for v in record]
  return record


def environment_footer(env: dict) -> str:
  """One Markdown line naming where a report was produced (left out of report comparisons)."""
  devices = ", ".join(env.get("devices") or []) or "?"
  commit = (env.get("git_commit") or "unknown")[:12]
  return (
    f"<sub>environment: splitjax {env.get('splitjax')} (git {commit}), Python "
    f"{env.get('python')}, jax {env.get('jax')}, jaxlib {env.get('jaxlib')}, flax "
    f"{env.get('flax')}, optax {env.get('optax')}, dp-accounting {env.get('dp-accounting')}, "
    f"numpy {env.get('numpy')}; {env.get('backend')} ({devices}"
    f"{', ' + env['cpu'] if env.get('cpu') else ''}); {env.get('utc_time')}"
    "</sub>"
  )


FOOTER_PREFIX = "<sub>environment: "


def write_history(workdir: pathlib.Path, history: list[dict]) -> None:
  """Atomically rewrites ``workdir/history.jsonl``: one JSON object per finished epoch.

  Written from the checkpointed history, so a resumed run's file equals an uninterrupted one's
  (up to the epochs' wall-clock ``seconds``).
  """
  text = "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in history)
  results.atomic_write_bytes(pathlib.Path(workdir) / "history.jsonl", text.encode())
