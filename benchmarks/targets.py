r"""EXACT against its targets: a plain, a factored and splitjax's head, both rooflines, torch.func.

Not run by CI. One process, one set of users and gradients for every contender (the adult DeepFM
shape of `benchmarks.exact_throughput`, random parameters, inputs drawn with `jax.random` on the
default device):

- heads: `plain` (the first layer written `concatenate([h, e(x)]) @ W1`, as users write it),
  `factored` (`W1_h h + sum_j T_j[x_j]`, the same function of the same parameters written as
  `splitjax.models.Head` computes it) and `models.Head` itself (`models.make_model` on the adult
  shape: its own initialiser, the same widths, its own gradients of the same users);
- contenders per head: `f32` (`attacks.exact` under `jax.default_matmul_precision('highest')`) and
  `bf16` (the screen, `screen_dtype='bfloat16'`, which rescoring makes exact); and `torch.func`
  (vmap of grad over the 1,680 pairs of a user, a Python loop over users; the plain head written in
  torch with the same parameters; the ratio of every head is taken to it, the same shape and
  widths) when torch is importable (the `bench` extra; never installed by
  CI, never imported by the library) and the default device is a CPU;
- timing: the first call of each contender (compilation included) reported apart; then
  `--rounds` (>= 5) interleaved rounds, each running every contender once in a rotated order, so a
  drifting load hits them alike; medians with the min-max spread, and the paired per-round ratios;
- rates: dense 2048^3 float32 (highest precision) and bf16 (float32 sums) matmuls, measured before
  and after the contenders; the fractions use the larger of the two medians (the conservative
  roofline);
- FLOPs per private candidate: `attacks.estimate`'s traced count for each head (its
  candidate-dependent part; the h product of the factored head is per user);
- answers: the screen's map answers against the f32 ones, torch's argmin against exact's.

The targets (issue 22): f32 >= 75 % of the f32 roofline; the screen >= 40 % of the bf16 roofline
with answers identical to f32; >= 10x torch.func. Each is printed met or missed with its numbers.

  python -m benchmarks.targets
  python -m benchmarks.targets --users=4096 --rounds=7 --json=/tmp/targets.json
"""

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from benchmarks import heads as et
from splitjax import attacks

_USERS = flags.DEFINE_integer('users', 512, 'Users attacked by every contender.')
_DATASET = flags.DEFINE_enum('dataset', 'adult', sorted(et.SHAPES), 'The head\'s shape.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved timed rounds (at least 5).')
_TORCH = flags.DEFINE_enum(
  'torch', 'auto', ['auto', 'yes', 'no'], 'torch.func contender: auto = when importable on a CPU.'
)
_JSON = flags.DEFINE_string('json', None, 'Optional path for the figures as JSON.')
_MATMUL_N = flags.DEFINE_integer(
  'matmul_n', 2048, 'Side of the square matmuls that measure the rooflines (8192 on a GPU).'
)
_CPU_USERS = flags.DEFINE_integer(
  'compare_cpu_users',
  256,
  'On an accelerator: the first N users attacked again in float32 on the host CPU, and on the '
  'accelerator at its default matmul precision (TF32 on Hopper), answers compared.',
)

F32_TARGET, BF16_TARGET, TORCH_TARGET = 0.75, 0.40, 10.0


def rates(repeats: int = 10) -> dict:
  """Dense matmul FLOP/s: float32 at highest precision, and bf16 inputs with float32 sums."""
  n = _MATMUL_N.value
  with jax.default_matmul_precision('highest'):
    f32 = et.matmul_flops_per_second(repeats, n)
  return dict(f32=f32, bf16=et.matmul_flops_per_second(repeats, n, dtype=jnp.bfloat16))


