"""Mixtures: interleave the sources' windows so that each source's share of tokens is its weight.

Grain's ``IterDataset.mix`` picks the source of every next element by a fixed arithmetic
rule over the (integer-scaled) weights, not by sampling: after n windows, each source has
supplied its share of n to within one window, the same way on every run and after a restore.
Windows are mixed after packing, so every window holds one source's tokens and the shares
are shares of tokens, not of documents.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grain

log = logging.getLogger("jaxlm.data")


def mix(windows: Sequence[grain.IterDataset], weights: Sequence[float], names: Sequence[str]) -> grain.IterDataset:
    """One stream of windows from several; a single source passes through unchanged."""
    if len(windows) == 1:
        return windows[0]
    total = float(sum(weights))
    keys = mixture_keys(names)
    log.info("data mixture (share of tokens): %s",
             ", ".join(f"{name} {weight / total:.1%}" for name, weight in zip(names, weights)))
    # Keyed by source, so that a checkpoint restores each source's position by name even
    # if the mixture is reordered or reweighted (a new source starts from its beginning).
    return grain.IterDataset.mix(dict(zip(keys, windows)), dict(zip(keys, map(float, weights))))


def mixture_keys(names: Sequence[str]) -> list[str]:
    """Distinct keys for the sources (the same path twice gets '#2', '#3', ...)."""
    keys, seen = [], {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return keys
