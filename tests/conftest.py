"""Shared pytest set-up: absl flags parsed, float32 default, small shared fixtures."""

from absl import flags

flags.FLAGS.mark_as_parsed()

# Test files in decreasing order of their serial run time (seconds on a 2-core machine, measured
# with `pytest --durations=0`). pytest-xdist (`--dist loadfile --no-loadscope-reorder`) hands the
# files to workers in this order, longest first, so no worker is left alone with a long file at
# the end. Files not listed run after these, in collection order. Only the order changes: every
# test still runs.
_LONGEST_FIRST = (
    "test_experiments.py", "test_numerics.py", "test_optimize.py", "test_exact.py",
    "test_bad_input.py", "test_distributed.py", "test_training.py", "test_protocol.py",
    "test_sharding.py", "test_activations.py", "test_privacy_transforms.py",
    "test_antipodal.py", "test_properties.py",
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps test order
