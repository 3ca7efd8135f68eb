"""The Llama-family forward pass (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM).

Weights are views into the model's flat buffer (:meth:`LlamaModel.bind`); the model owns no
memory of its own besides the rotary table. Attention reads and writes the paged KV view
``[num_pages, num_layers, 2, block_tokens, num_kv_heads, head_dim]`` it is handed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpupool import kernels
from gpupool.kernels import native
from gpupool.kernels.linear import linear, linear_int8, pack
from gpupool.kernels.reference import apply_rope, rms_norm, silu_mul
from gpupool.models.batch import ForwardBatch
from gpupool.models.config import ModelConfig
from gpupool.models.rope import cos_sin_table
from gpupool.pool.weights import SCALE_SUFFIX


def project(x: torch.Tensor, w: dict[str, torch.Tensor], name: str,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w[name].T (+ bias)``; an int8 weight comes with its per-row ``name_scale``."""
    scale = w.get(name + SCALE_SUFFIX)
    if scale is None:
        return linear(x, w[name], bias)
    return linear_int8(x, w[name], scale, bias)


LINEAR_WEIGHTS = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")


def _packed(weight: torch.Tensor) -> torch.Tensor:
    packed = pack(weight)
    return weight if packed is None else packed


class LlamaModel:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
        self.cfg = cfg
        self.dtype = dtype
        self.device = device
        self.scale = cfg.head_dim**-0.5
        self.rope = cos_sin_table(cfg, cfg.max_model_len, dtype, device)  # [pos, 2, D]
        if device.type == "cpu" and dtype == torch.bfloat16:
            native.enabled()  # builds and checks the kernels now, not in the first request
        self.w: dict[str, torch.Tensor] = {}
        self.layers: list[dict[str, torch.Tensor]] = []
        self.plain: list[dict[str, torch.Tensor]] = []  # the layers' weight views, unpacked
        self.head: torch.Tensor | None = None  # the lm_head weight (maybe packed)
        self.packed = False  # pack_weights() ran since the last bind
        self.int8 = False  # every linear weight int8 (set by bind)
        self._kv: tuple | None = None  # (kv, per-layer (K, V) views, their native.kv_table)
        self._table = None  # the layers' weight addresses for native.decode_layers, or False
        self._ends = None  # see _step_ends

    def bind(self, views: dict[str, torch.Tensor]) -> None:
        """Point the model at a set of weight views (e.g. after a swap); no copy."""
        self.w = views
        self.layers = [
            {k.split(".", 2)[2]: v for k, v in views.items() if k.startswith(f"layers.{i}.")}
            for i in range(self.cfg.num_layers)
        ]
        self.head = views[self.lm_head_name]
        self.plain = [dict(lw) for lw in self.layers]  # the views, whatever packing does
        self._table = None  # native.layer_table(self.plain), made at first use
        self._ends = None
        self.packed = False
        # int8 weight-only: every linear weight and the lm_head carry row scales
        self.int8 = self.lm_head_name + SCALE_SUFFIX in views and all(
            name + SCALE_SUFFIX in lw for lw in self.layers for name in LINEAR_WEIGHTS
            if name in lw)

    def pack_weights(self) -> None:
        """On CPU in bf16, the linear layers' weights and the lm_head packed for oneDNN
        (``kernels.linear.pack``: bit-identical results, 1.2-2.8x faster products; copies
        held until the next ``bind`` or ``unbind``). About a copy of the weights' bytes:
        SmolLM2 took 90-110 ms here, so the worker packs a model only once it has stayed
        resident a while. Elsewhere nothing changes."""
        if self.packed or not self.layers:
            return
        if self.lm_head_name + SCALE_SUFFIX not in self.w:  # int8 weights stay as they are
            self.head = _packed(self.head)
        for lw in self.layers:
            for name in LINEAR_WEIGHTS:
                if name in lw and name + SCALE_SUFFIX not in lw:
                    lw[name] = _packed(lw[name])
        self.packed = True

    def unbind(self) -> None:
        """Forget the weights (evicted: the views' slab now holds another model, and packed
        copies would hold host memory): the next ``bind`` brings them back."""
        self.w, self.layers, self.plain, self.head, self.packed = {}, [], [], None, False
        self._table, self._ends, self.int8 = None, None, False

    @property
    def lm_head_name(self) -> str:
        return "embed_tokens" if self.cfg.tie_word_embeddings else "lm_head"

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.w["embed_tokens"])
        scale = self.w.get("embed_tokens" + SCALE_SUFFIX)
        if scale is not None:  # int8 rows (tied with an int8 lm_head)
            x = x.to(self.dtype) * scale[ids, None]
        return x

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: torch.Tensor, lora=None) -> torch.Tensor:
        """Logits [len(batch.logits_indices), vocab] in float32.

        ``lora``: a :class:`gpupool.adapters.batch.LoraBatch` adding each row's adapter
        terms after every fused projection, or None for a base-only batch.
        """
        kv_layers = self._kv_layers(kv)
        if self._native(kv):
            return self._forward_native(batch, kv_layers, lora)
        x = self.embed(batch.input_ids)  # [T, hidden]
        cos_sin = self.rope[batch.positions]  # [T, 2, D]
        cos, sin = cos_sin[:, 0:1], cos_sin[:, 1:2]  # [T, 1, D]
        for i, lw in enumerate(self.layers):
            h = rms_norm(x, lw["input_norm"], self.cfg.rms_norm_eps)
            x = x + self._attention(h, lw, *kv_layers[i], cos, sin, batch, lora, i)
            h = rms_norm(x, lw["post_norm"], self.cfg.rms_norm_eps)
            gate_up = project(h, lw, "gate_up_weight")  # [T, 2 * inter]
            if lora is not None:
                lora.apply(i, "gate_up", h, gate_up)
            act = silu_mul(gate_up)
            down = project(act, lw, "down_weight")
            if lora is not None:
                lora.apply(i, "down", act, down)
            x = x + down
        x = batch.sampled_rows(x)
        return self._logits(rms_norm(x, self.w["norm"], self.cfg.rms_norm_eps))

    def _logits(self, x: torch.Tensor, gemv: bool = False) -> torch.Tensor:
        """float32 logits of the final norm's rows ``x``; ``gemv``: through the native
        GEMVs on the plain lm_head (a few rows)."""
        if gemv:
            return self._gemv_project(x, self.w, self.lm_head_name).float()
        if self.head is not self.w[self.lm_head_name]:  # packed
            return linear(x, self.head).float()
        return project(x, self.w, self.lm_head_name).float()

    def _kv_layers(self, kv: torch.Tensor) -> list:
        """Each layer's (K, V) cache views: the same storage every step, so made once."""
        if self._kv is None or self._kv[0] is not kv:  # (kv, views, native.kv_table)
            self._kv = (kv, [(kv[:, i, 0], kv[:, i, 1]) for i in range(self.cfg.num_layers)],
                        None)
        return self._kv[1]

    def _native(self, kv: torch.Tensor) -> bool:
        """Whether this step runs on the fused CPU kernels (:mod:`gpupool.kernels.native`):
        bf16 activations (the model's dtype) and KV cache on CPU, no per-head q/k norm, sizes
        they handle."""
        cfg = self.cfg
        return (self.dtype == torch.bfloat16 and kv.dtype == torch.bfloat16 and not cfg.qk_norm
                and native.supports(self.device, self.dtype, cfg.hidden_size,
                                    cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                                    cfg.head_dim)
                and native.enabled())

    def _step_ends(self):
        """(embedding, head) for native.decode_layers to run the model's first and last ops
        too: each (plain weight, int8 row scales or None), or False when one is not a form its
        kernels read. Made once per bind."""
        if self._ends is None:
            self._ends = False
            parts = []
            for name in ("embed_tokens", self.lm_head_name):
                w, sc = self.w[name], self.w.get(name + SCALE_SUFFIX)
                ok = w.is_contiguous() and (
                    (sc is None and w.dtype == torch.bfloat16 and native.has_gemv())
                    or (sc is not None and w.dtype == torch.int8 and sc.dtype == torch.bfloat16
                        and sc.is_contiguous() and native.has_gemv_int8()))
                if not ok:
                    return False
                parts.append((w, sc))
            self._ends = tuple(parts)
        return self._ends

    def _forward_native(self, batch: ForwardBatch, kv_layers, lora) -> torch.Tensor:
        """The forward pass with each layer's glue in fused kernels: the residual add and the
        norm after it in one call, RoPE with the KV write, decode attention in place, SiLU
        times up. Same arithmetic as the torch path, op for op (see native.c)."""
        cfg, eps, nd = self.cfg, self.cfg.rms_norm_eps, batch.num_decode
        rows = batch.num_tokens
        # a few rows: the kernels' GEMVs on the plain weights (faster than oneDNN there; the
        # int8 one than torch's int8 products for more rows)
        if self.int8:
            gemv = rows <= native.GEMV_INT8_MAX_ROWS and native.has_gemv_int8()
        else:
            gemv = rows <= native.GEMV_MAX_ROWS and native.has_gemv()
        if (gemv and not batch.num_prefill_seqs
                and (lora is None or lora.native is not None)):
            if self._table is None:
                self._table = native.layer_table(self.plain) or False
            if self._table:  # a few decode rows: every layer in one call
                ends = self._step_ends()
                if self._kv[2] is None:
                    self._kv = (*self._kv[:2], native.kv_table(kv_layers))
                # every row samples (a decode step): the embedding and the head in the call
                whole = ends and batch.logits_indices.shape[0] == rows
                x = (torch.empty(rows, cfg.hidden_size, dtype=self.dtype) if whole
                     else self.embed(batch.input_ids))
                out = native.decode_layers(
                    x, self._table, cfg.num_layers, cfg.intermediate_size, cfg.num_heads,
                    cfg.num_kv_heads, cfg.head_dim, eps, self.rope, batch.positions,
                    self._kv[2], batch.slot_pages, batch.slot_offsets,
                    batch.decode_block_tables, batch.decode_context_lens, self.scale,
                    self.w["norm"], batch.input_ids if whole else None,
                    ends[0] if whole else None, ends[1] if whole else None,
                    None if lora is None else lora.native_table(cfg.num_layers))
                return out if whole else self._logits(batch.sampled_rows(out), gemv)
        x = self.embed(batch.input_ids)
        prefill_native = native.has_prefill_attention(cfg.head_dim)
        h = torch.empty_like(x)  # each norm's output, reused
        delta = None  # the previous layer's MLP output, added to x by the next norm
        proj = self._gemv_project if gemv else project
        for i, lw in enumerate(self.layers):
            if gemv:
                lw = self.plain[i]
            native.add_rmsnorm(x, delta, lw["input_norm"], eps, h)
            qkv = proj(h, lw, "qkv_weight", lw.get("qkv_bias"))  # [T, q + 2kv]
            if lora is not None:
                lora.apply(i, "qkv", h, qkv)
            k_cache, v_cache = kv_layers[i]
            native.rope_kv(qkv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.rope,
                           batch.positions, k_cache, v_cache, batch.slot_pages,
                           batch.slot_offsets)
            parts = []
            if nd:
                parts.append(native.decode_attention(
                    qkv[:nd], cfg.num_heads, k_cache, v_cache, batch.decode_block_tables,
                    batch.decode_context_lens, self.scale))
            if batch.num_prefill_seqs:
                o = None
                if prefill_native:  # flash-style in C, on the pages in place
                    o = native.prefill_attention(
                        qkv[nd:], cfg.num_heads, k_cache, v_cache, batch.prefill_block_tables,
                        batch.prefill_cu_seqlens, batch.prefill_context_lens, self.scale)
                if o is None:
                    q = qkv[nd:, : cfg.q_size].view(-1, cfg.num_heads, cfg.head_dim)
                    o = kernels.paged_attention_prefill(
                        q, k_cache, v_cache, batch.prefill_block_tables,
                        batch.prefill_cu_seqlens, batch.prefill_context_lens, self.scale,
                    ).reshape(q.shape[0], cfg.q_size)
                parts.append(o)
            o = parts[0] if len(parts) == 1 else torch.cat(parts)  # [T, q_size]
            out = proj(o, lw, "o_weight")
            if lora is not None:
                lora.apply(i, "o", o, out)
            native.add_rmsnorm(x, out, lw["post_norm"], eps, h)
            gate_up = proj(h, lw, "gate_up_weight")
            if lora is not None:
                lora.apply(i, "gate_up", h, gate_up)
            act = native.silu_mul(gate_up)
            delta = proj(act, lw, "down_weight")
            if lora is not None:
                lora.apply(i, "down", act, delta)
        native.add_rmsnorm(x, delta, self.w["norm"], eps, h)
        return self._logits(batch.sampled_rows(h), gemv)

    @staticmethod
    def _gemv_project(x, w, name, bias=None):
        scale = w.get(name + SCALE_SUFFIX)
        if scale is None:
            return native.gemv(x, w[name], bias)
        if scale.dtype == torch.bfloat16 and native.has_gemv_int8():
            return native.gemv_int8(x, w[name], scale, bias)
        return project(x, w, name, bias)

    def _attention(self, h, lw, k_cache, v_cache, cos, sin, batch: ForwardBatch, lora, i):
        cfg = self.cfg
        qkv = project(h, lw, "qkv_weight", lw.get("qkv_bias"))  # [T, q + 2kv]
        if lora is not None:
            lora.apply(i, "qkv", h, qkv)
        if cfg.qk_norm:
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = rms_norm(q.view(-1, cfg.num_heads, cfg.head_dim), lw["q_norm"],
                         cfg.rms_norm_eps)
            k = rms_norm(k.view(-1, cfg.num_kv_heads, cfg.head_dim), lw["k_norm"],
                         cfg.rms_norm_eps)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        else:  # q and k rotated together: one RoPE over [T, heads + kv heads, D]
            heads = cfg.num_heads + cfg.num_kv_heads
            qk = apply_rope(qkv[:, : cfg.q_size + cfg.kv_size].view(-1, heads, cfg.head_dim),
                            cos, sin)
            q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads :]
        v = qkv[:, cfg.q_size + cfg.kv_size :].view(-1, cfg.num_kv_heads, cfg.head_dim)
        kernels.write_kv(k_cache, v_cache, k, v, batch.slot_pages, batch.slot_offsets)
        nd = batch.num_decode
        parts = []
        if nd:
            parts.append(kernels.paged_attention_decode(
                q[:nd], k_cache, v_cache, batch.decode_block_tables,
                batch.decode_context_lens, self.scale,
                batch.decode_max_len, batch.decode_min_len,
            ))
        if batch.num_prefill_seqs:
            parts.append(kernels.paged_attention_prefill(
                q[nd:], k_cache, v_cache, batch.prefill_block_tables,
                batch.prefill_cu_seqlens, batch.prefill_context_lens, self.scale,
            ))
        o = parts[0] if len(parts) == 1 else torch.cat(parts)  # [T, H, D]
        o = o.reshape(o.shape[0], cfg.q_size)
        out = project(o, lw, "o_weight")
        if lora is not None:
            lora.apply(i, "o", o, out)
        return out
