"""Messages to JSON-safe dicts and back: ``{"type": class name, field: value, ...}``, nested
messages the same way, tuples as lists. ``json.dumps(to_wire(m))`` is what goes over a
socket or a Redis stream; ``from_wire(json.loads(...)) == m``."""

from __future__ import annotations

import dataclasses
from typing import Any

from gpupool.messages.types import MESSAGES

_BY_NAME = {cls.__name__: cls for cls in MESSAGES}


def to_wire(msg) -> dict:
    """A message (or a nested one) as a dict of JSON values."""
    if type(msg).__name__ not in _BY_NAME:
        raise TypeError(f"{type(msg).__name__} is not a message")
    out = {"type": type(msg).__name__}
    for f in dataclasses.fields(msg):
        out[f.name] = _value(getattr(msg, f.name))
    return out


def _value(v) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_wire(v)
    if isinstance(v, (tuple, list)):
        return [_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _value(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"{type(v).__name__} cannot cross the engine boundary")


def from_wire(d: dict):
    """The message ``to_wire`` made ``d`` from; ValueError if it is not one."""
    if not isinstance(d, dict) or d.get("type") not in _BY_NAME:
        raise ValueError("not a message: a dict with a known 'type' is expected")
    cls = _BY_NAME[d["type"]]
    plain = {f.name for f in dataclasses.fields(cls) if str(f.type).startswith("dict")}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names - {"type"}
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    # dict fields hold plain JSON (a model may be called "type"); others may nest messages
    return cls(**{k: _back(v, keep_lists=k in plain) for k, v in d.items() if k != "type"})


def _back(v, keep_lists: bool = False):
    if isinstance(v, dict):
        if "type" in v and not keep_lists:
            return from_wire(v)
        return {k: _back(x, keep_lists=True) for k, x in v.items()}
    if isinstance(v, list):
        items = [_back(x, keep_lists) for x in v]
        return items if keep_lists else tuple(items)
    return v
