"""Tests of splitjax.data: bundled tables, roles, csv, taobao, synthetic and bad input."""

import gzip
import json
import os
import shutil

import numpy as np
import pytest
import tables
from scipy import stats

from splitjax import data
from splitjax.data import bundled


@pytest.fixture(scope="module")
def adult():
  return data.load("adult")


def _all(split_a, split_b, field):
  return np.concatenate([getattr(split_a, field), getattr(split_b, field)])


def _write(tmp_path, name, content):
  path = tmp_path / name
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    path.write_text(content, encoding="utf-8")
  return str(path)


# ------------------------------------------------------------------------------------------
# Bundled tables.


def test_adult_rows_cardinalities_label_rate(adult):
  assert len(adult.train) + len(adult.test) == 48_842
  assert len(adult.test) == 4_885
  assert adult.priv_cardinalities == (2, 5, 6, 7)
  assert adult.roles.private_categorical == ("sex", "race", "relationship", "marital-status")
  assert adult.roles.server_dense == ("age", "capital-gain", "capital-loss", "hours-per-week")
  assert adult.vocab["income"] == ("<=50K", ">50K")  # adult.test's trailing "." is stripped.
  assert "?" in adult.vocab["workclass"]
  assert adult.vocab["sex"] == ("Female", "Male")
  y = _all(adult.train, adult.test, "y")
  assert y.dtype == np.int32 and set(np.unique(y)) == {0, 1}
  assert abs(y.mean() - 0.2393) < 0.001
  for split in (adult.train, adult.test):
    assert split.priv_cat.dtype == np.int32 and split.pub_cat.dtype == np.int32
    assert split.pub_dense.dtype == np.float32
    assert split.priv_cat.shape == (len(split), 4) and split.priv_dense.shape == (len(split), 0)
    assert np.all(split.priv_cat < np.array(adult.priv_cardinalities))
    assert np.all(split.pub_cat < np.array(adult.pub_cardinalities))
    assert split.p_y_pub is None and split.p_y_full is None
  assert adult.priv_priors is None
  head = adult.test.take(np.arange(5))
  assert len(head) == 5 and head.p_y_pub is None
  np.testing.assert_array_equal(head.pub_dense, adult.test.pub_dense[:5])


def test_bank_rows_cardinalities_label_rate():
  bank = data.load("bank")
  assert len(bank.train) + len(bank.test) == 4_521
  assert len(bank.test) == 453
  assert bank.priv_cardinalities == (3, 12, 4, 2, 2, 3)
  assert bank.vocab["y"] == ("no", "yes")
  assert abs(_all(bank.train, bank.test, "y").mean() - 521 / 4521) < 1e-9


def test_credit_rows_cardinalities_label_rate():
  credit = data.load("credit")
  assert len(credit.train) + len(credit.test) == 30_000
  assert len(credit.test) == 3_000
  assert credit.priv_cardinalities == (2, 7, 4)
  assert credit.vocab["EDUCATION"] == tuple(str(i) for i in range(7))
  assert credit.vocab["MARRIAGE"] == ("0", "1", "2", "3")
  assert credit.vocab["PAY_0"][0] == "-2"  # Numeric categories sort numerically.
  assert credit.train.pub_dense.shape[1] == 14
  assert abs(_all(credit.train, credit.test, "y").mean() - 6636 / 30000) < 1e-9


def test_dense_scaled_to_unit_interval_on_train(adult):
  dense = adult.train.pub_dense
  np.testing.assert_allclose(dense.min(axis=0), 0.0)
  np.testing.assert_allclose(dense.max(axis=0), 1.0)
  assert adult.dense_ranges["age"] == (17.0, 90.0)
  assert set(adult.dense_ranges) == set(adult.roles.server_dense)


