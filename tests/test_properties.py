"""Property-based tests (hypothesis) of the CSV loader and the cut-layer DP transforms.

Shapes are fixed (a 20-row table; [8, 5] gradient rows) so that every example reuses one compiled
function; each property runs at most 20 examples.
"""

import csv
import io
import itertools
import math
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from splitjax import data as sj_data
from splitjax import privacy

SETTINGS = settings(max_examples=20, deadline=None)

# --------------------------------------------------------------------------------------------------
# The CSV loader: random tables with given roles.

NUM_ROWS = 20
LETTERS = ("a", "b", "c", "d", "e")
NUMBERS = ("0", "1", "2", "10", "-3")  # sorted numerically: -3, 0, 1, 2, 10
LABELS = (("no", "yes"), ("0", "1"), ("<=50K", ">50K"))
SCHEMA = {
  "private_categorical": ["p_letter", "p_number"],
  "private_dense": ["p_dense"],
  "server_categorical": ["s_letter"],
  "server_dense": ["s_dense"],
  "label": "y",
  "ignore": ["ignored"],
}  # dropped on purpose (an unlisted csv column goes to the server)
_DENSE = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def tables(draw):
  """A dict column -> list of NUM_ROWS strings (every role of SCHEMA plus an ignored column)."""
  column = lambda values: draw(
    st.lists(st.sampled_from(values), min_size=NUM_ROWS, max_size=NUM_ROWS)
  )
  dense = lambda: [repr(v) for v in draw(st.lists(_DENSE, min_size=NUM_ROWS, max_size=NUM_ROWS))]
  neg, pos = draw(st.sampled_from(LABELS))
  flips = draw(st.lists(st.booleans(), min_size=NUM_ROWS - 2, max_size=NUM_ROWS - 2))
  return {
    "p_letter": column(LETTERS),
    "ignored": column(LETTERS),
    "p_number": column(NUMBERS),
    "p_dense": dense(),
    "s_letter": column(LETTERS[:3]),
    "s_dense": dense(),
    "y": [neg, pos] + [pos if f else neg for f in flips],
  }


@pytest.fixture(scope="module")
def csv_dir():
  with tempfile.TemporaryDirectory() as d:
    yield pathlib.Path(d)


_COUNTER = itertools.count()


def _write(directory: pathlib.Path, table: dict, delimiter: str) -> pathlib.Path:
  buf = io.StringIO()
  writer = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
  writer.writerow(table)
  writer.writerows(zip(*table.values(), strict=True))
  path = directory / f"table_{next(_COUNTER)}.csv"  # a fresh name: no parse-cache reuse
  path.write_text(buf.getvalue(), encoding="utf-8")
  return path


def _sort_key(value: str):
  try:
    return (0, float(value), value)
  except ValueError:
    return (1, 0.0, value)


