r"""Throughput of splitjax's EXACT against a plain vmap(grad) over (candidate, label) pairs.

Also times the bf16-screened attack (`screen_dtype='bfloat16'`: every pair scored with bf16
matmuls summed in f32, the 8 best rescored in f32, inconclusive users redone in f32) against the
f32 one in the same run, with the answers' agreement, the share of users redone, the measured bf16
matmul rate, and the relative error of screened pair gradients on 64 users.

Not run by CI. On adult-shaped (4,885 users x 840 pairs) and bank-shaped (453 x 3,456) DeepFM device
models with random parameters it prints, after compilation (median of --repeats runs):
splitjax's exact time, a plain `jax.vmap(jax.grad)` of the BCE loss over every (candidate, label)
pair followed by an argmin (same model, chunked over users the same way), a users-per-chunk sweep,
the machine's dense f32 matmul FLOP/s (a 2048 x 2048 jnp.dot) and the analytic FLOPs of one
candidate gradient, hence candidate gradients per second, the speed-up and the roofline fraction.

  python -m benchmarks.exact_throughput
  python -m benchmarks.exact_throughput --datasets=adult --repeats=3 --sweep=4,8,16
"""

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from benchmarks.heads import SHAPES
from benchmarks.heads import Shape
from benchmarks.heads import bce
from benchmarks.heads import init_deepfm
from benchmarks.heads import make_apply
from benchmarks.heads import matmul_flops_per_second
from benchmarks.heads import median_time
from splitjax import attacks
from splitjax.attacks import factor
from splitjax.attacks import sizing

_DATASETS = flags.DEFINE_list('datasets', ['adult', 'bank'], 'Shapes to benchmark.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs after compilation (median reported).')
_SWEEP = flags.DEFINE_list(
  'sweep',
  ['1', '2', '4', '8', '16', '32', '64'],
  'users_per_chunk values for the chunk-size sweep (empty: skip).',
)
_PLAIN_USERS = flags.DEFINE_list(
  'plain_users_per_chunk',
  ['2', '4', '8', '16'],
  'Chunk sizes tried for the plain vmap(grad); its best is reported.',
)
_LOOP_USERS = flags.DEFINE_integer(
  'python_loop_users',
  2,
  'Users timed with a per-candidate Python loop (authors\' style; '
  '0 to skip); extrapolated to all users.',
)
_JSON = flags.DEFINE_string('json', None, 'Optional path for the figures as JSON.')
_HEADS = flags.DEFINE_list(
  'heads',
  ['factored', 'plain', 'plain_split', 'splitjax'],
  'Heads timed side by side (empty: skip): factored (this file\'s DeepFM, first layer '
  'W_h h + sum_j T_j[x_j]), plain (the same function written concatenate-then-matmul), splitjax '
  '(models.make_model for the dataset: the head the binaries attack), plain_split (the plain '
  'head through splitjax.attacks.factor.split_concat_dots: its h product once per user).',
)
_FULL = flags.DEFINE_bool(
  'full',
  True,
  'The full benchmark per shape (f32 and bf16 timings, sweeps, plain vmap(grad), '
  'Python loop); --nofull runs the head comparison only.',
)
_HEAD_ROUNDS = flags.DEFINE_integer(
  'head_rounds', 5, 'Rounds of the head comparison; each runs every head once (interleaved).'
)


def splitjax_head(s: Shape):
  """(device_apply, device params, cut width) of `models.make_model` for dataset `s.name`.

  The model `experiments.train` builds for the dataset with its default config, random
  parameters (its own initialiser).
  """
  from experiments import pipeline  # pylint: disable=import-outside-toplevel
  from experiments.configs import base  # pylint: disable=import-outside-toplevel
  from splitjax import models  # pylint: disable=import-outside-toplevel

  config = base.TrainConfig(dataset=s.name)
  model = pipeline.model_of(config, pipeline.load_data(config))
  theta = model.server_init(jax.random.key(1))
  width = jax.eval_shape(
    model.encode_batch,
    theta,
    np.zeros((1, len(model.spec.pub_cardinalities)), np.int32),
    np.zeros((1, model.spec.num_pub_dense), np.float32),
  ).shape[1]
  return (
    models.device_logit_fn(model),
    model.device_init(jax.random.key(0)),
    int(width),
    (tuple(model.spec.priv_cardinalities)),
  )


