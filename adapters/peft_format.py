"""Read and validate a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).

Refused with a clear error, never served wrongly: DoRA, ``modules_to_save``, LoRA on
embeddings or lm_head, LoRA biases, per-module rank/alpha patterns, fan_in_fan_out, pickled
``.bin`` weights, ranks above the configured maximum, shapes that do not fit the base model,
non-finite ``lora_alpha`` or weights, a config that is not a JSON object. Registration checks
all of it from the config and the safetensors header (:func:`inspect_peft_adapter`) but the
weights' values, which are read, and checked, on first use (:func:`load_peft_weights`).
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load

from gpupool.adapters.base import PROJECTIONS, AdapterError, expert_projection
from gpupool.kernels.reference import deinterleave, permute_heads, rotary_order

KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|qkv_proj|gate_up_proj)"
    r"\.lora_([AB])\.weight$"
)
# LoRA on a mixture's experts (peft's target_parameters on the experts' stacked weights):
# one A [E r, in] and B [out, E r] a part, the parts told apart by their shapes (the
# second wrapper's keys nest under the first's base_layer, in the order the config lists)
EXPERT_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.mlp\.experts\.((?:base_layer\.)*)"
    r"lora_([AB])\.weight$"
)
EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")
# a fused projection's LoRA (Phi-3's qkv_proj, gate_up_proj) is its parts' LoRA with one A
# and B split by rows: each part's x @ A is the same numbers, so the terms are exact
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def projection_shapes(cfg) -> dict[str, tuple[int, int]]:
    """Projection -> (in_features, out_features) of the base model (Phi-3's fused ones for a
    fused checkpoint)."""
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    out = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
           "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    if getattr(cfg, "fused_checkpoint", False):
        out.update(qkv_proj=(h, q + 2 * kv), gate_up_proj=(h, 2 * inter))
    experts = getattr(cfg, "num_experts", 0) or 0
    if experts:  # the MLP's LoRA is on the experts (one A and B each), not dense weights
        for p in ("gate_proj", "up_proj", "down_proj"):
            del out[p]
        mi = cfg.moe_intermediate_size
        for e in range(experts):
            out[expert_projection(e, "gate_up")] = (h, 2 * mi)
            out[expert_projection(e, "down")] = (mi, h)
    return out


def _expert_part(cfg, a_shape: tuple, b_shape: tuple, rank: int) -> str | None:
    """Which expert weights (gate_up or down) a pair of expert LoRA tensors adapts, from
    their shapes (A [E r, in], B [out, E r]); None if they fit neither."""
    experts = getattr(cfg, "num_experts", 0) or 0
    if not experts:
        return None
    h, mi, er = cfg.hidden_size, cfg.moe_intermediate_size, experts * rank
    for part, (fan_in, fan_out) in (("gate_up", (h, 2 * mi)), ("down", (mi, h))):
        if a_shape == (er, fan_in) and b_shape == (fan_out, er):
            return part
    return None


def _expert_pairs(tensors: dict) -> dict[tuple[int, str], dict[str, object]]:
    """{(layer, nesting): {"A": value, "B": value}} of a file's expert LoRA keys."""
    pairs: dict[tuple[int, str], dict[str, object]] = {}
    for key, value in tensors.items():
        m = EXPERT_KEY.match(key)
        if m is not None:
            pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = value
    return pairs


def _split_fused(parts: dict, cfg) -> dict:
    """{(layer, projection): (A, B)} with fused projections split into their parts, and q's
    and k's B rows in the stored head order (``models.rope.rotary_order``)."""
    shapes = projection_shapes(cfg)
    out = {}
    for (layer, proj), (a, b) in parts.items():
        if proj in FUSED:
            row = 0
            for part in FUSED[proj]:
                n = shapes[part][1]
                out[(layer, part)] = (a, b[row: row + n])
                row += n
        else:
            out[(layer, proj)] = (a, b)
    order = (rotary_order(cfg.head_dim, cfg.rotary_dim) if hasattr(cfg, "rotary_dim")
             else None)
    for key in [k for k in out if k[1] in ("q_proj", "k_proj")]:
        a, b = out[key]
        out[key] = (a, permute_heads(b, order, cfg.head_dim))
    return out


