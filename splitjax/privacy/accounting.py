"""Host-side privacy accounting for cut-layer DP: closed-form mu-GDP, calibration, cross-checks.

Each cut-layer release of one example is an unsampled Gaussian mechanism: the device clips its
`g_i` to L2 norm C and adds `N(0, (sigma C)^2 I)`. Under replace-one neighbours (swap one
example's private features and label for any others) a clipped row moves by at most 2C, so one
release is mu-GDP with mu = 2C / (sigma C) = 2 / sigma, and k releases compose to
mu sqrt(k) (Dong, Roth, Su 2019). The server knows whose gradient it sees, so there is no
amplification by sampling. Epsilon at delta follows exactly from the mu-GDP trade-off curve.

Everything here is numpy/scipy float64, run outside jit.
"""

import math

import dp_accounting
import numpy as np
from dp_accounting import pld
from dp_accounting import rdp
from scipy import optimize
from scipy import special

from splitjax.privacy import _checks

NEIGHBOURING_RELATION = 'replace-one'
ACCOUNTANT = 'closed-form mu-GDP'
ACCOUNTANTS = ('pld', 'rdp')
# PLD is run only where the composed mu is at most this (beyond, it needs minutes and gigabytes).
PLD_MAX_MU = 10.0


def per_release_mu(noise_multiplier: float) -> float:
  """The mu-GDP parameter of one cut-layer release: 2 / sigma.

  Args:
    noise_multiplier: sigma >= 0; the noise standard deviation is sigma * C.

  Returns:
    2 / sigma (inf at sigma = 0, 0 at sigma = inf).

  Raises:
    PrivacyError: sigma is negative or NaN.

  Formal guarantees:
    Replace-one sensitivity of a row clipped to norm C is 2C; Gaussian noise of std sigma C then
    gives mu = 2C / (sigma C) = 2 / sigma, independent of C.

  Example:
    >>> per_release_mu(2.0)
    1.0
  """
  return composed_mu(noise_multiplier, 1)


def composed_mu(noise_multiplier: float, releases: int) -> float:
  """The mu-GDP parameter of `releases` cut-layer releases of one example: 2 sqrt(k) / sigma.

  Args:
    noise_multiplier: sigma >= 0.
    releases: k >= 0, the number of clipped-and-noised rows an example sends.

  Returns:
    2 sqrt(k) / sigma; inf when sigma = 0 and k > 0; 0 when sigma = inf or k = 0.

  Raises:
    PrivacyError: sigma negative/NaN, or k not a non-negative integer.

  Formal guarantees:
    mu-GDP composes as mu_total = sqrt(sum_i mu_i^2) (Dong, Roth, Su 2019, Cor. 3.3), so k
    identical releases give mu sqrt(k). No amplification by sampling is claimed.

  References:
    Dong, Roth, Su, "Gaussian Differential Privacy", arXiv 1905.02383.

  Example:
    >>> composed_mu(2.0, 4)
    2.0
  """
  sigma = _checks.host(
    _checks.nonnegative(noise_multiplier, 'noise_multiplier'), 'noise_multiplier'
  )
  k = _checks.releases_count(releases)
  if k == 0 or math.isinf(sigma):
    return 0.0
  if sigma == 0.0:
    return math.inf
  return 2.0 * math.sqrt(k) / sigma


def _log_delta(mu: float, epsilon: float) -> float:
  """log delta(eps) of mu-GDP, for finite mu > 0 and finite eps >= 0 (stable in log space)."""
  a = -epsilon / mu + mu / 2.0
  b = -epsilon / mu - mu / 2.0
  log_a = special.log_ndtr(a)
  log_b = epsilon + special.log_ndtr(b)
  diff = log_b - log_a  # < 0 in exact arithmetic
  if diff >= 0.0:
    return -math.inf
  return float(log_a + math.log(-math.expm1(diff)))


def delta_for_epsilon(mu: float, epsilon: float) -> float:
  """The smallest delta for which a mu-GDP mechanism is (epsilon, delta)-DP.

  delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), evaluated in log space.

  Args:
    mu: the GDP parameter, >= 0 (inf allowed).
    epsilon: >= 0 (inf allowed).

  Returns:
    delta in [0, 1].

  Raises:
    PrivacyError: negative or NaN arguments.

  Formal guarantees:
    Exact (Dong, Roth, Su 2019, Cor. 2.13; Balle and Wang 2018): mu-GDP is equivalent to
    (eps, delta(eps))-DP for every eps >= 0 simultaneously.

  References:
    Dong, Roth, Su, arXiv 1905.02383; Balle, Wang, "Improving the Gaussian mechanism for
    differential privacy", arXiv 1805.06530.

  Example:
    >>> round(delta_for_epsilon(1.0, 0.0), 6)
    0.382925
  """
  mu = _checks.host(_checks.nonnegative(mu, 'mu'), 'mu')
  eps = _checks.host(_checks.nonnegative(epsilon, 'epsilon'), 'epsilon')
  if mu == 0.0 or math.isinf(eps):
    return 0.0
  if math.isinf(mu):
    return 1.0
  return min(1.0, math.exp(_log_delta(mu, eps)))


