"""Kernel backends: the ops of a forward step, chosen once per model (:func:`select`).

A model's layer loop (``models/llama.py``) calls one backend for every op, so which kernel
runs is decided in one place, when the model is made, from the device, the dtype, the CPU's
build of the native kernels (what built and passed its self-check) and the engine's config
(``kernels``: auto, reference or triton; ``native``: on or off). Nothing here is a process
global: two engines in one process with different settings keep theirs.

- :class:`TorchOps`: torch ops, the spec (``kernels/reference.py`` and the faster torch
  decode attention checked against it); every device and dtype.
- :class:`TritonOps`: the same with Triton's attention, SGMV and int8 kernels (CUDA, or CPU
  under ``TRITON_INTERPRET=1`` with ``kernels="triton"``).
- :class:`NativeOps`: the fused C kernels of ``kernels/native.c`` for bf16 on CPU: the
  residual add with the norm, RoPE with the KV write, attention on the pages in place, the
  GEMVs for a few rows, and a whole decode step in one call (:meth:`NativeOps.decode_step`).

Adding an op: write its torch version in ``reference.py`` (the spec), a method here on
:class:`TorchOps` calling it, and overrides where a backend has a faster kernel, checked
against the reference in ``tests/test_kernels_*.py``. Adding a backend: a subclass and a line
in :func:`select`. A step's per-step state (the rotary rows, which weights the products read)
is a :class:`StepPlan` made once by :meth:`TorchOps.plan`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from gpupool.kernels import decode, fixed, native, quant4, reference
from gpupool.kernels.linear import linear, linear_int8, linear_int8_reference

logger = logging.getLogger(__name__)

SCALE_SUFFIX = "_scale"  # an int8 weight's per-row scales (as pool.weights names them)
GSCALE_SUFFIX, GOFFSET_SUFFIX = "_gscale", "_goffset"  # a 4-bit weight's groups (likewise)
GCODE_SUFFIX = "_gcode"  # a 4-bit weight's codebook (likewise; kernels/quant4.py)
PERM_SUFFIX = "_perm"  # a 4-bit weight's column order where it is not x's (act-order GPTQ)
# the native products' row limits where batch invariance is off (Config.batch_invariant):
# past them torch's are faster (int8: from ~17 rows) or as fast (bf16, oneDNN's packed GEMM)
FAST_MAX_ROWS = {"bf16": 64, "int8": 16}


@dataclass
class StepPlan:
    """What a step's ops share: the rotary table's rows for its positions (torch backends),
    the layers' weights the products read (packed or plain) and whether they run as GEMVs."""
    layers: list[dict[str, torch.Tensor]]
    rope: torch.Tensor  # the model's rotary table [positions, 2, D]
    cos: torch.Tensor | None = None  # [T, 1, D]: the table's rows of the step's positions
    sin: torch.Tensor | None = None
    gemv: bool = False


def project(x: torch.Tensor, w: dict[str, torch.Tensor], name: str,
            bias: torch.Tensor | None = None, triton: bool = False,
            product=None) -> torch.Tensor:
    """``x @ w[name].T (+ bias)``; an int8 weight comes with its per-row ``name_scale``.
    ``product``: every product through it (``kernels.fixed.linear``), an int8 weight widened
    to x's dtype and its rows scaled after (``linear_int8_reference``). A 4-bit weight
    (``name_gscale``, ``name_goffset``, a codebook ``name_gcode``): its float32 values times
    x in float32 (``quant4.linear_int4_reference``; Triton's kernel where ``triton``)."""
    gscale = w.get(name + GSCALE_SUFFIX)
    if gscale is not None:
        x = _in_weight_order(x, w, name)
        code = w.get(name + GCODE_SUFFIX)
        if triton and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
            from gpupool.kernels.int4 import linear_int4

            return linear_int4(x, w[name], gscale, w.get(name + GOFFSET_SUFFIX), bias, code)
        return quant4.linear_int4_reference(x, w[name], gscale, w.get(name + GOFFSET_SUFFIX),
                                            bias, product, code)
    scale = w.get(name + SCALE_SUFFIX)
    if scale is None:
        return (product or linear)(x, w[name], bias)
    if product is not None:
        return linear_int8_reference(x, w[name], scale, bias, product)
    return linear_int8(x, w[name], scale, bias, triton=triton)