def compare_heads(s: Shape, peak: float) -> dict:
  """Every head of --heads on the same users, timed in interleaved rounds (medians)."""
  rng = np.random.default_rng(0)
  n = s.num_users
  heads = {}
  for name in _HEADS.value:
    if name in ('factored', 'plain', 'plain_split'):
      apply = make_apply(s, plain=name != 'factored')
      if name == 'plain_split':  # the plain head through the concat-matmul split
        apply = factor.split_concat_dots(apply)
      params, d, cards = init_deepfm(jax.random.key(0), s), s.d, s.priv_cardinalities
    elif name == 'splitjax':
      apply, params, d, cards = splitjax_head(s)
    else:
      raise ValueError(
        f'unknown head {name!r} in --heads: choose factored, plain, plain_split, splitjax'
      )
    h = (0.5 * rng.normal(size=(n, d))).astype(np.float32)
    x = np.stack([rng.integers(0, k, n) for k in cards], 1).astype(np.int32)
    y = rng.integers(0, 2, n).astype(np.float32)
    g = np.asarray(
      jax.jit(jax.vmap(jax.grad(lambda h_, x_, y_, a=apply, p=params: bce(a, p, h_, x_, y_))))(
        h, x, y
      )
    )
    run = lambda a=apply, p=params, h=h, g=g, c=cards: attacks.exact(a, p, h, g, c)
    t0 = time.perf_counter()
    res = run()
    first = time.perf_counter() - t0
    est = attacks.estimate(apply, params, d, cards, n)
    heads[name] = dict(
      run=run,
      cut_width=d,
      private_candidates=math.prod(cards),
      first_call_seconds=first,
      accuracy_no_dp=float(np.mean((res.features == x).all(1) & (res.labels == y))),
      flops_per_candidate=est.flops_per_candidate,
      seconds_all=[],
    )
  for _ in range(_HEAD_ROUNDS.value):  # interleaved: a drifting load hits every head alike
    for head in heads.values():
      t0 = time.perf_counter()
      jax.block_until_ready(head['run']())
      head['seconds_all'].append(time.perf_counter() - t0)
  out = {}
  for name, head in heads.items():
    t = float(np.median(head.pop('seconds_all')))
    head.pop('run')
    rate = n * head['private_candidates'] * head['flops_per_candidate'] / t
    out[name] = dict(head, seconds=t, flops_per_second=rate, fraction_of_matmul_rate=rate / peak)
  return out


def analytic_flops_per_candidate(s: Shape) -> int:
  """Matmul FLOPs (2 per multiply-add) of one candidate's z and dz/dh, candidate-dependent part.

  Forward: relu(a1) @ W2 (h1 x h2) and a2 . w3; backward: W2 delta2 (h2 x h1) and W1_h delta1
  (h1 x d). W_h h and the embedding tables T_j = E_j W_j are shared by all candidates of a user;
  the FM, linear and elementwise terms are a few hundred FLOPs and are not counted.
  """
  h1, h2 = s.hidden
  return 2 * (h1 * h2 + h2) + 2 * (h2 * h1 + h1 * s.d)


def screened_pair_errors(apply, params, h, cards, num_users: int = 64) -> np.ndarray:
  """||g_bf16 - g_f32|| / ||g_f32|| of every (candidate, label) pair gradient of `num_users`."""
  table = jnp.asarray(attacks.candidate_table(cards))
  vg = jax.value_and_grad(apply, argnums=1)
  results = []
  for fn in (vg, attacks.low_precision_matmuls(vg)):
    z, v = jax.jit(jax.vmap(jax.vmap(fn, (None, None, 0)), (None, 0, None)))(
      params, h[:num_users], table
    )
    a = attacks.loss_factors(z)
    results.append(a[..., None] * v[:, :, None, :])
  ref, low = results
  return np.asarray(jnp.linalg.norm(low - ref, axis=-1) / jnp.linalg.norm(ref, axis=-1)).ravel()


