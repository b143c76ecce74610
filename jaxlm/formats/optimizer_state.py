"""Optimizer state between PyTorch and optax, through per-parameter "slots".

A PyTorch optimizer's ``state_dict()`` keys its state by parameter *index*
(``{"state": {3: {"momentum_buffer": T}}, "param_groups": [{"params": [0, 1, ...], ...}]}``);
optax keeps one tree per moment deep inside nested transform states. Between the two sits a
neutral form: ``slots = {"momentum": {path: array}, "mu": {...}, "nu": {...}}`` in jaxlm's
parameter layout (Flax kernels, fused matrices split), plus one step count.

Which parameter an index means: the group's ``param_names`` when torch saved them (torch >= 2.5
with named parameters, and every file jaxlm writes); otherwise the parameters in state_dict
order, filtered by the rule that fits the group — all of them, the Muon matrices (>= 2-D
but not the embedding), the rest (embedding and vectors), >= 2-D, 1-D, the embedding alone —
checked against the shapes of the state tensors (and matched by shape when the group lists
them in another order).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from jaxlm.errors import CheckpointError
from jaxlm.optim import path_name

# State tensor names of Muon, SGD, Adam(W), Moonlight-style Muon+AdamW -> slot.
SLOT_NAMES = {
    "momentum_buffer": "momentum", "momentum": "momentum", "momentum_buf": "momentum", "buf": "momentum",
    "exp_avg": "mu", "moment1": "mu", "m": "mu", "mu": "mu", "exp_avg_m": "mu",
    "exp_avg_sq": "nu", "moment2": "nu", "v": "nu", "nu": "nu",
}
STEP_NAMES = ("step", "t", "count")
SLOTS = ("momentum", "mu", "nu")


def is_torch_optimizer(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("state"), dict) and isinstance(obj.get("param_groups"), list)


def is_optimizer_entry(obj) -> bool:
    """One optimizer state_dict, or a list/dict of them (a Muon + an AdamW saved side by side)."""
    if is_torch_optimizer(obj):
        return True
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    values = list(values)
    return bool(values) and all(is_torch_optimizer(v) for v in values)


@dataclasses.dataclass
class ParamInfo:
    name: str          # the state_dict key (as in the file)
    shape: tuple       # PyTorch shape
    role: str


def _fits(param_state, shape) -> bool:
    if not isinstance(param_state, dict):
        return True
    return all(tuple(v.shape) == tuple(shape) for v in param_state.values()
               if isinstance(v, np.ndarray) and v.ndim >= 1)


def _state_shape(param_state):
    for value in (param_state or {}).values():
        if isinstance(value, np.ndarray) and value.ndim >= 1:
            return tuple(value.shape)
    return None


def _candidate_lists(params: list[ParamInfo]) -> dict[str, list[ParamInfo]]:
    is_matrix = lambda p: len(p.shape) >= 2 and p.role != "embed"
    return {
        "all parameters": params,
        "Muon matrices": [p for p in params if is_matrix(p)],
        "embedding and vectors": [p for p in params if not is_matrix(p)],
        ">=2-D parameters": [p for p in params if len(p.shape) >= 2],
        "1-D parameters": [p for p in params if len(p.shape) < 2],
        "embedding": [p for p in params if p.role == "embed"],
    }


def _match_by_shape(ids, state, candidates: list[ParamInfo]):
    """Candidates assigned to ids by state-tensor shape, in order within each shape."""
    queues: dict[tuple, list[ParamInfo]] = {}
    for p in candidates:
        queues.setdefault(tuple(p.shape), []).append(p)
    out = []
    for i in ids:
        shape = _state_shape(state.get(i))
        if shape is None or not queues.get(shape):
            return None
        out.append(queues[shape].pop(0))
    return out


def assign_params(opt: dict, params: list[ParamInfo], strip, source: str) -> dict:
    """{parameter index: ParamInfo} for one PyTorch optimizer state_dict."""
    state, groups = opt["state"], opt["param_groups"]
    by_name = {strip(p.name): p for p in params}
    mapping = {}
    candidates = _candidate_lists(params)
    for g, group in enumerate(groups):
        ids = list(group.get("params", []))
        names = group.get("param_names")
        if isinstance(names, list) and len(names) == len(ids):
            for i, name in zip(ids, names):
                if strip(name) not in by_name:
                    raise CheckpointError(f"{source}: optimizer group {g} names parameter {name!r}, "
                                          "which the model state_dict does not have")
                mapping[i] = by_name[strip(name)]
            continue
        chosen = None
        for rule, cand in candidates.items():
            if len(cand) == len(ids) and all(_fits(state.get(i), p.shape) for i, p in zip(ids, cand)):
                chosen = cand
                break
        if chosen is None:
            for rule, cand in candidates.items():
                if len(cand) == len(ids):
                    chosen = _match_by_shape(ids, state, cand)
                    if chosen:
                        break
        if chosen is None:
            shapes = sorted({_state_shape(state.get(i)) for i in ids} - {None})
            raise CheckpointError(
                f"{source}: optimizer group {g} has {len(ids)} parameters (state shapes {shapes[:4]}); cannot "
                "tell which model parameters they are; convert the weights alone (to-orbax --weights-only)")
        mapping.update(zip(ids, chosen))
    seen = {}
    for i, p in mapping.items():
        if p.name in seen:
            raise CheckpointError(f"{source}: optimizer indices {seen[p.name]} and {i} both resolve to {p.name}; "
                                  "convert the weights alone (to-orbax --weights-only)")
        seen[p.name] = i
    return mapping


def global_step_of(optimizers: list[dict]) -> int | None:
    """The largest per-parameter ``step`` in the optimizers' state (AdamW counts its updates)."""
    steps = []
    for opt in optimizers:
        for param_state in opt["state"].values():
            for key in STEP_NAMES:
                value = param_state.get(key) if isinstance(param_state, dict) else None
                if value is not None and np.ndim(value) == 0:
                    steps.append(float(np.asarray(value, np.float64)))
    return int(max(steps)) if steps else None


