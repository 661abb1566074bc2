"""Seeded synthetic tables whose private features are independent of or tied to the server's."""

import itertools
from collections.abc import Sequence

import numpy as np

from splitjax.data import base
from splitjax.data import tabular

_PRIV_WEIGHT_SCALE = 1.5  # Private features move the logit more than server ones: gradients leak.
_GAUSS_HERMITE_NODES = 64
_MAX_PRIVATE_COMBINATIONS = 65536  # Above this, P(y | x_pub) is not computed (left None).


def _sigmoid(z: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * z))


def synthetic(
  *,
  num_examples: int = 2000,
  priv_cardinalities: Sequence[int] = (2, 3),
  pub_cardinalities: Sequence[int] = (4, 5),
  num_pub_dense: int = 2,
  num_priv_dense: int = 0,
  correlation: float = 0.0,
  seed: int = 0,
  test_fraction: float = 0.1,
) -> base.TabularData:
  """Makes a seeded table from a known generator, with its exact priors and posteriors.

  The generator (all draws from `np.random.default_rng(seed)`):

  * server categorical `pub_cat_k` uniform on `range(pub_cardinalities[k])`; server dense
    `pub_dense_k` standard normal;
  * each private categorical `priv_cat_j` has a prior `pi_j ~ Dirichlet(2, ..., 2)`. With
    probability `correlation` (independently per row and feature) it copies the server value,
    `pub_cat_{j mod Sc} mod k_j`; otherwise it is drawn from `pi_j`. With `correlation=0` the
    private features are independent of every server feature and of each other;
  * private dense `priv_dense_j` standard normal, independent of everything;
  * label `y ~ Bernoulli(sigmoid(b + sum_k a_k[pub_cat_k] + v . pub_dense
    + sum_j w_j[priv_cat_j] + u . priv_dense))` with Gaussian random weights, so the label, and
    with it the cut-layer gradient, depends on the private features.

  Args:
    num_examples: number of rows N.
    priv_cardinalities: cardinality of each private categorical feature.
    pub_cardinalities: cardinality of each server categorical feature.
    num_pub_dense: number of server dense features.
    num_priv_dense: number of private dense features.
    correlation: probability in [0, 1] that a private value is a function of a server one.
    seed: seed of the generator and of the train/test split.
    test_fraction: fraction of rows in the test split.

  Returns:
    `TabularData` named "synthetic" with columns `priv_cat_j`, `priv_dense_j`, `pub_cat_k`,
    `pub_dense_k` and label `y`. It also carries the generator's truth: `priv_priors` (the
    exact marginal of each private categorical feature), and per example `Split.p_y_full`
    = P(y=1 | x_pub, x_priv) and `Split.p_y_pub` = P(y=1 | x_pub) (private features
    marginalised exactly over categories, and over the private dense part by 64-node
    Gauss-Hermite quadrature; None when the categories have more than 65,536 combinations) and
    `Split.p_priv_pub` = P(priv_j | x_pub) for every private categorical feature.

  Raises:
    DataError: bad sizes, a correlation outside [0, 1], correlation > 0 without a server
      categorical feature, or no private feature.

  Example:
    >>> data = synthetic(num_examples=100, seed=1)
    >>> data.priv_cardinalities, len(data.test)
    ((2, 3), 10)
  """
  priv_cardinalities = tuple(int(k) for k in priv_cardinalities)
  pub_cardinalities = tuple(int(k) for k in pub_cardinalities)
  if num_examples < 2:
    raise base.DataError(f"num_examples must be >= 2, got {num_examples}; e.g. 2000")
  if any(k < 1 for k in priv_cardinalities + pub_cardinalities):
    raise base.DataError(
      f"cardinalities must be >= 1, got private {priv_cardinalities}, server "
      f"{pub_cardinalities}; e.g. priv_cardinalities=(2, 3)"
    )
  if num_pub_dense < 0 or num_priv_dense < 0:
    raise base.DataError("num_pub_dense and num_priv_dense must be >= 0; e.g. 2 and 0")
  if not 0.0 <= correlation <= 1.0:
    raise base.DataError(f"correlation must be in [0, 1], got {correlation}; e.g. 0.0 or 0.5")
  if correlation > 0 and not pub_cardinalities:
    raise base.DataError(
      "correlation > 0 needs a server categorical feature to correlate with; give "
      "pub_cardinalities=(4,) or correlation=0"
    )
  if not priv_cardinalities and num_priv_dense == 0:
    raise base.DataError(
      "no private feature; give priv_cardinalities=(2, 3) or num_priv_dense >= 1"
    )

  rng = np.random.default_rng(seed)
  n = num_examples
  if pub_cardinalities:
    pub_cat = np.stack([rng.integers(0, k, n) for k in pub_cardinalities], axis=1)
  else:
    pub_cat = np.zeros((n, 0), np.int64)
  pub_dense = rng.standard_normal((n, num_pub_dense))
  priors = tuple(rng.dirichlet(np.full(k, 2.0)) for k in priv_cardinalities)
  priv_cat, cond, marginals = [], [], []
  for j, (k, prior) in enumerate(zip(priv_cardinalities, priors, strict=False)):
    drawn = rng.choice(k, size=n, p=prior)
    copy = rng.random(n) < correlation
    if pub_cardinalities:
      src = j % len(pub_cardinalities)
      mapped = pub_cat[:, src] % k
      counts = np.bincount(np.arange(pub_cardinalities[src]) % k, minlength=k)
      pushed = counts / pub_cardinalities[src]
    else:
      mapped, pushed = drawn, prior
    priv_cat.append(np.where(copy, mapped, drawn))
    # P(priv_j | x_pub): a point mass on the mapped value with prob. correlation, else prior.
    cond.append(correlation * np.eye(k)[mapped] + (1.0 - correlation) * prior[None, :])
    marginals.append(correlation * pushed + (1.0 - correlation) * prior)
  priv_dense = rng.standard_normal((n, num_priv_dense))

  bias = rng.normal(0.0, 0.5)
  pub_weights = [rng.normal(0.0, 1.0, k) for k in pub_cardinalities]
  pub_dense_weights = rng.normal(0.0, 1.0, num_pub_dense)
  priv_weights = [rng.normal(0.0, _PRIV_WEIGHT_SCALE, k) for k in priv_cardinalities]
  priv_dense_weights = rng.normal(0.0, 1.0, num_priv_dense)

  logit_pub = bias + pub_dense @ pub_dense_weights
  for k, weights in enumerate(pub_weights):
    logit_pub = logit_pub + weights[pub_cat[:, k]]
  logit = logit_pub + priv_dense @ priv_dense_weights
  for j, weights in enumerate(priv_weights):
    logit = logit + weights[priv_cat[j]]
  p_full = _sigmoid(logit)
  y = (rng.random(n) < p_full).astype(np.int32)
  p_pub = _marginal_posterior(
    logit_pub, cond, priv_weights, float(np.linalg.norm(priv_dense_weights))
  )

  names = {
    "priv_cat": [f"priv_cat_{j}" for j in range(len(priv_cardinalities))],
    "priv_dense": [f"priv_dense_{j}" for j in range(num_priv_dense)],
    "pub_cat": [f"pub_cat_{k}" for k in range(len(pub_cardinalities))],
    "pub_dense": [f"pub_dense_{k}" for k in range(num_pub_dense)],
  }
  roles = base.Roles(
    private_categorical=tuple(names["priv_cat"]),
    private_dense=tuple(names["priv_dense"]),
    server_categorical=tuple(names["pub_cat"]),
    server_dense=tuple(names["pub_dense"]),
    label="y",
  )
  cat = dict(zip(names["priv_cat"], priv_cat, strict=False)) | {
    name: pub_cat[:, k] for k, name in enumerate(names["pub_cat"])
  }
  cardinalities = dict(zip(names["priv_cat"], priv_cardinalities, strict=False)) | dict(
    zip(names["pub_cat"], pub_cardinalities, strict=False)
  )
  vocab = {name: tuple(str(i) for i in range(k)) for name, k in cardinalities.items()}
  vocab["y"] = ("0", "1")
  dense = {name: priv_dense[:, j] for j, name in enumerate(names["priv_dense"])} | {
    name: pub_dense[:, k] for k, name in enumerate(names["pub_dense"])
  }
  extras = {"p_y_full": p_full, "p_priv_pub": np.concatenate(cond, axis=1)}
  if p_pub is not None:
    extras["p_y_pub"] = p_pub
  return tabular.assemble(
    name="synthetic",
    roles=roles,
    cat=cat,
    cardinalities=cardinalities,
    vocab=vocab,
    dense=dense,
    y=y,
    seed=seed,
    test_fraction=test_fraction,
    extras=extras,
    priv_priors=tuple(marginals),
  )


