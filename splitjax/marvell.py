"""Marvell (Li et al., "Label Leakage and Protection in Two-party Split Learning", ICLR 2022,
arXiv 2102.08504, section 4.2): the host solver of its four noise scalars and the noise itself.

Per batch, from the true labels: the class means' difference Delta, each class's average
coordinate variance u_y and the positive fraction p (`marvell_params`); `marvell_lambdas` (scipy
SLSQP, on the host, reached from jit through ``jax.pure_callback``) solves for lambda1_y (along
Delta) and lambda2_y (across) minimising the symmetrised KL (`marvell_sum_kl`) under the power
constraint; `marvell_noise` adds N(0, Sigma_y) to each row of class y; `marvell_estimate` is the
attacker's estimate of the batch statistics from the observed rows. The chain entry
``marvell:S`` is in `splitjax.defenses`, which re-exports these names.
"""

import jax
import jax.numpy as jnp


def marvell_sum_kl(lams, delta_sq: float, u0: float, u1: float, dim: int) -> float:
  """The symmetrised KL between N(mu_0, u_0 I + Sigma_0) and N(mu_1, u_1 I + Sigma_1).

  ``lams = (lambda1_0, lambda2_0, lambda1_1, lambda2_1)``; along Delta the variances are
  a1 = u0 + lambda1_0, b1 = u1 + lambda1_1, across (d - 1 directions) a2, b2 likewise:
  ``(a1/b1 + b1/a1 + (d-1)(a2/b2 + b2/a2) - 2d + ||Delta||^2 (1/a1 + 1/b1)) / 2``.
  """
  l10, l20, l11, l21 = (float(v) for v in lams)
  a1, b1, a2, b2 = u0 + l10, u1 + l11, u0 + l20, u1 + l21
  return 0.5 * (
    a1 / b1 + b1 / a1 + (dim - 1) * (a2 / b2 + b2 / a2) - 2 * dim + delta_sq * (1 / a1 + 1 / b1)
  )


def marvell_lambdas(delta_sq, u0, u1, p, power, dim: int):
  """Marvell's four scalars (host, float64): minimise `marvell_sum_kl` subject to
  ``p (l1_1 + (d-1) l2_1) + (1-p) (l1_0 + (d-1) l2_0) <= power`` and every lambda >= 0.

  Returns float32 ``[lambda1_0, lambda2_0, lambda1_1, lambda2_1]``; zeros when the batch has one
  class (``p`` 0 or 1) or ``Delta = 0``.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from scipy import optimize  # pylint: disable=import-outside-toplevel

  delta_sq, u0, u1, p, power = (float(v) for v in (delta_sq, u0, u1, p, power))
  if not (0 < p < 1) or not delta_sq > 0 or not power > 0:
    return np.zeros(4, np.float32)
  eps = 1e-12 * max(delta_sq, 1e-30)
  u0, u1 = max(u0, eps), max(u1, eps)
  cost = np.array([1 - p, (1 - p) * (dim - 1), p, p * (dim - 1)])
  scale = power  # optimise lambda / power (well conditioned)

  def f(x):
    return marvell_sum_kl(x * scale, delta_sq, u0, u1, dim)

  x0 = np.full(4, 1.0 / cost.sum())  # the power spread isotropically over both classes
  res = optimize.minimize(
    f,
    x0,
    method="SLSQP",
    bounds=[(0.0, None)] * 4,
    constraints=[{"type": "ineq", "fun": lambda x: 1.0 - cost @ x}],
    options={"maxiter": 200, "ftol": 1e-10},
  )
  x = np.maximum(res.x if res.success and f(res.x) <= f(x0) else x0, 0.0)
  x = x / max(1.0, float(cost @ x))  # on the constraint's safe side
  return (x * scale).astype(np.float32)


def _marvell_stats(x, y, mask):
  """A batch's class statistics: (Delta [d], ||Delta||^2, u_0, u_1, p) over its real rows."""
  dim = x.shape[1]
  w = mask.astype(x.dtype)
  yy = y.astype(x.dtype)
  n1, n0 = jnp.sum(w * yy), jnp.sum(w * (1 - yy))
  mu1 = jnp.sum((w * yy)[:, None] * x, 0) / jnp.maximum(n1, 1.0)
  mu0 = jnp.sum((w * (1 - yy))[:, None] * x, 0) / jnp.maximum(n0, 1.0)
  delta = mu1 - mu0
  delta_sq = jnp.sum(jnp.square(delta))
  var = lambda wy, mu, cnt: jnp.sum(wy[:, None] * jnp.square(x - mu)) / jnp.maximum(cnt * dim, 1.0)
  u1, u0 = var(w * yy, mu1, n1), var(w * (1 - yy), mu0, n0)
  p = n1 / jnp.maximum(n1 + n0, 1.0)
  return delta, delta_sq, u0, u1, p


