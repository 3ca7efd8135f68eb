"""How an embedding model pools and normalises, as its sentence-transformers files say, and
the vector's last steps (truncation to ``dimensions``, L2 normalisation, base64), in plain
Python: the engine returns the pooled float32 vector.

``modules.json`` lists the modules: a ``Pooling`` one points to a folder whose
``config.json`` names the mode (sentence-transformers 6: ``"pooling_mode": "lasttoken"``;
before it: ``"pooling_mode_lasttoken": true`` and its siblings), a ``Normalize`` one asks for
unit vectors. Module types are matched by their class name (version 6 moved the modules to
new paths). A decoder model without these files pools its last token and normalises (vLLM's
default for decoder-only embedding models). Modes the engine does not pool (cls, max,
weighted mean, several at once) and ``Dense`` projections are refused when the model is
registered. ``is_matryoshka`` / ``matryoshka_dimensions`` in config.json allow ``dimensions``.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_MODES = {"lasttoken": "last", "mean": "mean", "mean_tokens": "mean"}


@dataclass(frozen=True)
class Pooling:
    mode: str  # "last" | "mean" (SamplingParams.pooling)
    normalize: bool
    matryoshka: bool | tuple[int, ...] = False  # True: any size; a tuple: those sizes


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path.name}: {e}") from None


def _mode(cfg: dict) -> str:
    mode = cfg.get("pooling_mode")
    if mode is None:  # the older flags: pooling_mode_<name>: true
        mode = [k.removeprefix("pooling_mode_") for k, v in cfg.items()
                if k.startswith("pooling_mode_") and v is True] or ["mean"]
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1 or modes[0] not in _MODES:
        raise ValueError(f"pooling mode {'+'.join(map(str, modes))} is not supported "
                         "(lasttoken and mean are)")
    return _MODES[modes[0]]


@lru_cache(maxsize=64)
def pooling_of(folder: str) -> Pooling:
    """The model folder's pooling; ValueError naming what is not supported."""
    root = Path(folder)
    modules = _read(root / "modules.json") if root.is_dir() else None
    hf = (_read(root / "config.json") if root.is_dir() else None) or {}
    dims = hf.get("matryoshka_dimensions")
    matryoshka = tuple(dims) if isinstance(dims, list) else bool(hf.get("is_matryoshka"))
    if not modules:
        return Pooling("last", True, matryoshka)
    mode, normalize = "last", False
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            mode = _mode(_read(root / m.get("path", "") / "config.json") or {})
        elif kind == "Normalize":
            normalize = True
        elif kind == "Dense":
            raise ValueError("a Dense projection after the pooling is not supported")
    return Pooling(mode, normalize, matryoshka)


def finish_vector(vec, dimensions: int | None, normalize: bool) -> list[float]:
    """The first ``dimensions`` values, then scaled to unit length if ``normalize``."""
    out = list(vec[:dimensions] if dimensions else vec)
    if normalize:
        norm = math.sqrt(math.fsum(v * v for v in out))
        if norm > 0:
            out = [v / norm for v in out]
    return out


def encode_base64(vec: list[float]) -> str:
    """Little-endian float32 bytes, base64 (what OpenAI's client decodes)."""
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
