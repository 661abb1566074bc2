"""Shared pytest set-up: absl flags parsed, float32 default, small shared fixtures."""

from absl import flags

flags.FLAGS.mark_as_parsed()
