"""The Llama-family forward pass (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM).

Weights are views into the model's flat buffer (:meth:`LlamaModel.bind`); the model owns no
memory of its own besides the rotary table. Attention reads and writes the paged KV view
``[num_pages, num_layers, 2, block_tokens, num_kv_heads, head_dim]`` it is handed (a model
mixing global and windowed layers: one such view a group, :func:`kv_views`). Every op
of a step goes through the model's kernel backend (:mod:`gpupool.kernels.backend`), chosen
once when the model is made: one layer loop whatever runs it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from gpupool.kernels import backend, quant4, reference
from gpupool.kernels.backend import TorchOps
from gpupool.kernels.linear import pack
from gpupool.models.batch import ForwardBatch
from gpupool.models.config import ModelConfig
from gpupool.models.rope import cos_sin_table, rope_table
from gpupool.pool.weights import GOFFSET_SUFFIX, GSCALE_SUFFIX, SCALE_SUFFIX

LINEAR_WEIGHTS = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")


def _packed(weight: torch.Tensor) -> torch.Tensor:
    packed = pack(weight)
    return weight if packed is None else packed


class LlamaModel:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 ops: TorchOps | None = None):
        """``ops``: the kernel backend (default: :func:`gpupool.kernels.backend.select`'s
        choice for this device, dtype and model, the engine's defaults)."""
        self.cfg = cfg
        self.dtype = dtype
        self.device = device
        self.scale = cfg.attn_scale or cfg.head_dim**-0.5
        # Gemma: the embedding times sqrt(hidden_size) rounded to the model's dtype (as
        # transformers multiplies), and each layer's window and score soft-capping
        self.embed_normalizer = (torch.full((), cfg.hidden_size**0.5, dtype=dtype,
                                            device=device) if cfg.embed_scale else None)
        windows = list(cfg.layer_windows or [0] * cfg.num_layers)
        self.attn_options = [{**({"window": w} if w else {}),
                              **({"softcap": cfg.attn_softcap} if cfg.attn_softcap else {})}
                             for w in windows]
        # each layer's sliding window for the native decode step (None: no layer has one)
        self.windows = torch.tensor(windows, dtype=torch.int64) if any(windows) else None
        # [pos, 2, D]; LongRoPE's long rows after the short ones (rope.rope_table)
        self.rope = rope_table(cfg, cfg.max_model_len, dtype, device)
        self.rope_long_offset = cfg.max_model_len
        # Gemma 3: the windowed layers' own rope base (plain rotation)
        self.rope_local = (cos_sin_table(dataclasses.replace(
            cfg, rope_theta=cfg.rope_local_theta, rope_scaling={}), cfg.max_model_len, dtype,
            device) if cfg.rope_local_theta else None)
        self.local_layers = [bool(w) and self.rope_local is not None
                             for w in (cfg.layer_windows or [0] * cfg.num_layers)]
        # the same flags for the native whole-step decode (None: no local rotary table)
        self.local_flags = (torch.tensor(self.local_layers, dtype=torch.int64)
                            if self.rope_local is not None else None)
        # global and windowed layers mixed: each layer's KV group (0 global, 1 windowed: its
        # own pages, block tables and slots, ForwardBatch.window_group) and place in it
        groups = cfg.kv_groups
        self.kv_places = [(0, 0)] * cfg.num_layers
        for g, layers in enumerate(groups):
            for j, layer in enumerate(layers):
                self.kv_places[layer] = (g, j)
        self.mixed_kv = len(groups) > 1
        self.ops = ops if ops is not None else backend.select(device, dtype, cfg)
        self.w: dict[str, torch.Tensor] = {}
        self.layers: list[dict[str, torch.Tensor]] = []
        self.plain: list[dict[str, torch.Tensor]] = []  # the layers' weight views, unpacked
        self.head: torch.Tensor | None = None  # the lm_head weight (maybe packed)
        self.packed = False  # pack_weights() ran since the last bind
        self.int8 = False  # every linear weight int8 (set by bind)
        self.int4 = False  # some weight 4-bit (set by bind)
        # tensor parallelism (models/tp.py): this rank's group; cfg is then its shard's
        self.tp = None
        self._kv: tuple | None = None  # (kv, its per-layer (K, V) views)
        self._normed = None  # the config after OLMoE's norms on a rank (_cfg_normed)

    def bind(self, views: dict[str, torch.Tensor]) -> None:
        """Point the model at a set of weight views (e.g. after a swap); no copy."""
        self.w = views
        self.layers = [
            {k.split(".", 2)[2]: v for k, v in views.items() if k.startswith(f"layers.{i}.")}
            for i in range(self.cfg.num_layers)
        ]
        self.head = views[self.lm_head_name]
        self.plain = [dict(lw) for lw in self.layers]  # the views, whatever packing does
        self.packed = False
        # int8 weight-only: every linear weight and the lm_head carry row scales
        self.int8 = self.lm_head_name + SCALE_SUFFIX in views and all(
            name + SCALE_SUFFIX in lw for lw in self.layers for name in LINEAR_WEIGHTS
            if name in lw)
        self.int4 = any(k.endswith(GSCALE_SUFFIX) for k in views)
        self.ops.bind(self)

    def pack_weights(self) -> None:
        """On CPU in bf16, the linear layers' weights and the lm_head packed for oneDNN
        (``kernels.linear.pack``: bit-identical results, 1.2-2.8x faster products; copies
        held until the next ``bind`` or ``unbind``). About a copy of the weights' bytes:
        SmolLM2 took 90-110 ms here, so the worker packs a model only once it has stayed
        resident a while. Elsewhere nothing changes."""
        if self.packed or not self.layers or not self.ops.packs_weights:
            return
        quantized = (SCALE_SUFFIX, GSCALE_SUFFIX)  # int8 and 4-bit weights stay as they are
        if all(self.lm_head_name + q not in self.w for q in quantized):
            self.head = _packed(self.head)
        for lw in self.layers:
            for name in LINEAR_WEIGHTS:
                if name in lw and all(name + q not in lw for q in quantized):
                    lw[name] = _packed(lw[name])
        self.packed = True

    def unbind(self) -> None:
        """Forget the weights (evicted: the views' slab now holds another model, and packed
        copies would hold host memory): the next ``bind`` brings them back."""
        self.w, self.layers, self.plain, self.head, self.packed = {}, [], [], None, False
        self.int8 = self.int4 = False
        self.ops.bind(self)

    @property
    def lm_head_name(self) -> str:
        return "embed_tokens" if self.cfg.tie_word_embeddings else "lm_head"

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        gscale = self.w.get("embed_tokens" + GSCALE_SUFFIX)
        if gscale is not None:  # 4-bit rows (tied with a 4-bit lm_head): their float32 values
            return quant4.dequantize(self.w["embed_tokens"], gscale,
                                     self.w["embed_tokens" + GOFFSET_SUFFIX], ids).to(self.dtype)
        x = F.embedding(ids, self.w["embed_tokens"])
        scale = self.w.get("embed_tokens" + SCALE_SUFFIX)
        if scale is not None:  # int8 rows (tied with an int8 lm_head)
            x = x.to(self.dtype) * scale[ids, None]
        return x

    def input_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The first layer's input: the embedding (over the ranks' vocabularies under TP),
        times Gemma's scale."""
        x = self._embed_tp(ids) if self.tp else self.embed(ids)
        if self.embed_normalizer is not None:
            x = x * self.embed_normalizer
        return x

    def _embed_tp(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding split by vocabulary: each rank's rows of the ids it holds, zeros for
        the others, added over the ranks."""
        v = self.cfg.vocab_size  # this rank's share
        local = ids - self.tp.rank * v
        mine = (local >= 0) & (local < v)
        x = self.embed(torch.where(mine, local, torch.zeros_like(local)))
        return self.tp.all_reduce(x * mine[:, None].to(x.dtype))

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: torch.Tensor, lora=None):
        """Logits [len(batch.logits_indices), vocab] in float32. A batch with rows that pool
        (``batch.pooling``: index tensors splitting those rows into the ones that sample and
        the ones that pool) gives the pair (logits of the first; the final norm's output of
        the second, [rows, hidden size] in the model's dtype: what embeddings pool).

        ``lora``: a :class:`gpupool.adapters.batch.LoraBatch` adding each row's adapter
        terms after every fused projection, or None for a base-only batch.
        """
        ops, eps = self.ops, self.cfg.rms_norm_eps
        kv_layers = self._kv_layers(kv)
        plan = ops.plan(self, batch)
        hidden = batch.pooling
        logits = (None if hidden is not None
                  else ops.decode_step(self, batch, plan, kv_layers, lora))
        if logits is not None:  # the backend ran the whole step in one call
            return logits
        x = self.input_rows(batch.input_ids)
        delta = None  # the previous layer's MLP output, added to x by the next norm
        plans = (plan, self._local_plan(plan, batch))
        batches = (batch, batch.window_group) if self.mixed_kv else (batch,)
        if batches[-1] is None:
            raise ValueError("a model with global and windowed layers needs the windowed "
                             "layers' pages in its batch (build_batch's window_tokens)")
        for i, lw in enumerate(plan.layers):
            x, delta = self._layer(plans[self.local_layers[i]], x, delta, lw, kv_layers[i],
                                   batches[self.kv_places[i][0]], lora, i)
        h = ops.final_norm(x, delta, self.w["norm"], eps, batch)  # the rows that sample
        if hidden is None:
            return self._logits(plan, h)
        samples, pools = hidden
        logits = (self._logits(plan, h[samples]) if samples.numel()
                  else h.new_zeros(0, self.cfg.vocab_size, dtype=torch.float32))
        return logits, h[pools]

    def _layer(self, plan, x, delta, lw, kv, batch: ForwardBatch, lora, i):
        """One decoder layer: (the residual stream, the MLP's output the next norm adds)."""
        ops, cfg, eps = self.ops, self.cfg, self.cfg.rms_norm_eps
        x, h = ops.add_norm(x, delta, lw["input_norm"], eps)
        o = self._attention(plan, h, lw, kv, batch, lora, i)  # [T, q_size]
        out = ops.linear(plan, o, lw, "o_weight", lw.get("o_bias"))  # (no bias over ranks)
        if self.tp is not None:  # row-parallel: the ranks' partial sums added
            out = self.tp.all_reduce(out)
        if lora is not None:
            lora.apply(i, "o", o, out)
        if cfg.sandwich_norms:  # Gemma 2: the attention's output normed, then the MLP's norm
            out = ops.add_norm(out, None, lw["post_norm"], eps)[1]
            x, h = ops.add_norm(x, out, lw["pre_ff_norm"], eps)
        else:
            x, h = ops.add_norm(x, out, lw["post_norm"], eps)
        if cfg.moe_layers and cfg.moe_layers[i]:
            delta = self._experts(plan, h, lw, lora, i)
            if self.tp is not None:  # each rank's share of every expert: partial sums
                delta = self.tp.all_reduce(delta)
        else:
            gate_up = ops.linear(plan, h, lw, "gate_up_weight")  # [T, 2 * inter]
            if lora is not None:
                lora.apply(i, "gate_up", h, gate_up)
            act = self._act(gate_up)
            delta = ops.linear(plan, act, lw, "down_weight")
            if self.tp is not None:
                delta = self.tp.all_reduce(delta)
            if lora is not None:
                lora.apply(i, "down", act, delta)
        if cfg.sandwich_norms:
            delta = ops.add_norm(delta, None, lw["post_ff_norm"], eps)[1]
        return x, delta

    def _local_plan(self, plan, batch: ForwardBatch):
        """The plan of the windowed layers: their own rotary rows (Gemma 3), else ``plan``."""
        if self.rope_local is None:
            return plan
        cos_sin = self.rope_local[batch.positions]
        return dataclasses.replace(plan, rope=self.rope_local, cos=cos_sin[:, 0:1],
                                   sin=cos_sin[:, 1:2])

    def _experts(self, plan, h: torch.Tensor, lw, lora=None, layer: int = 0) -> torch.Tensor:
        """A mixture-of-experts MLP: each token's top experts by the router's softmax, their
        outputs weighted (rounded to h's dtype) and added in float32 in ascending expert
        order from zero, rounded once (as transformers adds them in its dtype: the same in
        float32), each expert's rows through the step's products (row-invariant: a token's
        sum is the same whatever shares its experts). A backend may run them in one call,
        ``ops.experts``: the native one gives this loop's bits; Triton's grouped GEMM its own,
        row-invariant too (a step with expert LoRA takes this loop there: torch's products).
        LoRA on the experts (``lora.experts``: a step's adapter has some): each expert's rows
        get their adapters' terms after its gate_up and its down product: in the native call
        (``LoraBatch.native_experts``), else here (``LoraBatch.apply_expert``)."""
        ops, cfg = self.ops, self.cfg
        logits = ops.linear(plan, h, lw, "router_weight", lw.get("router_bias"))
        if cfg.router_topk_first:  # gpt-oss: the top logits' softmax, in h's dtype
            top, idx = torch.topk(logits, cfg.experts_per_tok, dim=-1)
            top = torch.softmax(top, dim=-1, dtype=top.dtype)
        else:
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)
            top, idx = torch.topk(probs, cfg.experts_per_tok, dim=-1)
            if cfg.norm_topk_prob:
                top = top / top.sum(dim=-1, keepdim=True)
        top = top.to(h.dtype)
        adapted = lora is not None and lora.experts
        fused = ops.experts(plan, h, lw, idx, top, cfg, lora if adapted else None, layer)
        if fused is not None:
            return fused
        if not adapted and h.shape[0] == 1:  # one row (batch-1 decode): the same sums
            return self._one_rows_experts(plan, h, lw, top, idx)
        # the (row, choice) pairs grouped by expert (ascending; rows ascending within one):
        # one gather of the rows, each expert's rows a slice; each weighted output put at
        # its row's place k of its experts in ascending order, the k places added in order
        order, rows, place = reference.expert_order(idx)
        xs, ws = h.index_select(0, rows), top.reshape(-1).index_select(0, order)
        parts, start = [], 0
        for e, n in enumerate(torch.bincount(idx.reshape(-1),
                                             minlength=cfg.num_experts).tolist()):
            if n:
                gate_up = ops.linear(plan, xs[start : start + n], lw,
                                     f"experts.{e}.gate_up_weight",
                                     lw.get(f"experts.{e}.gate_up_bias"))
                if adapted:
                    lora.apply_expert(layer, "experts_gate_up", e, rows[start : start + n],
                                      xs[start : start + n], gate_up)
                act = self._act(gate_up)
                y = ops.linear(plan, act, lw, f"experts.{e}.down_weight",
                               lw.get(f"experts.{e}.down_bias"))
                if adapted:
                    lora.apply_expert(layer, "experts_down", e, rows[start : start + n], act, y)
                parts.append(y * ws[start : start + n, None])
                start += n
        return reference.sum_in_expert_order(torch.cat(parts), rows, place, tuple(idx.shape))

    def _act(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The MLP's activation of [gate | up]: the backend's, or gpt-oss's clamped SwiGLU."""
        return self.ops.mlp_act(gate_up, self.cfg)

    def _one_rows_experts(self, plan, h, lw, top, idx):
        """:meth:`_experts` for a single row: its experts in ascending order, each weighted
        output added to a float32 zero in that order as the general path does, without its
        sorts, gathers and scatters (a dozen small ops a layer fewer)."""
        ops = self.ops
        acc = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        for e, p in sorted(zip(idx[0].tolist(), range(idx.shape[1]))):
            gate_up = ops.linear(plan, h, lw, f"experts.{e}.gate_up_weight",
                                 lw.get(f"experts.{e}.gate_up_bias"))
            y = ops.linear(plan, self._act(gate_up), lw, f"experts.{e}.down_weight",
                           lw.get(f"experts.{e}.down_bias"))
            acc += (y * top[:, p, None]).float()
        return acc.to(h.dtype)

    def _logits(self, plan, h: torch.Tensor) -> torch.Tensor:
        logits = self.ops.logits(plan, self, h)
        if self.tp is not None:  # each rank's share of the vocabulary, whole rows gathered
            logits = self.tp.gather_columns(logits)
        cap = self.cfg.final_softcap
        if cap:  # as transformers: divide, tanh, multiply
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _attention(self, plan, h, lw, kv, batch: ForwardBatch, lora, i) -> torch.Tensor:
        """The attention block up to its output projection: [T, q_size]."""
        ops, cfg = self.ops, self.cfg
        qkv = ops.linear(plan, h, lw, "qkv_weight", lw.get("qkv_bias"))  # [T, q + 2kv]
        if lora is not None:
            lora.apply(i, "qkv", h, qkv)
        k_cache, v_cache = kv
        if self.tp is not None and cfg.qk_norm_whole:  # OLMoE on a rank: whole-vector norms
            qkv, cfg = self._qk_norm_tp(qkv, lw), self._cfg_normed()
        q = ops.rope_kv(plan, cfg, qkv, lw, k_cache, v_cache, batch)
        sinks = {"sinks": lw["sinks"]} if cfg.attn_sinks else {}
        return ops.attention(cfg, q, k_cache, v_cache, batch, self.scale,
                             **self.attn_options[i], **sinks)

    def _qk_norm_tp(self, qkv: torch.Tensor, lw) -> torch.Tensor:
        """OLMoE's q and k normed as whole vectors on a tensor-parallel rank (its q and k
        rows are the rank's heads): each row's sums of squares added over the ranks (in
        float32) before the norm (reference.rms_norm's rounding), then the clip (transformers'
        order); within rounding of the one-rank model's."""
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        sums = self.tp.all_reduce(torch.stack([q.float().pow(2).sum(-1),
                                               k.float().pow(2).sum(-1)], dim=-1))
        parts = []
        for x, s, w, size in ((q, sums[:, 0], lw["q_norm"], cfg.q_size),
                              (k, sums[:, 1], lw["k_norm"], cfg.kv_size)):
            xf = x.float() * torch.rsqrt(s / (size * self.tp.world) + eps)[:, None]
            parts.append((xf * w).to(x.dtype) if w.dtype == torch.float32
                         and x.dtype != torch.float32 else w * xf.to(x.dtype))
        out = torch.cat([*parts, v], dim=-1)
        if cfg.clip_qkv is not None:
            out.clamp_(min=-cfg.clip_qkv, max=cfg.clip_qkv)
        return out

    def _cfg_normed(self):
        """The config rope_kv sees after :meth:`_qk_norm_tp` (no norms left to apply)."""
        if self._normed is None:
            import dataclasses

            self._normed = dataclasses.replace(self.cfg, qk_norm=False, qk_norm_whole=False)
        return self._normed

    def _kv_layers(self, kv) -> list:
        """Each layer's (K, V) cache views: the same storage every step, so made once. ``kv``:
        the model's view, or its KV groups' (:func:`kv_views`)."""
        if self._kv is None or self._kv[0] is not kv:
            views = kv if isinstance(kv, tuple) else (kv,)
            if len(views) != 1 + self.mixed_kv:
                raise ValueError(f"{len(views)} KV views for {1 + self.mixed_kv} groups")
            self._kv = (kv, [(views[g][:, j, 0], views[g][:, j, 1]) for g, j in self.kv_places])
        return self._kv[1]


def kv_views(kv, cfg: ModelConfig, dtype: torch.dtype):
    """The model's view of the KV pages (``pool.kv.KVStorage``): one of every layer, or where
    global and windowed layers mix, a tuple of the two groups' (``ModelConfig.kv_groups``)."""
    groups = cfg.kv_groups
    if len(groups) == 1:
        return kv.model_view(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
    return kv.group_views(tuple(len(g) for g in groups), cfg.num_kv_heads, cfg.head_dim, dtype)