# ----------------------------------------------------------------------------- optax


def _slot_and_param(path) -> tuple[str | None, str | None]:
    names = path_name(path).split("/")
    for i, name in enumerate(names):
        if name in SLOTS:
            rest = names[i + 1:]
            if rest and rest[-1] == "value":  # an nnx.Param's value
                rest = rest[:-1]
            return name, "/".join(rest)
        if name == "count" and i == len(names) - 1:
            return "count", None
    return None, None


def fill_optax(opt_state, slots: dict[str, dict[str, np.ndarray]], count: int,
               place: Callable[[np.ndarray, object], object]):
    """``opt_state`` (from ``tx.init``) with its moments taken from ``slots`` and every count set.

    ``place(array, template_leaf)`` casts and puts an array where the template leaf lives.
    Returns ``(opt_state, notes)``; the notes name moments that start at zero or are dropped.
    """
    used, zero = set(), []

    def fill(path, leaf):
        slot, param = _slot_and_param(path)
        if slot == "count":
            return place(np.asarray(count), leaf)
        if slot is None:
            return leaf
        value = slots.get(slot, {}).get(param)
        if value is None:
            zero.append(f"{param} ({slot})")
            return leaf
        if tuple(value.shape) != tuple(leaf.shape):
            raise CheckpointError(f"optimizer {slot} of {param} has shape {tuple(value.shape)}, "
                                  f"the parameter {tuple(leaf.shape)}")
        used.add((slot, param))
        return place(value, leaf)

    filled = jax.tree_util.tree_map_with_path(fill, opt_state)
    notes = []
    if zero:
        notes.append(f"{len(zero)} optimizer moments are not in the checkpoint and start at zero: "
                     + ", ".join(zero[:4]) + (" ..." if len(zero) > 4 else ""))
    unused = [f"{p} ({s})" for s, d in slots.items() for p in d if (s, p) not in used]
    if unused:
        notes.append(f"{len(unused)} optimizer moments have no place in jaxlm's optimizer (another group "
                     "trains those parameters) and are dropped: " + ", ".join(unused[:4])
                     + (" ..." if len(unused) > 4 else ""))
    return filled, notes


def slots_from_optax(opt_state) -> tuple[dict[str, dict[str, np.ndarray]], int | None]:
    """The moments of an optax state (live or as Orbax restored it) as slots, and its largest count."""
    slots: dict[str, dict[str, np.ndarray]] = {}
    counts = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        slot, param = _slot_and_param(path)
        if slot == "count":
            counts.append(int(np.asarray(leaf)))
        elif slot is not None:
            slots.setdefault(slot, {})[param] = np.asarray(leaf)
    return slots, (max(counts) if counts else None)
