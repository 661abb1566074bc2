"""Every attack's outputs on fixed small problems, saved to one .npz: a regression oracle.

The quick report (docs/results/results.json) exercises EXACT, the priors and k-NN through the
binaries; this probe also covers `optimize`, `hybrid` (with and without noise), `exact_activations`
(with and without dense features), the label-only attacks and EXACT's rarer options (screening,
top-k votes, cosine, parameter versions, candidate blocks, per-user priors). Run it on two commits
and compare bit for bit:

  python -m benchmarks.attack_probe --out=/tmp/new.npz
  python -m benchmarks.attack_probe --compare=/tmp/old.npz,/tmp/new.npz

It uses only public names (and the soft head of either API generation), so it runs on the code
before and after a refactor.
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from splitjax import attacks
from splitjax import models

_OUT = flags.DEFINE_string('out', None, 'Where to write the outputs (.npz).')
_COMPARE = flags.DEFINE_string('compare', None, 'OLD.npz,NEW.npz: compare two probes bit for bit.')

CARDS = (3, 4)
N = 24


def _bce(z, y):
  return jnp.logaddexp(0.0, z) - y * z


@functools.cache
def _problem(num_dense: int):
  spec = models.ModelSpec(
    pub_cardinalities=(3, 4),
    num_pub_dense=2,
    priv_cardinalities=CARDS,
    num_priv_dense=num_dense,
    hidden=(16, 8),
  )
  model = models.make_model(spec)
  theta = model.encoder_init(jax.random.key(0))
  phi = model.head_init(jax.random.key(1))
  rng = np.random.default_rng(7)
  pub_cat = rng.integers(0, [3, 4], size=(N, 2)).astype(np.int32)
  pub_dense = rng.normal(size=(N, 2)).astype(np.float32)
  x = rng.integers(0, CARDS, size=(N, len(CARDS))).astype(np.int32)
  dense = rng.uniform(size=(N, num_dense)).astype(np.float32)
  y = rng.integers(0, 2, N).astype(np.float32)
  h = np.asarray(model.encode_batch(theta, pub_cat, pub_dense))
  grad = jax.vmap(jax.grad(lambda hh, xx, dd, yy: _bce(model.head_apply(phi, hh, xx, dd), yy)))
  g = np.asarray(grad(h, x, dense, y))
  return model, phi, h, g, rng


def _soft(model):
  if hasattr(models, 'soft_device_apply'):
    return models.soft_device_apply(model)
  return attacks.relaxed_device_apply(model)


def _flat(prefix, result, out):
  for name, value in result._asdict().items():
    if value is None:
      continue
    parts = value if isinstance(value, tuple) else (value,)
    for i, part in enumerate(parts):
      out[f'{prefix}.{name}.{i}'] = np.asarray(part)


def probe() -> dict:
  out: dict = {}
  model, phi, h, g, rng = _problem(0)
  apply = models.device_logit_fn(model)
  clipped = g * np.minimum(1.0, 0.05 / np.linalg.norm(g, axis=1, keepdims=True))
  noisy = (clipped + 0.02 * rng.normal(size=g.shape)).astype(np.float32)
  prior = rng.normal(size=(N, 12, 2)).astype(np.float32)
  phi2 = jax.tree.map(lambda a: jnp.stack([a, 1.1 * a]), phi)
  index = (np.arange(N) % 2).astype(np.int32)
  runs = {
    'exact': dict(),
    'exact_clip': dict(g_obs=clipped, l2_clip_norm=0.05),
    'exact_unaware': dict(g_obs=clipped, l2_clip_norm=0.05, clip_aware=False),
    'exact_bayes': dict(g_obs=noisy, l2_clip_norm=0.05, noise_stddev=0.02, log_prior=prior),
    'exact_top3': dict(g_obs=noisy, top_k=3),
    'exact_cosine': dict(g_obs=noisy, distance='cosine'),
    'exact_blocks': dict(g_obs=noisy, chunk_size=5, users_per_chunk=4),
    'exact_screen': dict(screen_dtype='bfloat16'),
    'exact_screen_noisy': dict(g_obs=noisy, screen_dtype='bfloat16', top_k=2),
    'exact_versions': dict(device_params=phi2, param_index=index),
  }
  for name, kw in runs.items():
    args = dict(device_params=phi, h=h, g_obs=g)
    args.update(kw)
    _flat(name, attacks.exact(apply, cardinalities=CARDS, **args), out)
  _flat('label_norm', attacks.label_norm(noisy, positive_fraction=0.4), out)
  _flat('label_direction', attacks.label_direction(noisy), out)

  model1, phi1, h1, g1, _ = _problem(1)
  common = dict(num_steps=20, key=jax.random.key(3))
  _flat(
    'optimize',
    attacks.optimize(_soft(model1), phi1, h1, g1, CARDS, 1, num_restarts=4, **common),
    out,
  )
  _flat(
    'hybrid',
    attacks.hybrid(
      model1.head_apply, phi1, h1, g1, CARDS, 1, num_restarts=8, num_refine=6, **common
    ),
    out,
  )
  g1n = (g1 + 0.01 * np.random.default_rng(5).normal(size=g1.shape)).astype(np.float32)
  _flat(
    'hybrid_bayes',
    attacks.hybrid(
      model1.head_apply,
      phi1,
      h1,
      g1n,
      CARDS,
      1,
      num_restarts=8,
      num_refine=6,
      noise_stddev=0.01,
      **common,
    ),
    out,
  )

  spec_b = models.ModelSpec(
    pub_cardinalities=(3,),
    num_pub_dense=1,
    priv_cardinalities=CARDS,
    num_priv_dense=1,
    topology='device_bottom',
    hidden=(8,),
  )
  mb = models.make_model(spec_b)
  enc = mb.encoder_init(jax.random.key(4))
  xb = rng.integers(0, CARDS, size=(N, 2)).astype(np.int32)
  db = rng.uniform(size=(N, 1)).astype(np.float32)
  a = np.asarray(mb.encode_batch(enc, xb, db))
  a = a * np.minimum(1.0, 1.0 / np.linalg.norm(a, axis=1, keepdims=True))
  a_noisy = (a + 0.05 * rng.normal(size=a.shape)).astype(np.float32)
  fixed = lambda p, x, d: mb.encoder_apply(p, x, jnp.full((1,), 0.5))
  _flat('act', attacks.exact_activations(fixed, enc, a_noisy, CARDS, l2_clip_norm=1.0), out)
  _flat(
    'act_bayes',
    attacks.exact_activations(
      fixed, enc, a_noisy, CARDS, l2_clip_norm=1.0, noise_stddev=0.05, log_prior=prior[:, :, 0]
    ),
    out,
  )
  _flat(
    'act_dense',
    attacks.exact_activations(
      mb.encoder_apply,
      enc,
      a_noisy,
      CARDS,
      num_dense=1,
      l2_clip_norm=1.0,
      num_steps=10,
      num_restarts=8,
      key=jax.random.key(5),
    ),
    out,
  )
  return out


def compare(old_path: str, new_path: str) -> int:
  old, new = np.load(old_path), np.load(new_path)
  keys = sorted(set(old.files) | set(new.files))
  bad = []
  for k in keys:
    if k not in old.files or k not in new.files:
      bad.append(f'{k}: only in {"new" if k in new.files else "old"}')
    elif old[k].shape != new[k].shape or old[k].dtype != new[k].dtype:
      bad.append(f'{k}: {old[k].shape} {old[k].dtype} -> {new[k].shape} {new[k].dtype}')
    elif not np.array_equal(old[k], new[k], equal_nan=True):
      diff = np.abs(old[k].astype(np.float64) - new[k].astype(np.float64))
      bad.append(
        f'{k}: {int(np.sum(old[k] != new[k]))} entries differ, max |diff| {diff.max():.3g}'
      )
  print(f'{len(bad)} of {len(keys)} arrays differ ({sum(old[k].size for k in old.files)} values)')
  for line in bad:
    print(' ', line)
  return 1 if bad else 0


def main(argv):
  del argv
  if _COMPARE.value:
    sys.exit(compare(*_COMPARE.value.split(',')))
  if not _OUT.value:
    sys.exit('pass --out=FILE.npz or --compare=OLD.npz,NEW.npz')
  out = probe()
  np.savez(_OUT.value, **out)
  print(f'wrote {len(out)} arrays to {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