@SETTINGS
@given(table=tables(), seed=st.integers(0, 3), delimiter=st.sampled_from([",", ";", "\t", "|"]))
def test_csv_loader_codes_scaling_rows_and_determinism(csv_dir, table, seed, delimiter):
  path = _write(csv_dir, table, delimiter)
  data = sj_data.load("csv", path=path, schema=SCHEMA, seed=seed)

  # Rows: all kept, split ceil(10 %) / rest by the seeded permutation.
  n_test = math.ceil(0.1 * NUM_ROWS)
  assert len(data.test) == n_test and len(data.train) == NUM_ROWS - n_test
  perm = np.random.default_rng(seed).permutation(NUM_ROWS)
  rows = {"test": perm[:n_test], "train": perm[n_test:]}

  for part in ("train", "test"):
    split, idx = getattr(data, part), rows[part]
    for arr, role, cards in (
      (split.priv_cat, "private_categorical", data.priv_cardinalities),
      (split.pub_cat, "server_categorical", data.pub_cardinalities),
    ):
      assert arr.dtype == np.int32 and arr.shape == (len(idx), len(SCHEMA[role]))
      for j, col in enumerate(SCHEMA[role]):
        values = table[col]
        # Codes in range; the cardinality is the number of distinct values in the whole table;
        # categories in sorted order (numerically when all are numbers); each code decodes back.
        assert cards[j] == len(set(values))
        assert np.all((0 <= arr[:, j]) & (arr[:, j] < cards[j]))
        assert list(data.vocab[col]) == sorted(set(values), key=_sort_key)
        assert [data.vocab[col][c] for c in arr[:, j]] == [values[i] for i in idx]
    neg, pos = sorted(set(table["y"]), key=_sort_key)
    assert split.y.dtype == np.int32
    np.testing.assert_array_equal(split.y, [int(table["y"][i] == pos) for i in idx])

  # Dense columns: min-max scaled with the train rows' range; train values in [0, 1].
  for col, arr in (("p_dense", data.train.priv_dense), ("s_dense", data.train.pub_dense)):
    assert arr.dtype == np.float32
    assert np.all((arr >= 0) & (arr <= 1)), col
  for part in ("train", "test"):
    split, idx = getattr(data, part), rows[part]
    for col, arr in (("p_dense", split.priv_dense[:, 0]), ("s_dense", split.pub_dense[:, 0])):
      raw = np.array([float(table[col][i]) for i in idx])
      train_raw = np.array([float(table[col][i]) for i in rows["train"]])
      lo, hi = train_raw.min(), train_raw.max()
      assert data.dense_ranges[col] == (lo, hi)
      want = ((raw - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)
      np.testing.assert_array_equal(arr, want)

  # Deterministic: the same file under another name (no cache) loads to the same arrays.
  again = sj_data.load("csv", path=_write(csv_dir, table, delimiter), schema=SCHEMA, seed=seed)
  for part in ("train", "test"):
    for field in ("priv_cat", "priv_dense", "pub_cat", "pub_dense", "y"):
      np.testing.assert_array_equal(
        getattr(getattr(again, part), field), getattr(getattr(data, part), field)
      )
  assert again.vocab == data.vocab and again.dense_ranges == data.dense_ranges


@SETTINGS
@given(table=tables(), cut=st.integers(1, 200))
def test_csv_loader_rejects_a_truncated_file_with_one_line(csv_dir, table, cut):
  path = _write(csv_dir, table, ",")
  text = path.read_text()
  cut = min(cut, len(text) - 1)
  truncated = text[:-cut]
  path.write_text(truncated)
  last = truncated.rsplit("\n", 1)[-1]
  header = truncated.split("\n", 1)[0]
  try:
    sj_data.load("csv", path=path, schema=SCHEMA)
  except sj_data.DataError as e:
    # A cut through a row (or the header) is reported on one line; nothing else is raised.
    assert "\n" not in str(e)
    assert (
      "fields, expected" in str(e)
      or "unknown column" in str(e)
      or "no data rows" in str(e)
      or "must be binary" in str(e)
      or "one column only" in str(e)
      or "non-numeric" in str(e)
    ), str(e)
  else:
    # Only a cut at a row boundary (or within the last field) can go unnoticed.
    assert last == "" or last.count(",") == header.count(",")


# --------------------------------------------------------------------------------------------------
# DP transforms: clip bound, idempotence of the noise-free chain, shapes and dtypes kept.

ROWS, DIM = 8, 5
_CLIPS = st.one_of(
  st.sampled_from([0.0, math.inf]), st.floats(min_value=1e-6, max_value=1e6, allow_nan=False)
)


def _rows_strategy(dtype=np.float32):
  scale = st.floats(min_value=0.0, max_value=1e4, allow_nan=False, width=32)
  return st.tuples(
    hnp.arrays(dtype, (ROWS, DIM), elements=st.floats(-1.0, 1.0, width=32)),
    st.lists(scale, min_size=ROWS, max_size=ROWS),
  )


# Entries below this are set to 0: XLA on CPU flushes subnormals, and a row whose squared norm
# underflowed float32 before the norm was computed max-scaled (test at the end).
_TINY = 1e-18


def _scaled(arr_and_scale, dtype=np.float32):
  """Rows with norms from 0 to ~2e4 (entries below _TINY set to 0)."""
  arr, scale = arr_and_scale
  out = (arr.astype(np.float64) * np.asarray(scale)[:, None]).astype(dtype)
  out[np.abs(out) < _TINY] = 0
  return out


@jax.jit
def _clip(g, c):
  tx = privacy.clip_per_example(c)  # traced C: one compilation for every clip value
  return tx.update(g, tx.init(g))[0]


@jax.jit
def _noise_free_chain_twice(g, c, key):
  tx = privacy.cut_layer_dp(c, 0.0, key=key)
  state = tx.init(g)
  once, state = tx.update(g, state)
  twice, state = tx.update(once, state)
  return once, twice, state


def _norms(x):
  return np.sqrt(np.sum(np.square(np.asarray(x, np.float64)), axis=1))


@SETTINGS
@given(rows=_rows_strategy(), clip=_CLIPS)
def test_clip_bound_direction_and_untouched_rows(rows, clip):
  g = _scaled(rows)
  out = np.asarray(_clip(g, np.float32(clip)))
  n_in, n_out = _norms(g), _norms(out)
  assert np.all(np.isfinite(out))
  assert np.all(n_out <= np.float32(clip) * (1 + 2e-6) + 1e-30)
  inside = n_in <= np.float32(clip)
  np.testing.assert_array_equal(out[inside], g[inside])  # inside the ball: bit for bit
  if math.isfinite(clip):
    np.testing.assert_allclose(n_out[~inside], np.float32(clip), rtol=2e-6)
  # out_i = s_i g_i with 0 <= s_i <= 1: the direction is kept.
  dots = np.sum(out.astype(np.float64) * g, axis=1)
  assert np.all(dots >= -1e-30)
  assert np.all(np.abs(out) <= np.abs(g) * (1 + 1e-6) + 1e-30)


@SETTINGS
@given(rows=_rows_strategy(), clip=_CLIPS, seed=st.integers(0, 2**31 - 1))
def test_noise_free_chain_equals_clip_and_is_idempotent(rows, clip, seed):
  g = _scaled(rows)
  c = np.float32(clip)
  once, twice, state = _noise_free_chain_twice(g, c, jax.random.key(seed))
  np.testing.assert_array_equal(once, _clip(g, c))  # sigma = 0: the chain is the clip
  # Clipping again changes nothing (up to float32 rounding of rows on the sphere).
  np.testing.assert_allclose(twice, once, rtol=3e-6, atol=0)
  assert int(state["noise"].count) == 2


@jax.jit
def _chain_once(tree, c, sigma, key):
  tx = privacy.cut_layer_dp(c, sigma, key=key)  # traced C and sigma: one compilation per dtype
  return tx.update(tree, tx.init(tree))[0]


@SETTINGS
@given(
  dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
  clip=_CLIPS,
  sigma=st.sampled_from([0.0, 0.5, 2.0]),
  rows=_rows_strategy(),
  seed=st.integers(0, 2**31 - 1),
)
def test_dp_chain_keeps_shapes_and_dtypes(dtype, clip, sigma, rows, seed):
  if sigma > 0 and math.isinf(clip):
    clip = 1.0  # noise needs a finite clip norm (a PrivacyError otherwise)
  if dtype == jnp.float16:
    clip = min(clip, 1e3)  # noise of std sigma C beyond ~1e4 overflows float16 (max 65504) to inf
  g = _scaled(rows, np.float32)
  tree = {"g": jnp.asarray(g, dtype), "extra": jnp.asarray(g[:, :2].reshape(ROWS, 2, 1), dtype)}
  out = _chain_once(tree, np.float32(clip), np.float32(sigma), jax.random.key(seed))
  assert jax.tree.structure(out) == jax.tree.structure(tree)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(tree), strict=True):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.all(np.isfinite(np.asarray(got, np.float32)))


