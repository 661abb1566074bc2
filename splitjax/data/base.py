"""Data containers of splitjax.data: column roles, a split of encoded arrays, and a loaded table."""

import dataclasses

import numpy as np


class DataError(ValueError):
  """Bad data or a bad data request; the message is one line naming the problem and the fix.

  The message names no command-line flag (a program adds its own hints).

  Attributes:
    reason: None, or what to fix, for a program that maps it to its own flags: `'schema'` (a
      column's role: fix the schema), `'no_table'` (the csv dataset was given no path),
      `'no_directory'` (taobao was given no directory) or `'path_not_taken'` (a bundled
      dataset was given a path).
  """

  def __init__(self, message: str, *, reason: str | None = None):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Roles:
  """Which column plays which part in the split protocol (DESIGN.md §5).

  Attributes:
    private_categorical: columns held by the device, integer-coded (what attacks reconstruct).
    private_dense: numeric columns held by the device, min-max scaled.
    server_categorical: integer-coded columns held by the server.
    server_dense: numeric columns held by the server, min-max scaled.
    label: the binary label column (held by the device).
  """

  private_categorical: tuple[str, ...]
  private_dense: tuple[str, ...]
  server_categorical: tuple[str, ...]
  server_dense: tuple[str, ...]
  label: str

  def features(self) -> tuple[str, ...]:
    """All feature columns in role order (private categorical, private dense, server ...)."""
    return (
      self.private_categorical + self.private_dense + self.server_categorical + self.server_dense
    )


@dataclasses.dataclass(frozen=True)
class Split:
  """Encoded rows of one split; every array has the example axis first.

  Attributes:
    priv_cat: [N, Pc] int32 codes, dense from 0 (see `TabularData.priv_cardinalities`).
    priv_dense: [N, Pd] float32, min-max scaled with TRAIN stats (train values in [0, 1]).
    pub_cat: [N, Sc] int32 codes, dense from 0.
    pub_dense: [N, Sd] float32, min-max scaled with TRAIN stats.
    y: [N] int32 labels in {0, 1}.
    p_y_pub: [N] float64 or None. Synthetic data only: the generator's exact P(y=1 | x_pub),
      the private features marginalised out.
    p_y_full: [N] float64 or None. Synthetic data only: the exact P(y=1 | x_pub, x_priv).
    p_priv_pub: [N, sum K_j] float64 or None. Synthetic data only: the exact
      P(priv_j = k | x_pub) of each private categorical feature j, the features' blocks side by
      side (the attacker's true prior given what the server knows; features are independent given
      x_pub).
  """

  priv_cat: np.ndarray
  priv_dense: np.ndarray
  pub_cat: np.ndarray
  pub_dense: np.ndarray
  y: np.ndarray
  p_y_pub: np.ndarray | None = None
  p_y_full: np.ndarray | None = None
  p_priv_pub: np.ndarray | None = None

  def __len__(self) -> int:
    return int(self.y.shape[0])

  def take(self, idx) -> "Split":
    """Returns the rows `idx` (integer indices, a slice or a boolean mask) as a new `Split`."""
    return Split(
      **{  # type: ignore[arg-type]  # None only for the optional synthetic fields
        field.name: None if getattr(self, field.name) is None else getattr(self, field.name)[idx]
        for field in dataclasses.fields(self)
      }
    )


@dataclasses.dataclass(frozen=True)
class TabularData:
  """A loaded table: roles, the train/test splits and the encodings used.

  Attributes:
    name: dataset name (`adult`, `bank`, ...).
    roles: the column roles after overrides.
    train: the training split.
    test: the test split (`ceil(test_fraction * N)` rows).
    priv_cardinalities: number of categories of each private categorical column (full domain).
    pub_cardinalities: number of categories of each server categorical column (full domain).
    vocab: category names per categorical column, in code order (code i is `vocab[col][i]`);
      `vocab[roles.label]` is `(negative value, positive value)`.
    dense_ranges: train (min, max) of each dense column before scaling.
    priv_priors: synthetic data only: the exact marginal prior of each private categorical
      feature, one [cardinality] float64 array per feature; None for real data.
    notes: one-line messages on how the table was read (e.g. for csv, the unlisted columns
      given to the server), for the caller to show.
  """

  name: str
  roles: Roles
  train: Split
  test: Split
  priv_cardinalities: tuple[int, ...]
  pub_cardinalities: tuple[int, ...]
  vocab: dict[str, tuple[str, ...]]
  dense_ranges: dict[str, tuple[float, float]]
  priv_priors: tuple[np.ndarray, ...] | None = None
  notes: tuple[str, ...] = ()
