"""Shared pytest set-up: absl flags parsed, one XLA compilation cache, longest files first."""

import os
import shutil
import tempfile

from absl import flags

flags.FLAGS.mark_as_parsed()

# One persistent XLA compilation cache for the whole session: the xdist workers and every
# subprocess a test starts (they inherit the environment) compile the same small functions, and
# compilation is most of the suite's time on CPU. Only compilation is skipped: tracing still
# happens (retrace tests count traces), and a cached executable is the one the compiler would
# produce. A cache given by the caller (JAX_COMPILATION_CACHE_DIR, e.g. by CI) is used as is.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="splitjax-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session, exitstatus):
  del exitstatus
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # the controller made it
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# Test files in decreasing order of their serial run time (seconds on a 2-core machine, measured
# with `pytest --durations=0`). pytest-xdist (`--dist loadfile --no-loadscope-reorder`) hands the
# files to workers in this order, longest first, so no worker is left alone with a long file at
# the end. Files not listed run after these, in collection order. Only the order changes: every
# test still runs.
_LONGEST_FIRST = (
  "test_experiments.py",
  "test_exact.py",
  "test_optimize.py",
  "test_bad_input.py",
  "test_distributed.py",
  "test_numerics.py",
  "test_protocol.py",
  "test_likelihoods.py",
  "test_defenses.py",
  "test_training.py",
  "test_tracking.py",
  "test_sharding.py",
  "test_privacy_transforms.py",
  "test_dispatch.py",
  "test_activations.py",
  "test_audit.py",
  "test_antipodal.py",
  "test_packaging.py",
  "test_properties.py",
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps test order