def test_clip_bound_holds_for_rows_whose_squared_norm_underflows():
  g = np.array([[1e-20, 0.0], [1e-25, 1e-25]], np.float32)
  np.testing.assert_array_equal(_clip(g, np.float32(0.0)), 0.0)  # C = 0 must give zeros
  assert np.all(_norms(_clip(g, np.float32(1e-30))) <= 1e-30 * (1 + 1e-6))


# --------------------------------------------------------------------------------------------------
# The clip bound for every float32 row (M3, L6): near the float32 maximum, tiny, subnormal, +-inf,
# NaN. A row that leaves the device has L2 norm <= C (1 + 1e-6); a non-finite row is a zero row.

_F32_MAX = float(np.finfo(np.float32).max)
_EXTREMES = (
  0.0,
  1e-45,
  1e-40,
  1.2e-38,
  2.0**-100,
  1e-30,
  1.0,
  1e30,
  2.0**100,
  8.5e37,
  1e38,
  _F32_MAX,
  math.inf,
  math.nan,
)
_EXTREME_ENTRY = st.builds(
  lambda v, s: np.float32(s * v), st.sampled_from(_EXTREMES), st.sampled_from([1.0, -1.0])
)
_EXTREME_ROWS = hnp.arrays(np.float32, (ROWS, DIM), elements=_EXTREME_ENTRY)
_EXTREME_CLIPS = st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e3, 1e30, math.inf])


