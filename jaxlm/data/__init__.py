"""Data for jaxlm: tokenizers, sources, the Grain pipeline, mixtures, TFDS preparation.

The train loop needs two calls::

    tok = load_tokenizer_for(cfg.data, vocab_size=model_vocab)
    it = make_batch_iterator(cfg.data, tok, seq_len=T, batch_size=B, seed=cfg.seed, split="train",
                             process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)          # np.int32 [B // process_count, T + 1]

The names are imported when first used: ``import jaxlm.data.tokenizer`` (generation, the
tokenizer CLI) must not pull in Grain through the pipeline, and ``python -m jaxlm.data.tokenizer``
must not find its own module already imported by this package.
"""

import importlib

_WHERE = {
    "make_batch_iterator": "pipeline", "make_dataset": "pipeline",
    "SpecialTokens": "tokenizer", "load_tokenizer": "tokenizer", "load_tokenizer_for": "tokenizer",
    "save_tokenizer": "tokenizer", "special_tokens": "tokenizer", "train_tokenizer": "tokenizer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
