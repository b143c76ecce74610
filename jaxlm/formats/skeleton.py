"""The non-tensor structure of a foreign checkpoint as JSON, so it can be written back as it was.

A converted checkpoint keeps its tensors in Orbax and everything around them — which keys
the top-level dict had and in what order, tuples vs lists, an optimizer's param groups,
integer-keyed dicts, a pickled config — in a JSON "skeleton". Plain dicts with string keys,
lists, strings, numbers, booleans and None are JSON as they are; everything else is a
one-key object whose key starts with ``~``:

``~tuple`` ``~odict`` ``~dict`` (non-string keys) ``~set`` ``~frozenset`` ``~bytes`` ``~complex``
``~config`` (a pickled config object, as its class and fields)

and the caller's own markers (``~tensor``, ``~model``, ...) for what it pulls out, given by
the ``hook`` of :func:`encode` and resolved by the ``resolve`` of :func:`decode`.
"""

from __future__ import annotations

import base64
import collections
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxlm.formats.torch_pt import PickledConfig

NOT_HANDLED = object()


def _is_tag(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)).startswith("~")


def encode(obj, hook: Callable[[Any, str], Any], path: str = "") -> Any:
    """JSON for ``obj``; ``hook(obj, path)`` may return a replacement (or NOT_HANDLED) for any node."""
    replaced = hook(obj, path)
    if replaced is not NOT_HANDLED:
        return replaced
    sub = lambda value, key: encode(value, hook, f"{path}/{key}" if path else str(key))
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return sub(obj.item(), "")
    if isinstance(obj, PickledConfig):
        return {"~config": {"class": obj.origin, "fields": {k: sub(v, k) for k, v in obj.fields.items()},
                            "args": [sub(v, i) for i, v in enumerate(obj.args)]}}
    if isinstance(obj, collections.OrderedDict):
        return {"~odict": [[sub(k, "key"), sub(v, k)] for k, v in obj.items()]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("~") for k in obj):
            return {k: sub(v, k) for k, v in obj.items()}
        return {"~dict": [[sub(k, "key"), sub(v, k)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"~tuple": [sub(v, i) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [sub(v, i) for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return {f"~{type(obj).__name__}": [sub(v, i) for i, v in enumerate(sorted(obj, key=repr))]}
    if isinstance(obj, bytes):
        return {"~bytes": base64.b64encode(obj).decode()}
    if isinstance(obj, complex):
        return {"~complex": [obj.real, obj.imag]}
    raise TypeError(f"{path or 'checkpoint'}: cannot describe a {type(obj).__name__} in JSON")


def decode(value, resolve: Callable[[str, Any], Any]) -> Any:
    """The object :func:`encode` described; ``resolve(tag, payload)`` rebuilds the caller's markers.

    A pickled config comes back as a plain dict of its fields (what the card's loader accepts).
    """
    sub = lambda v: decode(v, resolve)
    if isinstance(value, list):
        return [sub(v) for v in value]
    if not isinstance(value, dict):
        return value
    if not _is_tag(value):
        return {k: sub(v) for k, v in value.items()}
    (tag, payload), = value.items()
    if tag == "~tuple":
        return tuple(sub(v) for v in payload)
    if tag == "~odict":
        return collections.OrderedDict((sub(k), sub(v)) for k, v in payload)
    if tag == "~dict":
        return {sub(k): sub(v) for k, v in payload}
    if tag == "~set":
        return {sub(v) for v in payload}
    if tag == "~frozenset":
        return frozenset(sub(v) for v in payload)
    if tag == "~bytes":
        return base64.b64decode(payload)
    if tag == "~complex":
        return complex(*payload)
    if tag == "~config":
        return {k: sub(v) for k, v in payload["fields"].items()}
    return resolve(tag, payload)