def epsilon_for_delta(mu: float, delta: float) -> float:
  """The smallest epsilon for which a mu-GDP mechanism is (epsilon, delta)-DP (safe side).

  Brackets epsilon in [0, mu (mu/2 - Phi^-1(delta))] (at the upper end the first term of
  delta(eps) alone is <= delta), solves log delta(eps) = log delta with Brent's method, then
  steps up until delta(eps) <= delta holds in floating point. Works for any finite mu (the
  paper's sigma = 0.01, mu = 200 per release, takes microseconds; memory is O(1)).

  Args:
    mu: the GDP parameter, >= 0 (inf allowed).
    delta: in (0, 1).

  Returns:
    epsilon >= 0, with delta_for_epsilon(mu, epsilon) <= delta; inf when mu = inf.

  Raises:
    PrivacyError: mu negative/NaN, or delta outside (0, 1).

  Formal guarantees:
    The returned epsilon is at or above the exact one (relative error ~1e-12), so the reported
    (epsilon, delta) guarantee is never overstated.

  Example:
    >>> round(epsilon_for_delta(1.0, 1e-5), 3)
    4.377
  """
  mu = _checks.host(_checks.nonnegative(mu, 'mu'), 'mu')
  delta = _checks.probability_open(delta, 'delta')
  if mu == 0.0:
    return 0.0
  if math.isinf(mu):
    return math.inf
  log_target = math.log(delta)
  f = lambda eps: _log_delta(mu, eps) - log_target
  if f(0.0) <= 0.0:
    return 0.0
  hi = mu * (mu / 2.0 - float(special.ndtri(delta)))
  if not math.isfinite(hi):
    return math.inf
  hi = max(hi, 1e-12)
  while f(hi) > 0.0:  # only float slack; the bracket is analytic
    hi *= 2.0
  eps = optimize.brentq(f, 0.0, hi, xtol=1e-12, rtol=4 * np.finfo(float).eps, maxiter=500)
  step = max(1e-12, 1e-14 * eps)
  while f(eps) > 0.0:
    eps += step
    step *= 2.0
  return float(eps)


def epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
  """Epsilon at `delta` of `releases` cut-layer releases with noise multiplier sigma.

  Args:
    noise_multiplier: sigma >= 0 (noise std sigma * C).
    releases: k, the number of noised rows each example sends.
    delta: in (0, 1).

  Returns:
    epsilon_for_delta(2 sqrt(k) / sigma, delta); inf at sigma = 0 (k > 0).

  Raises:
    PrivacyError: invalid arguments.

  Formal guarantees:
    Exact for the unsampled Gaussian mechanism of replace-one sensitivity 2C composed k times,
    rounded to the safe side.

  Example:
    >>> round(epsilon(2.0, 1, 1e-5), 3)
    4.377
  """
  return epsilon_for_delta(composed_mu(noise_multiplier, releases), delta)


def calibrate_noise_multiplier(
  *, target_epsilon: float, target_delta: float, releases: int, rtol: float = 1e-6
) -> float:
  """The noise multiplier sigma whose k-release epsilon at `target_delta` is <= target.

  Brackets sigma by doubling/halving, then bisects in log sigma until the bracket is within
  `rtol`; returns the upper (safe) end.

  Args:
    target_epsilon: > 0 (inf gives 0).
    target_delta: in (0, 1).
    releases: k >= 0 (0 gives 0: nothing is released).
    rtol: relative width of the final bracket on sigma.

  Returns:
    sigma with epsilon(sigma, releases, target_delta) <= target_epsilon, and within `rtol`
    of the smallest such sigma.

  Raises:
    PrivacyError: invalid arguments.

  Formal guarantees:
    The returned sigma is never below the exact one: the achieved epsilon is at or under the
    target (it sits within a relative ~2 rtol of the target).

  Example:
    >>> s = calibrate_noise_multiplier(target_epsilon=4.377, target_delta=1e-5, releases=1)
    >>> round(s, 3)
    2.0
  """
  target_eps = _checks.host(
    _checks.epsilon_positive(target_epsilon, 'target_epsilon'), 'target_epsilon'
  )
  if target_eps is None:
    raise _checks.PrivacyError('target_epsilon must be a concrete number, got a tracer.')
  target_delta = _checks.probability_open(target_delta, 'target_delta')
  k = _checks.releases_count(releases)
  rtol = _checks.host(_checks.nonnegative(rtol, 'rtol', allow_inf=False), 'rtol')
  if not rtol > 0:
    raise _checks.PrivacyError(f'rtol must be > 0, got {rtol}.')
  if k == 0 or math.isinf(target_eps):
    return 0.0
  ok = lambda s: epsilon(s, k, target_delta) <= target_eps
  lo = hi = 1.0
  if ok(hi):
    while ok(lo):
      hi, lo = lo, lo / 2.0
      if lo < 1e-300:
        return hi
  else:
    while not ok(hi):
      lo, hi = hi, hi * 2.0
      if hi > 1e300:
        raise _checks.PrivacyError(f'target_epsilon={target_eps} is unreachable; raise it.')
  while hi / lo - 1.0 > rtol:
    mid = math.sqrt(lo * hi)
    if ok(mid):
      hi = mid
    else:
      lo = mid
  return float(hi)


