"""A jaxpr rewrite that keeps a head's candidate-invariant matmul work out of the candidate vmap.

Users write a first layer the plain way, ``concatenate([h, e(x)]) @ W``. Under EXACT's vmap over
candidates (``h`` shared, ``x`` batched) the concatenation is batched, so the whole product, its
``h`` part included, is computed once per candidate, and so is its transpose in the backward
pass. `split_concat_dots` traces the function and evaluates it with every ``dot_general`` whose
operand is a ``concatenate`` along a contracted dimension, of parts that do and parts that do not
depend on the candidate, split in two, ``dot(concat(h, e), W) = dot(h, W_h) + dot(e, W_e)``: the
``h`` product then stays unbatched (once per user) and, since ``e(x)`` carries no tangent, the
transpose of ``W_e`` is not computed at all; the candidate-dependent parts stay one product (many
thin products would run slower than one). The function is the same up to float32 summation
order; apply the rewrite before differentiating.

Opt-in: pass ``split_concat_dots(device_apply)`` to `splitjax.attacks.exact`. On the CPUs
measured (BUILD_NOTES.md, "Candidate-invariant work") XLA ran the one concatenated product of
the head as written faster than the split form, so EXACT does not apply it by itself.
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core

from splitjax.attacks import screen as screen_lib


def _cat(values, axis):
  return values[0] if len(values) == 1 else jax.lax.concatenate(values, axis)


def _split_dot(eqn, invals, concat, varying):
  """``dot_general`` of ``invals`` as two products when one operand concatenates parts that do
  and parts that do not depend on the varying inputs (None: no such operand)."""
  (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
  for side in (0, 1):
    var = eqn.invars[side]
    if isinstance(var, jex_core.Literal) or var not in concat:
      continue
    parts, part_vars, dim = concat[var]
    contract, other_contract = (lhs_c, rhs_c) if side == 0 else (rhs_c, lhs_c)
    moving = [not isinstance(v, jex_core.Literal) and v in varying for v in part_vars]
    if dim not in contract or all(moving) or not any(moving):
      continue
    other = invals[1 - side]
    other_dim = other_contract[list(contract).index(dim)]
    groups: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}
    offset = 0
    for part, moves in zip(parts, moving, strict=True):
      size = part.shape[dim]
      groups[moves][0].append(part)
      groups[moves][1].append(jax.lax.slice_in_dim(other, offset, offset + size, axis=other_dim))
      offset += size
    total = None
    for kept, pieces in groups.values():
      a, b = _cat(kept, dim), _cat(pieces, other_dim)
      lhs, rhs = (a, b) if side == 0 else (b, a)
      out = jax.lax.dot_general(
        lhs,
        rhs,
        ((lhs_c, rhs_c), (lhs_b, rhs_b)),
        precision=eqn.params.get("precision"),
        preferred_element_type=eqn.params.get("preferred_element_type"),
      )
      total = out if total is None else total + out
    return total
  return None


def _eval(jaxpr, consts, args, varying_invars):
  env: dict[Any, Any] = {}
  concat: dict[Any, tuple[list, list, int]] = {}  # concatenate outputs -> (parts, vars, dim)
  varying = set(varying_invars)  # the variables that depend on the varying inputs

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  def moves(v):
    return not isinstance(v, jex_core.Literal) and v in varying

  env.update(zip(jaxpr.constvars, consts, strict=False))
  env.update(zip(jaxpr.invars, args, strict=False))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    body = eqn.params.get(screen_lib.CALL_BODIES.get(name, ""), None)
    split = _split_dot(eqn, invals, concat, varying) if name == "dot_general" else None
    inner = [i for i, v in enumerate(eqn.invars) if moves(v)]  # positions of varying inputs
    if split is not None:
      outs = [split]
    elif body is not None and hasattr(body, "jaxpr"):  # a ClosedJaxpr: inline it
      outs = _eval(body.jaxpr, body.consts, invals, [body.jaxpr.invars[i] for i in inner])
    elif isinstance(body, jex_core.Jaxpr) and not body.constvars:
      outs = _eval(body, (), invals, [body.invars[i] for i in inner])
    else:
      outs = eqn.primitive.bind(*invals, **eqn.params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    if name == "concatenate":
      concat[eqn.outvars[0]] = (invals, list(eqn.invars), eqn.params["dimension"])
    if inner:
      varying.update(eqn.outvars)
    env.update(zip(eqn.outvars, outs, strict=False))
  return [read(v) for v in jaxpr.outvars]


def split_concat_dots(
  fn: Callable[..., Any], varying: tuple[int, ...] = (2,)
) -> Callable[..., Any]:
  """``fn`` with every matmul of a concatenation whose parts do and do not depend on the
  arguments ``varying`` split into two (same values up to float32 summation order).

  EXACT vmaps ``device_apply(params, h, x)`` over candidates ``x`` (argument 2): the parts of a
  concatenation that do not depend on ``x`` (``h``) are multiplied once per user, the others
  together in one product per candidate. Traced at each call's shapes; compose it under
  ``grad``/``vmap`` (``jax.value_and_grad(split_concat_dots(f))``) so the backward pass is
  derived from the split form.
  """

  def wrapped(*args):
    flat, tree = jax.tree.flatten(args)
    closed, out_shape = jax.make_jaxpr(
      lambda *xs: fn(*jax.tree.unflatten(tree, xs)), return_shape=True
    )(*flat)
    starts = np.cumsum([0] + [len(jax.tree.leaves(a)) for a in args])
    moving = [
      closed.jaxpr.invars[i]
      for k in varying
      if k < len(args)
      for i in range(starts[k], starts[k + 1])
    ]
    outs = _eval(closed.jaxpr, closed.consts, flat, moving)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped
