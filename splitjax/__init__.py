"""splitjax: privacy leakage through the cut layer of split learning, in JAX."""

from splitjax import attacks
from splitjax import audit
from splitjax import checkpointing
from splitjax import data
from splitjax import evaluation
from splitjax import metrics
from splitjax import models
from splitjax import multihost
from splitjax import privacy
from splitjax import protocol
from splitjax import results
from splitjax import training

__version__ = "0.2.0"