@SETTINGS
@given(rows=_EXTREME_ROWS, clip=_EXTREME_CLIPS)
def test_clip_bound_holds_for_extreme_and_nonfinite_rows(rows, clip):
  out = np.asarray(_clip(rows, np.float32(clip)))
  finite = np.all(np.isfinite(rows), axis=1)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[~finite], 0.0)  # non-finite rows become zero rows
  np.testing.assert_array_equal(np.asarray(privacy.nonfinite_rows(rows)), ~finite)
  assert np.all(_norms(out) <= np.float32(clip) * (1 + 1e-6))
  # The direction is kept, and no entry grows.
  with np.errstate(over="ignore", invalid="ignore"):
    dots = np.sum(out.astype(np.float64) * rows.astype(np.float64), axis=1)
  assert np.all(dots[finite] >= 0)
  assert np.all(np.abs(out[finite]) <= np.abs(rows[finite]))
  if math.isinf(clip):  # C = inf: finite rows pass unchanged (backends may flush subnormals)
    subnormal = np.abs(rows) < 2.0**-126
    kept = (out == rows) | (subnormal & (out == 0))
    assert np.all(kept[finite])


def test_clip_of_rows_near_the_float32_maximum_keeps_their_direction():
  g = np.array(
    [
      [_F32_MAX, _F32_MAX, 0, 0, 0],
      [9e37, 0, 0, 0, 0],
      [1e-40, 3e-39, 0, 0, 0],
      [math.nan, 1, 0, 0, 0],
      [-math.inf, 1, 0, 0, 0],
      [1, 1, 0, 0, 0],
      [0, 0, 0, 0, 0],
      [2e38, -2e38, 2e38, -2e38, 2e38],
    ],
    np.float32,
  )
  out = np.asarray(_clip(g, np.float32(1.0)))
  np.testing.assert_allclose(out[0, :2], [2**-0.5, 2**-0.5], rtol=1e-6)
  np.testing.assert_allclose(out[1, 0], 1.0, rtol=1e-6)
  np.testing.assert_array_equal(out[3:5], 0.0)
  np.testing.assert_allclose(out[7], np.array([1, -1, 1, -1, 1]) / 5**0.5, rtol=1e-6)
  np.testing.assert_array_equal(out[5], g[5] / np.float32(2**0.5))  # inside: scaled as before
  norms = np.asarray(privacy.per_example_global_norm(g))
  np.testing.assert_allclose(norms[[1, 5]], [9e37, 2**0.5], rtol=1e-6)
  assert math.isinf(norms[0]) and math.isnan(norms[3]) and math.isinf(norms[4])
  assert norms[6] == 0.0
  np.testing.assert_allclose(norms[2], math.hypot(1e-40, 3e-39), rtol=1e-4) if norms[2] else None


def _clip_rows_v01(g, clip):
  """splitjax 0.1's clip (one leaf), the reference for rows with max |entry| in [2^-100, 2^100]."""
  m = jnp.max(jnp.abs(g), axis=1)
  safe = jnp.where(m > 0, m, 1.0)
  norms = jnp.where(m > 0, safe * jnp.sqrt(jnp.sum(jnp.square(g / safe[:, None]), axis=1)), 0.0)
  over = norms > clip
  scale = jnp.where(over, clip / jnp.where(over, norms, 1.0), 1.0)
  return g * scale[:, None]


_clip_v01 = jax.jit(_clip_rows_v01)
_TYPICAL_ROWS = st.builds(
  lambda base, exps: (
    np.asarray(base, np.float32) * np.exp2(np.asarray(exps, np.float32))[:, None]
  ).astype(np.float32),
  hnp.arrays(np.float32, (ROWS, DIM), elements=st.floats(-1, 1, width=32)),
  st.lists(st.integers(-99, 99), min_size=ROWS, max_size=ROWS),
)


@SETTINGS
@given(rows=_TYPICAL_ROWS, clip=_CLIPS)
def test_clip_is_bit_identical_to_v01_for_typical_rows(rows, clip):
  m = np.max(np.abs(rows), axis=1)
  typical = (m >= 2.0**-100) & (m <= 2.0**100)
  got = np.asarray(_clip(rows, np.float32(clip)))
  want = np.asarray(_clip_v01(rows, np.float32(clip)))
  np.testing.assert_array_equal(got[typical].view(np.uint32), want[typical].view(np.uint32))