def marvell_params(x, y, mask, strength):
  """What Marvell draws a batch's noise from: ``(u [d], lams [4])``, ``u = Delta / ||Delta||``
  and ``lams = (lambda1_0, lambda2_0, lambda1_1, lambda2_1)`` (`marvell_lambdas`, on the host).

  Rows ``x [N, d]`` with labels ``y [N]`` and ``mask [N]`` (1: a real row). The attack's
  white-box knowledge of a batch (`splitjax.attacks.likelihoods.marvell_nll` reads it).
  """
  dim = x.shape[1]
  delta, delta_sq, u0, u1, p = _marvell_stats(x, y, mask)
  lams = jax.pure_callback(
    lambda dsq, a0, a1, pp, pw: marvell_lambdas(dsq, a0, a1, pp, pw, dim),
    jax.ShapeDtypeStruct((4,), jnp.float32),
    delta_sq,
    u0,
    u1,
    p,
    strength * delta_sq,
  )
  unit = delta / jnp.maximum(jnp.sqrt(delta_sq), jnp.finfo(x.dtype).tiny)
  return unit, lams


def marvell_estimate(observed, info):
  """The server's estimate of a Marvell batch's side information (host, numpy): ``[d + 4]``.

  ``observed [n, d]``: the batch's noisy rows as received; ``info [d + 4]``: `batch_info` of the
  gradients the attacker simulates for its current answers (their lambdas are kept). The
  direction ``u`` is replaced by the observed batch's top principal axis, which needs no labels:
  Marvell's noise along ``u`` dominates the batch's covariance. An axis estimated from ``n`` rows
  is off by ``E sin^2 = sum_k l_1 l_k / (n (l_1 - l_k)^2)`` over the covariance's other
  eigenvalues ``l_k`` (first-order perturbation of a sample covariance), so that share of each
  class's ``lambda1``, spread over the ``d - 1`` other directions, is added to its ``lambda2``:
  without it a class with ``lambda2 ~ 0`` (rank-one noise) scores every error of the estimate as
  impossible and the attack collapses to the other label.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel

  o = np.asarray(observed, np.float64)
  n, dim = o.shape
  out = np.array(info, np.float32, copy=True)
  vals, vecs = np.linalg.eigh(np.cov(o.T) if n > 1 else np.eye(dim))
  out[:dim] = vecs[:, -1]
  top, rest = vals[-1], np.maximum(vals[:-1], 0.0)
  gap = np.maximum(top - rest, 1e-12 * max(top, 1e-30))
  sin_sq = min(1.0, float(np.sum(top * rest / gap**2)) / n)
  out[dim + 1] += out[dim] * sin_sq / max(dim - 1, 1)
  out[dim + 3] += out[dim + 2] * sin_sq / max(dim - 1, 1)
  return out


def marvell_noise(x, y, mask, key, strength):
  """Marvell's noise on rows ``x [N, d]`` with labels ``y [N]`` (see the module doc)."""
  unit, lams = marvell_params(x, y, mask, strength)
  yy = y.astype(x.dtype)
  l1 = jnp.where(yy > 0, lams[2], lams[0])[:, None]
  l2 = jnp.where(yy > 0, lams[3], lams[1])[:, None]
  z = jax.random.normal(key, x.shape, x.dtype)
  along = (z @ unit)[:, None] * unit[None, :]
  return x + jnp.sqrt(l2) * z + (jnp.sqrt(l1) - jnp.sqrt(l2)) * along