def precision_check(heads: dict, s: et.Shape, h, answers, num_users: int) -> dict:
  """Accelerator answers against the host CPU's float32 ones on the first `num_users` users.

  `answers`: the accelerator's results by contender name. Also the accelerator at its default
  matmul precision (TF32 on Hopper), which can change EXACT's answers.
  """
  m, cards = min(num_users, s.num_users), s.priv_cardinalities
  same = lambda a, b: float(
    np.mean(
      (a.map_features[:m] == b.map_features[:m]).all(1) & (a.map_labels[:m] == b.map_labels[:m])
    )
  )
  out = {}
  for head, (apply, params, g) in heads.items():
    cpu = jax.devices('cpu')[0]
    with jax.default_device(cpu), jax.default_matmul_precision('highest'):
      ref = attacks.exact(apply, jax.device_put(params, cpu), h[:m], g[:m], cards, devices=[cpu])
    default = attacks.exact(apply, params, h[:m], g[:m], cards)
    out[head] = dict(
      users=m,
      f32_highest_equal_cpu=same(answers[f'{head}/f32'], ref),
      bf16_screen_equal_cpu=same(answers[f'{head}/bf16'], ref),
      default_precision_equal_cpu=same(default, ref),
    )
  return out


def head_gemm_rates(s: et.Shape, rows: int = 8192, repeats: int = 10) -> dict:
  """FLOP/s of the head's own candidate-dependent matmuls, alone, at `rows` candidates.

  relu(a1) @ W2 [rows, h1] x [h1, h2], then the backward delta2 @ W2^T and delta1 @ W1_h^T
  [rows, h1] x [h1, d]: the matmul rate a perfect implementation of these shapes would get (the
  ceiling below the 2048^3 roofline that narrow layers leave), float32 (highest) and bf16.
  """
  h1, h2 = s.hidden
  k = jax.random.split(jax.random.key(7), 4)
  a = jax.random.normal(k[0], (rows, h1), jnp.float32)
  w2 = jax.random.normal(k[1], (h1, h2), jnp.float32)
  w1h = jax.random.normal(k[2], (s.d, h1), jnp.float32)

  def chain(a, w2, w1h):
    dt = a.dtype
    z2 = jnp.dot(a, w2, preferred_element_type=jnp.float32)
    d1 = jnp.dot(z2.astype(dt), w2.T, preferred_element_type=jnp.float32)
    return jnp.dot(d1.astype(dt), w1h.T, preferred_element_type=jnp.float32)

  flops = 2 * rows * (2 * h1 * h2 + h1 * s.d)
  out = {}
  for name, dt in (('f32', jnp.float32), ('bf16', jnp.bfloat16)):
    args = [x.astype(dt) for x in (a, w2, w1h)]
    fn = jax.jit(chain)
    with jax.default_matmul_precision('highest'):
      out[name] = flops / et.median_time(lambda fn=fn, args=args: fn(*args), repeats)
  return out


def inputs(s: et.Shape, key):
  """Parameters, users' h [n, d], true (x [n, P], y [n]) and their cut gradients g [n, d]."""
  kp, kh, kx, ky = jax.random.split(key, 4)
  params = et.init_deepfm(kp, s)
  n = s.num_users
  h = 0.5 * jax.random.normal(kh, (n, s.d), jnp.float32)
  kxs = jax.random.split(kx, len(s.priv_cardinalities))
  x = jnp.stack(
    [jax.random.randint(k, (n,), 0, c) for k, c in zip(kxs, s.priv_cardinalities, strict=True)], 1
  )
  x = x.astype(jnp.int32)
  y = jax.random.bernoulli(ky, 0.5, (n,)).astype(jnp.float32)
  apply = et.make_apply(s, plain=True)
  with jax.default_matmul_precision('highest'):
    g = jax.jit(jax.vmap(jax.grad(lambda h_, x_, y_: et.bce(apply, params, h_, x_, y_))))(h, x, y)
  return params, np.asarray(h), np.asarray(x), np.asarray(y), np.asarray(g)


HEADS = ('plain', 'factored', 'models.Head')


