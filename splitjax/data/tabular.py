"""Turns a raw string table into TabularData: roles, integer codes, seeded split, scaling."""

import math
from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np

from splitjax.data import base
from splitjax.data import reader

ROLE_NAMES = ("private_categorical", "private_dense", "server_categorical", "server_dense")


def as_columns(value) -> tuple[str, ...] | None:
  """Normalises a role argument: None stays None; "a,b" or ["a", "b"] -> ("a", "b")."""
  if value is None:
    return None
  if isinstance(value, str):
    return tuple(part.strip() for part in value.split(",") if part.strip())
  if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
    raise base.DataError(
      f"a role must be a column name, a comma-separated string or a list of names, got "
      f"{value!r}; e.g. private_dense=('age',)"
    )
  return tuple(value)


def resolve_roles(
  defaults: base.Roles | None,
  header: Sequence[str],
  *,
  overrides: Mapping[str, object],
  label: str | None,
  source: str,
  ignore=None,
) -> base.Roles:
  """Applies role overrides to the defaults and validates the result against the header.

  A role given explicitly replaces that role's default columns, and every column it names is
  removed from the roles it had by default (so `private_dense=('age',)` moves age to the
  device). Columns in `ignore` leave every role.

  Args:
    defaults: the dataset's default roles, or None (then roles not given are empty).
    header: the available column names.
    overrides: role name (one of `ROLE_NAMES`) -> columns, or None where not given.
    label: the label column if given, else None (the default label is kept).
    source: dataset or file name used in messages.
    ignore: columns dropped on purpose (the schema's "ignore" key), or None.

  Returns:
    The resolved roles (the server side may still be empty: see `check_server_side`).

  Raises:
    DataError: a column in two roles, an unknown column, no label, or no private feature.
  """
  given = {role: as_columns(overrides.get(role)) for role in ROLE_NAMES}
  ignored = as_columns(ignore) or ()
  owner = {}
  for col in ignored:
    if col in owner:
      raise base.DataError(f"column {col!r} is listed twice in \"ignore\"; list it once")
    owner[col] = "ignore"
  for role, columns in given.items():
    for col in columns or ():
      if col in owner and owner[col] == role:
        raise base.DataError(f"column {col!r} is listed twice in {role}; list it once")
      if col in owner:
        raise base.DataError(
          f"column {col!r} is given two roles ({owner[col]} and {role}); give each column one role"
        )
      owner[col] = role
  if label is not None and label in owner:
    raise base.DataError(
      f"column {label!r} is given two roles (label and {owner[label]}); give each column one role"
    )
  moved = set(owner) | ({label} if label is not None else set())
  final: dict[str, tuple[str, ...]] = {}
  for role in ROLE_NAMES:
    chosen = given[role]
    if chosen is not None:
      final[role] = chosen
    elif defaults is not None:
      final[role] = tuple(c for c in getattr(defaults, role) if c not in moved)
    else:
      final[role] = ()
  if label is None:
    label = defaults.label if defaults is not None else None
  if not label:
    raise base.DataError(
      f"no label column for {source}; name a binary column with the \"label\" key of the schema",
      reason="schema",
    )
  roles = base.Roles(label=label, **final)
  known = set(header)
  for col in roles.features() + (label,) + ignored:
    if col not in known:
      raise base.DataError(
        f"unknown column {col!r} for {source}; available columns: {', '.join(header)}"
      )
  for role in ROLE_NAMES:
    if label in final[role]:
      raise base.DataError(
        f"column {label!r} is given two roles (label and {role}); give each column one role"
      )
  if label in ignored:
    raise base.DataError(f"column {label!r} is both the label and in \"ignore\"; drop one")
  if not roles.private_categorical and not roles.private_dense:
    raise base.DataError(
      f"no private feature for {source}; list the device's columns under "
      "\"private_categorical\" or \"private_dense\" in the schema (the device must hold at "
      "least one feature)",
      reason="schema",
    )
  return roles


