"""Convert a Llama-family GGUF file into a Hugging Face folder (config, tokenizer, safetensors).

Only what gpupool needs to serve a GGUF model: the ``gguf`` package reads the metadata and
de-quantizes each tensor to float32 (exact: a quantized value has one float meaning; a
``Q8_0`` file, 8-bit values with one scale per 32, becomes its exact float32 values, which
``quantization="int8"`` requantizes with one scale per row);
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


def read_tensors(reader, config, progress: Callable[[int, int], None] | None = None
                 ) -> dict[str, torch.Tensor]:
    """Every tensor de-quantized to float32 under its Hugging Face name."""
    from gguf import dequantize

    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    out: dict[str, torch.Tensor] = {}
    for i, t in enumerate(reader.tensors):
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims fastest first
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
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
