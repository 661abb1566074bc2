"""Scoring of an attack's answers against the truth, the baselines and the DP bounds: the record.

``score`` (device_top: every private categorical feature and the label) and ``score_bottom``
(device_bottom: the features only) return the attack record's body (DESIGN.md §4): per secret the
accuracy with its Clopper-Pearson interval, the no-gradient baselines (majority prior, k-NN on the
server's features and on ``h``), the same prior's answers without the gradient and the paired gain,
and the bound of what any attacker with the stated prior can reach, with its kind.
"""

import math
from typing import Any
from typing import NamedTuple

import numpy as np

from splitjax import attacks
from splitjax import metrics
from splitjax import models
from splitjax import training
from splitjax.evaluation import informed as informed_lib
from splitjax.privacy import accounting
from splitjax.privacy import bounds

SCHEMA_VERSION = 2  # attack records: 2 = splitjax 0.2 (prior, bounds with kinds, gains)


class Setting(NamedTuple):
  """The public facts of an attacked run that its record states and its bounds depend on.

  Attributes:
    dataset: the dataset's name (``TrainConfig.dataset``).
    protocol: 'sl' or 'fsl'.
    attack: the attack's name as configured (``AttackConfig.attack``).
    variant: the variant as configured (the caller may overwrite the resolved one).
    users: 'test' (replayed once through the final model) or 'train' (the recorded transcript).
    knn_k: k of the k-NN baselines.
    releases: cut-layer releases of each training example (``metrics.json``'s 'releases').
    l2_clip_norm: the public clip norm C (inf: none).
    noise_multiplier: the public sigma (0: none).
    device_noise_multiplier: the device DP-SGD's sigma; None when the device parameters train
      without device DP-SGD (then training users' cut-layer releases have no bound).
    label_epsilon: the label-DP epsilon (0 or None: no label DP).
    delta: the delta of the reported epsilons.
    clip_source: where C came from (``metrics.json``'s 'clip_source'), reported as it is.
    clip_read_labels: C was computed from the private training labels (splitjax < 0.2
      ``--dp_clip=auto``): the label's randomized-response guarantee is void.
  """

  dataset: str
  protocol: str
  attack: str
  variant: str
  users: str
  knn_k: int
  releases: int
  l2_clip_norm: float
  noise_multiplier: float
  device_noise_multiplier: float | None = None
  label_epsilon: float | None = None
  delta: float = 1e-5
  clip_source: str | None = None
  clip_read_labels: bool = False


def accuracy_per_secret(dataset, feats, labels, true_feats, true_y) -> dict:
  """``{feature: accuracy, ..., "label": accuracy}`` of answers ``feats [N, P]``, ``labels [N]``."""
  out = {}
  for j, fname in enumerate(dataset.roles.private_categorical):
    out[fname] = metrics.accuracy(feats[:, j], true_feats[:, j])["accuracy"]
  out["label"] = metrics.accuracy(labels, true_y)["accuracy"]
  return out


def stale_report(dataset, feats, labels, true_feats, true_y, rows) -> dict:
  """Accuracy per secret on the attacked rows ``rows`` (a boolean mask)."""
  return {
    "num_examples": int(rows.sum()),
    **accuracy_per_secret(dataset, feats[rows], labels[rows], true_feats[rows], true_y[rows]),
  }


