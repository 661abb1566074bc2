r"""Test AUC of the split models (3 seeds, both recipes, SL, FSL) and a one-hot logistic baseline.

  python -m benchmarks.train_auc --datasets=adult,bank,credit --seeds=0,1,2 --out=/tmp/auc.json

Not run by CI. The logistic regression uses every feature (server and private),
one-hot for categoricals, on the same 90/10 split, trained with optax L-BFGS.
"""

import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags

from experiments import pipeline
from experiments.configs import base
from splitjax import metrics

_DATASETS = flags.DEFINE_list("datasets", ["adult", "bank", "credit"], "Datasets.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_RECIPES = flags.DEFINE_list("recipes", ["tuned", "paper"], "Recipes.")
_PROTOCOLS = flags.DEFINE_list("protocols", ["sl", "fsl"], "Protocols.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")


def one_hot_features(dataset, split):
  parts = [
    np.eye(c, dtype=np.float32)[split.priv_cat[:, j]]
    for j, c in enumerate(dataset.priv_cardinalities)
  ]
  parts += [
    np.eye(c, dtype=np.float32)[split.pub_cat[:, j]]
    for j, c in enumerate(dataset.pub_cardinalities)
  ]
  parts += [split.priv_dense, split.pub_dense]
  return np.concatenate(parts, axis=1)


def logistic_auc(dataset, l2=1e-4, steps=300):
  x_tr, x_te = one_hot_features(dataset, dataset.train), one_hot_features(dataset, dataset.test)
  y_tr = jnp.asarray(dataset.train.y, jnp.float32)

  def loss(w):
    z = x_tr @ w[:-1] + w[-1]
    return jnp.mean(optax.sigmoid_binary_cross_entropy(z, y_tr)) + l2 * jnp.sum(w[:-1] ** 2)

  w = jnp.zeros(x_tr.shape[1] + 1)
  opt = optax.lbfgs()
  state = opt.init(w)
  vg = optax.value_and_grad_from_state(loss)

  @jax.jit
  def step(w, state):
    value, grad = vg(w, state=state)
    upd, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(w, upd), state

  for _ in range(steps):
    w, state = step(w, state)
  return metrics.roc_auc(np.asarray(x_te @ w[:-1] + w[-1]), dataset.test.y)


def main(argv):
  del argv
  results = []
  for ds in _DATASETS.value:
    for seed in map(int, _SEEDS.value):
      cfg = base.TrainConfig(dataset=ds, seed=seed)
      lr_auc = logistic_auc(pipeline.load_data(cfg))
      results.append({"dataset": ds, "seed": seed, "model": "logistic_onehot", "test_auc": lr_auc})
      print(json.dumps(results[-1]), flush=True)
      for recipe in _RECIPES.value:
        for proto in _PROTOCOLS.value:
          cfg = base.TrainConfig(dataset=ds, seed=seed, recipe=recipe, protocol=proto)
          with tempfile.TemporaryDirectory() as wd:
            t0 = time.time()
            m = pipeline.train_workdir(cfg, wd, progress=None)
          results.append(
            {
              "dataset": ds,
              "seed": seed,
              "recipe": recipe,
              "protocol": proto,
              "test_auc": m["test_auc"],
              "seconds_per_epoch": m["seconds_per_epoch"],
              "epochs": m["epochs"],
              "wall_seconds": time.time() - t0,
            }
          )
          print(json.dumps(results[-1]), flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