def make_plain(apply, params, s: Shape, users_per_chunk: int):
  """Plain vmap(grad) of the BCE loss over all (candidate, label) pairs, then argmin; chunked."""
  table = attacks.candidate_table(s.priv_cardinalities)
  pairs_x = jnp.asarray(np.repeat(table, 2, axis=0))  # [2C, P], label fastest
  pairs_y = jnp.asarray(np.tile(np.array([0.0, 1.0], np.float32), len(table)))
  grad = jax.grad(lambda h, x, y: bce(apply, params, h, x, y))

  @jax.jit
  def chunk(h, g):
    def one_user(h_u, g_u):
      cand = jax.vmap(grad, in_axes=(None, 0, 0))(h_u, pairs_x, pairs_y)  # [2C, d]
      return jnp.argmin(jnp.sum(jnp.square(cand - g_u), axis=-1))

    return jax.vmap(one_user)(h, g)

  def run(h, g):
    n = h.shape[0]
    num = -(-n // users_per_chunk)
    pad = num * users_per_chunk - n
    hp = np.concatenate([h, np.repeat(h[:1], pad, 0)])
    gp = np.concatenate([g, np.repeat(g[:1], pad, 0)])
    outs = [
      chunk(
        hp[i * users_per_chunk : (i + 1) * users_per_chunk],
        gp[i * users_per_chunk : (i + 1) * users_per_chunk],
      )
      for i in range(num)
    ]
    return jnp.concatenate(outs)[:n]

  return run


def python_loop_seconds_per_user(apply, params, h, g, s: Shape, num_users: int) -> float:
  """The authors' style: one jitted gradient call per (candidate, label), a Python loop."""
  table = attacks.candidate_table(s.priv_cardinalities)
  grad = jax.jit(jax.grad(lambda h, x, y: bce(apply, params, h, x, y)))
  jax.block_until_ready(grad(h[0], table[0], 0.0))
  t0 = time.perf_counter()
  for u in range(num_users):
    best, best_d = None, np.inf
    for x in table:
      for y in (0.0, 1.0):
        dist = float(jnp.sum(jnp.square(grad(h[u], x, y) - g[u])))
        if dist < best_d:
          best, best_d = (x, y), dist
    del best  # timed for the loop's cost; the answer itself is not used
  return (time.perf_counter() - t0) / num_users


def benchmark(s: Shape, peak: float, peak_bf16: float) -> dict:
  params = init_deepfm(jax.random.key(0), s)
  apply = make_apply(s)
  rng = np.random.default_rng(0)
  n = s.num_users
  h = (0.5 * rng.normal(size=(n, s.d))).astype(np.float32)
  x = np.stack([rng.integers(0, k, n) for k in s.priv_cardinalities], 1).astype(np.int32)
  y = rng.integers(0, 2, n).astype(np.float32)
  g = np.asarray(
    jax.jit(jax.vmap(jax.grad(lambda h_, x_, y_: bce(apply, params, h_, x_, y_))))(h, x, y)
  )
  num_cand = math.prod(s.priv_cardinalities)
  flops = analytic_flops_per_candidate(s)
  repeats = _REPEATS.value

  def exact(**kwargs):
    return attacks.exact(apply, params, h, g, s.priv_cardinalities, **kwargs)

  t_compile = time.perf_counter()
  r = exact()
  t_compile = time.perf_counter() - t_compile
  acc = float(np.mean((r.features == x).all(1) & (r.labels == y)))
  # float32 and the bf16 screen timed alternately (each run of one right after one of the other),
  # so that a drifting machine load hits both alike; medians of each.
  screened = exact(screen_dtype='bfloat16')  # compile
  times_f32, times_screen = [], []
  for _ in range(repeats):
    for fn, times in ((exact, times_f32), (lambda: exact(screen_dtype='bfloat16'), times_screen)):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
  t_exact, t_screen = float(np.median(times_f32)), float(np.median(times_screen))
  plan = sizing.plan(
    apply,
    params,
    s.d,
    np.float32,
    s.priv_cardinalities,
    2,
    n,  # pylint: disable=protected-access
    jax.device_count(),
    jax.devices()[0].platform,
    None,
    None,
  )

  agree = float(
    np.mean(
      (screened.map_features == r.map_features).all(1) & (screened.map_labels == r.map_labels)
    )
  )
  errors = screened_pair_errors(apply, params, h, s.priv_cardinalities)

  sweep = {}
  for u in [int(v) for v in _SWEEP.value if v]:
    sweep[u] = median_time(lambda u=u: exact(users_per_chunk=u), max(1, repeats // 2))

  plain = {}
  for u in [int(v) for v in _PLAIN_USERS.value if v]:
    run = make_plain(apply, params, s, u)
    plain[u] = median_time(lambda run=run: run(h, g), max(1, min(3, repeats)))
  plain_best = min(plain, key=plain.get)
  check = np.asarray(make_plain(apply, params, s, plain_best)(h[:64], g[:64]))
  plain_agrees = float(
    np.mean(check == _flat_index(r.map_features[:64], r.map_labels[:64], s.priv_cardinalities))
  )

  loop = None
  if _LOOP_USERS.value > 0:
    loop = python_loop_seconds_per_user(apply, params, h, g, s, _LOOP_USERS.value) * n

  grads_per_s = n * num_cand / t_exact
  out = dict(
    dataset=s.name,
    users=n,
    private_candidates=num_cand,
    pairs=2 * num_cand,
    exact_seconds=t_exact,
    first_call_seconds=t_compile,
    exact_accuracy_no_dp=acc,
    plan=plan._asdict(),
    sweep_seconds=sweep,
    plain_vmap_grad_seconds=plain,
    plain_best_users_per_chunk=plain_best,
    plain_agrees_on_64_users=plain_agrees,
    python_loop_seconds_extrapolated=loop,
    candidate_gradients_per_second=grads_per_s,
    pairs_per_second=2 * grads_per_s,
    speedup_vs_plain=plain[plain_best] / t_exact,
    analytic_flops_per_candidate=flops,
    achieved_flops_per_second=grads_per_s * flops,
    roofline_fraction=grads_per_s * flops / peak,
    exact_seconds_all=times_f32,
    screened_seconds=t_screen,
    screened_seconds_all=times_screen,
    screened_speedup=t_exact / t_screen,
    screened_agrees=agree,
    screened_fallback_fraction=float(screened.screen_fallback.mean()),
    screened_flops_per_second=n * num_cand * flops / t_screen,
    screened_fraction_of_f32_roofline=n * num_cand * flops / t_screen / peak,
    screened_fraction_of_bf16_roofline=n * num_cand * flops / t_screen / peak_bf16,
    screened_speedup_vs_plain=plain[plain_best] / t_screen,
    screen_pair_error_quantiles={
      q: float(np.quantile(errors, q)) for q in (0.5, 0.9, 0.97, 0.99, 1.0)
    },
  )
  return out


def _flat_index(features, labels, cards):
  idx = np.zeros(len(features), np.int64)
  for j, k in enumerate(cards):
    idx = idx * k + features[:, j]
  return idx * 2 + labels


def main(argv):
  del argv
  print(f'jax {jax.__version__}, devices {jax.devices()}')
  peak = matmul_flops_per_second(_REPEATS.value)
  print(f'dense f32 matmul (2048^3): {peak / 1e9:.1f} GFLOP/s')
  peak_bf16 = matmul_flops_per_second(_REPEATS.value, dtype=jnp.bfloat16)
  print(f'dense bf16 matmul, f32 sums (2048^3): {peak_bf16 / 1e9:.1f} GFLOP/s')
  results = dict(matmul_flops_per_second=peak, bf16_matmul_flops_per_second=peak_bf16, shapes={})
  for name in _DATASETS.value if _FULL.value else ():
    res = benchmark(SHAPES[name], peak, peak_bf16)
    results['shapes'][name] = res
    print(
      f'\n== {name}: {res["users"]} users x {res["pairs"]} (candidate, label) pairs '
      f'({res["private_candidates"]} gradients per user)'
    )
    print(
      f'splitjax exact: {res["exact_seconds"]:.3f} s (first call incl. compile '
      f'{res["first_call_seconds"]:.2f} s), plan {res["plan"]}, accuracy without DP '
      f'{res["exact_accuracy_no_dp"]:.4f}'
    )
    print(
      f'  {res["candidate_gradients_per_second"] / 1e6:.2f} M candidate gradients/s '
      f'({res["pairs_per_second"] / 1e6:.2f} M pairs/s); '
      f'{res["analytic_flops_per_candidate"] / 1e3:.1f} kFLOP per gradient -> '
      f'{res["achieved_flops_per_second"] / 1e9:.1f} GFLOP/s = '
      f'{100 * res["roofline_fraction"]:.1f} % of the matmul roofline'
    )
    print(
      f'bf16-screened exact: {res["screened_seconds"]:.3f} s (alternating with f32) -> '
      f'{res["screened_speedup"]:.2f}x; answers equal '
      f'to f32 for {100 * res["screened_agrees"]:.2f} % of users, '
      f'{100 * res["screened_fallback_fraction"]:.2f} % redone in f32; '
      f'{res["screened_flops_per_second"] / 1e9:.1f} GFLOP/s-equivalent = '
      f'{100 * res["screened_fraction_of_f32_roofline"]:.1f} % of the f32 / '
      f'{100 * res["screened_fraction_of_bf16_roofline"]:.1f} % of the bf16 matmul roofline; '
      f'{res["screened_speedup_vs_plain"]:.2f}x the plain vmap(grad)'
    )
    print(
      '  relative error of bf16 pair gradients (quantiles): '
      + ', '.join(f'{q}: {v:.1e}' for q, v in res['screen_pair_error_quantiles'].items())
    )
    print(
      '  users_per_chunk sweep: '
      + ', '.join(f'{u}: {t:.3f} s' for u, t in res['sweep_seconds'].items())
    )
    print(
      'plain vmap(grad) over pairs: '
      + ', '.join(f'{u}: {t:.3f} s' for u, t in res['plain_vmap_grad_seconds'].items())
      + f' -> speed-up {res["speedup_vs_plain"]:.2f}x (agreement with exact on 64 users: '
      f'{res["plain_agrees_on_64_users"]:.3f})'
    )
    if res['python_loop_seconds_extrapolated'] is not None:
      print(
        f'per-candidate Python loop (authors\' style), extrapolated: '
        f'{res["python_loop_seconds_extrapolated"]:.0f} s'
      )
  if _HEADS.value:
    results['heads'] = {}
    for name in _DATASETS.value:
      heads = results['heads'][name] = compare_heads(SHAPES[name], peak)
      print(
        f'\n== heads on {name} ({SHAPES[name].num_users} users; {_HEAD_ROUNDS.value} '
        'interleaved rounds, medians):'
      )
      for head, r in heads.items():
        print(
          f'  {head:9s} {r["seconds"]:.3f} s, {r["flops_per_candidate"] / 1e3:.1f} kFLOP per '
          f'candidate (traced), {r["flops_per_second"] / 1e9:.1f} GFLOP/s = '
          f'{100 * r["fraction_of_matmul_rate"]:.1f} % of the f32 matmul rate; accuracy '
          f'without DP {r["accuracy_no_dp"]:.4f}; first call {r["first_call_seconds"]:.2f} s'
        )
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(results, f, indent=2, default=str)


if __name__ == '__main__':
  app.run(main)