def score(
  dataset,
  setting: Setting,
  model: models.SplitModel,
  server_params,
  transcript,
  feats,
  labels,
  ties,
  true_feats,
  true_y,
  *,
  prior: str = "marginal",
  informed: informed_lib.Informed | None = None,
) -> dict:
  """Per-secret metrics, baselines, the prior-only answers and the gain, bounds and the report.

  Every secret gets ``accuracy`` (Clopper-Pearson ``ci``), the majority guess ``prior_accuracy``,
  k-NN on server features and on ``h``, ``prior_only_accuracy`` (the attack's own prior without
  the gradient, on the same users) with the paired ``gain`` (McNemar interval), ``marks``, and
  ``bound`` / ``bound_kind`` / ``bound_prior`` (per user, averaged over the attacked users; see
  ``bounds.BOUND_KINDS``), beside ``bound_marginal`` (the marginal prior; not valid against an
  attacker who knows h). ``mu_hat`` only where the bound is a guarantee.

  Args:
    dataset: the ``splitjax.data`` dataset (the attacked split is ``setting.users``', the other
      one the baselines' reference).
    setting: the public facts of the run (``Setting``).
    model, server_params: the split model and the server's parameters (the k-NN on ``h``).
    transcript: the attacked rows; ``feats [N, P]``, ``labels [N]``, ``ties [N]`` the answers;
      ``true_feats``, ``true_y`` the ground truth (scoring only).
    prior: the attack's prior ('uniform', 'marginal' or 'informed'), for its prior-only answers.
    informed: the informed prior of the attacked rows (``fit_informed``), required.

  Raises:
    BoundViolation: a success above a bound of kind guarantee (synthetic data): a bug.
  """
  clip, sigma = setting.l2_clip_norm, setting.noise_multiplier
  cards = dataset.priv_cardinalities
  train = dataset.train
  # Baselines without gradients: majority prior, k-NN on server features and on h.
  ref, query_split = _reference_and_query(dataset, setting)
  q = transcript.example_index
  ref_targets = np.concatenate([ref.priv_cat, ref.y[:, None]], axis=1)
  target_cards = tuple(cards) + (2,)
  knn = _server_knn(dataset, setting, ref, query_split, q, ref_targets, target_cards)
  ref_h = np.asarray(training.predict_h(model, server_params, ref.pub_cat, ref.pub_dense))
  knn_h = attacks.knn(ref_h, ref_targets, transcript.h, target_cards, k=setting.knn_k)
  priors = [
    np.bincount(train.priv_cat[:, j], minlength=c) / len(train) for j, c in enumerate(cards)
  ] + [np.bincount(train.y, minlength=2) / len(train)]
  n = int(transcript.num_rows)

  # The prior's own answers (no gradient): the informed prior, or the majority guess.
  if informed is None:
    raise ValueError("score needs the informed prior (evaluation.fit_informed)")
  inf_feats, inf_labels, inf_margs, inf_py1 = attacks.prior_guess(
    informed.fit.probs, informed.label_p1, cards
  )
  inf_preds = [inf_feats[:, j] for j in range(len(cards))] + [inf_labels]
  inf_posts = list(inf_margs) + [np.stack([1 - inf_py1, inf_py1], axis=1)]

  # What protects each channel (DESIGN.md §4): the cut layer for test users; training users only
  # with device DP-SGD as well (their later releases depend on a non-privately updated phi).
  cut_protected = math.isfinite(clip) and sigma > 0
  releases, mu = _attacked_releases_and_mu(setting)
  device_dp = setting.device_noise_multiplier is not None
  if not cut_protected or (setting.users == "train" and not device_dp):
    mu_ref = None
  else:
    mu_ref = bounds.reference_mu(
      noise_multiplier=sigma,
      releases=releases,
      device_noise_multiplier=setting.device_noise_multiplier,
      device_releases=releases if (device_dp and setting.users == "train") else 0,
    )
  label_eps = setting.label_epsilon
  true_prior = query_split.p_priv_pub is not None and query_split.p_y_pub is not None
  record: dict[str, Any] = {
    "schema_version": SCHEMA_VERSION,
    "dataset": setting.dataset,
    "protocol": setting.protocol,
    "attack": setting.attack,
    "variant": setting.variant,
    "prior": prior,
    "users": setting.users,
    "num_examples": n,
    "ties": int(np.sum(ties > 1)),
    "features": {},
    "label": None,
    "informed_prior": {
      "k": informed.fit.k,
      "lam": informed.fit.lam,
      "space": informed.fit.space,
      "cv_log_loss": informed.fit.cv_log_loss,
      "ece": {
        name: informed.fit.ece[j] for j, name in enumerate(dataset.roles.private_categorical)
      },
      "assumption": informed_lib.INFORMED_ASSUMPTION,
    },
  }
  names = list(dataset.roles.private_categorical) + ["label"]
  preds = [feats[:, j] for j in range(len(cards))] + [labels]
  trues = [true_feats[:, j] for j in range(len(cards))] + [true_y]
  offsets = np.concatenate([[0], np.cumsum(cards)])
  for j, name in enumerate(names):
    k = target_cards[j]
    is_label = name == "label"
    rep = metrics.feature_report(
      preds[j], trues[j], k, prior_pred=int(np.argmax(priors[j])), knn_pred=knn.predictions[:, j]
    )
    rep["knn_h_accuracy"] = metrics.accuracy(knn_h.predictions[:, j], trues[j])["accuracy"]
    # The same prior without the gradient, on the same users, and the paired gain.
    if prior == "informed" or (is_label and label_eps and prior != "uniform"):
      base_pred = inf_preds[j]
    else:
      base_pred = np.full(n, int(np.argmax(priors[j])))
    rep["prior_only_accuracy"] = float(np.mean(base_pred == trues[j]))
    rep["informed_prior_accuracy"] = float(np.mean(inf_preds[j] == trues[j]))
    rep["gain"] = metrics.paired_difference(preds[j] == trues[j], base_pred == trues[j])
    rep["marks"] = ([("below_majority_prior")] if rep["ci"][1] < rep["prior_accuracy"] else []) + (
      ["below_knn"] if rep["accuracy"] < rep["knn_accuracy"] else []
    )
    # Per-user priors for the bound: the generator's truth (synthetic), else the informed prior.
    if true_prior:
      user_prior = (
        np.stack([1 - query_split.p_y_pub[q], query_split.p_y_pub[q]], axis=1)
        if is_label
        else query_split.p_priv_pub[q][:, offsets[j] : offsets[j + 1]]
      )
      kind, described = "guarantee:true_prior", "the generator's P(secret | x_pub)"
    else:
      user_prior = inf_posts[j]
      kind, described = "estimate:knn_prior", "informed (k-NN joint prior + device model)"
    marginal = np.tile(priors[j], (n, 1))
    if mu_ref is None:
      bound, bound_marginal = None, None
    else:
      bound = float(np.mean(bounds.per_user_bound(user_prior, mu_ref)))
      bound_marginal = float(np.mean(bounds.per_user_bound(marginal, mu_ref)))
    if is_label and label_eps and setting.clip_read_labels:
      # splitjax < 0.2 computed --dp_clip=auto from the true training labels: a release that
      # nothing accounts for, so the label's randomized-response guarantee is void.
      rep["label_guarantee_void"] = (
        "the clip norm was computed from the private training "
        "labels (splitjax < 0.2 --dp_clip=auto): retrain"
      )
    elif is_label and label_eps:
      # Randomized response bounds the label end to end (also for training users): the public
      # clip reads no true label. Under label DP alone the unnoised gradient reveals x_priv, so
      # the per-user prior is P(y | x_pub, x_priv).
      if true_prior and query_split.p_y_full is not None:
        p_full = np.asarray(query_split.p_y_full)[q]
      else:
        codes = attacks.tuple_codes(true_feats, cards)
        p_full = informed.label_p1[np.arange(n), codes]
        kind, described = "estimate:knn_prior", "the device model's P(y | h, x_priv)"
      rr = np.asarray(bounds.randomized_response_bound(np.clip(p_full, 0, 1), label_eps))
      rep["bound_label_dp"] = float(np.mean(rr))
      rr_marginal = bounds.randomized_response_bound(float(priors[j][1]), label_eps)
      bound = rep["bound_label_dp"] if bound is None else min(bound, rep["bound_label_dp"])
      bound_marginal = rr_marginal if bound_marginal is None else min(bound_marginal, rr_marginal)
    rep["bound"] = bound
    rep["bound_kind"] = kind if bound is not None else "none:channel_unprotected"
    rep["bound_prior"] = described if bound is not None else None
    rep["bound_marginal"] = bound_marginal
    rep["bound_marginal_note"] = (
      "marginal prior (estimate:marginal_prior): not valid against an attacker who knows h"
    )
    rep["mu_hat"] = None
    if k == 2 and bound is not None and rep["bound_kind"].startswith("guarantee"):
      rep["mu_hat"] = bounds.mu_hat(rep["ci"][0], float(np.mean(user_prior[:, 1])))
    if is_label:
      record["label"] = rep
    else:
      record["features"][name] = rep
  check_guarantees(record)
  record.update(_channel_fields(setting, releases, mu))
  record["mu_reference"] = mu_ref
  record["clip_source"] = setting.clip_source
  return record


