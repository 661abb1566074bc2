"""The dataset registry: `load(name, ...)` for adult, bank, credit, taobao, csv and synthetic."""

import dataclasses
import json
import os
from collections.abc import Mapping

import numpy as np

from splitjax.data import base
from splitjax.data import bundled
from splitjax.data import generator as synthetic_lib
from splitjax.data import reader
from splitjax.data import tabular

DATASETS = ("adult", "bank", "credit", "taobao", "csv", "synthetic")

DEFAULT_ROLES = {
  "adult": base.Roles(
    private_categorical=("sex", "race", "relationship", "marital-status"),
    private_dense=(),
    server_categorical=("workclass", "education", "occupation", "native-country"),
    server_dense=("age", "capital-gain", "capital-loss", "hours-per-week"),
    label="income",
  ),
  "bank": base.Roles(
    private_categorical=("marital", "job", "education", "housing", "loan", "contact"),
    private_dense=(),
    server_categorical=("month", "poutcome", "default"),
    server_dense=("balance", "age", "day", "duration", "campaign", "pdays", "previous"),
    label="y",
  ),
  "credit": base.Roles(
    private_categorical=("SEX", "EDUCATION", "MARRIAGE"),
    private_dense=(),
    server_categorical=("PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6"),
    server_dense=(
      ("LIMIT_BAL", "AGE")
      + tuple(f"BILL_AMT{i}" for i in range(1, 7))
      + tuple(f"PAY_AMT{i}" for i in range(1, 7))
    ),
    label="default payment next month",
  ),
  "taobao": base.Roles(
    private_categorical=("age_level", "pvalue_level", "shopping_level", "occupation"),
    private_dense=(),
    server_categorical=("adgroup_id", "cate_id", "customer", "brand", "userid"),
    server_dense=("price",),
    label="clk",
  ),
}

# The value of each dataset's default label that maps to y = 1.
_POSITIVE = {"adult": ">50K", "bank": "yes", "credit": "1", "taobao": "1"}

SCHEMA_KEYS = tabular.ROLE_NAMES + ("label", "ignore", "delimiter", "positive_label")

# Options accepted through **kwargs, per dataset (synthetic takes `synthetic`'s arguments).
_OPTIONS = {
  "adult": (),
  "credit": (),
  "bank": ("delimiter", "max_rows"),
  "taobao": ("max_rows",),
  "csv": ("delimiter", "max_rows", "positive_label"),
  "synthetic": (
    "num_examples",
    "priv_cardinalities",
    "pub_cardinalities",
    "num_pub_dense",
    "num_priv_dense",
    "correlation",
  ),
}

TAOBAO_FILES = ("raw_sample.csv", "user_profile.csv", "ad_feature.csv")
# Fill values for missing cells after the join (DESIGN.md §5), in the files' own coding.
TAOBAO_FILL = {
  "pvalue_level": "2",
  "age_level": "3",
  "shopping_level": "2",
  "occupation": "0",
  "brand": "0",
  "customer": "0",
}
# Full domain of the private levels after the shift (pvalue and shopping levels start at 1).
_TAOBAO_LEVELS = {
  "age_level": (0, 7, 0),
  "pvalue_level": (1, 3, 1),
  "shopping_level": (1, 3, 1),
  "occupation": (0, 2, 0),
}  # (first, size, shift)


