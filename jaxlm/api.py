"""``jaxlm.load(path)``: a ready model from any checkpoint jaxlm reads.

    import jaxlm
    lm = jaxlm.load("step_017500.pt")          # .pt / .safetensors / HF dir / export / run dir / checkpoints/<step>
    lm = jaxlm.load("Org/Repo", filename="step_017500.pt")   # or "hf://Org/Repo/step_017500.pt": the Hub
    logits = lm(ids)                           # float32 [B, T, V] (soft-capped), ids int [B, T]
    lm.cfg                                     # the model config (e.g. ToyLMConfig)
    lm.tokenizer                               # tokenizers.Tokenizer from tokenizer.json beside it, or None
    lm.eos_id                                  # the id that ends a text (run config, else the tokenizer's files)
    lm.model                                   # the Flax NNX module, for jaxlm.generate and friends

Parameters are float32 (a bf16 checkpoint is upcast exactly); ``dtype="bfloat16"`` computes
the projections in bf16 instead.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import CheckpointError, JaxlmError
from jaxlm.models import build_model


@dataclasses.dataclass
class LoadedModel:
    """A model with its config and tokenizer; calling it returns float32 logits ``[B, T, V]``."""

    model: Any                      # the NNX module (``model(ids)`` works on it directly too)
    cfg: Any                        # its config dataclass
    tokenizer: Any = None           # ``tokenizers.Tokenizer`` or None
    step: int | None = None         # training step of the checkpoint, when known
    eos_id: int | None = None       # the end-of-text id: the run's data.eos_token, else the tokenizer's own
    source: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)  # what the conversion assumed
    _forward: Any = dataclasses.field(default=None, repr=False)

    def __call__(self, ids) -> jax.Array:
        ids = jnp.asarray(ids, jnp.int32)
        if ids.ndim == 1:
            ids = ids[None]
        if self._forward is None:
            self._forward = nnx.jit(lambda model, x: model(x))
        return self._forward(self.model, ids)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise CheckpointError(f"{self.source}: no tokenizer.json beside the checkpoint; pass tokenizer=PATH")
        return self.tokenizer.encode(text).ids


def find_tokenizer(path: pathlib.Path, explicit, vocab_size: int):
    """``(tokenizer, its file)`` named by ``explicit`` or found beside the checkpoint, or ``(None, None)``.

    Read with the checks of ``jaxlm.data.tokenizer`` (a file that is not a tokenizer, one with more
    ids than the model has rows), which imports no Grain.
    """
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return None, None
    from jaxlm.data import tokenizer as tok
    if explicit:
        candidates = [tok.tokenizer_file(explicit)]
    else:
        base = path.parent if path.is_file() else path
        candidates = [folder / name for folder in (base, base.parent.parent)  # run/checkpoints/<step>
                      for name in (tok.TOKENIZER_JSON, tok.SENTENCEPIECE_MODEL)]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        if explicit:
            return tok.load_tokenizer(candidate, vocab_size=vocab_size, eos_token=None), candidate
        try:   # only found beside the checkpoint: one that does not fit is not this model's
            return tok.load_tokenizer(candidate, vocab_size=vocab_size, eos_token=None), candidate
        except JaxlmError as error:
            print(f"note: not using {candidate} as the tokenizer: {error}", file=sys.stderr)
    return None, None


def _eos_id(tokenizer, tokenizer_path, run_config: dict | None) -> int | None:
    """The run's ``data.eos_token`` where the checkpoint carries one, else the EOS the tokenizer's
    own files name (a SentencePiece eos_id, a tokenizer_config.json), else ``<|endoftext|>``."""
    if tokenizer is None:
        return None
    from jaxlm.data import tokenizer as tok
    named = ((run_config or {}).get("data") or {}).get("eos_token")
    if named and tokenizer.token_to_id(named) is not None:
        return tokenizer.token_to_id(named)
    own = tok.special_tokens(tokenizer_path, tokenizer)
    if own.eos_id is not None:
        return own.eos_id
    return tokenizer.token_to_id(tok.DEFAULT_EOS)


def model_from_params(model_cfg, params: dict[str, np.ndarray], *, dtype=jnp.float32, source: str = ""):
    """An NNX model of ``model_cfg`` holding ``params`` (``path -> array``), upcast to float32; no random init."""
    # jax.eval_shape rather than nnx.eval_shape: no sharding by logical names under a user's mesh.
    graphdef, state = jax.eval_shape(lambda: nnx.split(build_model(model_cfg, rngs=nnx.Rngs(0), dtype=dtype)))

    def fill(path, leaf):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        name = name.removesuffix("/value")
        if name not in params:
            raise CheckpointError(f"{source}: no parameter {name} in the checkpoint")
        array = np.asarray(params[name])
        if tuple(array.shape) != tuple(leaf.shape):
            raise CheckpointError(f"{source}: {name} has shape {array.shape}, the model {tuple(leaf.shape)}")
        return jnp.asarray(array.astype(leaf.dtype))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def load(path, *, filename: str | None = None, dtype: str = "float32", tokenizer=None, key_map=None, overrides=(),
         family: str | None = None) -> LoadedModel:
    """A ready model from ``path``: an Orbax directory (a run's out_dir, its ``checkpoints/<step>``, an
    inference export or a ``to-orbax`` export), a native ``.pt`` / ``.safetensors`` file, a Hugging Face
    directory (config.json + model.safetensors, sharded or not), or a Hub id: ``"Org/Repo"`` with
    ``filename="step_017500.pt"`` (or none: the repository's files), or ``"hf://Org/Repo/step_017500.pt"``.

    ``key_map`` / ``overrides`` as for the converter (``{their_name: our_path}``, ``["rope_theta=500000"]``);
    ``family``: read a foreign file as this family's instead of asking every family's claim.
    """
    from jaxlm import formats
    path = formats.resolve(path, filename)
    conv = formats.read_checkpoint(path, key_map=key_map, overrides=overrides, with_optimizer=False, family=family)
    compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(dtype)
    if compute is None:
        raise CheckpointError(f"dtype {dtype!r}: allowed 'float32', 'bfloat16'")
    # The tokenizer first: one that does not fit the model is refused before any weight is built.
    tok, tok_path = find_tokenizer(path, tokenizer, conv.model_cfg.vocab_size)
    model = model_from_params(conv.model_cfg, conv.params, dtype=compute, source=str(path))
    return LoadedModel(model=model, cfg=conv.model_cfg, tokenizer=tok, step=conv.step, source=str(path),
                       notes=list(conv.notes), eos_id=_eos_id(tok, tok_path, conv.run_config))
