"""EXACT's low-precision screen: bf16 matrix products, robust screening scores, when it decides.

With `exact(..., screen_dtype='bfloat16')` every pair is first scored with the model's matrix
products on bf16-rounded inputs (`low_precision_matmuls`), each user's best pairs are rescored in
float32 and users the screen cannot decide (`conclusive`) are redone in float32.

bf16 rounding moves a trained model's logit, hence the loss-gradient factor sigmoid(z) - y, by more
than neighbouring candidates' gradients differ, which the screening scores absorb
(SCREEN_LOGIT_SLACK); the measured errors are in BUILD_NOTES.md, "EXACT throughput".
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from splitjax.attacks import scoring

# Dtypes the matmuls may be screened in; pairs per user rescored in the input precision by default.
# A user's screen is conclusive when a rescored pair reproduces the observation to
# SCREEN_MATCH_RTOL (distance / scale; any other pair could then only be a near-tie), or else when
# every unrescored pair would still lose with its screened gradient off by DEFAULT_SCREEN_RTOL
# times its norm; other users are redone in full precision.
SCREEN_DTYPES = {'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
DEFAULT_SCREEN_TOP = 8
SCREEN_MATCH_RTOL = {'l2': 1e-5, 'cosine': 1e-7}
DEFAULT_SCREEN_RTOL = 0.25
# Screening scores allow each pair's loss factor sigmoid(z) - y to be off by a factor e^+-this
# (the logit error of the screen; measured up to 0.18 on a trained adult model).
SCREEN_LOGIT_SLACK = 1.0

# Call-like primitives whose body is interpreted (so the matmuls inside are rewritten too), and the
# parameter holding the body (also `factor`'s rewrite).
CALL_BODIES = {
  'jit': 'jaxpr',
  'pjit': 'jaxpr',
  'closed_call': 'call_jaxpr',
  'core_call': 'call_jaxpr',
  'custom_jvp_call': 'call_jaxpr',
  'custom_vjp_call': 'call_jaxpr',
  'remat2': 'jaxpr',
  'checkpoint': 'jaxpr',
}


def _eval_low_precision(jaxpr, consts, args, dtype):
  """Evaluates `jaxpr` with every float32 x float32 `dot_general` on `dtype` inputs (f32 sums)."""
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts, strict=False))
  env.update(zip(jaxpr.invars, args, strict=False))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    body = eqn.params.get(CALL_BODIES.get(name, ''), None)
    if name == 'dot_general' and all(jnp.result_type(x) == jnp.float32 for x in invals):
      outs = [
        jax.lax.dot_general(
          invals[0].astype(dtype),
          invals[1].astype(dtype),
          eqn.params['dimension_numbers'],
          preferred_element_type=jnp.float32,
        )
      ]
    elif body is not None and hasattr(body, 'jaxpr'):  # a ClosedJaxpr: inline it
      outs = _eval_low_precision(body.jaxpr, body.consts, invals, dtype)
    elif isinstance(body, jex_core.Jaxpr) and not body.constvars:  # an open one (remat2)
      outs = _eval_low_precision(body, (), invals, dtype)
    else:  # everything else (control flow included) runs as traced
      outs = eqn.primitive.bind(*invals, **eqn.params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    env.update(zip(eqn.outvars, outs, strict=False))
  return [read(v) for v in jaxpr.outvars]


def low_precision_matmuls(fn: Callable[..., Any], dtype=jnp.bfloat16) -> Callable[..., Any]:
  """`fn` with its float32 matrix products computed from `dtype`-rounded inputs, summed in f32.

  Traces `fn` to a jaxpr (at the shapes of each call, under any transformation) and re-evaluates
  it with every float32 `dot_general` replaced by one on `dtype` inputs with
  `preferred_element_type=float32` (on CPUs with AVX512-BF16, and on GPUs/TPUs, about twice the
  float32 matmul rate). Elementwise work stays float32. Apply it to an already differentiated
  function (e.g. `jax.value_and_grad(f)`), so the backward matmuls are rewritten as well.
  """

  def wrapped(*args):
    flat, tree = jax.tree.flatten(args)
    closed, out_shape = jax.make_jaxpr(
      lambda *xs: fn(*jax.tree.unflatten(tree, xs)), return_shape=True
    )(*flat)
    outs = _eval_low_precision(closed.jaxpr, closed.consts, flat, dtype)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped


def screen_scores(z, v, g, clip_norm, *, distance: str, clip: bool):
  """Screening scores, robust to the screen's logit error: z [U, B], v [U, B, d] -> [U, B, L].

  Low-precision matmuls move the logit z by up to ~0.2 on trained models, which scales
  `l'(z, y) = sigmoid(z) - y` by up to e^|dz| (|d log l'/dz| <= 1), far more than they turn the
  direction of v = dz/dh. So each pair is scored by its distance to the nearest point of the set
  of gradients `clip(s v)` with s between l' e^-SCREEN_LOGIT_SLACK and l' e^+SCREEN_LOGIT_SLACK:
  a segment along v (radially clipped: the part beyond norm C collapses to C v/||v||). The
  distance to a segment is closed-form from <v, g> and ||v||^2, so no [U, B, L, d] tensor is
  formed. Cosine scores ignore scale already and are scored as usual. `clip`: the attack is
  clip-aware and a clip norm is given.
  """
  if distance != 'l2':
    return scoring.pair_scores(z, v, g, clip_norm, distance=distance, clip=clip, bayes=False)
  a = scoring.loss_factors(z)  # [U, B, 2]
  slack = math.exp(SCREEN_LOGIT_SLACK)
  lo = jnp.minimum(a / slack, a * slack)
  hi = jnp.maximum(a / slack, a * slack)
  vv = jnp.sum(jnp.square(v), axis=-1)[..., None]  # [U, B, 1]
  vg = jnp.einsum('ubd,ud->ub', v, g)[..., None]
  tiny = jnp.finfo(vv.dtype).tiny
  if clip:
    cap = clip_norm / jnp.sqrt(jnp.maximum(vv, tiny))  # |s| ||v|| <= C after the clip
    lo, hi = jnp.clip(lo, -cap, cap), jnp.clip(hi, -cap, cap)
  s = jnp.clip(vg / jnp.maximum(vv, tiny), lo, hi)
  gg = jnp.sum(jnp.square(g), axis=-1)[:, None, None]
  return jnp.sqrt(jnp.maximum(gg - 2.0 * s * vg + jnp.square(s) * vv, 0.0))


def screen_top(screen, num_top: int):
  """The `num_top` best pairs of a low-precision screen `[U, n]`.

  Returns ([U, m] indices in ascending screening score, m = min(num_top, n); [U] the cutoff: the
  screening score of the best pair left out, +inf when every pair is kept; [U] bool, True where
  some screening score is not finite, e.g. a float16 overflow, which voids the screen's error
  bound). Selected by m + 1 masked argmins: `lax.top_k` is a sort on CPU, a large share of the
  screen's time (BUILD_NOTES.md, "EXACT throughput").
  """
  num_users, num_pairs = screen.shape
  m = min(num_top, num_pairs)
  iota = jnp.arange(num_pairs)[None, :]

  def pick(i, carry):
    masked, idx = carry
    best = jnp.argmin(masked, axis=1).astype(jnp.int32)
    return jnp.where(iota == best[:, None], jnp.inf, masked), idx.at[:, i].set(best)

  rounds = m + 1 if num_pairs > m else m
  masked, idx = jax.lax.fori_loop(
    0, rounds, pick, (screen, jnp.zeros((num_users, rounds), jnp.int32))
  )
  del masked
  if num_pairs > m:
    cutoff = jnp.take_along_axis(screen, idx[:, m : m + 1], axis=1)[:, 0]
  else:
    cutoff = jnp.full((num_users,), jnp.inf, screen.dtype)
  return idx[:, :m], cutoff, ~jnp.isfinite(screen).all(axis=1)


def conclusive(best, tol, scale, cutoff, rescored, screen_rtol, *, distance, clip, top_k):
  """[U] bool: the screen decided the user (else it is redone in full precision).

  Conclusive (1) when a rescored pair reproduces the observation: its full-precision distance
  is within SCREEN_MATCH_RTOL of zero, so no pair can beat it by more than that (a near-tie),
  whatever the screen's errors; or (2) when no unrescored pair can beat the rescored best (the
  top_k-th best for a vote) under the assumed error bound: a screened pair gradient within
  eps * ||g_c|| of its full-precision value g_c (eps = screen_rtol; the device's clip, a radial
  projection, keeps the relative error within eps / (1 - eps)). An unrescored pair (screen
  score >= cutoff) then has, for l2, true distance d >= cutoff - eps (||g_obs|| + d), i.e.
  d >= (cutoff - eps ||g_obs||) / (1 + eps); for cosine its angle moves by <= asin(eps).

  Args:
    best, tol, scale: [U] the best rescored score, the tie tolerance, the zero vector's score.
    cutoff: [U] the screening score of the best pair left out (`screen_top`).
    rescored: [U, m] the rescored pairs' full-precision scores.
    screen_rtol: the assumed error bound eps.
  """
  eps = screen_rtol
  if clip:
    eps = jnp.where(eps < 1.0, eps / jnp.maximum(1.0 - eps, 1e-6), jnp.inf)
  if distance == 'l2':
    lowest = (cutoff - eps * scale) / (1.0 + eps)
  else:
    lowest = cutoff - jnp.arcsin(jnp.minimum(eps, 1.0))
  if top_k == 1:
    match = best <= SCREEN_MATCH_RTOL[distance] * scale + tol
    return match | (lowest > best + tol)
  # Every one of the top_k voters must be certain to be among the rescored pairs.
  kth = -jax.lax.top_k(-rescored, top_k)[0][:, -1]
  return lowest > kth + tol
