"""Data for jaxlm: tokenizers, sources, the Grain pipeline, mixtures, TFDS preparation.

The train loop needs two calls::

    tok = load_tokenizer_for(cfg.data, vocab_size=model_vocab)
    it = make_batch_iterator(cfg.data, tok, seq_len=T, batch_size=B, seed=cfg.seed, split="train",
                             process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)          # np.int32 [B // process_count, T + 1]
"""

from jaxlm.data.pipeline import make_batch_iterator, make_dataset
from jaxlm.data.tokenizer import (SpecialTokens, load_tokenizer, load_tokenizer_for, save_tokenizer, special_tokens,
                                  train_tokenizer)

__all__ = ["SpecialTokens", "load_tokenizer", "load_tokenizer_for", "make_batch_iterator", "make_dataset",
           "save_tokenizer", "special_tokens", "train_tokenizer"]
