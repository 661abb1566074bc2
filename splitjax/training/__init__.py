"""Jitted split-learning (SL) and federated split-learning (FSL) training, evaluation, resume.

SL (DESIGN.md §1): one device, mini-batches; per step the server sends ``h``,
the device returns per-example ``g_i`` (after the cut-layer DP chain), both
sides update.

FSL: devices of ``samples_per_device`` examples share the device parameters.
Each round ``devices_per_round`` devices take ``local_steps`` steps from the
parameters at the start of the round (which the server therefore knows); the
server updates its own model after every local step with the gradients of all
devices of the round, then averages the devices' parameters and optimizer
states (FedAvg, equal weights). With ``local_steps=1`` and plain SGD a round
equals one SL step on the union of the round's examples.

Randomness: the data order of epoch ``e`` comes from
``np.random.default_rng([seed, e])``; the DP noise of step ``t`` from
``jax.random.fold_in(key, t)``. A run resumed from a checkpoint therefore
replays exactly the same computation.

Modules: `state` (the recipe, optimisers, `TrainState` with its static model and recipe,
`DPConfig`), `steps` (the module-level jitted SL step, FSL round and replay over
`protocol.split_step`), `loop` (`fit`, the transcript recorder, `replay_transcript`),
`evaluation` (test logits and metrics, the no-DP cut-gradient norm and the auto clip norm built
on it); host batching is `splitjax.data.batching`. Everything public is re-exported here.
"""

from splitjax.data.batching import Batch
from splitjax.data.batching import device_partition
from splitjax.data.batching import fsl_rounds
from splitjax.data.batching import sl_batches
from splitjax.data.batching import split_to_batch
from splitjax.multihost import put_global
from splitjax.multihost import to_host
from splitjax.training import evaluation
from splitjax.training import loop
from splitjax.training import state
from splitjax.training import steps
from splitjax.training.evaluation import AUTO_CLIP_SOURCE
from splitjax.training.evaluation import auto_clip_norm
from splitjax.training.evaluation import cut_grad_norms
from splitjax.training.evaluation import evaluate
from splitjax.training.evaluation import mean_cut_grad_norm
from splitjax.training.evaluation import predict
from splitjax.training.evaluation import predict_h
from splitjax.training.evaluation import predict_logits
from splitjax.training.evaluation import public_clip_split
from splitjax.training.loop import RECORD
from splitjax.training.loop import UPDATE_COORDS
from splitjax.training.loop import FitResult
from splitjax.training.loop import fit
from splitjax.training.loop import initialize_distributed
from splitjax.training.loop import replay_chunks
from splitjax.training.loop import replay_transcript
from splitjax.training.loop import update_coordinates
from splitjax.training.state import RECIPES
from splitjax.training.state import DPConfig
from splitjax.training.state import Recipe
from splitjax.training.state import TrainState
from splitjax.training.state import init_state
from splitjax.training.state import make_optimizer
from splitjax.training.state import no_dp
from splitjax.training.state import server_optimizer
from splitjax.training.steps import cut_layer_dp
from splitjax.training.steps import device_dp_sgd
from splitjax.training.steps import fsl_round
from splitjax.training.steps import replay
from splitjax.training.steps import sl_step
