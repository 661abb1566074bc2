"""Diffs two reproduction reports (results.json) on every non-timing number: the regression oracle.

  python -m benchmarks.compare_results docs/results/results.json workdirs/quick/results.json

Keys that hold wall times or throughputs (``*seconds*``, ``candidates_per_second``) and the
``environment`` blocks (versions, devices, UTC time) are skipped;
every other leaf must be equal (floats within --rtol, default 0: bit for bit as JSON prints them).
Exits 1 and lists the differing paths when any differ.
"""

import json
import math
import sys

_TIMING = ("seconds", "candidates_per_second", "per_second")


def leaves(obj, path=""):
  if isinstance(obj, dict):
    for k, v in obj.items():
      if not any(t in str(k) for t in _TIMING) and k != "environment":
        yield from leaves(v, f"{path}.{k}" if path else str(k))
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      yield from leaves(v, f"{path}[{i}]")
  else:
    yield path, obj


def differences(old, new, rtol=0.0):
  a, b = dict(leaves(old)), dict(leaves(new))
  out = [f"only in old: {p}" for p in sorted(set(a) - set(b))]
  out += [f"only in new: {p}" for p in sorted(set(b) - set(a))]
  for p in sorted(set(a) & set(b)):
    x, y = a[p], b[p]
    if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
      same = (
        x == y or (math.isnan(x) and math.isnan(y)) or (rtol and math.isclose(x, y, rel_tol=rtol))
      )
    else:
      same = x == y
    if not same:
      out.append(f"{p}: {x!r} -> {y!r}")
  return out


def main(argv):
  rtol = 0.0
  args = [a for a in argv[1:] if not a.startswith("--rtol=")]
  for a in argv[1:]:
    if a.startswith("--rtol="):
      rtol = float(a.split("=", 1)[1])
  if len(args) != 2:
    sys.exit(__doc__)
  old, new = (json.load(open(p)) for p in args)
  diff = differences(old, new, rtol)
  n = sum(1 for _ in leaves(old))
  print(f"{len(diff)} of {n} non-timing values differ")
  for line in diff[:200]:
    print(line)
  sys.exit(1 if diff else 0)


if __name__ == "__main__":
  main(sys.argv)
