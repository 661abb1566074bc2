"""Attacks on the cut layer (EXACT and its relatives) and baselines without gradients.

Public functions are re-exported here; the modules under them:

- `enumeration` (`exact`, the host runner over users) and `core` (`exact_user`, the pure
  per-user core both use); `releases` (`exact_releases`: every release of a user combined, the
  partial likelihood); `tracking` (`fsl_tracking`: FSL devices followed through their local
  steps), `update_match` (`device_update_match`: their hypotheses matched to the updates they
  returned), `devices` (what both share: rows by device, a device's local step); `scoring`
  (candidates, distances, `clip_rows`, the selection), `screen` (the bf16 screen), `sizing`
  (`estimate`), `runner` (padding, sharding, jit over users), `checks` (argument checks,
  `AttackError`);
- `joint` (`joint_attack`: a batch's rows jointly from one batch-averaged release, and the
  trivial `positive_count`);
- `relaxed` (`optimize`), `hybrid_search` (`hybrid`), `matching` (their objectives and
  simulators), `activations` (`exact_activations`), `label_only`, `baselines`, `priors`;
- `dispatch` (`run(name, transcript, public, **options)`: an attack by name on a transcript and
  the server's public knowledge `Public`).

No function here shadows a submodule (a test checks it).
"""

from splitjax.attacks import baselines
from splitjax.attacks import priors
from splitjax.attacks.activations import ActivationResult
from splitjax.attacks.activations import exact_activations
from splitjax.attacks.baselines import KnnResult
from splitjax.attacks.baselines import PriorResult
from splitjax.attacks.baselines import knn
from splitjax.attacks.baselines import majority_prior
from splitjax.attacks.baselines import server_feature_matrix
from splitjax.attacks.checks import AttackError
from splitjax.attacks.core import ExactUserResult
from splitjax.attacks.core import exact_user
from splitjax.attacks.dispatch import ATTACKS
from splitjax.attacks.dispatch import VARIANTS
from splitjax.attacks.dispatch import Public
from splitjax.attacks.dispatch import run
from splitjax.attacks.enumeration import ExactResult
from splitjax.attacks.enumeration import exact
from splitjax.attacks.hybrid_search import HybridResult
from splitjax.attacks.hybrid_search import hybrid
from splitjax.attacks.joint import JointResult
from splitjax.attacks.joint import joint_attack
from splitjax.attacks.label_only import LabelResult
from splitjax.attacks.label_only import label_direction
from splitjax.attacks.label_only import label_norm
from splitjax.attacks.matching import OBJECTIVES
from splitjax.attacks.matching import default_optimizer
from splitjax.attacks.priors import PRIORS
from splitjax.attacks.priors import InformedPrior
from splitjax.attacks.priors import candidate_label_probability
from splitjax.attacks.priors import debias_label_probability
from splitjax.attacks.priors import fit_informed_prior
from splitjax.attacks.priors import pair_log_prior
from splitjax.attacks.priors import prior_guess
from splitjax.attacks.priors import tuple_codes
from splitjax.attacks.relaxed import OptimizeResult
from splitjax.attacks.relaxed import optimize
from splitjax.attacks.releases import ReleasesResult
from splitjax.attacks.releases import exact_releases
from splitjax.attacks.scoring import DISTANCES
from splitjax.attacks.scoring import TIE_ATOL
from splitjax.attacks.scoring import TIE_RTOL
from splitjax.attacks.scoring import candidate_table
from splitjax.attacks.scoring import clip_rows
from splitjax.attacks.scoring import loss_factors
from splitjax.attacks.screen import SCREEN_DTYPES
from splitjax.attacks.screen import low_precision_matmuls
from splitjax.attacks.sizing import Estimate
from splitjax.attacks.sizing import estimate
from splitjax.attacks.tracking import TrackingResult
from splitjax.attacks.tracking import fsl_tracking
