"""Taobao-schema files at any size: raw_sample.csv, user_profile.csv and ad_feature.csv, seeded.

The real files (Alibaba, "Ad Display/Click Data on Taobao.com") are not bundled; this writes
stand-ins with their columns, their proportions and their quirks, so the Taobao path can be
tested small and benchmarked at the real size (26,557,961 impressions):

- sizes in the real files' proportions: per impression 0.0430 users in raw_sample.csv (1,141,729
  users), 0.0319 ad groups (846,811); 93 % of the users have a profile row (1,061,768 rows), the
  others none;
- impressions per user Zipf-like (a few users with thousands, most with a handful);
- user_profile.csv's header ends with a space (``new_user_class_level ``), as the real one does;
  ``pvalue_level`` empty in 54 % of the profile rows and ``new_user_class_level`` in 32 %;
- ``brand`` written ``NULL`` for 29 % of the ad groups; prices floats (log-normal, cents);
- a click rate near 5 % that depends on the user's private levels (pvalue, shopping) and on the ad;
- private levels that depend on the user only, and that correlate with what the server sees:
  each user's ad categories are drawn with weights that depend on their age and pvalue levels.

`write(directory, num_impressions, seed=0)` writes the three files (plain CSV, or gzipped with
``compress=True``) and returns their sizes; rows are written in chunks, so memory stays bounded at
the full size. The same arguments give the same bytes.

  python -m splitjax.data.taobao_files --directory=/tmp/taobao --impressions=26557961
"""

import argparse
import gzip
import os
from typing import NamedTuple

import numpy as np

# The real files' proportions.
USERS_PER_IMPRESSION = 1_141_729 / 26_557_961
ADS_PER_IMPRESSION = 846_811 / 26_557_961
PROFILE_SHARE = 1_061_768 / 1_141_729
PVALUE_EMPTY, NEW_USER_CLASS_EMPTY, BRAND_NULL = 0.54, 0.32, 0.29
CLICK_RATE = 0.05
START_TIME, DAYS = 1_494_000_000, 8
PROFILE_HEADER = (
  "userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,"
  "occupation,new_user_class_level "
)
RAW_HEADER = "user,time_stamp,adgroup_id,pid,nonclk,clk"
AD_HEADER = "adgroup_id,cate_id,campaign_id,customer,brand,price"
_CHUNK = 1 << 20


class Sizes(NamedTuple):
  """What `write` wrote."""

  impressions: int
  users: int
  profiles: int
  ads: int
  categories: int
  click_rate: float


def _open(path: str, compress: bool):
  return gzip.open(path + ".gz", "wt", compresslevel=1) if compress else open(path, "w")


def _rows(columns) -> str:
  """CSV lines of string columns (each a sequence of str)."""
  return "\n".join(map(",".join, zip(*columns, strict=True))) + "\n"


def _levels(rng, n: int):
  """Each user's private levels (age, pvalue, shopping, occupation), drawn from one latent taste
  per user, so that the first three correlate."""
  taste = rng.normal(size=n)
  age = np.clip(np.round(3.0 + 1.3 * taste + rng.normal(scale=0.8, size=n)), 0, 6).astype(int)
  wealth = 0.6 * taste + rng.normal(scale=0.8, size=n)
  pvalue = np.digitize(wealth, [-0.5, 0.9]) + 1  # 1..3
  shopping = np.digitize(0.5 * wealth + rng.normal(scale=0.7, size=n), [-1.0, 0.2]) + 1
  occupation = (rng.random(n) < 0.06).astype(int)
  return age, pvalue, shopping, occupation


