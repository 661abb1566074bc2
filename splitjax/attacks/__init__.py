"""Attacks on the cut layer (EXACT) and baselines without gradients, looked up by name."""

from collections.abc import Callable
from typing import Any

# Note: the function `exact` below shadows the submodule of the same name in this namespace; reach
# the module with importlib.import_module('splitjax.attacks.exact').
from splitjax.attacks import baselines
from splitjax.attacks import priors
from splitjax.attacks.activations import ActivationResult
from splitjax.attacks.activations import exact_activations
from splitjax.attacks.baselines import KnnResult
from splitjax.attacks.baselines import PriorResult
from splitjax.attacks.baselines import knn
from splitjax.attacks.baselines import majority_prior
from splitjax.attacks.baselines import server_feature_matrix
from splitjax.attacks.exact import DISTANCES
from splitjax.attacks.exact import SCREEN_DTYPES
from splitjax.attacks.exact import AttackError
from splitjax.attacks.exact import Estimate
from splitjax.attacks.exact import ExactResult
from splitjax.attacks.exact import ExactUserResult
from splitjax.attacks.exact import candidate_table
from splitjax.attacks.exact import estimate
from splitjax.attacks.exact import exact
from splitjax.attacks.exact import exact_user
from splitjax.attacks.exact import low_precision_matmuls
from splitjax.attacks.label_only import LabelResult
from splitjax.attacks.label_only import label_direction
from splitjax.attacks.label_only import label_norm
from splitjax.attacks.optimize import HybridResult
from splitjax.attacks.optimize import OptimizeResult
from splitjax.attacks.optimize import hybrid
from splitjax.attacks.optimize import optimize
from splitjax.attacks.optimize import relaxed_device_apply
from splitjax.attacks.priors import PRIORS
from splitjax.attacks.priors import InformedPrior
from splitjax.attacks.priors import candidate_label_probability
from splitjax.attacks.priors import debias_label_probability
from splitjax.attacks.priors import fit_informed_prior
from splitjax.attacks.priors import pair_log_prior
from splitjax.attacks.priors import prior_guess
from splitjax.attacks.priors import tuple_codes

# Name -> attack function (array API). The transcript-level runner wraps these.
ATTACKS: dict[str, Callable[..., Any]] = {
  'exact': exact,
  'majority_prior': majority_prior,
  'knn': knn,
  'optimize': optimize,
  'hybrid': hybrid,
  'label_norm': label_norm,
  'label_direction': label_direction,
  'exact_activations': exact_activations,
}


def run(name: str, **kwargs) -> Any:
  """Runs the attack registered under `name` with keyword arguments.

  Raises:
    AttackError (a ValueError): `name` is not in ATTACKS (the message lists the valid names).
  """
  if name not in ATTACKS:
    raise AttackError(f'unknown attack {name!r}; valid names: {sorted(ATTACKS)}.')
  return ATTACKS[name](**kwargs)