def test_split_is_seeded():
  a, b, c = data.load("bank", seed=0), data.load("bank", seed=0), data.load("bank", seed=1)
  np.testing.assert_array_equal(a.train.pub_dense, b.train.pub_dense)
  np.testing.assert_array_equal(a.test.y, b.test.y)
  assert not np.array_equal(a.test.pub_dense, c.test.pub_dense)
  assert len(a.test) == len(c.test) == 453


def test_role_override_moves_age(adult):
  moved = data.load("adult", private_dense=("age",))
  assert moved.roles.private_dense == ("age",)
  assert "age" not in moved.roles.server_dense
  assert moved.roles.private_categorical == adult.roles.private_categorical
  assert moved.train.priv_dense.shape == (len(moved.train), 1)
  assert moved.train.pub_dense.shape == (len(moved.train), 3)
  np.testing.assert_array_equal(moved.train.priv_dense[:, 0], adult.train.pub_dense[:, 0])
  as_string = data.load("adult", private_dense="age", private_categorical="sex,race")
  assert as_string.roles.private_categorical == ("sex", "race")
  assert as_string.priv_cardinalities == (2, 5)


def test_checksum_mismatch_detected(tmp_path, monkeypatch):
  files = tmp_path / "files"
  files.mkdir()
  shutil.copy(os.path.join(bundled.FILES_DIR, "bank.csv.gz"), files / "bank.csv.gz")
  monkeypatch.setattr(bundled, "FILES_DIR", str(files))
  assert len(data.load("bank").test) == 453  # The intact copy loads.
  content = gzip.decompress((files / "bank.csv.gz").read_bytes())
  (files / "bank.csv.gz").write_bytes(gzip.compress(content.replace(b"married", b"marrie", 1)))
  with pytest.raises(data.DataError, match=r"checksum mismatch .*bank\.csv\.gz.*reinstall"):
    data.load("bank")
  (files / "bank.csv.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
  with pytest.raises(data.DataError, match=r"bank\.csv\.gz is corrupt.*reinstall"):
    data.load("bank")
  (files / "bank.csv.gz").unlink()
  with pytest.raises(data.DataError, match=r"bank\.csv\.gz is missing.*reinstall"):
    data.load("bank")


def test_bank_full_path(tmp_path):
  source = gzip.decompress(open(os.path.join(bundled.FILES_DIR, "bank.csv.gz"), "rb").read())
  path = _write(tmp_path, "bank-full.csv", source)
  bank = data.load("bank", path=path)
  assert len(bank.train) + len(bank.test) == 4_521 and bank.priv_cardinalities[1] == 12
  few = data.load("bank", path=path, max_rows=100)
  assert len(few.train) + len(few.test) == 100


# ------------------------------------------------------------------------------------------
# csv and taobao.

_TABLE = """\
age,sex,city,income,spend,label
30,F,a,100.5,1,yes
41,M,b,80,2,no
25,F,a,55,3,no
52,M,c,120,4,yes
33,F,b,70,5,no
47,M,a,95,6,yes
29,F,c,60,7,no
38,M,b,88,8,no
44,F,a,101,9,yes
36,M,c,77,10,no
"""


def test_csv_with_json_schema(tmp_path):
  path = _write(tmp_path, "t.csv", _TABLE)
  schema = {
    "private_categorical": ["sex"],
    "private_dense": ["age"],
    "server_categorical": ["city"],
    "server_dense": ["income", "spend"],
    "label": "label",
  }
  schema_path = _write(tmp_path, "schema.json", json.dumps(schema))
  table = data.load("csv", path=path, schema=schema_path, test_fraction=0.2, seed=3)
  assert table.name == "csv"
  assert table.roles == data.Roles(("sex",), ("age",), ("city",), ("income", "spend"), "label")
  assert table.priv_cardinalities == (2,) and table.pub_cardinalities == (3,)
  assert table.vocab["sex"] == ("F", "M") and table.vocab["label"] == ("no", "yes")
  assert len(table.test) == 2 and len(table.train) == 8
  y = _all(table.train, table.test, "y")
  assert sorted(y.tolist()) == [0] * 6 + [1] * 4
  assert table.train.priv_dense.min() == 0.0 and table.train.priv_dense.max() == 1.0
  # Keywords override the schema; positive_label flips the mapping; a dict schema works too.
  flipped = data.load("csv", path=path, schema=schema, server_dense="income", positive_label="no")
  # spend, no longer listed, goes to the server by type (a csv table's unlisted columns do).
  assert flipped.roles.server_dense == ("income", "spend")
  assert flipped.notes == (
    "t.csv: 1 unlisted column(s) go to the server: server_dense (spend) "
    '(list any under "ignore" in the schema to drop it)',
  )
  assert _all(flipped.train, flipped.test, "y").sum() == 6
  semi = data.load(
    "csv", path=_write(tmp_path, "s.csv", _TABLE.replace(",", ";")), schema=schema
  )  # Delimiter detected from the header.
  assert semi.priv_cardinalities == (2,)


def test_own_table_unlisted_columns_go_to_the_server_by_type(tmp_path):
  """A German-credit-shaped table with a schema naming only the label and the private columns."""
  path = tables.german_like(tmp_path / "german.csv")
  table = data.load("csv", path=path, schema=tables.SCHEMA)
  assert table.roles.private_categorical == ("personal_status", "housing")
  assert set(table.roles.server_dense) == set(tables.NUMERIC)
  assert set(table.roles.server_categorical) == set(tables.CATEGORICAL) - {
    "personal_status",
    "housing",
  }
  assert len(table.roles.features()) == 20
  assert table.pub_cardinalities == tuple(
    len(tables.CATEGORICAL[c]) for c in table.roles.server_categorical
  )
  (note,) = table.notes
  assert "german.csv: 18 unlisted column(s) go to the server" in note and '"ignore"' in note
  for col in tables.NUMERIC + ("checking_status", "telephone"):
    assert col in note, col
  assert len(table.train) + len(table.test) == 1000
  # Everything listed: no note. "ignore" drops columns on purpose, from any dataset.
  listed = data.load(
    "csv",
    path=path,
    schema=dict(tables.SCHEMA, ignore=["purpose"]),
    server_dense=[c for c in tables.NUMERIC if c != "age"],
    server_categorical=[
      c for c in tables.CATEGORICAL if c not in ("purpose", "personal_status", "housing")
    ],
    private_dense=["age"],
  )
  assert listed.notes == ()
  assert "age" not in listed.roles.server_dense and listed.roles.private_dense == ("age",)
  adult = data.load("adult", ignore=["education"])
  assert "education" not in adult.roles.features() and adult.notes == ()
  # The built-in datasets keep their documented roles: their other columns are not used.
  assert data.load("adult").roles == data.DEFAULT_ROLES["adult"]


def test_own_table_refuses_an_id_and_an_empty_server_side(tmp_path):
  path = tables.german_like(tmp_path / "german.csv", num_rows=200, id_column=True)
  with pytest.raises(
    data.DataError,
    match=r"categorical column 'application_id' of .*german.csv "
    r"has 200 distinct values in 200 rows, like an identifier: list it under "
    r'"ignore" in the schema',
  ) as info:
    data.load("csv", path=path, schema=tables.SCHEMA)
  assert info.value.reason == "schema" and "--" not in str(info.value)
  table = data.load("csv", path=path, schema=dict(tables.SCHEMA, ignore=["application_id"]))
  assert "application_id" not in table.roles.features()
  assert "application_id" not in table.notes[0]
  # The id listed on purpose as a server category is refused too.
  with pytest.raises(data.DataError, match="like an identifier"):
    data.load("csv", path=path, schema=dict(tables.SCHEMA, server_categorical=["application_id"]))
  every_other = [
    c
    for c in ("application_id",) + tables.NUMERIC + tuple(tables.CATEGORICAL)
    if c not in ("personal_status", "housing")
  ]
  with pytest.raises(
    data.DataError,
    match=r"the server holds no feature for .*german.csv; list "
    r'its columns under "server_categorical" or "server_dense" in the schema',
  ) as info:
    data.load("csv", path=path, schema=dict(tables.SCHEMA, ignore=every_other))
  assert info.value.reason == "schema" and "--" not in str(info.value)
  with pytest.raises(data.DataError, match=r"the server holds no feature for adult"):
    data.load(
      "adult",
      ignore=list(
        data.DEFAULT_ROLES["adult"].server_categorical + data.DEFAULT_ROLES["adult"].server_dense
      ),
    )
  with pytest.raises(data.DataError, match=r"column 'class' is given two roles \(label and ignore"):
    data.load("csv", path=path, schema=dict(tables.SCHEMA, ignore=["class"]))
  with pytest.raises(data.DataError, match=r"column 'income' is both the label and in \"ignore\""):
    data.load("adult", ignore=["income"])
  with pytest.raises(data.DataError, match=r"unknown column 'nope'"):
    data.load("csv", path=path, schema=dict(tables.SCHEMA, ignore=["nope"]))
  with pytest.raises(data.DataError, match=r"given two roles \(ignore and server_dense\)"):
    data.load("csv", path=path, schema=dict(tables.SCHEMA, ignore=["age"], server_dense=["age"]))


_RAW_SAMPLE = """\
user,time_stamp,adgroup_id,pid,nonclk,clk
1,1494137644,10,430548_1007,1,0
1,1494137645,11,430548_1007,0,1
2,1494137646,10,430539_1007,1,0
2,1494137647,12,430539_1007,1,0
3,1494137648,12,430548_1007,0,1
3,1494137649,11,430548_1007,1,0
4,1494137650,10,430548_1007,1,0
4,1494137651,12,430548_1007,0,1
5,1494137652,11,430539_1007,1,0
5,1494137653,10,430539_1007,1,0
"""
_USER_PROFILE = """\
userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,occupation,new_user_class_level 
1,0,5,2,5,,3,0,3
2,0,2,1,2,1,3,1,
3,0,8,2,0,3,1,0,2
4,0,4,2,6,2,2,1,4
"""
_AD_FEATURE = """\
adgroup_id,cate_id,campaign_id,customer,brand,price
10,6406,83237,1,95471,170.0
11,4520,387991,6810,NULL,199.0
12,4280,333591,,247789,88.5
"""


def _taobao_dir(tmp_path):
  directory = tmp_path / "taobao"
  directory.mkdir()
  _write(directory, "raw_sample.csv", _RAW_SAMPLE)
  _write(directory, "user_profile.csv", _USER_PROFILE)
  _write(directory, "ad_feature.csv", _AD_FEATURE)
  return directory


def test_taobao_join_fills_and_shifts(tmp_path):
  table = data.load("taobao", path=_taobao_dir(tmp_path), test_fraction=0.2)
  assert len(table.train) + len(table.test) == 10 and len(table.test) == 2
  assert table.priv_cardinalities == (7, 3, 3, 2)  # Full domains, though the fixture lacks some.
  assert table.roles.server_categorical == ("adgroup_id", "cate_id", "customer", "brand", "userid")
  priv = np.concatenate([table.train.priv_cat, table.test.priv_cat])
  pub = np.concatenate([table.train.pub_cat, table.test.pub_cat])
  users = np.array(table.vocab["userid"])[pub[:, 4]]
  ads = np.array(table.vocab["adgroup_id"])[pub[:, 0]]
  # (age_level, pvalue_level - 1, shopping_level - 1, occupation); user 5 has no profile row:
  # filled with age 3, pvalue 2, shopping 2, occupation 0; user 1's empty pvalue is filled 2.
  expected = {
    "1": (5, 1, 2, 0),
    "2": (2, 0, 2, 1),
    "3": (0, 2, 0, 0),
    "4": (6, 1, 1, 1),
    "5": (3, 1, 1, 0),
  }
  for user, levels in expected.items():
    np.testing.assert_array_equal(priv[users == user], [levels] * int((users == user).sum()))
  brands = np.array(table.vocab["brand"])[pub[:, 3]]
  customers = np.array(table.vocab["customer"])[pub[:, 2]]
  assert set(brands[ads == "11"]) == {"0"} and set(customers[ads == "12"]) == {"0"}
  assert set(brands[ads == "10"]) == {"95471"}
  assert _all(table.train, table.test, "y").sum() == 3
  assert table.dense_ranges["price"][1] <= 199.0


def test_taobao_errors(tmp_path):
  directory = _taobao_dir(tmp_path)
  with pytest.raises(data.DataError, match="taobao needs the directory holding") as info:
    data.load("taobao")
  assert info.value.reason == "no_directory" and "--" not in str(info.value)
  (directory / "ad_feature.csv").write_text(_AD_FEATURE.replace("12,4280", "13,4280"))
  with pytest.raises(data.DataError, match=r"adgroup_id '12' at raw_sample\.csv line 5"):
    data.load("taobao", path=directory)
  (directory / "ad_feature.csv").unlink()
  with pytest.raises(data.DataError, match=r"file not found: .*ad_feature\.csv"):
    data.load("taobao", path=directory)


# ------------------------------------------------------------------------------------------
# Synthetic.


def test_synthetic_deterministic_by_seed():
  a, b = data.synthetic(num_examples=300, seed=4), data.synthetic(num_examples=300, seed=4)
  c = data.synthetic(num_examples=300, seed=5)
  for field in ("priv_cat", "pub_cat", "pub_dense", "y", "p_y_full", "p_y_pub"):
    np.testing.assert_array_equal(getattr(a.train, field), getattr(b.train, field))
  assert not np.array_equal(a.train.priv_cat, c.train.priv_cat)
  assert a.priv_cardinalities == (2, 3) and a.pub_cardinalities == (4, 5)
  assert len(a.test) == 30
  d = data.load("synthetic", seed=4, num_examples=300)
  np.testing.assert_array_equal(a.test.y, d.test.y)


def _contingency_pvalue(x, z, kx, kz):
  counts = np.zeros((kx, kz))
  np.add.at(counts, (x, z), 1)
  counts = counts[counts.sum(1) > 0][:, counts.sum(0) > 0]
  return stats.chi2_contingency(counts).pvalue


def test_synthetic_private_independent_of_server_when_uncorrelated():
  table = data.synthetic(num_examples=20_000, seed=0, correlation=0.0)
  split = table.train
  for j, kj in enumerate(table.priv_cardinalities):
    for k, kk in enumerate(table.pub_cardinalities):
      assert _contingency_pvalue(split.priv_cat[:, j], split.pub_cat[:, k], kj, kk) > 1e-3
    freq = np.bincount(split.priv_cat[:, j], minlength=kj) / len(split)
    np.testing.assert_allclose(freq, table.priv_priors[j], atol=0.02)
  # With correlation the private value follows the server's: dependence is detected.
  correlated = data.synthetic(num_examples=20_000, seed=0, correlation=0.8)
  assert (
    _contingency_pvalue(correlated.train.priv_cat[:, 0], correlated.train.pub_cat[:, 0], 2, 4)
    < 1e-10
  )
  freq = np.bincount(correlated.train.priv_cat[:, 1], minlength=3) / len(correlated.train)
  np.testing.assert_allclose(freq, correlated.priv_priors[1], atol=0.02)


def test_synthetic_posteriors_are_consistent():
  # Without server dense features x_pub takes 20 values: within each, the mean of
  # P(y=1 | x_pub, x_priv) estimates P(y=1 | x_pub).
  table = data.synthetic(
    num_examples=20_000, seed=2, num_pub_dense=0, num_priv_dense=1, correlation=0.3
  )
  split = table.train
  group = split.pub_cat[:, 0] * 5 + split.pub_cat[:, 1]
  for g in np.unique(group):
    rows = group == g
    np.testing.assert_allclose(split.p_y_pub[rows], split.p_y_pub[rows][0])
    assert abs(split.p_y_full[rows].mean() - split.p_y_pub[rows][0]) < 0.05
  assert abs(split.y.mean() - split.p_y_full.mean()) < 0.02
  # Private values fully determined by the server's: both posteriors agree.
  determined = data.synthetic(num_examples=500, seed=2, correlation=1.0)
  np.testing.assert_allclose(determined.train.p_y_pub, determined.train.p_y_full, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Bad input: one line naming the problem.


def _bad_csv_cases(tmp_path):
  schema = {"private_categorical": ["sex"], "server_dense": ["income"], "label": "label"}
  w = lambda name, content: _write(tmp_path, name, content)  # noqa: E731
  return [
    (lambda: data.load("adultt"), r"unknown dataset 'adultt'; valid names: adult, bank"),
    (
      lambda: data.load("adult", private_categorical=("sexx",)),
      r"unknown column 'sexx' for adult; available columns: age, workclass",
    ),
    (lambda: data.load("adult", frobnicate=1), r"unknown option\(s\) frobnicate"),
    (
      lambda: data.load("csv", path=str(tmp_path / "nope.csv"), schema=schema),
      r"file not found: .*nope\.csv",
    ),
    (lambda: data.load("csv", path=str(tmp_path), schema=schema), r"is a directory"),
    (
      lambda: data.load(
        "csv", path=w("rows.csv", "sex,income,label\nF,1,yes\nM,2\n"), schema=schema
      ),
      r"rows\.csv line 3: 2 fields, expected 3",
    ),
    (lambda: data.load("csv", path=w("empty.csv", ""), schema=schema), r"empty\.csv is empty"),
    (
      lambda: data.load("csv", path=w("head.csv", "sex,income,label\n"), schema=schema),
      r"head\.csv has a header but no data rows",
    ),
    (
      lambda: data.load(
        "csv", path=w("semi.csv", _TABLE.replace(",", ";")), schema=schema, delimiter=","
      ),
      r"semi\.csv has one column only when split on ','; it looks ';'-separated",
    ),
    (
      lambda: data.load(
        "csv", path=w("latin.csv", b"sex,income,label\n\xe9,1,yes\n"), schema=schema
      ),
      r"latin\.csv is not UTF-8 text",
    ),
    (
      lambda: data.load("csv", path=w("bin.csv", b"\x00\x01\x02binary\x00"), schema=schema),
      r"bin\.csv is a binary file",
    ),
    (
      lambda: data.load(
        "csv", path=w("multi.csv", "sex,income,label\nF,1,a\nM,2,b\nF,3,c\n"), schema=schema
      ),
      r"label 'label' must be binary but has 3 distinct",
    ),
    (
      lambda: data.load(
        "csv", path=w("nan.csv", "sex,income,label\nF,1,a\nM,nan,b\n"), schema=schema
      ),
      r"dense column 'income' has non-numeric or NaN value 'nan' at nan\.csv line 3",
    ),
    (
      lambda: data.load(
        "csv", path=w("txt.csv", "sex,income,label\nF,1,a\nM,lots,b\n"), schema=schema
      ),
      r"'income' has non-numeric .*'lots' at txt\.csv line 3",
    ),
    (
      lambda: data.load("adult", private_dense=("age",), server_dense=("age",)),
      r"column 'age' is given two roles \(private_dense and server_dense\)",
    ),
    (
      lambda: data.load("adult", private_categorical=("sex", "sex")),
      r"column 'sex' is listed twice in private_categorical",
    ),
    (
      lambda: data.load("adult", server_categorical=("income",)),
      r"column 'income' is given two roles \(label and server_categorical\)",
    ),
    (
      lambda: data.load(
        "csv", path=w("ok.csv", _TABLE), schema={"server_dense": ["income"], "label": "label"}
      ),
      r"no private feature",
    ),
    (
      lambda: data.load("csv", path=w("ok.csv", _TABLE), schema=w("bad.json", "{oops")),
      r"schema file .*bad\.json is not valid JSON",
    ),
    (
      lambda: data.load("csv", path=w("ok.csv", _TABLE), schema={"privat": ["sex"]}),
      r"unknown key\(s\) 'privat'",
    ),
    (lambda: data.load("bank", test_fraction=1.5), r"test_fraction must be in \(0, 1\)"),
    (lambda: data.synthetic(correlation=2.0), r"correlation must be in \[0, 1\]"),
    (lambda: data.synthetic(priv_cardinalities=()), r"no private feature"),
  ]


def test_bad_input_raises_one_line_data_error(tmp_path):
  for call, pattern in _bad_csv_cases(tmp_path):
    with pytest.raises(data.DataError, match=pattern) as info:
      call()
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value), str(info.value)


def test_taobao_generator_has_the_real_files_shape_and_quirks(tmp_path):
  import gzip

  from splitjax.data import taobao_files

  sizes = taobao_files.write(tmp_path / "a", 20_000, seed=3)
  taobao_files.write(tmp_path / "b", 20_000, seed=3)
  taobao_files.write(tmp_path / "c", 20_000, seed=4, compress=True)
  for name in ("raw_sample.csv", "user_profile.csv", "ad_feature.csv"):
    same = (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert same, name  # seeded: the same bytes
    with gzip.open(tmp_path / "c" / (name + ".gz"), "rt") as f:
      assert f.read() != (tmp_path / "a" / name).read_text(), name  # another seed, other rows
  raw = (tmp_path / "a" / "raw_sample.csv").read_text().splitlines()
  profile = (tmp_path / "a" / "user_profile.csv").read_text().splitlines()
  ads = (tmp_path / "a" / "ad_feature.csv").read_text().splitlines()
  assert profile[0].endswith("new_user_class_level ")  # the real header's trailing space
  assert len(raw) - 1 == 20_000 and sizes.ads == len(ads) - 1 and sizes.profiles == len(profile) - 1
  cells = [line.split(",") for line in profile[1:]]
  assert abs(np.mean([c[5] == "" for c in cells]) - 0.54) < 0.05  # empty pvalue_level
  assert abs(np.mean([c[8] == "" for c in cells]) - 0.32) < 0.05  # empty new_user_class_level
  ad_cells = [line.split(",") for line in ads[1:]]
  assert abs(np.mean([c[4] == "NULL" for c in ad_cells]) - 0.29) < 0.05
  assert all("." in c[5] for c in ad_cells)  # float prices
  users = np.array([int(line.split(",")[0]) for line in raw[1:]])
  profiled = {int(c[0]) for c in cells}
  seen = np.unique(users)
  assert 0.02 < np.mean([u not in profiled for u in seen]) < 0.15  # users without a profile
  per_user = np.bincount(np.unique(users, return_inverse=True)[1])
  assert per_user.max() >= 20 * np.median(per_user)  # Zipf-like impressions per user
  assert 0.04 < sizes.click_rate < 0.06
  # Through the loader: the private levels are the user's, and they show in what the server sees.
  d = data.load("taobao", path=tmp_path / "a")
  assert d.priv_cardinalities == (7, 3, 3, 2)
  tr, te = d.train, d.test
  user, age = tr.pub_cat[:, 4], tr.priv_cat[:, 0]
  for u in np.unique(user)[:200]:
    assert len(np.unique(age[user == u])) == 1  # a user's level, the same on all their rows
  cate = tr.pub_cat[:, 1]
  majority = {c: np.bincount(age[cate == c]).argmax() for c in np.unique(cate)}
  overall = np.bincount(age).argmax()
  guess = np.array([majority.get(c, overall) for c in te.pub_cat[:, 1]])
  assert np.mean(guess == te.priv_cat[:, 0]) > np.mean(te.priv_cat[:, 0] == overall) + 0.05