def write(directory, num_impressions: int, *, seed: int = 0, compress: bool = False) -> Sizes:
  """Writes raw_sample.csv, user_profile.csv and ad_feature.csv (module docstring) into
  `directory` (created if needed; existing files of those names are replaced)."""
  if num_impressions < 1:
    raise ValueError(f"num_impressions={num_impressions}: give at least 1")
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  num_users = max(2, round(num_impressions * USERS_PER_IMPRESSION))
  num_ads = max(2, round(num_impressions * ADS_PER_IMPRESSION))
  num_cates = int(np.clip(num_ads // 125, 8, 6_769))

  # Users: private levels from a latent taste; ids sparse like the real ones.
  user_ids = np.sort(rng.choice(num_users * 3, num_users, replace=False)) + 1
  age, pvalue, shopping, occupation = _levels(rng, num_users)
  has_profile = rng.random(num_users) < PROFILE_SHARE
  has_profile[0] = True
  # Ads: categories Zipf-like; each category has a 'taste' its audience leans to.
  cate_of_ad = np.minimum(rng.zipf(1.3, num_ads), num_cates) - 1
  cate_taste = rng.normal(size=num_cates)
  cate_value = rng.normal(size=num_cates)
  ad_effect = rng.normal(scale=0.5, size=num_ads)
  ad_ids = rng.permutation(num_ads) + 1

  # Impressions per user: Zipf-like (Pareto) weights, at least one each where there are enough.
  weights = rng.pareto(1.1, num_users) + 1.0
  base = 1 if num_impressions >= num_users else 0
  counts = base + rng.multinomial(num_impressions - base * num_users, weights / weights.sum())

  # Which ads a user sees: a category near their taste (age and pvalue), then an ad of it.
  order = np.argsort(cate_taste)
  ads_by_cate = np.argsort(cate_of_ad, kind="stable")
  cate_start = np.searchsorted(cate_of_ad[ads_by_cate], np.arange(num_cates))
  cate_size = np.bincount(cate_of_ad, minlength=num_cates)
  present = np.flatnonzero(cate_size[order] > 0)
  user_pos = (age / 6.0 * 0.7 + (pvalue - 1) / 2.0 * 0.3).clip(0, 1)
  bias, clicks = None, 0
  raw_path = os.path.join(directory, "raw_sample.csv")
  user_of_row = np.repeat(np.arange(num_users), counts)
  perm = rng.permutation(num_impressions)
  with _open(raw_path, compress) as f:
    f.write(RAW_HEADER + "\n")
    for start in range(0, num_impressions, _CHUNK):
      u = user_of_row[perm[start : start + _CHUNK]]
      n = len(u)
      spot = np.clip(user_pos[u] + rng.normal(scale=0.15, size=n), 0, 1 - 1e-9)
      cate = order[present[(spot * len(present)).astype(int)]]
      ad = ads_by_cate[cate_start[cate] + rng.integers(0, 1 << 30, size=n) % cate_size[cate]]
      logit = (
        0.35 * (pvalue[u] - 2)
        + 0.25 * (shopping[u] - 2)
        + 0.3 * occupation[u]
        + ad_effect[ad]
        + 0.4 * cate_value[cate]
      )
      if bias is None:  # the base rate, solved once on the first chunk for CLICK_RATE
        lo, hi = -10.0, 5.0
        for _ in range(50):
          mid = (lo + hi) / 2
          lo, hi = (
            (mid, hi) if np.mean(1 / (1 + np.exp(-(logit + mid)))) < CLICK_RATE else (lo, mid)
          )
        bias = (lo + hi) / 2
      clk = (rng.random(n) < 1 / (1 + np.exp(-(logit + bias)))).astype(np.int64)
      clicks += int(clk.sum())
      stamp = START_TIME + rng.integers(0, DAYS * 86_400, size=n)
      pid = np.where(rng.random(n) < 0.7, "430548_1007", "430539_1007")
      f.write(
        _rows(
          [
            user_ids[u].astype(str),
            stamp.astype(str),
            ad_ids[ad].astype(str),
            pid,
            (1 - clk).astype(str),
            clk.astype(str),
          ]
        )
      )

  # user_profile.csv: profile users in a shuffled order, empty cells in the real shares.
  rows = rng.permutation(np.flatnonzero(has_profile))
  m = len(rows)
  gender = rng.integers(1, 3, size=m)
  group = np.clip(age[rows] + 6 * (gender - 1), 0, 12)
  pv = np.where(rng.random(m) < PVALUE_EMPTY, "", pvalue[rows].astype(str))
  new_class = np.where(
    rng.random(m) < NEW_USER_CLASS_EMPTY, "", rng.integers(1, 5, size=m).astype(str)
  )
  with _open(os.path.join(directory, "user_profile.csv"), compress) as f:
    f.write(PROFILE_HEADER + "\n")
    for start in range(0, m, _CHUNK):
      s = slice(start, start + _CHUNK)
      r = rows[s]
      f.write(
        _rows(
          [
            user_ids[r].astype(str),
            np.where(rng.random(len(r)) < 0.9, "0", rng.integers(1, 97, len(r)).astype(str)),
            group[s].astype(str),
            gender[s].astype(str),
            age[r].astype(str),
            pv[s],
            shopping[r].astype(str),
            occupation[r].astype(str),
            new_class[s],
          ]
        )
      )

  # ad_feature.csv: every ad group, NULL brands, float prices.
  num_customers = max(1, num_ads // 3)
  with _open(os.path.join(directory, "ad_feature.csv"), compress) as f:
    f.write(AD_HEADER + "\n")
    for start in range(0, num_ads, _CHUNK):
      a = np.arange(start, min(start + _CHUNK, num_ads))
      n = len(a)
      customer = rng.integers(1, num_customers + 1, size=n)
      brand = np.where(rng.random(n) < BRAND_NULL, "NULL", (customer * 7 + 11).astype(str))
      price = np.round(np.exp(rng.normal(5.0, 1.4, size=n)), 2)
      f.write(
        _rows(
          [
            ad_ids[a].astype(str),
            (cate_of_ad[a] + 1).astype(str),
            rng.integers(1, max(2, num_ads // 2), size=n).astype(str),
            customer.astype(str),
            brand,
            np.char.mod("%.2f", price),
          ]
        )
      )
  return Sizes(num_impressions, num_users, m, num_ads, num_cates, clicks / num_impressions)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--directory", required=True)
  parser.add_argument("--impressions", type=int, default=26_557_961)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--compress", action="store_true", help="write NAME.csv.gz")
  args = parser.parse_args(argv)
  print(write(args.directory, args.impressions, seed=args.seed, compress=args.compress))


if __name__ == "__main__":
  main()