def load(
  name: str,
  *,
  seed: int = 0,
  test_fraction: float = 0.1,
  path=None,
  schema=None,
  private_categorical=None,
  private_dense=None,
  server_categorical=None,
  server_dense=None,
  label: str | None = None,
  ignore=None,
  **kwargs,
) -> base.TabularData:
  """Loads a dataset of the registry, encoded, split and scaled (DESIGN.md §5).

  Categorical columns are coded densely from 0 over the whole table, categories in sorted
  order (numerically when all are numbers), so cardinalities cover the full domain. Rows are
  split by `np.random.default_rng(seed).permutation(N)`: the first `ceil(test_fraction * N)`
  are the test split. Dense columns are min-max scaled with the train split's min and max.
  Parsed files are cached in-process, so repeated calls are cheap.

  Args:
    name: one of `DATASETS`.
    seed: seed of the train/test split (and of the generator for `synthetic`).
    test_fraction: fraction of rows in the test split.
    path: `bank`: a UCI bank-full.csv (default: the bundled bank.csv, 4,521 rows); `taobao`:
      the directory holding raw_sample.csv, user_profile.csv and ad_feature.csv; `csv`: the
      table. Plain or gzip, UTF-8.
    schema: a dict or the path of a JSON file with keys among `SCHEMA_KEYS` (role lists,
      `label`, `ignore`, optional `delimiter` and `positive_label`); keyword arguments override
      it.
    private_categorical: device-held categorical columns (a tuple or "a,b").
    private_dense: device-held numeric columns, e.g. `('age',)` moves age to the device.
    server_categorical: server-held categorical columns.
    server_dense: server-held numeric columns.
    label: the binary label column.
    ignore: columns dropped on purpose (e.g. an id column).
    **kwargs: `delimiter` (bank, csv), `max_rows` (bank, taobao, csv: keep the first rows of
      the file, of raw_sample.csv for taobao), `positive_label` (csv: the label value mapped to
      1; default the larger value), and `synthetic`'s arguments for `synthetic`.

  A role given explicitly replaces that role's default columns, and the columns it names leave
  the roles they had by default. For `csv`, every column in no role and not in `ignore` goes to
  the server by type (all cells numbers: server dense, else server categorical), named in
  `TabularData.notes`; a categorical column with about one value per row (an id) is refused.
  The built-in datasets keep their documented roles: their other columns are not used.

  Returns:
    The `TabularData`.

  Raises:
    DataError: an unknown dataset, option or column; a missing, unreadable, empty, binary or
      non-UTF-8 file; a checksum mismatch of a bundled file; malformed rows; a wrong delimiter;
      a label that is not binary; NaN or text in a dense column; a column given two roles; no
      private or no server feature; a csv categorical column that looks like an identifier.

  References:
    Qiu, Leontiadis, Melis, Sablayrolles, Stock, "Evaluating Privacy Leakage in Split
    Learning", arXiv:2305.12997.

  Example:
    >>> data = load("adult", private_dense=("age",))
    >>> data.priv_cardinalities, data.roles.private_dense, len(data.test)
    ((2, 5, 6, 7), ('age',), 4885)
  """
  if name not in DATASETS:
    raise base.DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
  unknown = sorted(set(kwargs) - set(_OPTIONS[name]))
  if unknown:
    accepted = ", ".join(_OPTIONS[name]) or "none"
    raise base.DataError(
      f"unknown option(s) {', '.join(unknown)} for dataset {name!r}; accepted options: {accepted}"
    )
  overrides = dict(
    private_categorical=private_categorical,
    private_dense=private_dense,
    server_categorical=server_categorical,
    server_dense=server_dense,
  )
  if name == "synthetic":
    if (
      path is not None
      or schema is not None
      or label is not None
      or ignore is not None
      or any(v is not None for v in overrides.values())
    ):
      given = [
        k
        for k, v in (
          ("path", path),
          ("schema", schema),
          ("label", label),
          ("ignore", ignore),
          *overrides.items(),
        )
        if v is not None
      ]
      raise base.DataError(
        f"synthetic takes no path, schema or column roles (got {', '.join(given)}); drop "
        f"{'it' if len(given) == 1 else 'them'} and size the table with num_examples, "
        "priv_cardinalities, pub_cardinalities, num_pub_dense, num_priv_dense"
      )
    return synthetic_lib.synthetic(seed=seed, test_fraction=test_fraction, **kwargs)
  if schema is not None:
    spec = read_schema(schema)
    for role in tabular.ROLE_NAMES:
      if overrides[role] is None:
        overrides[role] = spec.get(role)
    label = label if label is not None else spec.get("label")
    ignore = ignore if ignore is not None else spec.get("ignore")
    for key in ("delimiter", "positive_label"):
      if key in spec and kwargs.get(key) is None:
        if key not in _OPTIONS[name]:
          raise base.DataError(f"schema key {key!r} does not apply to dataset {name!r}; drop it")
        kwargs[key] = spec[key]
  if name in ("adult", "credit") and path is not None:
    raise base.DataError(
      f"{name} is bundled with splitjax and takes no path; for your own copy load it as the "
      "csv dataset with its path and a schema",
      reason="path_not_taken",
    )
  max_rows = kwargs.get("max_rows")
  if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 2):
    raise base.DataError(f"max_rows must be an integer >= 2, got {max_rows!r}; or leave it None")

  fixed_vocab = None
  if name in ("adult", "credit") or (name == "bank" and path is None):
    table = bundled.read_table(name)
  elif name == "bank":
    table = reader.read_csv(path, delimiter=kwargs.get("delimiter"), max_rows=max_rows)
  elif name == "taobao":
    table = taobao_table(path, max_rows=max_rows)
    fixed_vocab = {
      col: tuple(str(v) for v in range(size)) for col, (_, size, _) in _TAOBAO_LEVELS.items()
    }
  else:  # csv
    if path is None:
      raise base.DataError(
        "csv needs a table: give its path (a delimited text file) and a schema naming at "
        "least the label and the private columns",
        reason="no_table",
      )
    table = reader.read_csv(path, delimiter=kwargs.get("delimiter"), max_rows=max_rows)
  source = name if name != "csv" else table.source
  roles = tabular.resolve_roles(
    DEFAULT_ROLES.get(name),
    table.header,
    overrides=overrides,
    label=label,
    source=source,
    ignore=ignore,
  )
  notes: tuple[str, ...] = ()
  if name == "csv":
    roles, note = tabular.assign_unlisted(table, roles, ignore=ignore)
    notes = (note,) if note else ()
    tabular.check_no_identifiers(table, roles)
  tabular.check_server_side(roles, source=source)
  positive = kwargs.get("positive_label")
  if positive is None and name in _POSITIVE and roles.label == DEFAULT_ROLES[name].label:
    positive = _POSITIVE[name]
  data = tabular.from_raw(
    table,
    roles,
    name=name,
    seed=seed,
    test_fraction=test_fraction,
    positive=None if positive is None else str(positive),
    fixed_vocab=fixed_vocab,
  )
  return dataclasses.replace(data, notes=notes) if notes else data