def make_heads(s: et.Shape, params, h, x, y, g) -> dict:
  """{name: (device_apply, device params, g [n, d])} for every head, on the same users.

  `plain` and `factored` share `params` and the gradients of `inputs`; `models.Head` is
  `splitjax.models.make_model` on the adult shape (the head the binaries attack; its own
  initialiser, the same widths), with its own gradients of the same (h, x, y).
  """
  from splitjax import models  # pylint: disable=import-outside-toplevel

  spec = models.ModelSpec(
    pub_cardinalities=(9, 16, 15, 42),
    num_pub_dense=s.num_dense,
    priv_cardinalities=s.priv_cardinalities,
    hidden=s.hidden,
  )
  if spec.cut_dim != s.d:
    raise ValueError(f'models.Head cut width {spec.cut_dim} != the benchmark shape\'s {s.d}')
  model = models.make_model(spec)
  phi = model.head_init(jax.random.key(1))
  head_apply = models.device_logit_fn(model)
  with jax.default_matmul_precision('highest'):
    g_head = jax.jit(jax.vmap(jax.grad(lambda h_, x_, y_: et.bce(head_apply, phi, h_, x_, y_))))(
      h, x, y
    )
  return {
    'plain': (et.make_apply(s, plain=True), params, g),
    'factored': (et.make_apply(s), params, g),
    'models.Head': (head_apply, phi, np.asarray(g_head)),
  }


def torch_contender(params, s: et.Shape, h, g):
  """The plain head in torch (same parameters), vmap(grad) over a user's pairs, loop over users.

  Returns run() -> [n] int flat pair index (candidate * 2 + label) of each user's nearest pair.
  """
  import torch  # pylint: disable=import-outside-toplevel
  from torch import func  # pylint: disable=import-outside-toplevel

  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  p = jax.tree.map(t, params)
  w1 = torch.cat([p['W1_h'], *p['W1_priv']], 0)
  sf, num_priv = s.num_server_fields * s.embed_dim, len(s.priv_cardinalities)
  emb = torch.nn.functional.embedding  # (a lookup vmap can batch; indexing by a batched int cannot)
  w_priv = [w[:, None] for w in p['w_priv']]

  def apply(hh, xx):
    e = [emb(xx[j], p['emb'][j]) for j in range(num_priv)]
    lin = hh @ p['w_h'] + sum(emb(xx[j], w_priv[j])[0] for j in range(num_priv)) + p['bias']
    fields = torch.cat([hh[:sf].reshape(s.num_server_fields, s.embed_dim), torch.stack(e)])
    tot = fields.sum(0)
    fm = 0.5 * torch.sum(tot * tot - torch.sum(fields * fields, 0))
    a1 = torch.cat([hh, *e]) @ w1 + p['b1']
    a2 = torch.relu(torch.relu(a1) @ p['W2'] + p['b2'])
    return lin + fm + a2 @ p['w3'] + p['b3']

  def loss(hh, xx, yy):
    z = apply(hh, xx)
    return torch.nn.functional.softplus(z) - yy * z

  table = attacks.candidate_table(s.priv_cardinalities)
  pairs_x = torch.from_numpy(np.repeat(table, 2, axis=0).astype(np.int64))
  pairs_y = torch.from_numpy(np.tile(np.array([0.0, 1.0], np.float32), len(table)))
  grads = func.vmap(func.grad(loss), in_dims=(None, 0, 0))
  th, tg = torch.from_numpy(h), torch.from_numpy(g)

  def run():
    with torch.no_grad():
      return np.array(
        [
          int(torch.argmin(((grads(th[u], pairs_x, pairs_y) - tg[u]) ** 2).sum(-1)))
          for u in range(th.shape[0])
        ]
      )

  return run


