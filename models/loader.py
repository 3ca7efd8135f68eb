"""Read a Hugging Face folder's safetensors into one flat buffer per model.

Our tensor names differ from the checkpoint's: q/k/v are stacked into ``qkv_weight`` and
gate/up into ``gate_up_weight`` so each is one matmul. :func:`weight_sources` says which
checkpoint tensors make each of ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gpupool.kernels import quant4
from gpupool.kernels.reference import deinterleave, permute_heads
from gpupool.models.config import GPT_OSS, MOE, ModelConfig
from gpupool.models.errors import ModelLoadError
from gpupool.models.quantized import Int4, group_of, layer_parts, mxfp4, read_int4
from gpupool.models.rope import rotary_order
from gpupool.pool.weights import (
    GCODE_SUFFIX,
    GOFFSET_SUFFIX,
    GSCALE_SUFFIX,
    PERM_SUFFIX,
    SCALE_SUFFIX,
    WeightLayout,
)
from gpupool.progress import Progress

PROGRESS_MIN_BYTES = 64 << 20  # a smaller model loads too fast for a progress line


def _expert_sources(cfg: ModelConfig, i: int) -> dict:
    """A mixture-of-experts layer's router and experts (each expert's gate and up stacked as
    a dense layer's are)."""
    h, mi = cfg.hidden_size, cfg.moe_intermediate_size
    m = f"model.layers.{i}." + MOE[cfg.architecture]
    if cfg.architecture == GPT_OSS:  # every expert in one tensor a part: see _read_stacked
        out = {f"layers.{i}.router_weight": ((cfg.num_experts, h), [m + "router.weight"]),
               f"layers.{i}.router_bias": ((cfg.num_experts,), [m + "router.bias"])}
        for e in range(cfg.num_experts):
            for part, shape in (("gate_up", (2 * mi, h)), ("down", (h, mi))):
                x = f"{m}experts.{part}_proj"
                out[f"layers.{i}.experts.{e}.{part}_weight"] = (shape, [f"{x}[{e}]"])
                out[f"layers.{i}.experts.{e}.{part}_bias"] = (shape[:1], [f"{x}_bias[{e}]"])
        return out
    mixtral = cfg.architecture == "MixtralForCausalLM"
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    out = {f"layers.{i}.router_weight": ((cfg.num_experts, h), [m + "gate.weight"])}
    for e in range(cfg.num_experts):
        x = f"{m}experts.{e}."
        out[f"layers.{i}.experts.{e}.gate_up_weight"] = (
            (2 * mi, h), [x + gate + ".weight", x + up + ".weight"])
        out[f"layers.{i}.experts.{e}.down_weight"] = ((h, mi), [x + down + ".weight"])
    return out