def read_schema(schema) -> dict:
  """Reads a JSON schema file (or checks a dict) of column roles.

  Args:
    schema: a mapping, or the path of a JSON file holding an object with keys among
      `SCHEMA_KEYS`, e.g. `{"private_categorical": ["sex"], "server_dense": ["age"],
      "label": "income"}`.

  Returns:
    The schema as a dict.

  Raises:
    DataError: unreadable or invalid JSON, not an object, or an unknown key.
  """
  source = "schema"
  if not isinstance(schema, Mapping):
    source = os.fspath(schema)
    data = reader.read_bytes(source)
    try:
      schema = json.loads(reader.decode(data, source))
    except json.JSONDecodeError as e:
      raise base.DataError(
        f"schema file {source} is not valid JSON (line {e.lineno}, column {e.colno}: "
        f"{e.msg}); fix it"
      ) from None
    if not isinstance(schema, dict):
      raise base.DataError(
        f"schema file {source} must hold a JSON object with keys among {', '.join(SCHEMA_KEYS)}"
      )
  unknown = sorted(set(schema) - set(SCHEMA_KEYS))
  if unknown:
    raise base.DataError(
      f"unknown key(s) {', '.join(map(repr, unknown))} in {source}; valid keys: "
      f"{', '.join(SCHEMA_KEYS)}"
    )
  return dict(schema)


def _find(directory: str, file_name: str) -> str:
  for candidate in (file_name, file_name + ".gz"):
    full = os.path.join(directory, candidate)
    if os.path.isfile(full):
      return full
  raise base.DataError(
    f"file not found: {os.path.join(directory, file_name)}; the taobao directory must hold "
    f"{', '.join(TAOBAO_FILES)} (Alibaba 'Ad Display/Click Data on Taobao.com')"
  )


def _lookup(keys: np.ndarray, table_keys: np.ndarray, *, what: str, source: str):
  """Returns (found [N] bool, row [N] int) of each key in `table_keys` (which must be unique)."""
  order = np.argsort(table_keys, kind="stable")
  sorted_keys = table_keys[order]
  duplicated = sorted_keys[1:] == sorted_keys[:-1]
  if np.any(duplicated):
    dup = sorted_keys[1:][duplicated][0]
    raise base.DataError(
      f"{source} has several rows for {what} {str(dup)!r}; keep one row per {what}"
    )
  pos = np.clip(np.searchsorted(sorted_keys, keys), 0, len(sorted_keys) - 1)
  return sorted_keys[pos] == keys, order[pos]