def _in_weight_order(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """x's columns in the order a 4-bit weight stores its own (act-order GPTQ), else x."""
    perm = w.get(name + PERM_SUFFIX)
    return x if perm is None else x.index_select(-1, perm)


class TorchOps:
    """Every op in torch. ``reference``: the reference decode attention too (the spec itself,
    slower; ``kernels="reference"``)."""

    name = "torch"
    triton = False  # Triton kernels for attention, SGMV and int8 products
    paged_lora = False  # lora_paged: LoRA terms read in place from the adapters' pages
    capture_safe = False  # a CUDA step reads nothing back to the host (CUDA graphs)
    windowed = False  # decode/prefill_attention take sliding windows and sinks

    def __init__(self, reference_only: bool = False, fused_lora: bool = False,
                 invariant: bool = False, dtype: torch.dtype | None = None):
        """``reference_only``: the reference attention too; ``fused_lora``: LoRA terms
        through ``native.lora`` (adapters.batch.LoraBatch; bf16 on CPU where the native
        kernels are available, even for a model whose layers they do not run);
        ``invariant``: the fixed-order ops of ``kernels.fixed`` (CPU) for activations of
        ``dtype``."""
        self.reference_only = reference_only
        self.fused_lora = fused_lora
        self.invariant = invariant and not reference_only
        self._dtype = dtype

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(fused_lora={self.fused_lora}, "
                f"invariant={self.invariant})")

    @property
    def batch_invariant(self) -> bool:
        """Every op of a step computes a row's result in an order that depends only on that
        row and the op's shape (never on the step's other rows, its chunking or the cache): a
        request's tokens are the same whatever shares its steps (README: "Same request, same
        tokens"). Here: the fixed-order torch ops, where this machine's probes passed
        (``kernels.fixed.supported``); torch's own products and attention choose kernels by
        the number of rows, so the reference and the fast path make no claim."""
        return self.invariant and fixed.supported(self._dtype)

    @property
    def packs_weights(self) -> bool:
        # the products read weights packed for oneDNN (LlamaModel.pack_weights); the
        # fixed-order ones too where the packed kernel gives the plain one's bits (probed)
        return not self.batch_invariant or fixed.packs(self._dtype)

    # ---- a step ---------------------------------------------------------------------------
    def bind(self, model) -> None:
        """The model's weights changed (bound or unbound): forget what was made from them."""

    def plan(self, model, batch) -> StepPlan:
        cos_sin = model.rope[batch.positions]  # [T, 2, D]
        return StepPlan(model.layers, model.rope, cos_sin[:, 0:1], cos_sin[:, 1:2])

    def decode_step(self, model, batch, plan: StepPlan, kv_layers,
                    lora) -> torch.Tensor | None:
        """The whole step in one call where a backend has one (logits), else None."""
        return None

    # ---- ops --------------------------------------------------------------------------------
    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, rms_norm(x + delta, weight)); delta None: x as it is."""
        if delta is not None:
            x = x + delta
        return x, reference.rms_norm(x, weight, eps)

    def final_norm(self, x, delta, weight, eps, batch) -> torch.Tensor:
        """The last residual add and the final norm, of the rows that sample only."""
        if delta is not None:
            x = x + delta
        return reference.rms_norm(batch.sampled_rows(x), weight, eps)

    def linear(self, plan: StepPlan, x: torch.Tensor, w: dict[str, torch.Tensor], name: str,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        return project(x, w, name, bias, self.triton, self._products())

    def logits(self, plan: StepPlan, model, h: torch.Tensor) -> torch.Tensor:
        """float32 logits of the final norm's rows ``h`` (the packed lm_head if there is)."""
        if model.head is not model.w[model.lm_head_name]:  # packed
            return linear(h, model.head).float()
        return self.linear(plan, h, model.w, model.lm_head_name).float()

    def rope_kv(self, plan: StepPlan, cfg, qkv: torch.Tensor, lw, k_cache, v_cache, batch):
        """RoPE on q and k (after their per-head norms, Qwen3), k and v into their KV slots;
        returns q in the form :meth:`attention` takes ([T, H, D] here)."""
        cos, sin = plan.cos, plan.sin
        if getattr(cfg, "qk_norm_whole", False):  # OLMoE: over all of q and k, then a clip
            qkv = _olmoe_qkv(cfg, qkv, lw)
        if cfg.qk_norm and not getattr(cfg, "qk_norm_whole", False):
            q, k, _ = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = reference.rms_norm(q.view(-1, cfg.num_heads, cfg.head_dim), lw["q_norm"],
                                   cfg.rms_norm_eps)
            k = reference.rms_norm(k.view(-1, cfg.num_kv_heads, cfg.head_dim), lw["k_norm"],
                                   cfg.rms_norm_eps)
            q, k = reference.apply_rope(q, cos, sin), reference.apply_rope(k, cos, sin)
        else:  # q and k rotated together: one RoPE over [T, heads + kv heads, D]
            heads = cfg.num_heads + cfg.num_kv_heads
            qk = reference.apply_rope(
                qkv[:, : cfg.q_size + cfg.kv_size].view(-1, heads, cfg.head_dim), cos, sin)
            q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads :]
        v = qkv[:, cfg.q_size + cfg.kv_size :].view(-1, cfg.num_kv_heads, cfg.head_dim)
        reference.write_kv(k_cache, v_cache, k, v, batch.slot_pages, batch.slot_offsets)
        return q

    def attention(self, cfg, q, k_cache, v_cache, batch, scale: float, window: int = 0,
                  softcap: float | None = None,
                  sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Decode rows, then each prefill sequence's rows, over the paged KV: [T, q_size].
        ``window``: a query sees only its last ``window`` keys (0: all); ``softcap``: the
        scores tanh soft-capped (Gemma 2); ``sinks``: a logit a head in every row's softmax,
        its probability dropped (gpt-oss); the soft cap only through the fixed-order
        attention, windows and sinks also through a backend's own kernels where they take
        them (``windowed``: Triton's)."""
        shaped = bool(window) or sinks is not None
        if self.batch_invariant or softcap or (shaped and not self.windowed):
            return fixed.attention(q, k_cache, v_cache, batch, scale, window, softcap,
                                   sinks).reshape(q.shape[0], cfg.q_size)
        extra = {"window": window, "sinks": sinks} if shaped else {}
        nd = batch.num_decode
        parts = []
        if nd:
            parts.append(self.decode_attention(
                q[:nd], k_cache, v_cache, batch.decode_block_tables, batch.decode_context_lens,
                scale, batch.decode_max_len, batch.decode_min_len, **extra))
        if batch.num_prefill_seqs:
            parts.append(self.prefill_attention(
                q[nd:], k_cache, v_cache, batch.prefill_block_tables, batch.prefill_cu_seqlens,
                batch.prefill_context_lens, scale, **extra))
        o = parts[0] if len(parts) == 1 else torch.cat(parts)  # [T, H, D]
        return o.reshape(o.shape[0], cfg.q_size)

    def decode_attention(self, q, k_cache, v_cache, block_tables, context_lens, scale,
                         max_len=None, min_len=None):
        """See :func:`reference.paged_attention_decode`."""
        if not self.reference_only and decode.faster_than_reference(q):
            impl = decode.paged_attention_decode
        else:
            impl = reference.paged_attention_decode
        return impl(q, k_cache, v_cache, block_tables, context_lens, scale, max_len, min_len)

    def prefill_attention(self, q, k_cache, v_cache, block_tables, cu_seqlens, context_lens,
                          scale):
        """See :func:`reference.paged_attention_prefill`."""
        return reference.paged_attention_prefill(q, k_cache, v_cache, block_tables,
                                                 cu_seqlens, context_lens, scale)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            return fixed.silu_mul(gate_up)
        return reference.silu_mul(gate_up)

    def act_mul(self, gate_up: torch.Tensor, kind: str) -> torch.Tensor:
        """act(gate) * up of ``gate_up`` = [gate | up]: "gelu_tanh" (GeGLU, Gemma), or silu.
        Elementwise: the same bits whatever shares the step."""
        if kind == "silu":
            return self.silu_mul(gate_up)
        return reference.act_mul(gate_up, kind)

    def swiglu(self, gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
        """gpt-oss's clamped SwiGLU of [gate | up] (elementwise, as ``act_mul``)."""
        return reference.swiglu_oai(gate_up, limit, alpha)

    def mlp_act(self, gate_up: torch.Tensor, cfg) -> torch.Tensor:
        """The MLP's activation of [gate | up] for a model of ``cfg``: gpt-oss's clamped
        SwiGLU, else ``act_mul``'s of its kind."""
        if cfg.activation == "swiglu_oai":
            return self.swiglu(gate_up, cfg.swiglu_limit, cfg.swiglu_alpha)
        return self.act_mul(gate_up, cfg.activation)

    def experts(self, plan, h: torch.Tensor, lw, idx: torch.Tensor, top: torch.Tensor,
                cfg, lora=None, layer: int = 0) -> torch.Tensor | None:
        """A mixture-of-experts MLP's output for rows ``h`` (experts ``idx``, routing weights
        ``top``; ``cfg`` the model's) in one call, or None: the model runs its loop of
        products (LlamaModel._experts). ``lora``: the step's LoraBatch where its adapters
        have expert terms (at ``layer``), else None."""
        return None

    def _products(self):
        """The products' function under batch invariance (the fixed-order one), else None
        (the callees' own: ``kernels.linear``)."""
        return fixed.linear if self.batch_invariant else None

    def sgmv_shrink(self, x, w, seg_starts, seg_slots, seg_rows):
        """See :func:`reference.sgmv_shrink`."""
        return reference.sgmv_shrink(x, w, seg_starts, seg_slots, seg_rows, self._products())

    def sgmv_expand(self, y, h, w, seg_starts, seg_slots, seg_ranks, seg_h_offsets):
        """See :func:`reference.sgmv_expand` (adds into y in place)."""
        reference.sgmv_expand(y, h, w, seg_starts, seg_slots, seg_ranks, seg_h_offsets,
                              self._products())


class TritonOps(TorchOps):
    """Triton's paged attention, SGMV, int8 and 4-bit products, a mixture's experts as two
    grouped GEMMs (``kernels/moe.py``), and the fused small ops of ``kernels/fused.py`` (add +
    RMSNorm, SiLU x up, RoPE + KV write); the rest in torch."""

    name = "triton"
    triton = True
    capture_safe = True
    windowed = True

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._moe = {}  # id(layer's dict) -> (it, its experts' two moe.Product or None)
        self._moe_offsets = {}  # moe.product's offsets tensors, kept across binds (graphs)

    def bind(self, model) -> None:
        self._moe = {}

    def add_norm(self, x, delta, weight, eps):
        from gpupool.kernels.fused import add_rmsnorm

        if x.stride(-1) != 1 or (delta is not None and delta.stride(-1) != 1):
            return super().add_norm(x, delta, weight, eps)
        return add_rmsnorm(x, delta, weight, eps)

    def final_norm(self, x, delta, weight, eps, batch):
        from gpupool.kernels.fused import add_rmsnorm

        x = batch.sampled_rows(x)  # only the rows that sample: their add and norm
        delta = None if delta is None else batch.sampled_rows(delta)
        if x.stride(-1) != 1 or (delta is not None and delta.stride(-1) != 1):
            return TorchOps.add_norm(self, x, delta, weight, eps)[1]
        return add_rmsnorm(x, delta, weight, eps)[1]

    def silu_mul(self, gate_up):
        from gpupool.kernels.fused import silu_mul

        if gate_up.stride(-1) != 1:
            return super().silu_mul(gate_up)
        return silu_mul(gate_up)

    def rope_kv(self, plan, cfg, qkv, lw, k_cache, v_cache, batch):
        from gpupool.kernels.fused import rope_kv

        if cfg.qk_norm or qkv.stride(-1) != 1 or cfg.head_dim % 2:
            return super().rope_kv(plan, cfg, qkv, lw, k_cache, v_cache, batch)
        return rope_kv(qkv, plan.cos, plan.sin, cfg.num_heads, cfg.num_kv_heads,
                       cfg.head_dim, k_cache, v_cache, batch.slot_pages, batch.slot_offsets)

    def decode_attention(self, q, k_cache, v_cache, block_tables, context_lens, scale,
                         max_len=None, min_len=None, window: int = 0, sinks=None):
        from gpupool.kernels.paged_attention import paged_attention_decode

        return paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale,
                                      window, sinks)

    def prefill_attention(self, q, k_cache, v_cache, block_tables, cu_seqlens, context_lens,
                          scale, window: int = 0, sinks=None):
        from gpupool.kernels.paged_attention import paged_attention_prefill

        return paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens,
                                       context_lens, scale, window, sinks)

    def sgmv_shrink(self, x, w, seg_starts, seg_slots, seg_rows):
        from gpupool.kernels.sgmv import sgmv_shrink

        return sgmv_shrink(x, w, seg_starts, seg_slots, seg_rows)

    def sgmv_expand(self, y, h, w, seg_starts, seg_slots, seg_ranks, seg_h_offsets):
        from gpupool.kernels.sgmv import sgmv_expand

        sgmv_expand(y, h, w, seg_starts, seg_slots, seg_ranks, seg_h_offsets)

    def experts(self, plan, h, lw, idx, top, cfg, lora=None, layer=0):
        # every expert's rows in one grouped GEMM a product (kernels.moe), not the loop's two
        # products a touched expert; expert LoRA: the loop
        from gpupool.kernels import moe

        if lora is not None or h.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return None
        tables = self._moe
        if id(lw) not in tables:
            try:
                made = tuple(moe.product(*expert_tensors(lw, cfg, part),
                                         kept=self._moe_offsets)
                             for part in ("gate_up", "down"))
            except ValueError as e:  # a layout the kernel cannot read: the loop
                logger.info("experts through the model's loop: %s", e)
                made = None
            tables[id(lw)] = (lw, made)
        made = tables[id(lw)][1]
        return None if made is None else moe.experts(
            h, idx, top, *made, lambda gate_up: self.mlp_act(gate_up, cfg))

    paged_lora = True

    def lora_paged(self, x, out, *args, **kw):
        """See :func:`gpupool.kernels.sgmv.lora_paged` (adds into out in place)."""
        from gpupool.kernels.sgmv import lora_paged

        lora_paged(x, out, *args, **kw)


def expert_tensors(lw, cfg, part: str) -> tuple:
    """Every expert's ``part`` ("gate_up" or "down") of a mixture layer ``lw``: (weights,
    their int8 or 4-bit scales, 4-bit offsets, codebooks, biases), a list over the experts
    each or None where none has one. ValueError: an expert missing, experts of mixed forms,
    or a 4-bit weight whose columns are not in x's order (act order: the model's loop reads
    those)."""
    names = [f"experts.{e}.{part}_weight" for e in range(cfg.num_experts)]
    if any(n not in lw or n + PERM_SUFFIX in lw for n in names):
        raise ValueError(f"an expert's {part} is missing or in act order")
    if any(lw[n].layout != torch.strided for n in names):
        raise ValueError(f"an expert's {part} is packed")

    def each(suffix):
        got = [lw.get(n + suffix) for n in names]
        if all(t is None for t in got):
            return None
        if any(t is None for t in got):
            raise ValueError(f"some experts' {part} have {suffix}, some not")
        return got

    biases = [lw.get(n[: -len("weight")] + "bias") for n in names] if cfg.moe_bias else None
    return ([lw[n] for n in names], each(GSCALE_SUFFIX) or each(SCALE_SUFFIX),
            each(GOFFSET_SUFFIX), each(GCODE_SUFFIX), biases)


def _native_experts(lw, cfg) -> tuple:
    """``native.moe_table``'s arguments for a mixture layer ``lw`` (ValueError: a form it
    cannot take)."""
    gate_up, down = (expert_tensors(lw, cfg, part) for part in ("gate_up", "down"))
    four = gate_up[0][0].dtype == torch.uint8
    if four and not native.has_gemv_int4():
        raise ValueError("this build has no 4-bit product")
    none = [None] * cfg.num_experts

    def both(i):  # gate_up's E then down's E, as moe_table takes them
        if gate_up[i] is None and down[i] is None:
            return none + none if i == 2 and four else None  # 4-bit offsets: zero
        return [*(gate_up[i] or none), *(down[i] or none)]

    return gate_up[0], down[0], both(1), both(2), both(3), both(4)


@dataclass
class _NativeCache:
    """What the whole-step call reads, made once per bind: the layers' weight addresses
    (None: some weight is not a form it reads), the embedding and head (None likewise), the
    KV caches' addresses (per KV view)."""
    table: object = None
    ends: tuple | None = None
    kv: tuple = field(default_factory=tuple)  # (kv views, their native.KVTable) or ()
    experts: dict = field(default_factory=dict)  # id(layer's dict) -> (it, MoeTable)
    tp: object = None  # a tensor-parallel rank's native.TPTable
    made: bool = False


class NativeOps(TorchOps):
    """The fused C kernels (``kernels/native.c``) for bf16 activations on CPU."""

    name = "native"

    def __init__(self, head_dim: int = 0, invariant: bool = True):
        """``invariant`` False: the fastest product per step size instead of the native ones
        for every step (Config.batch_invariant)."""
        super().__init__(fused_lora=True)
        self._cache = _NativeCache()
        self.invariant = invariant
        self._head_dim = head_dim
        self._int8 = False  # the bound model's weights are int8
        self._int4 = False  # some of them 4-bit

    def bind(self, model) -> None:
        self._cache = _NativeCache()
        self._int8 = model.int8
        self._int4 = model.int4

    @property
    def batch_invariant(self) -> bool:
        # every product native (the int8 one: AVX-512 BW or AVX2) and attention through the prefill
        # kernel for decode rows too (AVX-512 BF16 or AVX2, head_dim % 16 == 0)
        return (self.invariant and native.has_gemv()
                and native.has_prefill_attention(self._head_dim)
                and (not self._int8 or native.has_gemv_int8())
                and (not self._int4 or native.has_gemv_int4()))

    @property
    def packs_weights(self) -> bool:
        # the native products read the plain weights; oneDNN's packed copies serve the large
        # steps of the fast path
        return not self.invariant or not native.has_gemv()

    def plan(self, model, batch) -> StepPlan:
        # every step, of 1 row or 1000, through the native products on the plain weights: a
        # row's sums have one order whatever shares its step (batch invariance; tiled, they
        # keep up with oneDNN's GEMM, native.c); torch's where they do not read the weights
        # (int8 on a CPU without AVX2). Not invariant: torch's products past a few rows
        # (FAST_MAX_ROWS), where they are faster (int8) or as fast (bf16, packed)
        gemv = native.has_gemv_int8() if model.int8 else native.has_gemv()
        if model.int4:  # the 4-bit weights through the native 4-bit product
            gemv = gemv and native.has_gemv_int4()
        if not self.invariant:
            gemv = gemv and batch.num_tokens <= FAST_MAX_ROWS["int8" if model.int8 else "bf16"]
        return StepPlan(model.plain if gemv else model.layers, model.rope, gemv=gemv)

    def _whole_step_inputs(self, model, kv_layers):
        c = self._cache
        if not c.made:
            c.table = native.layer_table(model.plain)
            c.ends = native.step_ends(model.w, model.lm_head_name, SCALE_SUFFIX)
            c.made = True
        if not c.kv or c.kv[0] is not kv_layers:
            groups = [g for g, _ in model.kv_places] if model.mixed_kv else None
            c.kv = (kv_layers, native.KVTable(kv_layers, groups))
        return c.table, c.ends, c.kv[1]

    def decode_step(self, model, batch, plan, kv_layers, lora) -> torch.Tensor | None:
        """Every layer of a decode step in one call (``native.decode_layers``), with the
        embedding and the head when every row samples; None where it does not apply
        (prefill rows, a weight it cannot read). The same kernels as the ops one by one."""
        tp, cfg = model.tp, model.cfg  # a TP rank: the all-reduces inside, through its shm
        if (not plan.gemv or batch.num_prefill_seqs or cfg.qk_norm_whole  # (OLMoE's norms)
                or cfg.activation not in ("silu", "gelu_tanh")
                or cfg.o_bias or cfg.attn_sinks  # (not in the step's call)
                or getattr(cfg, "num_experts", 0)  # its MLP is the model's loop
                or (lora is not None and lora.native is None)
                or (tp is not None and tp.shm is None)):
            return None
        table, ends, kv = self._whole_step_inputs(model, kv_layers)
        if table is None or table.norm_dtype != model.w["norm"].dtype:
            return None
        rows = batch.num_tokens
        exchange = None if tp is None else self._tp_table(tp)
        if exchange is not None and not exchange.fits(rows * cfg.hidden_size):
            return None
        if (exchange is not None and lora is not None  # its row-parallel shrinks' sums too
                and lora.native.max_rank > cfg.hidden_size):
            return None
        # the embedding and the head inside too, where every row samples (not under TP: the
        # vocabulary is split over the ranks, the embedding's sum and the logits' gather are
        # the model's; nor Gemma's scaled embedding and capped logits)
        whole = (exchange is None and ends is not None and batch.logits_indices.shape[0] == rows
                 and model.embed_normalizer is None and not cfg.final_softcap)
        if whole:
            x = torch.empty(rows, cfg.hidden_size, dtype=model.dtype)
        else:
            x = model.input_rows(batch.input_ids)
        out = native.decode_layers(
            x, table, cfg.num_layers, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.rms_norm_eps, model.rope, batch.positions, kv, batch.slot_pages,
            batch.slot_offsets, batch.decode_block_tables, batch.decode_context_lens,
            model.scale, model.w["norm"], batch.input_ids if whole else None,
            ends[0] if whole else None, ends[1] if whole else None,
            None if lora is None else lora.native_table(cfg.num_layers), tp=exchange,
            windows=model.windows, window_group=None if batch.window_group is None else (
                batch.window_group.slot_pages, batch.window_group.slot_offsets,
                batch.window_group.decode_block_tables),
            gelu=cfg.activation == "gelu_tanh", softcap=cfg.attn_softcap or 0.0,
            rope_local=None if model.local_flags is None else (model.rope_local,
                                                               model.local_flags))
        if whole:
            return out
        # (the vocabulary's columns gathered from the ranks; Gemma 2's cap)
        return model._logits(plan, batch.sampled_rows(out))

    def _tp_table(self, tp):
        c = self._cache
        if c.tp is None or c.tp.shm is not tp.shm:
            c.tp = native.TPTable(tp.shm)
        return c.tp

    def add_norm(self, x, delta, weight, eps):
        # (Gemma's 1 + weight, kept in float32: scaled in float32, rounded once)
        h = torch.empty_like(x)
        native.add_rmsnorm(x, delta, weight, eps, h)  # x += delta in place
        return x, h

    def final_norm(self, x, delta, weight, eps, batch):
        return batch.sampled_rows(self.add_norm(x, delta, weight, eps)[1])

    def experts(self, plan, h, lw, idx, top, cfg, lora=None, layer=0):
        # bf16, 4-bit or int8 experts in one native call (their rows through the step's
        # products, their biases, SiLU or gpt-oss's SwiGLU as the ops here compute them): the
        # loop's bits, without its ~40 ops a layer at batch 16; the adapters' expert terms in
        # it too, as native.lora computes a projection's (the loop: torch's per row)
        if (not plan.gemv or cfg.activation not in ("silu", "swiglu_oai")
                or h.dtype != torch.bfloat16):
            return None
        tables = self._cache.experts  # per layer (its weights' dict, kept), until the next bind
        if id(lw) not in tables:
            try:
                table = native.moe_table(*_native_experts(lw, cfg))
            except ValueError as e:  # a layout the call cannot read (act order, mixed): the loop
                logger.info("experts through the model's loop: %s", e)
                table = None
            tables[id(lw)] = (lw, table)
        table = tables[id(lw)][1]
        terms = None if lora is None or table is None else lora.native_experts()
        if table is None or (lora is not None and terms is None):
            return None
        swiglu = (cfg.swiglu_limit, cfg.swiglu_alpha) if cfg.activation == "swiglu_oai" else None
        return native.moe_experts(h, idx, top, table, swiglu, terms, layer)

    def linear(self, plan, x, w, name, bias=None):
        if not plan.gemv:
            return project(x, w, name, bias)
        gscale = w.get(name + GSCALE_SUFFIX)
        if gscale is not None:
            return native.gemv_int4(_in_weight_order(x, w, name), w[name], gscale,
                                    w.get(name + GOFFSET_SUFFIX), bias,
                                    w.get(name + GCODE_SUFFIX))
        scale = w.get(name + SCALE_SUFFIX)
        if scale is None:
            return native.gemv(x, w[name], bias)
        if scale.dtype == torch.bfloat16 and native.has_gemv_int8():
            return native.gemv_int8(x, w[name], scale, bias)
        return project(x, w, name, bias)

    def logits(self, plan, model, h):
        if plan.gemv:  # the plain lm_head through the GEMVs
            return self.linear(plan, h, model.w, model.lm_head_name).float()
        return super().logits(plan, model, h)

    def rope_kv(self, plan, cfg, qkv, lw, k_cache, v_cache, batch):
        """RoPE and the KV write in place in qkv (after q's and k's norms: per head, Qwen3
        and Gemma 3; whole vectors, OLMoE); returns qkv (q leads each row)."""
        if getattr(cfg, "qk_norm_whole", False):  # OLMoE: torch's norms over all of q and k
            qkv = _olmoe_qkv(cfg, qkv, lw)  # (row by row), then the clip
        elif cfg.qk_norm:  # each head's row normed alone: the same whatever shares the step
            # (in place, as decode_layers does; Gemma 3's weights float32, 1 + weight)
            native.head_norms(qkv, 0, cfg.num_heads, cfg.head_dim, lw["q_norm"],
                              cfg.rms_norm_eps)
            native.head_norms(qkv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                              lw["k_norm"], cfg.rms_norm_eps)
        native.rope_kv(qkv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, plan.rope,
                       batch.positions, k_cache, v_cache, batch.slot_pages, batch.slot_offsets)
        return qkv

    def attention(self, cfg, q, k_cache, v_cache, batch, scale, window: int = 0,
                  softcap: float | None = None, sinks: torch.Tensor | None = None):
        """``window``: a token sees only its last ``window`` keys (0: all); ``sinks``
        (gpt-oss): each head's logit beside the scores; ``softcap`` (Gemma 2): scores become
        cap tanh(s / cap); all in the native kernels (a build without the prefill kernel:
        prefill steps through the fixed-order torch attention, kernels.fixed)."""
        def fixed_order():  # every row by kernels.fixed's attention
            qh = q[:, : cfg.q_size].reshape(-1, cfg.num_heads, cfg.head_dim)
            return fixed.attention(qh, k_cache, v_cache, batch, scale, window,
                                   softcap, sinks).reshape(qh.shape[0], cfg.q_size)

        shaped = bool(window) or sinks is not None or bool(softcap)
        if shaped and batch.num_prefill_seqs and not native.has_prefill_attention(cfg.head_dim):
            return fixed_order()  # (the torch prefill path has no window, sinks nor cap)
        nd = batch.num_decode
        parts = []
        if nd:
            parts.append(native.decode_attention(
                q[:nd], cfg.num_heads, k_cache, v_cache, batch.decode_block_tables,
                batch.decode_context_lens, scale, window, sinks, softcap or 0.0))
        if batch.num_prefill_seqs:
            o = None
            if native.has_prefill_attention(cfg.head_dim):  # flash-style, on the pages
                o = native.prefill_attention(
                    q[nd:], cfg.num_heads, k_cache, v_cache, batch.prefill_block_tables,
                    batch.prefill_cu_seqlens, batch.prefill_context_lens, scale, window, sinks,
                    softcap or 0.0)
            if o is None and shaped:  # (out of memory) the fixed-order attention: it takes
                # windows, sinks and caps
                return fixed_order()
            if o is None:
                qp = q[nd:, : cfg.q_size].view(-1, cfg.num_heads, cfg.head_dim)
                o = super().prefill_attention(
                    qp, k_cache, v_cache, batch.prefill_block_tables, batch.prefill_cu_seqlens,
                    batch.prefill_context_lens, scale).reshape(qp.shape[0], cfg.q_size)
            parts.append(o)
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # [T, q_size]

    def silu_mul(self, gate_up):
        return native.silu_mul(gate_up)

    def act_mul(self, gate_up, kind):
        if kind == "gelu_tanh":  # Gemma's GeGLU (decode_layers' too)
            return native.gelu_tanh_mul(gate_up)
        return super().act_mul(gate_up, kind)

    def swiglu(self, gate_up, limit, alpha):
        if gate_up.dtype != torch.bfloat16:
            return super().swiglu(gate_up, limit, alpha)
        return native.swiglu_oai(gate_up, limit, alpha)


def _olmoe_qkv(cfg, qkv: torch.Tensor, lw) -> torch.Tensor:
    """qkv with q and k each normed as one vector (OLMoE's q_norm, k_norm) and every part
    clipped to ``clip_qkv`` where the model sets it (transformers' order)."""
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    eps = cfg.rms_norm_eps
    out = torch.cat([reference.rms_norm(q, lw["q_norm"], eps),
                     reference.rms_norm(k, lw["k_norm"], eps), v], dim=-1)
    if cfg.clip_qkv is not None:
        out.clamp_(min=-cfg.clip_qkv, max=cfg.clip_qkv)
    return out


def select(device: torch.device, dtype: torch.dtype, cfg, kernels: str = "auto",
           use_native: bool = True, batch_invariant: bool = True) -> TorchOps:
    """The backend for a model of ``cfg`` with activations of ``dtype`` on ``device``:
    Triton on CUDA where it is installed (or ``kernels="triton"``), the native kernels for
    bf16 on CPU where they built, passed their check and take the model's sizes, torch
    elsewhere (``kernels="reference"``: the reference attention too)."""
    if kernels == "reference":
        return TorchOps(reference_only=True)
    # features the Triton kernels lack (Gemma's norms, GeGLU, soft caps; windows and sinks
    # they take): the torch ops; the native ones take them op by op (NativeOps: torch's
    # where it has no kernel of its own: Gemma's float32 norms, GeGLU)
    torch_only = getattr(cfg, "torch_only", False)
    invariant_torch = TorchOps(invariant=batch_invariant and device.type == "cpu", dtype=dtype)
    if kernels == "triton" or (device.type == "cuda" and triton_available()):
        return invariant_torch if torch_only else TritonOps()
    cpu_bf16 = (use_native and device.type == "cpu" and dtype == torch.bfloat16
                and native.available())
    if (cpu_bf16 and native.supports(device, dtype, cfg.hidden_size, cfg.intermediate_size,
                                cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)):
        return NativeOps(cfg.head_dim, batch_invariant)
    if torch_only:
        return invariant_torch
    # the fixed-order torch ops on CPU (CUDA's invariant kernels: issue 32)
    return TorchOps(fused_lora=cpu_bf16, invariant=batch_invariant and device.type == "cpu",
                    dtype=dtype)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