def weight_sources(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], list[str]]]:
    """Our name -> (shape, checkpoint names concatenated along dim 0), in layout order."""
    h, q, kv, inter, hd = (
        cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size, cfg.head_dim
    )
    out: dict[str, tuple[tuple[int, ...], list[str]]] = {
        "embed_tokens": ((cfg.vocab_size, h), ["model.embed_tokens.weight"]),
    }
    for i in range(cfg.num_layers):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out[f"layers.{i}.input_norm"] = ((h,), [p + "input_layernorm.weight"])
        out[f"layers.{i}.qkv_weight"] = (
            (q + 2 * kv, h), [a + "qkv_proj.weight"] if cfg.fused_checkpoint
            else [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"]
        )
        if cfg.qkv_bias:
            out[f"layers.{i}.qkv_bias"] = (
                (q + 2 * kv,), [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"]
            )
        if cfg.qk_norm:
            whole = cfg.qk_norm_whole  # OLMoE: over all of q and k
            out[f"layers.{i}.q_norm"] = ((q if whole else hd,), [a + "q_norm.weight"])
            out[f"layers.{i}.k_norm"] = ((kv if whole else hd,), [a + "k_norm.weight"])
        out[f"layers.{i}.o_weight"] = ((h, q), [a + "o_proj.weight"])
        if cfg.o_bias:
            out[f"layers.{i}.o_bias"] = ((h,), [a + "o_proj.bias"])
        if cfg.attn_sinks:
            out[f"layers.{i}.sinks"] = ((cfg.num_heads,), [a + "sinks"])
        out[f"layers.{i}.post_norm"] = ((h,), [p + "post_attention_layernorm.weight"])
        if cfg.sandwich_norms:  # Gemma 2: post_norm on the attention's output, then these
            out[f"layers.{i}.pre_ff_norm"] = ((h,), [p + "pre_feedforward_layernorm.weight"])
            out[f"layers.{i}.post_ff_norm"] = ((h,), [p + "post_feedforward_layernorm.weight"])
        if cfg.moe_layers and cfg.moe_layers[i]:
            out.update(_expert_sources(cfg, i))
            continue
        out[f"layers.{i}.gate_up_weight"] = (
            (2 * inter, h), [m + "gate_up_proj.weight"] if cfg.fused_checkpoint
            else [m + "gate_proj.weight", m + "up_proj.weight"]
        )
        out[f"layers.{i}.down_weight"] = ((h, inter), [m + "down_proj.weight"])
    out["norm"] = ((h,), ["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        out["lm_head"] = ((cfg.vocab_size, h), ["lm_head.weight"])
    return out


# int8: per-row scales; int4: 4-bit groups of 32 columns (as llama.cpp's 4-bit blocks: with
# min/max scales, groups of 128 cost SmolLM2 20% more perplexity), int4-gN: of N (128 where it
# divides a weight's columns, else 32) (kernels/quant4.py)
QUANTIZATIONS = ("int8", "int4", "int4-g32", "int4-g64", "int4-g128")


def int4_group(quantization: str | None) -> int | None:
    """The group size a 4-bit quantization asks for, None for any other."""
    if quantization == "int4":
        return 32
    if quantization and quantization.startswith("int4-g"):
        return int(quantization[len("int4-g"):])
    return None


def check_quantization(quantization: str | None) -> str | None:
    """The quantization, None for none ("none" or None); ValueError if unknown."""
    if quantization in (None, "none"):
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or none, "
                         f"not {quantization!r}")
    return quantization


def quantized_names(cfg: ModelConfig, quantization: str | None) -> frozenset[str]:
    """The weights stored int8 under ``quantization``: every linear layer's (a mixture's
    experts' too; its router stays as it is) and the lm_head (which is ``embed_tokens`` when
    the two are tied; the embedding then reads int8 rows)."""
    if check_quantization(quantization) is None:
        return frozenset()
    linear = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")
    names = {n for n in weight_sources(cfg)
             if n.startswith("layers.") and n.rsplit(".", 1)[-1] in linear}
    names.add("embed_tokens" if cfg.tie_word_embeddings else "lm_head")
    return frozenset(names)


def build_layout(cfg: ModelConfig, dtype: torch.dtype, quantization: str | None = None,
                 stored_4bit: dict[str, int] | None = None,
                 perm: frozenset[str] = frozenset(),
                 codes: frozenset[str] = frozenset()) -> WeightLayout:
    """``stored_4bit``: our weights a 4-bit checkpoint holds 4-bit, with their groups (kept
    4-bit unless ``quantization`` is int8; ``perm``: those stored in another column order;
    ``codes``: those with a codebook, MXFP4's)."""
    sources = weight_sources(cfg)
    # Gemma's norms scale by 1 + weight in float32 (transformers): kept in float32
    fp32 = {k for k in sources if cfg.norm_offset and k.rsplit(".", 1)[-1].endswith("norm")}
    names = quantized_names(cfg, quantization)
    group = int4_group(quantization)
    int4 = {}
    if group is not None:
        # the linear layers 4-bit (a weight whose columns are not a multiple of 32 stays
        # unquantized); the lm_head (the embedding when tied) int8, as llama.cpp keeps its
        # output at 6 to 8 bits: 4-bit there cost SmolLM2 a further 8% of perplexity
        head = "embed_tokens" if cfg.tie_word_embeddings else "lm_head"
        int4 = {n: g for n in names - {head}
                if (g := quant4.choose_group(sources[n][0][1], group)) is not None}
        names = frozenset({head})
    if stored_4bit and quantization != "int8":
        int4.update(stored_4bit)
    kept = quantization != "int8"
    return WeightLayout.build({k: v[0] for k, v in sources.items()}, dtype, names, fp32, int4,
                              perm if kept else frozenset(), codes if kept else frozenset())


def quantize_rows(w: torch.Tensor, scale_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``w[n] ~ q[n] * s[n]`` with ``s[n] = max|w[n]| / 127`` rounded
    to ``scale_dtype`` first (so the stored scale is the one the values were divided by)."""
    wf = w.float()
    s = (wf.abs().amax(dim=-1) / 127).to(scale_dtype)
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: any scale; 1
    q = torch.round(wf / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


# a multimodal checkpoint's text model (Gemma 3 at 4B and above): its tensors' prefixes
TEXT_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                 "language_model.lm_head.": "lm_head."}


def _aliased(where: dict[str, Path]) -> tuple[dict[str, Path], dict[str, str]]:
    """(tensor name -> file, with a text model's tensors under the names a text-only
    checkpoint gives them; our name -> the name in the file, where they differ)."""
    if "model.embed_tokens.weight" in where:
        return where, {}
    alias = {}
    for name in where:
        for prefix, ours in TEXT_PREFIXES.items():
            if name.startswith(prefix):
                alias[ours + name[len(prefix):]] = name
    return {**where, **{ours: where[name] for ours, name in alias.items()}}, alias


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = dict(json.loads(index.read_text())["weight_map"])
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise ModelLoadError(f"{index}: unreadable shard index ({e!r})") from None
        bad = [f for f in weight_map.values()
               if not isinstance(f, str) or Path(f).name != f or f in (".", "..")]
        if bad:  # a shard is a file beside the index, never a path out of the folder
            raise ModelLoadError(f"{index}: shard names must be plain file names, got "
                                 f"{bad[0]!r}")
        return {name: folder / fname for name, fname in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
            raise ModelLoadError(f"{folder}: only pickle weights found; gpupool reads safetensors")
        raise ModelLoadError(f"{folder}: no *.safetensors weight file")
    where = {}
    for f in files:
        for name in _open(f).keys():
            where[name] = f
    return where


def _open(path: Path):
    if not path.is_file():
        raise ModelLoadError(f"{path}: weight file is missing")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: corrupt or unreadable safetensors file ({e})") from e


def _rotary_rows(cfg: ModelConfig, src: str, t):
    """q's and k's rows (weights, biases) in the stored head dimension order
    (``rope.rotary_order``: partial rotary models)."""
    order = rotary_order(cfg)
    if order is None:
        return t
    if isinstance(t, Int4):
        return t.map_rows(lambda rows: _rotary_rows(cfg, src, rows))
    kind = src.rsplit(".", 2)[-2]
    if kind in ("q_proj", "k_proj"):
        return permute_heads(t, order, cfg.head_dim)
    if kind == "qkv_proj":
        qk = cfg.q_size + cfg.kv_size
        return torch.cat((permute_heads(t[:qk], order, cfg.head_dim), t[qk:]))
    return t


def _store_int4(t: Int4, dest: torch.Tensor, views: dict, name: str, row: int, path: Path,
                src: str) -> None:
    """A 4-bit checkpoint tensor into a 4-bit weight's rows (its column order, where it has
    one, shared by every part of the weight)."""
    if not (bool(torch.isfinite(quant4.scale_values(t.scale)).all())
            and bool(torch.isfinite(t.offset).all())):
        raise ModelLoadError(f"{path}: tensor {src!r} holds NaN or infinite scales")
    order = views.get(name + PERM_SUFFIX)
    perm = t.perm if t.perm is not None else torch.arange(t.shape[1])
    if order is None and t.perm is not None:
        raise ModelLoadError(f"{path}: {src!r} reorders its columns (act-order) where the "
                             "checkpoint's config does not say desc_act")
    if order is not None:
        if row == 0:
            order.copy_(perm)
        elif not torch.equal(order, perm):
            raise ModelLoadError(f"{path}: {src!r} orders its input columns otherwise than "
                                 f"the projections fused with it into {name}")
    n = t.shape[0]
    dest.copy_(t.q)
    views[name + GSCALE_SUFFIX][row : row + n].copy_(t.scale)
    if name + GOFFSET_SUFFIX in views:
        views[name + GOFFSET_SUFFIX][row : row + n].copy_(t.offset)
    elif bool(t.offset.any()):  # a codebook weight stores no offsets: they must be zero
        raise ModelLoadError(f"{path}: {src!r} has offsets where its format has none")
    if t.code is not None:
        views[name + GCODE_SUFFIX].copy_(t.code)


def _store(t, dest: torch.Tensor, views: dict, name: str, row: int,
           dtype: torch.dtype, path: Path, src: str) -> None:
    """Checkpoint tensor ``t`` into its rows of ``name`` from ``row`` on: as it is, or
    quantized where the layout stores ``name`` int8 or 4-bit (refused if not finite). A
    4-bit checkpoint tensor (:class:`Int4`) is copied as it is into a 4-bit weight of its
    group, else widened to its float32 values first."""
    scales = views.get(name + SCALE_SUFFIX)
    gscales = views.get(name + GSCALE_SUFFIX)
    if isinstance(t, Int4):
        if (gscales is not None and quant4.group_size(dest, gscales) == t.group
                and (t.code is None) == (name + GCODE_SUFFIX not in views)):
            return _store_int4(t, dest, views, name, row, path, src)
        t = t.dequantize()
    if scales is None and gscales is None:
        dest.copy_(t)
    if not bool(torch.isfinite(dest if scales is None and gscales is None else t).all()):
        raise ModelLoadError(f"{path}: tensor {src!r} holds NaN or infinite values")
    n = t.shape[0]
    if scales is not None:
        q, s = quantize_rows(t, dtype)
        dest.copy_(q)
        scales[row : row + n].copy_(s)
    elif gscales is not None:
        q, s, o = quant4.quantize(t, quant4.group_size(dest, gscales))
        dest.copy_(q)
        gscales[row : row + n].copy_(s)
        views[name + GOFFSET_SUFFIX][row : row + n].copy_(o)


def _stored_4bit(cfg: ModelConfig, where: dict
                 ) -> tuple[dict[str, int], frozenset[str], frozenset[str]]:
    """(our weights every source of which the checkpoint holds 4-bit -> their group; those
    whose columns it may reorder: act-order GPTQ; those MXFP4 holds: a codebook's)."""
    sources = weight_sources(cfg)
    mx = frozenset(name for name, (shape, srcs) in sources.items()
                   if len(shape) == 2 and srcs and all(
                       s.endswith("]") and stacked_base(s) + "_blocks" in where for s in srcs))
    if not cfg.quant:
        return dict.fromkeys(mx, quant4.BLOCK), frozenset(), mx
    out = {}
    for name, (shape, srcs) in sources.items():
        parts = [layer_parts(s, cfg.quant) for s in srcs]
        if len(shape) == 2 and all(p is not None and p[0] in where for p in parts):
            out[name] = group_of(shape[1], cfg.quant)
    return out, frozenset(out) if cfg.quant.get("desc_act") else frozenset(), frozenset()


def stacked_base(src: str) -> str:
    """The checkpoint tensor a ``name[e]`` source (one expert of gpt-oss's stacked experts)
    reads from; any other source is itself."""
    return src[: src.index("[")] if src.endswith("]") else src


def _read_stacked(get, where: dict, src: str, interleaved: bool) -> torch.Tensor:
    """Expert ``e`` of gpt-oss's stacked tensor ``name[e]`` in our layout: its gate_up
    ([E, hidden, 2 inter]; ``interleaved``, ModelConfig.interleaved_gate_up as the adapter
    reader asks it: gate and up interleaved, gate columns 0, 2, ..) as [gate | up] rows, its
    down ([E, inter, hidden]) transposed, biases de-interleaved likewise; from
    MXFP4 blocks and scales (stored [E, rows, ...]: rows are outputs) where the checkpoint
    holds those (kept 4-bit: :func:`quantized.mxfp4`)."""
    name = stacked_base(src)
    e = int(src[len(name) + 1: -1])
    if name in where:
        t = get(name, e)
        t = t if t.dim() == 1 else t.t()
    elif name + "_blocks" in where and name + "_scales" in where:
        t = mxfp4(get(name + "_blocks", e), get(name + "_scales", e))
    else:
        raise ModelLoadError(f"checkpoint has no tensor {name!r} (nor MXFP4 blocks)")

    def rows(r: torch.Tensor) -> torch.Tensor:  # gate_up's de-interleaved
        return (deinterleave(r) if interleaved and "gate_up" in name else r).contiguous()

    return t.map_rows(rows) if isinstance(t, Int4) else rows(t)


def _read(handles: dict, where: dict, alias: dict, src: str, cfg: ModelConfig):
    """Checkpoint tensor ``src``: a tensor, or its 4-bit form (:class:`Int4`) where the
    checkpoint holds it 4-bit."""
    def get(name: str, index: int | None = None) -> torch.Tensor:
        file = where[name]
        if file not in handles:
            handles[file] = _open(file)
        try:
            if index is not None:  # one expert's slice of a stacked tensor
                return handles[file].get_slice(alias.get(name, name))[index]
            return handles[file].get_tensor(alias.get(name, name))
        except (SafetensorError, OSError, ValueError, IndexError) as e:
            raise ModelLoadError(f"{file}: cannot read tensor {name!r} ({e})") from e

    if src.endswith("]"):
        return _read_stacked(get, where, src, cfg.interleaved_gate_up)
    if src not in where:
        t = read_int4(get, src, cfg.quant, lambda n: n in where)
        if t is not None:
            return t
    return get(src)


def load_flat_weights(
    folder: str | Path, cfg: ModelConfig, dtype: torch.dtype, quantization: str | None = None,
    cut=None,
) -> tuple[WeightLayout, torch.Tensor]:
    """Read every weight once into a new host buffer in the layout's order (quantizing the
    weights ``quantization`` names, row by row as they are read). ``cut(name, src, t)``: the
    part of checkpoint tensor ``src`` this buffer holds (a tensor-parallel rank's shard,
    ``models/tp.py``; ``cfg`` is then the shard's)."""
    folder = Path(folder)
    where, alias = _aliased(_checkpoint_files(folder))
    stored, perm, codes = _stored_4bit(cfg, where)
    layout = build_layout(cfg, dtype, quantization, stored, perm, codes)
    buffer = layout.allocate("cpu")
    views = layout.views(buffer)
    handles: dict[Path, object] = {}
    with Progress(layout.num_bytes, f"loading {folder.name}", "bytes",
                  active=None if layout.num_bytes >= PROGRESS_MIN_BYTES else False) as bar:
        for name, (shape, sources) in weight_sources(cfg).items():
            row = 0
            for src in sources:
                parts = layer_parts(src, cfg.quant)
                base = stacked_base(src)
                path = (where.get(base) or where.get(base + "_blocks")
                        or (where.get(parts[0]) if parts else None))
                if path is None:
                    raise ModelLoadError(f"{folder}: checkpoint has no tensor {src!r}")
                t = _read(handles, where, alias, src, cfg)
                if cut is not None:
                    t = cut(name, src, t)
                t = _rotary_rows(cfg, src, t)
                if cfg.norm_offset and "norm" in src:  # Gemma's norms scale by 1 + weight
                    t = t.float() + 1.0
                n = t.shape[0] if t.dim() else 0
                dest = views[name][row : row + n]
                want = (min(n, max(shape[0] - row, 0)), *shape[1:]) if shape else ()
                if tuple(t.shape) != want or t.dim() != len(shape):
                    raise ModelLoadError(
                        f"{path}: tensor {src!r} has shape {tuple(t.shape)}, "
                        f"config expects {want}"
                    )
                _store(t, dest, views, name, row, dtype, path, src)
                row += n
            if row != shape[0]:
                raise ModelLoadError(f"{folder}: tensor {name!r} assembled {row} rows of "
                                     f"{shape[0]}")
            bar.update(sum(views[name + x].nbytes for x in ("", SCALE_SUFFIX, GSCALE_SUFFIX,
                                                             GOFFSET_SUFFIX)
                           if name + x in views))
        bar.update(layout.num_bytes - bar.done)  # the alignment gaps: end at 100%
    return layout, buffer
