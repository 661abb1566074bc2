#!/usr/bin/env bash
# The small wheels benchmarks/gpu_check.sh installs offline (what a jax+flax+optax Python lacks for
# splitjax: dp-accounting and the pure-Python packages it imports), at the versions of
# constraints.txt. dp-accounting also declares dm-tree (compiled), which none of the modules splitjax
# imports uses: installing with --no-deps leaves it out. Writes build/gpu_wheels (or $1); run where
# the package index is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-build/gpu_wheels}
mkdir -p "$dest"
pin() { grep -i "^$1==" constraints.txt; }
pip download -q --no-deps -d "$dest" "$(pin dp-accounting)" "$(pin mpmath)" "$(pin attrs)"
ls -la "$dest"
du -sh "$dest"