def dp_event(noise_multiplier: float, releases: int) -> dp_accounting.DpEvent:
  """The dp_accounting event of `releases` cut-layer releases (default add/remove relation).

  `GaussianDpEvent(sigma / 2)` is a Gaussian of sensitivity 1 with std sigma / 2: the same
  privacy loss as std sigma C at sensitivity 2C (the replace-one sensitivity of a clipped row).
  Do NOT pass `NeighboringRelation.REPLACE_ONE` to an accountant on top: PLD would double the
  sensitivity again and RDP ignores it.

  Args:
    noise_multiplier: sigma >= 0.
    releases: k >= 0.

  Returns:
    `SelfComposedDpEvent(GaussianDpEvent(sigma / 2), k)`.

  Raises:
    PrivacyError: invalid arguments.
  """
  sigma = _checks.host(
    _checks.nonnegative(noise_multiplier, 'noise_multiplier'), 'noise_multiplier'
  )
  k = _checks.releases_count(releases)
  return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma / 2.0), k)


def dp_accounting_epsilon(
  noise_multiplier: float, releases: int, delta: float, *, accountant: str = 'pld'
) -> float:
  """Epsilon from dp_accounting's PLD or RDP accountant, as a cross-check of `epsilon`.

  Args:
    noise_multiplier: sigma >= 0.
    releases: k >= 0.
    delta: in (0, 1).
    accountant: 'pld' (tight; only where the composed mu <= 10) or 'rdp' (an upper bound).

  Returns:
    epsilon at `delta` (inf at sigma = 0, 0 at sigma = inf or k = 0).

  Raises:
    PrivacyError: invalid arguments, an unknown accountant, or 'pld' with composed mu > 10
      (use accountant='rdp' or the closed form `epsilon`).

  Formal guarantees:
    PLD (pessimistic discretisation) is an upper bound that matches the closed form to ~1e-4
    relative; RDP converts to (eps, delta) loosely and is never below the closed form.
  """
  if accountant not in ACCOUNTANTS:
    raise _checks.PrivacyError(f'unknown accountant {accountant!r}; use one of {ACCOUNTANTS}.')
  mu = composed_mu(noise_multiplier, releases)
  delta = _checks.probability_open(delta, 'delta')
  if mu == 0.0:
    return 0.0
  if math.isinf(mu):
    return math.inf
  if accountant == 'pld' and mu > PLD_MAX_MU:
    raise _checks.PrivacyError(
      f'composed mu = {mu:.4g} > {PLD_MAX_MU}: PLD would take minutes and gigabytes; '
      "use accountant='rdp' or the closed form accounting.epsilon."
    )
  event = dp_event(noise_multiplier, releases)
  acc = pld.PLDAccountant() if accountant == 'pld' else rdp.RdpAccountant()
  acc.compose(event)
  return float(acc.get_epsilon(delta))


def _json_number(x):
  """A JSON-safe number: floats that are infinite become the string "inf"."""
  if x is None:
    return None
  if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
    return int(x)
  x = float(x)
  if math.isinf(x):
    return 'inf' if x > 0 else '-inf'
  return x


