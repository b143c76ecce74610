"""jaxlm: small language-model recipes released as PyTorch code, in JAX/Flax NNX."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """A ready model from a checkpoint: ``jaxlm.load(path)(ids)`` gives float32 logits ``[B, T, V]``.

    ``path``: an Orbax directory (a run's out_dir, its ``checkpoints/<step>``, an inference or a
    ``to-orbax`` export) or a ``.pt`` / ``.safetensors`` file. Returns a :class:`jaxlm.api.LoadedModel`
    with ``.model``, ``.cfg`` and ``.tokenizer``. Imported on first use, so ``import jaxlm`` stays light.
    """
    from jaxlm.api import load as _load
    return _load(path, **kwargs)
