r"""How EXACT's cost grows: time and peak memory against users and against the candidate domain.

  python -m benchmarks.scaling --out=/tmp/scaling.json
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.scaling --users=10000
  python -m benchmarks.scaling --screen_dtype=bfloat16      # the bf16 screen (see exact)

Each configuration runs in its own subprocess so that its peak resident memory
(``ru_maxrss``) is its own. Model: splitjax's DeepFM head with adult's server
side (d = 36) and random parameters; users are random (h, g) pairs produced by
the model itself, so every answer is a real candidate. Not run by CI.

On one CPU host, forced devices share the same cores: they measure the overhead
of sharding, not a speed-up.
"""

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

_USERS = flags.DEFINE_list("users", ["1000", "10000", "50000"], "User counts (adult domain).")
_DOMAINS = flags.DEFINE_list("domains", ["adult", "bank", "large"], "Domains at --domain_users.")
_DOMAIN_USERS = flags.DEFINE_integer("domain_users", 1000, "Users for the domain sweep.")
_OUT = flags.DEFINE_string("out", None, "Write the table as JSON here.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one configuration 'domain:users'.")
_SCREEN = flags.DEFINE_string(
  "screen_dtype",
  None,
  "Optional: time exact's low-precision screen (bfloat16 or float16) instead of float32.",
)

DOMAINS = {
  "adult": (2, 5, 6, 7),  # 420 private candidates x 2 labels = 840
  "bank": (3, 12, 4, 2, 2, 3),  # 1,728 x 2 = 3,456
  "large": (2, 5, 6, 7, 6, 6),  # 15,120 x 2 = 30,240
}


def run_one(domain: str, num_users: int, screen_dtype=None) -> dict:
  import resource  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from splitjax import attacks  # pylint: disable=g-import-not-at-top
  from splitjax import models  # pylint: disable=g-import-not-at-top

  cards = DOMAINS[domain]
  spec = models.ModelSpec(
    pub_cardinalities=(9, 16, 15, 42), num_pub_dense=4, priv_cardinalities=cards
  )
  model = models.make_model(spec)
  phi = model.head_init(jax.random.key(1))
  apply = models.device_logit_fn(model)
  rng = np.random.default_rng(0)
  h = rng.normal(scale=0.1, size=(num_users, spec.cut_dim)).astype(np.float32)
  x = np.stack([rng.integers(0, c, num_users) for c in cards], 1).astype(np.int32)
  y = rng.integers(0, 2, num_users).astype(np.float32)
  grad = jax.jit(
    jax.vmap(
      lambda hh, xx, yy: (
        (jax.nn.sigmoid(apply(phi, hh, xx)) - yy) * jax.grad(apply, argnums=1)(phi, hh, xx)
      )
    )
  )
  g = np.asarray(grad(h, x, y))
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t = time.perf_counter()
  attacks.exact(apply, phi, h[:1], g[:1], cards, screen_dtype=screen_dtype)  # compile
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(2 if num_users <= 10_000 else 1):
    t = time.perf_counter()
    res = attacks.exact(apply, phi, h, g, cards, screen_dtype=screen_dtype)
    times.append(time.perf_counter() - t)
  seconds = float(np.median(times))
  rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  private = int(np.prod(cards))
  return {
    "domain": domain,
    "users": num_users,
    "candidates": 2 * private,
    "screen_dtype": screen_dtype or "none",
    "devices": jax.device_count(),
    "seconds": seconds,
    "compile_seconds": compile_s,
    "seconds_per_user": seconds / num_users,
    "ns_per_candidate": 1e9 * seconds / (num_users * 2 * private),
    "candidate_gradients_per_second": num_users * private / seconds,
    "peak_rss_mib": rss1 / 1024,
    "attack_rss_growth_mib": (rss1 - rss0) / 1024,
    "recovered": float(np.mean(np.all(res.features == x, axis=1) & (res.labels == y))),
  }


def main(argv):
  del argv
  if _WORKER.value:
    domain, users = _WORKER.value.split(":")
    print("RESULT " + json.dumps(run_one(domain, int(users), _SCREEN.value)), flush=True)
    return
  configs = [("adult", int(u)) for u in _USERS.value]
  configs += [
    (d, _DOMAIN_USERS.value) for d in _DOMAINS.value if (d, _DOMAIN_USERS.value) not in configs
  ]
  rows = []
  for domain, users in configs:
    cmd = [sys.executable, "-m", "benchmarks.scaling", f"--worker={domain}:{users}"]
    if _SCREEN.value:
      cmd.append(f"--screen_dtype={_SCREEN.value}")
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    line = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")]
    if not line:
      print(out.stderr[-2000:])
      continue
    rows.append(json.loads(line[0][7:]))
    r = rows[-1]
    print(
      f"{r['domain']:>6} users {r['users']:>6} candidates {r['candidates']:>6} devices "
      f"{r['devices']}: {r['seconds']:.2f} s ({r['seconds_per_user'] * 1e3:.3f} ms/user, "
      f"{r['ns_per_candidate']:.1f} ns/candidate, {r['candidate_gradients_per_second']:.3g} "
      f"grad/s), peak RSS {r['peak_rss_mib']:.0f} MiB (+{r['attack_rss_growth_mib']:.0f}), "
      f"recovered {r['recovered']:.3f}",
      flush=True,
    )
    if _OUT.value:  # after every row: a run stopped by a timeout keeps what it measured
      with open(_OUT.value, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
