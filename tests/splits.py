"""The tiny split model and table the training and runner tests share (small fixed shapes).

`MODEL` has two public categorical features (3 and 4 values), two public dense ones and two
private categorical ones (2 and 3 values); `split(n, seed)` draws a table for it whose label
depends on a public and a private feature, so a model has something to learn.
"""

import numpy as np

from splitjax import models
from splitjax.data import base as data_base

PUB_CARDS, PRIV_CARDS = (3, 4), (2, 3)
SPEC = models.ModelSpec(
  pub_cardinalities=PUB_CARDS, num_pub_dense=2, priv_cardinalities=PRIV_CARDS, hidden=(16, 8)
)
MODEL = models.make_model(SPEC)


def split(n: int, seed: int = 0) -> data_base.Split:
  """n rows for `MODEL`, seeded."""
  rng = np.random.default_rng(seed)
  pub_cat = np.stack([rng.integers(0, c, n) for c in PUB_CARDS], 1).astype(np.int32)
  priv_cat = np.stack([rng.integers(0, c, n) for c in PRIV_CARDS], 1).astype(np.int32)
  logit = (pub_cat[:, 0] - 1.0) + (priv_cat[:, 1] - 1.0) + rng.normal(size=n)
  return data_base.Split(
    priv_cat=priv_cat,
    priv_dense=np.zeros((n, 0), np.float32),
    pub_cat=pub_cat,
    pub_dense=rng.random((n, 2)).astype(np.float32),
    y=(logit > 0).astype(np.int32),
  )
