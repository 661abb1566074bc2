"""splitjax: privacy leakage through the cut layer of split learning, in JAX."""

__version__ = "0.1.0"
