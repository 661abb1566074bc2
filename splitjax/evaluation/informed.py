"""The attacker's priors built from library data: the informed prior of the attacked rows (fitted on
the split not attacked, plus the device model's label posterior), the marginal log prior, and the
label's answer through the randomized-response channel."""

import functools
from typing import NamedTuple

import numpy as np

from splitjax import attacks
from splitjax import models
from splitjax import training
from splitjax.privacy import label_dp

INFORMED_ASSUMPTION = (
  "the attacker holds an auxiliary sample of the population with private attributes (the split "
  "not attacked) and the device model; Jayaraman & Evans, CCS 2022"
)


def marginal_log_prior(dataset, *, with_label: bool = True) -> np.ndarray:
  """Log prior from the train marginals (features independent, one pseudo-count per value).

  With ``with_label``, ``[C * 2]`` over (candidate, label) pairs in ``attacks.candidate_table``
  order, label fastest (EXACT, hybrid); without, ``[C]`` over candidates (activation matching,
  which attacks no label).
  """
  logp = attacks.priors.marginal_tuple_log_prior(dataset.train.priv_cat, dataset.priv_cardinalities)
  if not with_label:
    return logp
  py = np.bincount(dataset.train.y, minlength=2) + 1.0
  return (logp[:, None] + np.log(py / py.sum())[None, :]).reshape(-1)


class Informed(NamedTuple):
  """The informed prior of the attacked rows (see ``splitjax.attacks.priors``)."""

  fit: attacks.InformedPrior  # tuple prior [N, C] and how it was chosen
  label_p1: np.ndarray  # [N, C] P(y = 1 | h, x) for the true label (debiased under label DP)
  label_noisy_p1: (
    np.ndarray
  )  # [N, C] the model's own P(y~ = 1 | h, x) (= label_p1 without label DP)
  flip: float  # randomized-response flip probability (0 without label DP)


def fit_informed(
  dataset,
  model: models.SplitModel,
  server_params,
  transcript,
  split_name: str,
  *,
  seed: int,
  label_epsilon: float | None,
) -> Informed:
  """Fits the informed prior on the split not attacked and evaluates it for the attacked rows.

  Args:
    dataset: the ``splitjax.data`` dataset; ``split_name`` ('test' or 'train') is the attacked
      split, the other one is the attacker's auxiliary sample.
    model, server_params: the split model and the server's parameters (the server's ``h``).
    transcript: the attacked rows (``example_index`` into the attacked split).
    seed: the seed of the prior's cross-validated fit.
    label_epsilon: the label-DP epsilon (None or 0: no label DP).
  """
  ref = dataset.test if split_name == "train" else dataset.train
  query = getattr(dataset, split_name).take(transcript.example_index)
  predict_h = functools.partial(training.predict_h, model)
  spaces = {
    "server": attacks.server_feature_matrix(ref.pub_cat, ref.pub_dense, dataset.pub_cardinalities),
    "h": np.asarray(predict_h(server_params, ref.pub_cat, ref.pub_dense)),
  }
  query_spaces = {
    "server": attacks.server_feature_matrix(
      query.pub_cat, query.pub_dense, dataset.pub_cardinalities
    ),
    "h": np.asarray(predict_h(server_params, query.pub_cat, query.pub_dense)),
  }
  fit = attacks.fit_informed_prior(
    spaces, ref.priv_cat, dataset.priv_cardinalities, query_spaces=query_spaces, seed=seed
  )
  device_apply = models.device_logit_fn(model)
  versions = np.unique(transcript.param_index)
  if len(versions) > 1:  # every parameter version in one computation
    params, index = transcript.device_params, np.asarray(transcript.param_index)
  else:
    params, index = transcript.params_at(int(versions[0]) if len(versions) else 0), None
  noisy = attacks.candidate_label_probability(
    device_apply, params, transcript.h, dataset.priv_cardinalities, param_index=index
  )
  eps = label_epsilon
  flip = label_dp.flip_probability(eps) if eps else 0.0
  p1 = attacks.debias_label_probability(noisy, flip) if eps else noisy.astype(np.float64)
  return Informed(fit, p1, noisy, flip)


def rr_label_answer(
  p1_true: np.ndarray, noisy_label_posterior: np.ndarray, flip: float
) -> np.ndarray:
  """P(y = 1 | g) from P(y~ | g) [N, 2] and P(y = 1 | h, x) [N] through the RR channel.

  ``P(y | g) = sum_y~ P(y~ | g) P(y | y~, h, x)`` with
  ``P(y | y~, h, x) ∝ P(y | h, x) P(y~ | y)`` and ``P(y~ | y) = 1 - q`` if equal, else q.
  """
  p1 = np.clip(np.asarray(p1_true, np.float64), 1e-12, 1 - 1e-12)
  post = np.zeros_like(p1)
  for noisy in (0, 1):
    like1 = (1 - flip) if noisy == 1 else flip  # P(y~ | y = 1)
    like0 = flip if noisy == 1 else (1 - flip)  # P(y~ | y = 0)
    given = p1 * like1 / (p1 * like1 + (1 - p1) * like0)
    post += np.asarray(noisy_label_posterior, np.float64)[:, noisy] * given
  return post