def _marginal_posterior(
  logit_pub: np.ndarray, cond: list[np.ndarray], priv_weights: list[np.ndarray], dense_scale: float
) -> np.ndarray | None:
  """P(y=1 | x_pub): sums over private categories, integrates the private dense logit term.

  Args:
    logit_pub: [N] logit part that depends on x_pub only.
    cond: per private feature j, [N, k_j] P(x_priv_j | x_pub) (independent across j).
    priv_weights: per private feature j, [k_j] logit weights.
    dense_scale: std of the private dense logit term u . z, z ~ N(0, I).

  Returns:
    [N] float64, or None when there are too many category combinations.
  """
  sizes = [w.shape[0] for w in priv_weights]
  if int(np.prod(sizes)) > _MAX_PRIVATE_COMBINATIONS:
    return None
  combos = np.array(list(itertools.product(*[range(k) for k in sizes])), dtype=np.int64)
  combos = combos.reshape(int(np.prod(sizes)), len(sizes))
  combo_logit = np.zeros(combos.shape[0])
  for j, weights in enumerate(priv_weights):
    combo_logit = combo_logit + weights[combos[:, j]]
  if dense_scale > 0:
    nodes, node_weights = np.polynomial.hermite.hermgauss(_GAUSS_HERMITE_NODES)
    shifts = np.sqrt(2.0) * dense_scale * nodes
    node_weights = node_weights / np.sqrt(np.pi)
  else:
    shifts, node_weights = np.zeros(1), np.ones(1)
  n = logit_pub.shape[0]
  out = np.empty(n)
  chunk = max(1, 4_000_000 // (combos.shape[0] * shifts.shape[0]))
  for start in range(0, n, chunk):
    rows = slice(start, start + chunk)
    prob = np.ones((logit_pub[rows].shape[0], combos.shape[0]))
    for j, p in enumerate(cond):
      prob = prob * p[rows][:, combos[:, j]]
    z = logit_pub[rows, None, None] + combo_logit[None, :, None] + shifts[None, None, :]
    expected = _sigmoid(z) @ node_weights  # [rows, combos]
    out[rows] = np.sum(prob * expected, axis=1)
  return out