def taobao_table(path, *, max_rows: int | None = None) -> reader.RawTable:
  """Joins the Taobao files into one raw table (one row per raw_sample row).

  raw_sample.csv (user, time_stamp, adgroup_id, pid, nonclk, clk) is joined with
  user_profile.csv (userid, cms_segid, cms_group_id, final_gender_code, age_level,
  pvalue_level, shopping_level, occupation, new_user_class_level) on user = userid, and with
  ad_feature.csv (adgroup_id, cate_id, campaign_id, customer, brand, price) on adgroup_id. The
  user column is named `userid` in the result. Missing values (no profile row, or an empty /
  NULL cell) are filled: pvalue_level 2, age_level 3, shopping_level 2, occupation 0, brand 0,
  customer 0, other profile columns -1. pvalue_level and shopping_level (1..3) are shifted to
  start at 0.

  Args:
    path: the directory holding the three files (each may be gzipped as NAME.gz).
    max_rows: keep only the first `max_rows` rows of raw_sample.csv.

  Returns:
    The joined `RawTable`; locations in messages refer to raw_sample.csv lines.

  Raises:
    DataError: no path, a missing file or column, a duplicated user or ad group, an ad group
      without features, or a level outside its domain.
  """
  if path is None:
    raise base.DataError(
      f"taobao needs the directory holding {', '.join(TAOBAO_FILES)} (Alibaba 'Ad "
      "Display/Click Data on Taobao.com'); it is not bundled",
      reason="no_directory",
    )
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise base.DataError(
      f"taobao path {path} is not a directory; give the directory holding {', '.join(TAOBAO_FILES)}"
    )
  raw = reader.read_csv(_find(path, "raw_sample.csv"), max_rows=max_rows)
  profile = reader.read_csv(_find(path, "user_profile.csv"))
  ads = reader.read_csv(_find(path, "ad_feature.csv"))
  for table, needed in (
    (raw, ("user", "adgroup_id", "clk")),
    (profile, ("userid",) + tuple(_TAOBAO_LEVELS)),
    (ads, ("adgroup_id", "cate_id", "customer", "brand", "price")),
  ):
    for col in needed:
      table.column(col)

  columns = {("userid" if c == "user" else c): v for c, v in raw.columns.items()}
  found, row = _lookup(
    raw.column("adgroup_id"), ads.column("adgroup_id"), what="adgroup_id", source=ads.source
  )
  if not np.all(found):
    first = int(np.flatnonzero(~found)[0])
    raise base.DataError(
      f"adgroup_id {str(raw.column('adgroup_id')[first])!r} at {raw.locate(first)} has no row in "
      f"{ads.source}; give the matching ad_feature.csv"
    )
  for col in ads.header:
    if col != "adgroup_id" and col not in columns:
      columns[col] = ads.columns[col][row]
  found, row = _lookup(
    raw.column("user"), profile.column("userid"), what="userid", source=profile.source
  )
  for col in profile.header:
    if col != "userid" and col not in columns:
      columns[col] = np.where(found, profile.columns[col][row], "")
  for col, values in columns.items():
    if col in TAOBAO_FILL or col in profile.header and col != "userid":
      missing = reader.is_missing(values)
      if np.any(missing):
        columns[col] = np.where(missing, TAOBAO_FILL.get(col, "-1"), values)
  joined = reader.RawTable(
    header=tuple(columns), columns=columns, source=raw.source, lines=raw.lines
  )
  for col, (first, size, shift) in _TAOBAO_LEVELS.items():
    values = tabular.to_float(columns[col], column=col, table=joined)
    bad = (values != np.round(values)) | (values < first) | (values >= first + size)
    if np.any(bad):
      i = int(np.flatnonzero(bad)[0])
      raise base.DataError(
        f"{col} value {str(columns[col][i])!r} at {joined.locate(i)} is outside "
        f"{first}..{first + size - 1}; fix the value"
      )
    columns[col] = (values.astype(np.int64) - shift).astype(str)
  for values in columns.values():
    values.flags.writeable = False
  return joined