def _config(folder: Path, max_rank: int) -> tuple[int, float]:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"{path}: no adapter_config.json in adapter folder")
    try:
        c = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise AdapterError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(c, dict):
        raise AdapterError(f"{path}: must hold a JSON object, not {type(c).__name__}")
    targets = c.get("target_modules")
    unknown = ([t for t in targets if not isinstance(t, str)
                or t.rsplit(".", 1)[-1] not in (*PROJECTIONS, *FUSED)]
               if isinstance(targets, list) else [])
    params = c.get("target_parameters") or []
    unknown += ([t for t in params if not isinstance(t, str)
                 or not t.endswith(EXPERT_PARAMETERS)]
                if isinstance(params, list) else [params])
    checks = [
        (c.get("peft_type", "LORA") != "LORA", f"peft_type {c.get('peft_type')!r} is not LORA"),
        (bool(c.get("use_dora")), "DoRA adapters (use_dora) are not supported"),
        (bool(c.get("modules_to_save")), "modules_to_save is not supported"),
        (c.get("bias", "none") != "none", "LoRA biases (bias != 'none') are not supported"),
        (bool(c.get("rank_pattern")) or bool(c.get("alpha_pattern")),
         "per-module rank_pattern/alpha_pattern is not supported"),
        (bool(c.get("fan_in_fan_out")), "fan_in_fan_out adapters are not supported"),
        (bool(unknown), f"targets {unknown!r} are not supported (only "
                        f"{', '.join((*PROJECTIONS, *FUSED))}, and a mixture's "
                        f"{' and '.join(EXPERT_PARAMETERS)} as target_parameters)"),
    ]
    for bad, msg in checks:
        if bad:
            raise AdapterError(f"{path}: {msg}")
    rank, alpha = c.get("r"), c.get("lora_alpha", c.get("r"))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{path}: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise AdapterError(f"{path}: rank {rank} exceeds max_lora_rank {max_rank}")
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
            or not math.isfinite(alpha)):
        raise AdapterError(f"{path}: lora_alpha must be a finite number, got {alpha!r}")
    scaling = alpha / math.sqrt(rank) if c.get("use_rslora") else alpha / rank
    return rank, float(scaling)


@dataclass(frozen=True)
class AdapterFile:
    """What registration learns of an adapter without reading its weights: the safetensors
    header's keys and shapes, checked against the base model."""

    path: Path  # adapter_model.safetensors
    rank: int
    scaling: float
    # the layers each projection has LoRA on, as a bit mask (kept small: thousands of
    # adapters are registered, each costs a few hundred bytes until used)
    layers: tuple[tuple[str, int], ...]  # (projection, layer bit mask)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(proj for proj, _ in self.layers)