def main(argv):
  del argv
  if _ROUNDS.value < 5:
    raise app.UsageError(f'--rounds={_ROUNDS.value}: at least 5 interleaved rounds are timed')
  s = et.SHAPES[_DATASET.value]
  s = et.Shape(**{**s.__dict__, 'num_users': _USERS.value})
  platform = jax.devices()[0].platform
  print(
    f'jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind} ({platform})'
  )
  before = rates()
  params, h, x, y, g = inputs(s, jax.random.key(0))
  n, num_cand = s.num_users, math.prod(s.priv_cardinalities)
  cards = s.priv_cardinalities
  contenders, flops = {}, {}
  heads = make_heads(s, params, h, x, y, g)
  for head, (apply, p, gh) in heads.items():
    flops[head] = attacks.estimate(apply, p, s.d, cards, n).flops_per_candidate

    def f32(apply=apply, p=p, gh=gh):
      with jax.default_matmul_precision('highest'):
        return attacks.exact(apply, p, h, gh, cards)

    def bf16(apply=apply, p=p, gh=gh):
      with jax.default_matmul_precision('highest'):
        return attacks.exact(apply, p, h, gh, cards, screen_dtype='bfloat16')

    contenders[f'{head}/f32'], contenders[f'{head}/bf16'] = f32, bf16
  use_torch = _TORCH.value == 'yes' or (_TORCH.value == 'auto' and platform == 'cpu')
  if use_torch:
    try:
      contenders['plain/torch.func'] = torch_contender(params, s, h, g)
    except ImportError as e:
      if _TORCH.value == 'yes':
        raise app.UsageError(f'--torch=yes: {e} (pip install -e ".[bench]")') from e
      print(f'torch.func left out: {e}')
  first, answers, times = {}, {}, {name: [] for name in contenders}
  for name, fn in contenders.items():
    t0 = time.perf_counter()
    answers[name] = jax.block_until_ready(fn())
    first[name] = time.perf_counter() - t0
  names = list(contenders)
  for r in range(_ROUNDS.value):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      t0 = time.perf_counter()
      jax.block_until_ready(contenders[name]())
      times[name].append(time.perf_counter() - t0)
  after = rates()
  gemm = head_gemm_rates(s)
  check = None
  if platform != 'cpu' and _CPU_USERS.value > 0:
    check = precision_check(heads, s, h, answers, _CPU_USERS.value)
  peak = {k: max(before[k], after[k]) for k in before}
  truth = np.ravel_multi_index(tuple(x.T), cards) * 2 + y.astype(np.int64)
  rows = {}
  for name in names:
    head, kind = name.split('/')
    ts = np.asarray(times[name])
    med = float(np.median(ts))
    row = dict(
      median_seconds=med,
      min_seconds=float(ts.min()),
      max_seconds=float(ts.max()),
      seconds_all=ts.tolist(),
      first_call_seconds=first[name],
    )
    a = answers[name]
    if kind == 'torch.func':
      pairs = a
    else:
      pairs = np.ravel_multi_index(tuple(a.map_features.T), cards) * 2 + a.map_labels
      rate = n * num_cand * flops[head] / med
      row.update(
        flops_per_candidate=flops[head],
        candidate_gradients_per_second=n * num_cand / med,
        flops_per_second=rate,
        fraction_of_f32_roofline=rate / peak['f32'],
        fraction_of_bf16_roofline=rate / peak['bf16'],
      )
      if kind == 'bf16':
        ref = answers[f'{head}/f32']
        row['answers_equal_f32'] = bool(
          np.array_equal(a.map_features, ref.map_features)
          and np.array_equal(a.map_labels, ref.map_labels)
        )
        row['redone_in_f32'] = float(np.mean(a.screen_fallback))
    row['recovered'] = float(np.mean(pairs == truth))
    rows[name] = row
  if 'plain/torch.func' in rows:
    ref = np.asarray(times['plain/torch.func'])
    for name in names:
      if name != 'plain/torch.func':
        rows[name]['x_torch_func'] = float(np.median(ref / np.asarray(times[name])))
  print(
    f'\nrates (median of 10, before / after): f32 {before["f32"] / 1e9:.1f} / '
    f'{after["f32"] / 1e9:.1f} GFLOP/s, bf16 {before["bf16"] / 1e9:.1f} / '
    f'{after["bf16"] / 1e9:.1f} GFLOP/s (bf16 / f32 = {peak["bf16"] / peak["f32"]:.2f})'
  )
  print(
    f"the head's own matmul shapes alone ({s.hidden[0]}x{s.hidden[1]}, {s.hidden[0]}x{s.d}, "
    f'8,192 candidates): f32 {gemm["f32"] / 1e9:.1f} GFLOP/s '
    f'({100 * gemm["f32"] / peak["f32"]:.0f} % of the f32 roofline), bf16 '
    f'{gemm["bf16"] / 1e9:.1f} GFLOP/s ({100 * gemm["bf16"] / peak["bf16"]:.0f} % of bf16)'
  )
  print(
    f'{s.name} DeepFM, {n} users x {2 * num_cand} pairs; {_ROUNDS.value} interleaved rounds; '
    'kFLOP/cand: ' + ', '.join(f'{k} {v / 1e3:.1f}' for k, v in flops.items())
  )
  print(
    '| contender | median s | spread (min-max) | first call s | % f32 roofline | '
    '% bf16 roofline | x torch.func | = f32 | recovered |'
  )
  print('|---|---|---|---|---|---|---|---|---|')
  for name, r in rows.items():
    pct = lambda k, r=r: f'{100 * r[k]:.1f}' if k in r else '-'
    eq = r.get('answers_equal_f32')
    print(
      f'| {name} | {r["median_seconds"]:.3f} | {r["min_seconds"]:.3f}-{r["max_seconds"]:.3f} | '
      f'{r["first_call_seconds"]:.2f} | {pct("fraction_of_f32_roofline")} | '
      f'{pct("fraction_of_bf16_roofline")} | '
      + (f'{r["x_torch_func"]:.1f}' if 'x_torch_func' in r else '-')
      + f' | {"-" if eq is None else ("yes" if eq else "NO")} | {r["recovered"]:.3f} |'
    )
  verdicts = []
  for head in HEADS:
    f, b = rows[f'{head}/f32'], rows[f'{head}/bf16']
    verdicts.append(
      (
        f'{head}: f32 >= {F32_TARGET:.0%} of the f32 roofline',
        f['fraction_of_f32_roofline'] >= F32_TARGET,
        f'{100 * f["fraction_of_f32_roofline"]:.1f} %',
      )
    )
    verdicts.append(
      (
        f'{head}: screen >= {BF16_TARGET:.0%} of the bf16 roofline, answers = f32',
        b['fraction_of_bf16_roofline'] >= BF16_TARGET and b['answers_equal_f32'],
        f'{100 * b["fraction_of_bf16_roofline"]:.1f} %, answers equal: {b["answers_equal_f32"]}',
      )
    )
    if 'x_torch_func' in f:
      best = max(f['x_torch_func'], b['x_torch_func'])
      verdicts.append(
        (
          f'{head}: >= {TORCH_TARGET:.0f}x torch.func',
          best >= TORCH_TARGET,
          f'{best:.1f}x (f32 {f["x_torch_func"]:.1f}x, screen {b["x_torch_func"]:.1f}x)',
        )
      )
  if check is not None:
    for head, c in check.items():
      print(
        f'{head}: answers equal to the host CPU float32 ones on {c["users"]} users: f32 at highest '
        f'precision {c["f32_highest_equal_cpu"]:.4f}, bf16 screen '
        f'{c["bf16_screen_equal_cpu"]:.4f}, '
        f'default precision {c["default_precision_equal_cpu"]:.4f}'
      )
  print()
  for text, met, value in verdicts:
    print(f'{"met   " if met else "MISSED"} {text}: {value}')
  if _JSON.value:
    with open(_JSON.value, 'w') as fh:
      json.dump(
        dict(
          rates_before=before,
          rates_after=after,
          shape=s.__dict__,
          rows=rows,
          targets=[dict(target=t, met=m, value=v) for t, m, v in verdicts],
        ),
        fh,
        indent=2,
        default=str,
      )


if __name__ == '__main__':
  app.run(main)