def check_server_side(roles: base.Roles, *, source: str) -> None:
  """Raises DataError when the server holds no feature (the cut layer would carry nothing)."""
  if not roles.server_categorical and not roles.server_dense:
    raise base.DataError(
      f"the server holds no feature for {source}; list its columns under "
      "\"server_categorical\" or \"server_dense\" in the schema (or leave them unlisted: "
      "for csv, unlisted columns go to the server)",
      reason="schema",
    )


# A categorical column with at least this many distinct values, and at least this fraction of
# the rows distinct, reads as an identifier (a row id, a name): one embedding row per example.
ID_MIN_DISTINCT = 50
ID_MIN_FRACTION = 0.5


def looks_numeric(values: np.ndarray) -> bool:
  """Whether every cell of a string column parses as a finite number."""
  try:
    return bool(np.all(np.isfinite(values.astype(np.float64))))
  except ValueError:
    return False


def assign_unlisted(
  table: reader.RawTable, roles: base.Roles, *, ignore=None
) -> tuple[base.Roles, str | None]:
  """Gives every column without a role (and not in `ignore`) to the server, by type.

  A column whose every cell is a finite number becomes server dense, any other one server
  categorical (appended after the listed server columns, in file order).

  Args:
    table: the raw table.
    roles: resolved roles.
    ignore: columns dropped on purpose, or None.

  Returns:
    (the roles with the unlisted columns added, a one-line note naming them or None when every
    column was listed).
  """
  taken = set(roles.features()) | {roles.label} | set(as_columns(ignore) or ())
  unlisted = [c for c in table.header if c not in taken]
  if not unlisted:
    return roles, None
  dense = tuple(c for c in unlisted if looks_numeric(table.column(c)))
  cat = tuple(c for c in unlisted if c not in dense)
  roles = base.Roles(
    private_categorical=roles.private_categorical,
    private_dense=roles.private_dense,
    server_categorical=roles.server_categorical + cat,
    server_dense=roles.server_dense + dense,
    label=roles.label,
  )
  parts = [
    f"server_dense ({', '.join(dense)})" if dense else "",
    f"server_categorical ({', '.join(cat)})" if cat else "",
  ]
  note = (
    f"{table.source}: {len(unlisted)} unlisted column(s) go to the server: "
    f"{'; '.join(p for p in parts if p)} (list any under \"ignore\" in the schema to drop "
    "it)"
  )
  return roles, note


def check_no_identifiers(table: reader.RawTable, roles: base.Roles) -> None:
  """Refuses a categorical column with about one value per row (an id or a name)."""
  for col in roles.private_categorical + roles.server_categorical:
    values = table.column(col)
    num_rows = int(values.shape[0])
    distinct = int(np.unique(values).shape[0])
    if distinct >= ID_MIN_DISTINCT and distinct >= ID_MIN_FRACTION * num_rows:
      raise base.DataError(
        f"categorical column {col!r} of {table.source} has {distinct:,} distinct values in "
        f"{num_rows:,} rows, like an identifier: list it under \"ignore\" in the schema (a "
        "per-row category teaches the model nothing and EXACT would enumerate every value)",
        reason="schema",
      )


def _sort_key(values: np.ndarray) -> np.ndarray:
  """Indices that sort category names numerically when all are numbers, else as strings."""
  try:
    numbers = values.astype(np.float64)
  except ValueError:
    return np.arange(values.shape[0])  # np.unique already sorted them as strings.
  return np.lexsort((values, numbers))