class BoundViolation(AssertionError):
  """A measured success above its DP bound on synthetic data, beyond sampling error: a bug."""


def check_guarantees(record) -> None:
  """Fails loudly where a success's CI lower end exceeds a bound of kind guarantee."""
  for name, r in list(record["features"].items()) + [("label", record["label"])]:
    if r["bound_kind"].startswith("guarantee") and r["ci"][0] > r["bound"] + 1e-9:
      raise BoundViolation(
        f"{name}: measured success {r['accuracy']:.4f} (95% CI lower end {r['ci'][0]:.4f}) is "
        f"above the DP bound {r['bound']:.4f} on synthetic data with a known prior: "
        "this is a bug in the attack, the DP transform or the accounting; rerun with --debug "
        "and report it"
      )


def score_bottom(dataset, setting: Setting, transcript, feats, ties, true_feats) -> dict:
  """``score`` for device_bottom: private features only (the server holds the label).

  The k-NN baseline uses the server's own features only (in this orientation ``h`` is the device's
  activation, i.e. the very signal under attack).
  """
  cards = dataset.priv_cardinalities
  train = dataset.train
  ref, query = _reference_and_query(dataset, setting)
  q = transcript.example_index
  knn = _server_knn(dataset, setting, ref, query, q, ref.priv_cat, cards)
  releases, mu = _attacked_releases_and_mu(setting)
  record: dict[str, Any] = {
    "dataset": setting.dataset,
    "protocol": setting.protocol,
    "topology": "device_bottom",
    "attack": setting.attack,
    "variant": setting.variant,
    "users": setting.users,
    "num_examples": int(transcript.num_rows),
    "ties": int(np.sum(ties > 1)),
    "features": {},
    "label": None,
    "label_note": "device_bottom: the server holds the label; nothing to attack",
  }
  for j, fname in enumerate(dataset.roles.private_categorical):
    prior = np.bincount(train.priv_cat[:, j], minlength=cards[j]) / len(train)
    rep = metrics.feature_report(
      feats[:, j],
      true_feats[:, j],
      cards[j],
      prior_pred=int(np.argmax(prior)),
      knn_pred=knn.predictions[:, j],
    )
    rep["knn_h_accuracy"] = None
    rep["bound_marginal"] = bounds.prior_bound(prior, mu)
    rep["bound_marginal_note"] = "marginal prior: not valid against an attacker who knows h"
    rep["bound_knn"] = bounds.knn_bound(knn.posteriors[j], mu)
    if cards[j] == 2:
      rep["mu_hat"] = bounds.mu_hat(rep["ci"][0], float(prior[1]))
    record["features"][fname] = rep
  record.update(_channel_fields(setting, releases, mu))
  return record


