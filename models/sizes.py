"""How many parameters a model folder holds, from its safetensors headers alone (no torch, no
reading of the weights): a gateway checks a model against the workers' weight regions."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from gpupool.models.config import INT4_PARTS, OWN_INT4
from gpupool.models.cpu import auto_cpu_dtype
from gpupool.models.errors import ModelLoadError

# a 4-bit checkpoint's tensors (config.INT4_PARTS): packed values count as the weights they
# hold (int32 words: 8, bytes: 2); the groups' scales, zeros and orders are in the 0.75 byte
# an element of a 4-bit model
PACKED = {INT4_PARTS["gptq"][0]: 8, INT4_PARTS[OWN_INT4][0]: 2,
          "_blocks": 2}  # MXFP4 (gpt-oss's experts): two 4-bit codes a byte
GROUP_PARTS = (*sorted({p for parts in INT4_PARTS.values() for p in parts[1:]}), "_scales")


def parameter_count(folder: str | Path) -> int:
    """Elements of every tensor in the folder's ``*.safetensors`` files (a 4-bit
    checkpoint's packed values counted as the weights they hold, its scales not)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no .safetensors files")
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100 << 20:
                    raise ValueError("header too large")
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise ModelLoadError(f"{f}: unreadable safetensors header ({e})") from None
        for name, spec in header.items():
            if name == "__metadata__" or name.endswith(GROUP_PARTS):
                continue
            pack = next((n for s, n in PACKED.items() if name.endswith(s)), 1)
            total += math.prod(spec.get("shape") or [1]) * pack
    return total


def model_element_bytes(dtype: str | None, quantization: str | None) -> float:
    """Bytes per weight element a model's own settings fix (int8: 1, about: norms and an
    untied embedding stay 16/32-bit; 4-bit: half a byte and 8 bytes of scale and offset a
    group: 0.75 at groups of 32, the default and the fallback of larger ones), or 0
    when they leave it to the worker's dtype."""
    if quantization == "int8":
        return 1
    if quantization and quantization.startswith("int4"):
        return 0.75
    if dtype in (None, "auto"):
        return 0
    return 4 if dtype == "float32" else 2


def checkpoint_element_bytes(folder: str | Path) -> float:
    """0.75 for a folder whose ``config.json`` says its weights are 4-bit (GPTQ, AWQ, a
    converted GGUF: most of its bytes; MXFP4, gpt-oss's experts, kept 4-bit: 0.53 a value
    there, its other weights 2 bytes: about 0.66 for gpt-oss-20b), else 0 (the worker's
    dtype decides)."""
    try:
        qc = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return 0
    if not isinstance(qc, dict):
        return 0
    four = qc.get("bits", qc.get("w_bit")) == 4 or qc.get("quant_method") == "mxfp4"
    return 0.75 if four else 0


def element_bytes(dtype: str, device: str) -> int:
    """Bytes per weight element on a worker: its dtype setting ("auto" on CPU: what the CPU
    probe picks; on a GPU the 2-byte dtypes models ship in)."""
    if dtype == "auto" and device.startswith("cpu"):
        dtype = auto_cpu_dtype()
    return 4 if dtype == "float32" else 2