def privacy_report(
  *,
  noise_multiplier: float,
  l2_clip_norm: float,
  releases: int,
  delta: float,
  device_noise_multiplier: float | None = None,
  device_releases: int | None = None,
  label_epsilon: float | None = None,
) -> dict:
  """What every epsilon of a run covers, as a JSON-safe dict (infinities as "inf").

  Args:
    noise_multiplier: cut-layer sigma (0 = no noise, inf = nothing informative is sent).
    l2_clip_norm: the per-example clip norm C of `g_i` (inf = no clipping).
    releases: k, the number of `g_i` each training example sends (epochs in SL, epochs x
      local_steps in FSL).
    delta: in (0, 1).
    device_noise_multiplier: sigma of device DP-SGD (`dp_aggregate`), or None when the device
      parameters are trained without DP (then `device_epsilon` and `total_epsilon` are "inf").
    device_releases: releases of the device-parameter channel per example (default `releases`).
    label_epsilon: epsilon of randomized response on the label, if used (reported separately;
      not folded into total_epsilon, which covers the cut and device channels).

  Returns:
    dict with noise_multiplier, l2_clip_norm, releases, sensitivity (2C), neighbouring_relation,
    mu (composed, k = releases), attack_mu (k = 1), epsilon (training cut channel),
    attack_epsilon (one replayed release), device_epsilon, total_epsilon, delta, accountant,
    ledger (list of str), plus device_* keys with device DP-SGD and label_epsilon when given.

  Raises:
    PrivacyError: invalid arguments, or noise_multiplier > 0 with l2_clip_norm = inf.

  Formal guarantees:
    `epsilon` holds per training example for the cut channel alone; `attack_epsilon` for a test
    user attacked once; `total_epsilon` composes the cut and device channels as GDP
    (mu = sqrt(mu_cut^2 + mu_dev^2)) and is infinite without device DP-SGD, because later
    gradients depend on a device model updated non-privately on the example.
  """
  sigma = _checks.host(
    _checks.nonnegative(noise_multiplier, 'noise_multiplier'), 'noise_multiplier'
  )
  clip = _checks.host(_checks.nonnegative(l2_clip_norm, 'l2_clip_norm'), 'l2_clip_norm')
  k = _checks.releases_count(releases)
  delta = _checks.probability_open(delta, 'delta')
  if sigma > 0 and math.isinf(clip):
    raise _checks.PrivacyError(
      f'noise_multiplier={sigma} > 0 needs a finite l2_clip_norm (sensitivity 2C); '
      'give the clip norm used or set noise_multiplier=0.'
    )
  mu = composed_mu(sigma, k)
  attack_mu = composed_mu(sigma, 1)
  report = {
    'noise_multiplier': _json_number(sigma),
    'l2_clip_norm': _json_number(clip),
    'releases': k,
    'sensitivity': _json_number(2.0 * clip),
    'neighbouring_relation': NEIGHBOURING_RELATION,
    'mu': _json_number(mu),
    'attack_mu': _json_number(attack_mu),
    'epsilon': _json_number(epsilon_for_delta(mu, delta)),
    'attack_epsilon': _json_number(epsilon_for_delta(attack_mu, delta)),
    'device_epsilon': 'inf',
    'total_epsilon': 'inf',
    'delta': delta,
    'accountant': ACCOUNTANT,
  }
  ledger = [
    f'cut: {dp_event(sigma, k)!r}; sensitivity 2C = {2.0 * clip:g}, '
    f'{NEIGHBOURING_RELATION}, no sampling; mu = 2 sqrt(k)/sigma = {mu:.6g}',
    f'attack: {dp_event(sigma, 1)!r}; mu = {attack_mu:.6g}',
  ]
  if device_noise_multiplier is None:
    if device_releases is not None:
      raise _checks.PrivacyError(
        'device_releases given without device_noise_multiplier; pass both or neither.'
      )
    ledger.append('device: NonPrivateDpEvent (device parameters trained without DP-SGD)')
  else:
    dev_sigma = _checks.host(
      _checks.nonnegative(device_noise_multiplier, 'device_noise_multiplier'),
      'device_noise_multiplier',
    )
    dev_k = (
      k if device_releases is None else _checks.releases_count(device_releases, 'device_releases')
    )
    dev_mu = composed_mu(dev_sigma, dev_k)
    total_mu = math.hypot(mu, dev_mu)
    report.update(
      {
        'device_noise_multiplier': _json_number(dev_sigma),
        'device_releases': dev_k,
        'device_mu': _json_number(dev_mu),
        'device_epsilon': _json_number(epsilon_for_delta(dev_mu, delta)),
        'total_mu': _json_number(total_mu),
        'total_epsilon': _json_number(epsilon_for_delta(total_mu, delta)),
      }
    )
    ledger.append(
      f'device: {dp_event(dev_sigma, dev_k)!r}; per-example clip, noise on the '
      f'summed update; mu = {dev_mu:.6g}'
    )
    ledger.append(f'total: GDP composition sqrt(mu_cut^2 + mu_dev^2) = {total_mu:.6g}')
  if label_epsilon is not None:
    label_eps = _checks.host(
      _checks.epsilon_positive(label_epsilon, 'label_epsilon'), 'label_epsilon'
    )
    report['label_epsilon'] = _json_number(label_eps)
    ledger.append(
      f'label: RandomizedResponseDpEvent(epsilon={label_eps:g}), drawn once before '
      'training (label only; not in total_epsilon)'
    )
  report['ledger'] = ledger
  return report
