"""Convert a Llama-family GGUF file into a Hugging Face folder (config, tokenizer, safetensors).

Only what gpupool needs to serve a GGUF model: the ``gguf`` package reads the metadata and
de-quantizes each tensor to float32 (exact: a quantized value has one float meaning; a
``Q8_0`` file, 8-bit values with one scale per 32, becomes its exact float32 values, which
``quantization="int8"`` requantizes with one scale per row), except the 4-bit ones: a
``Q4_0`` or ``Q4_K`` tensor is repacked, without going through float32, into gpupool's 4-bit
format (``kernels/quant4.py``: groups of 32, scale and offset exact: Q4_0's ``d (q - 8)`` is
scale ``d``, offset ``-8 d``; Q4_K's ``d sc q - dmin m`` is scale ``d sc``, offset ``-dmin m``)
as ``<name>.qweight4``, ``.scales4`` and ``.offsets4`` beside the float tensors, and
``config.json`` says ``quant_method: gpupool_int4`` (``models/quantized.py``). A Q4_K_M file's
Q6_K tensors (6 bits: no 4-bit form holds them) are de-quantized to float32 like the rest;
transformers builds the config and the tokenizer. No accelerate and no model instance, so the
default model's first run costs the plain install and a few seconds.

llama.cpp's converter stores ``q_proj`` and ``k_proj`` with each head's rows reordered from
the Hugging Face layout (halves -> interleaved pairs, for its rotary kernel); we undo that::

    HF rows of one head:   [x0 x1 ... x31 | y0 y1 ... y31]   (rotate-half pairs: xi, yi)
    GGUF rows of one head: [x0 y0 x1 y1 ... x31 y31]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gpupool.models.config import INT4_PARTS, OWN_INT4, int4_quantization_config
from gpupool.models.errors import ModelLoadError
from gpupool.progress import Progress

logger = logging.getLogger(__name__)

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
              "output": "lm_head"}


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    stem, _, kind = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row order for q/k projections (see the module docstring)."""
    rows = w.shape[0]
    return (w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


_REQUIRED = object()


def _field(reader, key: str, default=_REQUIRED):
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ModelLoadError(f"GGUF metadata has no {key!r}")
        return default
    return field.contents()


def llama_config(reader):
    """A ``LlamaConfig`` from the GGUF metadata (architecture ``llama`` only)."""
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else _REQUIRED
    return LlamaConfig(
        vocab_size=int(_field(reader, "llama.vocab_size", vocab)),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(_field(reader, "llama.context_length")),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings=not has_output,
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", None),
        architectures=["LlamaForCausalLM"],
        torch_dtype="float32",
    )


def _pack_blocks(v: np.ndarray) -> np.ndarray:
    """Values [..., 32] (0..15) -> gpupool's packed bytes [..., 16] (byte j: value j low,
    value 16 + j high)."""
    return (v[..., :16] | (v[..., 16:] << 4)).astype(np.uint8)


def q4_0_to_int4(data: np.ndarray, rows: int, cols: int) -> tuple[torch.Tensor, ...]:
    """A Q4_0 tensor's bytes (blocks of 32: a float16 d, 16 bytes of values - 8 whose byte j
    holds value j low and 16 + j high: gpupool's own order) -> (q, scale, offset)."""
    blocks = np.ascontiguousarray(data).reshape(rows, cols // 32, 18)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = np.ascontiguousarray(blocks[..., 2:]).reshape(rows, cols // 2)
    return torch.from_numpy(q.copy()), torch.from_numpy(d), torch.from_numpy(-8 * d)


def q4_k_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes of 6-bit scales and minimums [..., 12] -> each [..., 8] (llama.cpp's
    get_scale_min_k4: sub-blocks 0-3 in the low 6 bits of bytes 0-3 and 4-7, 4-7 in bytes
    8-11's nibbles with their top 2 bits in bytes 0-7's top 2)."""
    sc = sc.astype(np.uint8)
    lo, mid, hi = sc[..., 0:4], sc[..., 4:8], sc[..., 8:12]
    scales = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=-1)
    mins = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return scales, mins


def q4_k_to_int4(data: np.ndarray, rows: int, cols: int) -> tuple[torch.Tensor, ...]:
    """A Q4_K tensor's bytes (super-blocks of 256: float16 d and dmin, 12 bytes of 6-bit
    scales and minimums of 8 sub-blocks of 32, 128 bytes of values: each 32 bytes hold two
    sub-blocks, the first in their low nibbles) -> (q, scale, offset) in groups of 32."""
    nb = cols // 256
    blocks = np.ascontiguousarray(data).reshape(rows, nb, 144)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sc, mn = q4_k_scales(blocks[..., 4:16])
    qs = blocks[..., 16:].reshape(rows, nb, 4, 1, 32)
    vals = ((qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)) & 15)
    q = _pack_blocks(vals.reshape(rows, nb * 8, 32)).reshape(rows, cols // 2)
    scale = (d[..., None] * sc.astype(np.float32)).reshape(rows, nb * 8)
    offset = -(dmin[..., None] * mn.astype(np.float32)).reshape(rows, nb * 8)
    return torch.from_numpy(q), torch.from_numpy(scale), torch.from_numpy(offset)


INT4_TYPES = {"Q4_0": q4_0_to_int4, "Q4_K": q4_k_to_int4}


def read_tensors(reader, config, progress: Callable[[int, int], None] | None = None
                 ) -> dict[str, torch.Tensor]:
    """Every tensor under its Hugging Face name: de-quantized to float32, or, for a Q4_0 or
    Q4_K weight, its 4-bit form as three tensors (``config.INT4_PARTS[OWN_INT4]``)."""
    from gguf import dequantize

    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    out: dict[str, torch.Tensor] = {}
    for i, t in enumerate(reader.tensors):
        shape = [int(d) for d in reversed(t.shape)]  # GGUF lists dims fastest first
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        repack = INT4_TYPES.get(t.tensor_type.name) if len(shape) == 2 else None
        if repack is not None:
            parts = repack(t.data, *shape)
            if kind in heads:
                parts = [unpermute_rows(p, heads[kind]) for p in parts]
            base = hf_name(t.name)[: -len(".weight")]
            for suffix, p in zip(INT4_PARTS[OWN_INT4], parts):
                out[base + suffix] = p.contiguous()
        else:
            w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            w = w.reshape(shape)
            if kind in heads:
                w = unpermute_rows(w, heads[kind])
            out[hf_name(t.name)] = torch.from_numpy(np.array(w, order="C"))  # owns its memory
        if progress is not None:
            progress(i + 1, len(reader.tensors))
    return out


def convert_gguf(src: Path, dest: Path) -> None:
    """Write ``config.json``, the tokenizer files and ``model.safetensors`` for ``src`` into
    ``dest`` (created; the caller moves it into place). On a terminal one progress line shows
    it (``gpupool.progress``); elsewhere (a server's log) log lines at each quarter do."""
    start = time.perf_counter()
    with Progress(None, f"converting {src.stem}", "bytes") as bar:
        bar.note("reading")
        has_tokenizer = _convert(src, dest, bar, start)
        bar.status = ""  # the closing line: the figures and the time taken
    if not has_tokenizer:  # weights only: token-id prompts
        logger.warning("gpupool: %s has no tokenizer; the model takes token ids only", src.name)


def _convert(src: Path, dest: Path, bar: Progress, start: float) -> bool:
    """:func:`convert_gguf`'s work; whether the file had a tokenizer."""
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    try:
        reader = GGUFReader(str(src))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{src}: not a readable GGUF file: {e}") from e
    config = llama_config(reader)
    if any(t.tensor_type.name in INT4_TYPES and len(t.shape) == 2 for t in reader.tensors):
        config.quantization_config = int4_quantization_config(32)
    dest.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(dest))
    bar.total = sum(4 * int(t.n_elements) for t in reader.tensors)  # float32 bytes written
    next_pct = [25]

    def progress(done: int, count: int) -> None:
        bar.update(4 * int(reader.tensors[done - 1].n_elements))
        if not bar.active and done * 100 >= next_pct[0] * count:
            logger.warning("gpupool: converting weights %d%% (%d/%d tensors, %.1f s)",
                           next_pct[0], done, count, time.perf_counter() - start)
            next_pct[0] += 25

    bar.note("de-quantizing")
    tensors = read_tensors(reader, config, progress)
    bar.note("writing")
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    if "tokenizer.ggml.tokens" not in reader.fields:
        return False
    if not bar.active:
        logger.warning("gpupool: converting the tokenizer (%.1f s)", time.perf_counter() - start)
    bar.note("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    tokenizer.save_pretrained(str(dest))
    return True