def _reference_and_query(dataset, setting: Setting):
  """``(reference, attacked)`` splits: the baselines vote from the split not attacked."""
  if setting.users == "train":
    return dataset.test, dataset.train
  return dataset.train, dataset.test


def _server_knn(dataset, setting: Setting, ref, query, q, ref_targets, target_cards):
  """k-NN on the server's own features: ``ref`` rows vote ``ref_targets`` for ``query`` rows q."""
  ref_x = attacks.server_feature_matrix(ref.pub_cat, ref.pub_dense, dataset.pub_cardinalities)
  query_x = attacks.server_feature_matrix(
    query.pub_cat[q], query.pub_dense[q], dataset.pub_cardinalities
  )
  return attacks.knn(ref_x, ref_targets, query_x, target_cards, k=setting.knn_k)


def _attacked_releases_and_mu(setting: Setting) -> tuple[int, float]:
  """Releases of one attacked user (1 for a test user) and the cut layer's composed mu."""
  releases = 1 if setting.users == "test" else setting.releases
  clip, sigma = setting.l2_clip_norm, setting.noise_multiplier
  mu = accounting.composed_mu(sigma, releases) if math.isfinite(clip) else math.inf
  return releases, mu


def _channel_fields(setting: Setting, releases: int, mu: float) -> dict:
  """The record's accounting: the run's privacy report and the attacked releases' mu."""
  return {
    **accounting.privacy_report(
      noise_multiplier=setting.noise_multiplier,
      l2_clip_norm=setting.l2_clip_norm,
      releases=setting.releases,
      delta=setting.delta,
      label_epsilon=setting.label_epsilon or None,
    ),
    "mu_attack_bound": mu,
    "releases_attacked": releases,
  }