def inspect_peft_adapter(folder: str | Path, base_cfg, max_rank: int) -> AdapterFile:
    """Validate a PEFT LoRA folder from its config and its safetensors header only (keys,
    shapes, dtypes; no weight is read): every refusal of the module's docstring but the
    weights' finiteness, which :func:`load_peft_weights` checks when they are read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: adapter folder does not exist")
    rank, scaling = _config(folder, max_rank)
    wfile = folder / "adapter_model.safetensors"
    if not wfile.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise AdapterError(f"{folder}: adapter_model.bin is a pickle; gpupool reads only "
                               "adapter_model.safetensors")
        raise AdapterError(f"{wfile}: adapter weights missing")
    try:
        with safe_open(str(wfile), framework="pt") as f:
            header = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{wfile}: corrupt or unreadable safetensors ({e})") from e
    return AdapterFile(wfile, rank, scaling, layer_masks(wfile, header, base_cfg, rank))


def layer_masks(wfile: Path, shapes_of: dict[str, tuple], base_cfg, rank: int):
    """The (projection, layer bit mask) pairs of a file's tensors (key -> shape), each key
    and shape checked against the base model; AdapterError naming the first bad one."""
    shapes = projection_shapes(base_cfg)
    parts: dict[tuple[int, str], set[str]] = {}
    moe_layers = getattr(base_cfg, "moe_layers", None) or ()
    for (layer, _), ab in sorted(_expert_pairs(shapes_of).items()):
        if layer >= base_cfg.num_layers or not (layer < len(moe_layers) and moe_layers[layer]):
            raise AdapterError(f"{wfile}: expert LoRA on layer {layer}, which is not a "
                               "mixture-of-experts layer of the base model")
        part = (_expert_part(base_cfg, ab["A"], ab["B"], rank)
                if set(ab) == {"A", "B"} else None)
        if part is None:
            raise AdapterError(f"{wfile}: layer {layer}'s expert LoRA (shapes "
                               f"{sorted(ab.items())}) fits neither the experts' gate_up nor "
                               "their down weights of the base model at this rank")
        if (layer, expert_projection(0, part)) in parts:
            raise AdapterError(f"{wfile}: layer {layer} has two expert LoRA pairs on the "
                               f"experts' {part} weights")
        for e in range(base_cfg.num_experts):
            parts[(layer, expert_projection(e, part))] = {"A", "B"}
    for key, shape in sorted(shapes_of.items()):
        if EXPERT_KEY.match(key):
            continue
        m = KEY.match(key)
        if m is None:
            raise AdapterError(f"{wfile}: unsupported tensor {key!r} (only LoRA A/B on "
                               f"{', '.join(PROJECTIONS)} are supported)")
        layer, proj, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= base_cfg.num_layers:
            raise AdapterError(f"{wfile}: {key!r} names layer {layer}; the base has "
                               f"{base_cfg.num_layers}")
        if proj not in shapes:
            raise AdapterError(f"{wfile}: {key!r} targets {proj}, which adapters of this base "
                               "model cannot (fused projections of an unfused checkpoint, or "
                               "the MLP of a mixture of experts)")
        fan_in, fan_out = shapes[proj]
        want = (rank, fan_in) if ab == "A" else (fan_out, rank)
        if shape != want:
            raise AdapterError(f"{wfile}: {key!r} has shape {shape}, the base model "
                               f"needs {want}")
        parts.setdefault((layer, proj), set()).add(ab)
    if not parts:
        raise AdapterError(f"{wfile}: no LoRA weights found")
    masks: dict[str, int] = {}
    for (layer, proj), abs_ in parts.items():
        if abs_ != {"A", "B"}:
            raise AdapterError(f"{wfile}: layer {layer} {proj} lacks lora_A or lora_B")
        for part in FUSED.get(proj, (proj,)):
            if masks.get(part, 0) & 1 << layer:
                raise AdapterError(f"{wfile}: layer {layer} has LoRA on {part} twice (alone "
                                   "and in a fused projection, or two expert tensors)")
            masks[part] = masks.get(part, 0) | 1 << layer
    return tuple(sorted(masks.items()))


def load_peft_weights(spec: AdapterFile, base_cfg):
    """The weights of an inspected adapter: {(layer, projection): (A [r, in] float32,
    B*scaling [out, r] float32)}; AdapterError if the file cannot be read, no longer holds
    what was inspected (its keys and shapes checked again, as at registration), or holds NaN
    or infinite values."""
    try:
        tensors = read_tensors(spec.path)
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{spec.path}: corrupt or unreadable safetensors ({e})") from e
    masks = layer_masks(spec.path, {k: tuple(t.shape) for k, t in tensors.items()},
                         base_cfg, spec.rank)
    if masks != spec.layers:
        raise AdapterError(f"{spec.path}: its tensors differ from the file registered "
                           "(changed on disk since)")
    tensors = {key: t.float() for key, t in tensors.items()}
    # one check over every value (a check a tensor cost more than the file's read); the
    # first tensor that fails it named
    if tensors and not bool(torch.isfinite(torch.cat([t.reshape(-1)
                                                      for t in tensors.values()])).all()):
        key = next(k for k, t in tensors.items() if not bool(torch.isfinite(t).all()))
        raise AdapterError(f"{spec.path}: {key!r} holds NaN or infinite values")
    return adapter_weights(tensors, spec.scaling, base_cfg)


def adapter_weights(tensors: dict[str, torch.Tensor], scaling: float, base_cfg) -> dict:
    """{(layer, projection): (A, B*scaling)} from a file's tensors (keys checked): fused
    projections split, q's and k's B rows in the stored head order. Moves values only, but
    for the one product (``adapters.paged.PackPlan`` runs it on element indices)."""
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = KEY.match(key)
        if m is not None:
            parts.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    out = _split_fused({k: (ab["A"], ab["B"] * scaling) for k, ab in parts.items()}, base_cfg)
    # each expert's A and B out of the stacked ones (peft's ParamWrapper: A viewed as
    # [E, r, in], B as [out, r, E])
    for (layer, _), ab in _expert_pairs(tensors).items():
        experts = base_cfg.num_experts
        rank = ab["A"].shape[0] // experts
        part = _expert_part(base_cfg, tuple(ab["A"].shape), tuple(ab["B"].shape), rank)
        a = ab["A"].reshape(experts, rank, -1)
        b = ab["B"].reshape(ab["B"].shape[0], rank, experts)
        if part == "gate_up" and getattr(base_cfg, "interleaved_gate_up", False):
            b = deinterleave(b)  # gpt-oss: its gate outputs first, as loaded
        for e in range(experts):
            out[(layer, expert_projection(e, part))] = (a[e], b[:, :, e] * scaling)
    return out


class PeftLoader:
    """An inspected adapter's loader: calling it gives :func:`load_peft_weights`; ``spec``
    lets the adapter pages pack the file's values straight from its bytes (:func:`read_raw`)."""

    def __init__(self, spec: AdapterFile, base_cfg):
        self.spec, self.base_cfg = spec, base_cfg

    def __call__(self):
        return load_peft_weights(self.spec, self.base_cfg)


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


