"""The family contract: what a model family offers, and all that generic code may call.

A *family* is one architecture (``toylm``, ``hybrid``, ``deepseek_v4``...) in its own package
under ``jaxlm/models/``, registered once with :func:`jaxlm.models.register` (or listed in
``jaxlm/models/__init__.py`` for the built-in ones). Train, generate, bench, checkpoint, the
loss and the converter know a family only through the two protocols below and the
:class:`Family` record; a newcomer adding a family reads this file and ``docs/FAMILIES.md``.

**Config** (a hashable dataclass: the model keeps it as static data that ``jit`` hashes):

- ``family``: the registered name, a class attribute. ``vocab_size`` and ``max_seq_len`` (a field
  or a property): the tokenizer and prompt checks read them.
- ``SHAPE_FIELDS``: the fields that fix parameter shapes. A checkpoint whose shape fields differ
  from the run's config is refused; the others (conventions, losses) may change.
- ``validate()``: raise :class:`jaxlm.errors.ConfigError` naming the field on a bad value.
- ``param_count()``, ``flops_per_token(seq_len)`` (training FLOPs, forward + backward), used for
  MFU; ``layer_kinds()``: one short name per layer (``layer_descriptions()``, optional: the same
  with each layer's settings, for ``--dry_run``); ``flops_note()``: a line that states the FLOP
  formula of any layer kind that is not plain attention ("" if none).
- ``loss_terms()``: :class:`HeadLoss`, the extra terms on the logits that the family's recipe
  adds to the cross-entropy (z-loss); ``HeadLoss()`` for none.

**Model** (an ``nnx.Module`` built as ``Model(cfg, rngs=..., dtype=compute_dtype)``):

- ``hidden(ids_BT, positions_BT=None, *, remat="none", scan_layers=False) -> (x_BTD, Aux)``:
  the final-normed hidden states and the model's auxiliary losses and metrics.
- ``logits(x_BTD) -> logits_BTV`` in float32.
- ``output_projection()`` (optional) -> ``(table_VD, cap, dtype)`` when the logits are
  ``softcap(x @ table_VD.T, cap)``: lets the loss fuse the head with the cross-entropy.
- ``init_cache(batch, max_len, dtype=None) -> Cache``; ``prefill(ids_BT, cache, starts_B) ->
  (logits_BV, cache)``; ``decode_step(ids_B, cache) -> (logits_BV, cache)``. The cache holds one
  entry per layer, of whatever form that layer needs (a ring of keys, full keys and values, a
  recurrent state, a latent cache); generic code only reads ``length`` and ``starts_B``.
- ``fast_decoder(batch, cache_dtype)`` (optional) -> a :class:`FastDecoder`, or a string that
  says why none runs here; generation then uses ``decode_step``.

Variables that the optimizer must not touch but a checkpoint must keep (a router bias updated
outside the gradient, a running statistic) are :class:`Buffer` variables: the train state keeps
them beside the parameters, and the model may update them in its forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple, Protocol, runtime_checkable

import jax
from flax import nnx


class Buffer(nnx.Variable):
    """A non-trained model variable that is part of the train state and its checkpoints."""


class Aux(NamedTuple):
    """What a model's ``hidden`` returns beside the hidden states.

    ``losses``: scalars added to the training objective as they are (already weighted), each
    also logged under its name. ``metrics``: scalars or small arrays logged only (per-expert
    load, router entropy).
    """

    losses: dict = {}
    metrics: dict = {}


NO_AUX = Aux()


@dataclasses.dataclass(frozen=True)
class HeadLoss:
    """Terms on the logits beside the cross-entropy: ``z_weight x z`` with ``z`` the PaLM
    ``mean(lse^2)`` (``z_form="mean_sq"``) or ``mean(lse)^2`` (``"sq_mean"``)."""

    z_weight: float = 0.0
    z_form: str = "mean_sq"


class Cache(NamedTuple):
    """A decode cache: one entry per layer (any pytree the layer defines), plus the bookkeeping
    that generic code reads. Every row advances in lockstep on one time axis; prompts are
    left-padded, and a row's first real token is at time ``starts_B[b]``."""

    layers: tuple
    length: jax.Array      # int32 []: time steps written so far, i.e. the next token's time
    starts_B: jax.Array    # int32 [B]


@dataclasses.dataclass(frozen=True)
class FastDecoder:
    """A faster decode step that a family offers where it runs (e.g. one fused GPU kernel).

    ``prepare(model)`` makes the step's own weight layout, once per generation (jit-able);
    ``step(model, weights, ids_B, cache)`` is ``decode_step`` with them; ``greedy_steps(model,
    weights, token_B, cache, steps=N, eos_id=E) -> (tokens_BN, cache)``, if given, runs ``N``
    plain greedy steps at once (a row fed ``E`` is fed ``E`` again). ``min_rows``: rows it is
    fastest with (generation pads a smaller batch up to it).
    """

    name: str
    prepare: Callable[[Any], Any]
    step: Callable[..., Any]
    greedy_steps: Callable[..., Any] | None = None
    min_rows: int = 1


@runtime_checkable
class FamilyConfig(Protocol):
    family: ClassVar[str]
    SHAPE_FIELDS: ClassVar[tuple[str, ...]]
    vocab_size: int
    max_seq_len: int

    def validate(self) -> None: ...
    def param_count(self) -> int: ...
    def flops_per_token(self, seq_len: int) -> float: ...
    def layer_kinds(self) -> list[str]: ...
    def flops_note(self) -> str: ...
    def loss_terms(self) -> HeadLoss: ...


@runtime_checkable
class FamilyModel(Protocol):
    cfg: Any
    dtype: Any

    def hidden(self, ids_BT, positions_BT=None, *, remat: str = "none", scan_layers: bool = False): ...
    def logits(self, x_BTD): ...
    def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache: ...
    def prefill(self, ids_BT, cache: Cache, starts_B=None): ...
    def decode_step(self, ids_B, cache: Cache): ...


def layer_descriptions(cfg) -> list[str]:
    """What ``--dry_run`` prints for each layer: its description where the family gives one."""
    describe = getattr(cfg, "layer_descriptions", None)
    return describe() if describe else cfg.layer_kinds()


@dataclasses.dataclass(frozen=True)
class Family:
    """A registered family: its config and model classes, and the import path of the module in
    ``jaxlm.formats`` (or anywhere) that reads and writes its foreign checkpoints (a *naming*
    module, see ``jaxlm/formats/keymap.py``). A path rather than the module itself keeps the
    imports pointing one way: models never import formats."""

    name: str
    config: type
    model: type
    naming: str | None = None
