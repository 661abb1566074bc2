"""Flags of the binaries that attack (attack, sweep), defined once (the tests import every binary
into one process). `train` and `reproduce` do not import this module, so they do not take them."""

from absl import flags

NUM_EXAMPLES = flags.DEFINE_integer(
  "num_examples", None, "Attack only the first N users (unset = all)."
)
