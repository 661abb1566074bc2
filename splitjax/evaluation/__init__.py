"""Scoring attack results against the truth, baselines without gradients and the DP bounds.

What turns an attack's answers into the attack record (``experiments.attack`` writes it), with
library data only:

- `report`: `score` (device_top) and `score_bottom` (device_bottom) -> the record's body, under
  a `Setting` (the public facts of the run); `check_guarantees` / `BoundViolation`;
  `accuracy_per_secret` and `stale_report` (accuracy per secret, on some rows);
- `informed`: the attacker's priors, `fit_informed` (the informed prior of the attacked rows),
  `marginal_log_prior`, `rr_label_answer` (the label through randomized response);
- `dense`: `dense_report` and `dense_baselines` for private continuous features.
"""

from splitjax.evaluation import dense
from splitjax.evaluation import informed
from splitjax.evaluation import report
from splitjax.evaluation.dense import DENSE_KNN_BINS
from splitjax.evaluation.dense import dense_baselines
from splitjax.evaluation.dense import dense_report
from splitjax.evaluation.informed import INFORMED_ASSUMPTION
from splitjax.evaluation.informed import Informed
from splitjax.evaluation.informed import fit_informed
from splitjax.evaluation.informed import marginal_log_prior
from splitjax.evaluation.informed import rr_label_answer
from splitjax.evaluation.report import SCHEMA_VERSION
from splitjax.evaluation.report import BoundViolation
from splitjax.evaluation.report import Setting
from splitjax.evaluation.report import accuracy_per_secret
from splitjax.evaluation.report import check_guarantees
from splitjax.evaluation.report import score
from splitjax.evaluation.report import score_bottom
from splitjax.evaluation.report import stale_report
