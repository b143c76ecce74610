"""jaxlm: small language-model recipes released as PyTorch code, in JAX/Flax NNX."""

__version__ = "0.1.0"