def categories(values: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  """Returns (category names in code order, [N] int32 codes) for a string column."""
  names, inverse = np.unique(values, return_inverse=True)
  order = _sort_key(names)
  rank = np.empty_like(order)
  rank[order] = np.arange(order.shape[0])
  return tuple(str(v) for v in names[order]), rank[inverse].astype(np.int32)


def encode_with_vocab(
  values: np.ndarray, vocab: Sequence[str], *, column: str, table: reader.RawTable
) -> np.ndarray:
  """[N] int32 codes of `values` in a fixed vocabulary; unknown values raise DataError."""
  lookup = {v: i for i, v in enumerate(vocab)}
  names, inverse = np.unique(values, return_inverse=True)
  for name in names:
    if name not in lookup:
      row = int(np.flatnonzero(values == name)[0])
      raise base.DataError(
        f"column {column!r} has value {str(name)!r} at {table.locate(row)}, outside its domain "
        f"{list(vocab)}; fix the value"
      )
  return np.array([lookup[n] for n in names], dtype=np.int32)[inverse]


def to_float(values: np.ndarray, *, column: str, table: reader.RawTable) -> np.ndarray:
  """Parses a dense column as float64; non-numeric, NaN or infinite cells raise DataError."""
  try:
    numbers = values.astype(np.float64)
  except ValueError:
    numbers = None
  if numbers is None or not np.all(np.isfinite(numbers)):
    for row, cell in enumerate(values):
      try:
        ok = math.isfinite(float(cell))
      except ValueError:
        ok = False
      if not ok:
        raise base.DataError(
          f"dense column {column!r} has non-numeric or NaN value {str(cell)!r} at "
          f"{table.locate(row)}; clean the value or give {column!r} a categorical role"
        )
  if numbers is None:  # numpy refused the column but every cell parses (e.g. "1_000")
    numbers = np.array([float(cell) for cell in values], np.float64)
  return numbers


def binary_label(
  values: np.ndarray, *, column: str, positive: str | None = None
) -> tuple[np.ndarray, tuple[str, str]]:
  """Maps a two-valued column to {0, 1}.

  Args:
    values: [N] str label column.
    column: its name, for messages.
    positive: the value that maps to 1; None takes the larger value (numerically when both
      are numbers, e.g. 1 over 0, "yes" over "no", ">50K" over "<=50K").

  Returns:
    ([N] int32 labels, (negative name, positive name)).

  Raises:
    DataError: the column does not have exactly two distinct values.
  """
  names, _ = categories(values)
  if len(names) != 2:
    shown = ", ".join(repr(n) for n in names[:6]) + (", ..." if len(names) > 6 else "")
    raise base.DataError(
      f"label {column!r} must be binary but has {len(names)} distinct value(s) ({shown}); "
      "choose a two-valued label column or map it to two values first"
    )
  if positive is None:
    positive = names[1]
  elif positive not in names:
    raise base.DataError(
      f"positive label {positive!r} does not occur in label {column!r} (values {list(names)}); "
      "give one of those"
    )
  negative = names[0] if names[1] == positive else names[1]
  return (values == positive).astype(np.int32), (negative, positive)


def num_test(num_examples: int, test_fraction: float) -> int:
  """ceil(test_fraction * N), checked to leave at least one row on each side."""
  if not 0.0 < test_fraction < 1.0:
    raise base.DataError(f"test_fraction must be in (0, 1), got {test_fraction}; e.g. 0.1")
  n_test = math.ceil(test_fraction * num_examples - 1e-9)
  if not 1 <= n_test < num_examples:
    raise base.DataError(
      f"test_fraction={test_fraction} leaves no train or test rows out of {num_examples}; "
      "use more rows or another fraction"
    )
  return n_test


def assemble(
  *,
  name: str,
  roles: base.Roles,
  cat: Mapping[str, np.ndarray],
  cardinalities: Mapping[str, int],
  vocab: Mapping[str, tuple[str, ...]],
  dense: Mapping[str, np.ndarray],
  y: np.ndarray,
  seed: int,
  test_fraction: float,
  extras: Mapping[str, np.ndarray] | None = None,
  priv_priors: tuple[np.ndarray, ...] | None = None,
) -> base.TabularData:
  """Splits encoded columns 90/10 (by default) with a seeded permutation and scales dense ones.

  Args:
    name: dataset name.
    roles: resolved roles.
    cat: categorical column -> [N] int32 codes.
    cardinalities: categorical column -> number of categories.
    vocab: categorical column (and the label) -> names in code order.
    dense: dense column -> [N] float64 raw values.
    y: [N] int32 labels.
    seed: seed of the permutation (`np.random.default_rng(seed).permutation(N)`); the first
      `ceil(test_fraction * N)` permuted rows are the test split.
    test_fraction: fraction of rows in the test split.
    extras: optional per-example `Split` fields (`p_y_pub`, `p_y_full`) -> [N] arrays.
    priv_priors: optional marginal priors of the private categorical features.

  Returns:
    The `TabularData`, dense columns min-max scaled with the train split's min and max (a
    constant column maps to 0).
  """
  num_examples = int(y.shape[0])
  n_test = num_test(num_examples, test_fraction)
  perm = np.random.default_rng(seed).permutation(num_examples)
  parts = {"test": perm[:n_test], "train": perm[n_test:]}
  ranges = {}
  scaled = {}
  for col, values in dense.items():
    train_values = values[parts["train"]]
    lo, hi = float(train_values.min()), float(train_values.max())
    ranges[col] = (lo, hi)
    scaled[col] = ((values - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)

  def stack(columns, table, dtype):
    if not columns:
      return np.zeros((num_examples, 0), dtype)
    return np.stack([table[c] for c in columns], axis=1).astype(dtype)

  full = dict(
    priv_cat=stack(roles.private_categorical, cat, np.int32),
    priv_dense=stack(roles.private_dense, scaled, np.float32),
    pub_cat=stack(roles.server_categorical, cat, np.int32),
    pub_dense=stack(roles.server_dense, scaled, np.float32),
    y=y.astype(np.int32),
    **(extras or {}),
  )
  splits = {part: base.Split(**{k: v[idx] for k, v in full.items()}) for part, idx in parts.items()}
  return base.TabularData(
    name=name,
    roles=roles,
    train=splits["train"],
    test=splits["test"],
    priv_cardinalities=tuple(int(cardinalities[c]) for c in roles.private_categorical),
    pub_cardinalities=tuple(int(cardinalities[c]) for c in roles.server_categorical),
    vocab=dict(vocab),
    dense_ranges=ranges,
    priv_priors=priv_priors,
  )


def from_raw(
  table: reader.RawTable,
  roles: base.Roles,
  *,
  name: str,
  seed: int,
  test_fraction: float,
  positive: str | None = None,
  fixed_vocab: Mapping[str, Sequence[str]] | None = None,
) -> base.TabularData:
  """Encodes a raw table with resolved roles into `TabularData`.

  Args:
    table: the raw string table.
    roles: resolved roles (columns checked to exist).
    name: dataset name.
    seed: split seed.
    test_fraction: fraction of rows in the test split.
    positive: the label value mapped to 1 (None: the larger of the two values).
    fixed_vocab: categorical column -> its full domain in code order, for columns whose
      domain is known (e.g. Taobao's levels); other columns are coded over the whole table.

  Returns:
    The `TabularData`.

  Raises:
    DataError: a label that is not binary, NaN or text in a dense column, or a value outside
      a fixed domain.
  """
  fixed_vocab = fixed_vocab or {}
  y, label_names = binary_label(table.column(roles.label), column=roles.label, positive=positive)
  cat, cardinalities, vocab = {}, {}, {}
  for col in roles.private_categorical + roles.server_categorical:
    values = table.column(col)
    if col in fixed_vocab:
      vocab[col] = tuple(fixed_vocab[col])
      cat[col] = encode_with_vocab(values, vocab[col], column=col, table=table)
    else:
      vocab[col], cat[col] = categories(values)
    cardinalities[col] = len(vocab[col])
  vocab[roles.label] = label_names
  dense = {
    col: to_float(table.column(col), column=col, table=table)
    for col in roles.private_dense + roles.server_dense
  }
  return assemble(
    name=name,
    roles=roles,
    cat=cat,
    cardinalities=cardinalities,
    vocab=vocab,
    dense=dense,
    y=y,
    seed=seed,
    test_fraction=test_fraction,
  )