@dataclass(frozen=True)
class RawFile:
    """A safetensors file's values as one 1-D tensor (the data region in the file's one
    dtype), and where each tensor starts in it."""

    values: torch.Tensor
    signature: tuple  # ((key, dtype, shape, first element), ...) sorted: the file's layout
    shapes: dict[str, tuple[int, ...]]
    starts: dict[str, int]


def read_raw(path: Path) -> RawFile | None:
    """The file read in one call and viewed without a copy, or None where it is not plain
    (several dtypes, other dtypes, unaligned or out-of-bounds offsets, an unreadable
    header): :func:`load_peft_weights` reads those (and gives their errors)."""
    try:
        with open(path, "rb", buffering=0) as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            if hasattr(os, "posix_fadvise"):  # the whole file asked for at once (cold, the
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)  # readahead's
            if f.readinto(data) != len(data):  # window would split it into round trips)
                return None
        n = int.from_bytes(data[:8], "little")
        layout = _layout(bytes(data[8 : 8 + n]), len(data))
        if layout is None:
            return None
        dtype, size, signature, shapes, starts = layout
        values = torch.frombuffer(data, dtype=dtype, offset=8 + n, count=size)
    except (OSError, ValueError):
        return None
    return RawFile(values, signature, shapes, starts)


# the layouts of the last headers read (adapters made by one recipe share their header
# byte for byte): parsing one costs ~0.7 ms of a cold adapter's first token
_LAYOUTS: OrderedDict[tuple[bytes, int], tuple | None] = OrderedDict()
_LAYOUTS_KEPT = 16
_LAYOUTS_LOCK = threading.Lock()


def _layout(header: bytes, file_bytes: int) -> tuple | None:
    """(dtype, number of values, signature, shapes, starts) of a safetensors file of
    ``file_bytes`` whose header is ``header``, or None where it is not plain
    (:func:`read_raw`): parsed once per header and size, the last _LAYOUTS_KEPT kept."""
    key = (header, file_bytes)
    with _LAYOUTS_LOCK:
        if key in _LAYOUTS:
            _LAYOUTS.move_to_end(key)
            return _LAYOUTS[key]
    layout = _parse_layout(header, file_bytes)
    with _LAYOUTS_LOCK:
        _LAYOUTS[key] = layout
        while len(_LAYOUTS) > _LAYOUTS_KEPT:
            _LAYOUTS.popitem(last=False)
    return layout


def _parse_layout(header: bytes, file_bytes: int) -> tuple | None:
    try:
        meta = json.loads(header)
        meta.pop("__metadata__", None)
        kinds = {v["dtype"] for v in meta.values()}
        if len(kinds) != 1 or next(iter(kinds)) not in _DTYPES:
            return None
        dtype = _DTYPES[kinds.pop()]
        elem = torch.empty((), dtype=dtype).element_size()
        data_bytes = file_bytes - 8 - len(header)
        shapes, starts, spans = {}, {}, []
        for key, v in meta.items():
            if not all(type(o) is int for o in (*v["data_offsets"], *v["shape"])):
                return None  # safetensors' own reader refuses these: let it say so
            begin, end = v["data_offsets"]
            shape = tuple(v["shape"])
            if begin % elem or end - begin != math.prod(shape) * elem:
                return None
            shapes[key], starts[key] = shape, begin // elem
            spans.append((begin, end))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    spans.sort()
    # the tensors tile the data region, no gap nor overlap (as safetensors checks)
    if (not spans or spans[0][0] != 0 or spans[-1][1] != data_bytes
            or any(a[1] != b[0] for a, b in zip(spans, spans[1:]))):
        return None
    signature = tuple(sorted((k, str(dtype), shapes[k], starts[k]) for k in shapes))
    return dtype, data_bytes // elem, signature, shapes, starts


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, the file read in one call (from a cold disk, one read
    instead of a page fault or two for each of its hundreds of small tensors)."""
    with open(path, "rb") as f:
        return load(f.read())
