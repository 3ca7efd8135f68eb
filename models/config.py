"""Model hyper-parameters read from a Hugging Face ``config.json``.

Accepts both the transformers 4 spelling (``rope_theta`` + ``rope_scaling``) and the
transformers 5 one (``rope_parameters``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from gpupool.models.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",  # fused qkv and gate_up checkpoints, LongRoPE, partial rotary
    "Gemma2ForCausalLM",  # sandwich norms, GeGLU, soft-capping, sliding-window layers
    "Gemma3ForCausalLM",  # Gemma 2's, q/k norms, a rope base of its own for sliding layers
    "Gemma3ForConditionalGeneration",  # its text model (config text_config)
    "MixtralForCausalLM",  # mixture of experts: softmax top-k routing, renormalised
    "Qwen3MoeForCausalLM",  # ... norm_topk_prob from the config, dense layers among them
    "OlmoeForCausalLM",  # ... q and k normed whole, an optional clip of q, k and v
    "GptOssForCausalLM",  # ... top-k then softmax, biases, clamped SwiGLU; attention sinks
)
MOE = {"MixtralForCausalLM": "block_sparse_moe.", "Qwen3MoeForCausalLM": "mlp.",
       "OlmoeForCausalLM": "mlp.", "GptOssForCausalLM": "mlp."}
GPT_OSS = "GptOssForCausalLM"
GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
OWN_INT4 = "gpupool_int4"  # a converted GGUF's 4-bit tensors (models/gguf.py, quantized.py)
# a 4-bit checkpoint's tensor names for one layer, by method: the layer's name + each suffix,
# the packed values first (models/quantized.py reads them, models/gguf.py writes gpupool's own,
# models/sizes.py counts them from the headers)
INT4_PARTS = {"gptq": (".qweight", ".qzeros", ".scales", ".g_idx"),
              "awq": (".qweight", ".qzeros", ".scales"),
              OWN_INT4: (".qweight4", ".scales4", ".offsets4")}


def int4_quantization_config(group: int) -> dict:
    """``config.json``'s ``quantization_config`` of a folder holding gpupool's own 4-bit
    tensors (a converted GGUF file)."""
    return {"quant_method": OWN_INT4, "bits": 4, "group_size": group}


def checkpoint_quant(cfg: dict, source: str) -> dict:
    """The checkpoint's 4-bit format from ``quantization_config`` ({} for none):
    method, group (-1: one group a row), zero_plus (GPTQ v1's +1), desc_act. Any other
    quantization is refused with its name."""
    qc = cfg.get("quantization_config")
    if not qc:
        return {}
    if not isinstance(qc, dict):
        raise ModelLoadError(f"{source}: quantization_config must be an object")
    method = str(qc.get("quant_method", "")).lower()
    bits = qc.get("bits", qc.get("w_bit", 4))
    group = qc.get("group_size", qc.get("q_group_size", 128))
    if method == "mxfp4":  # gpt-oss's experts: the loader finds their blocks and keeps them
        return {}  # 4-bit with the e2m1 codebook (quantized.mxfp4)
    if method not in ("gptq", "awq", OWN_INT4):
        raise ModelLoadError(f"{source}: quantization {method or qc!r} is not supported; "
                             "gpupool reads 4-bit GPTQ and AWQ checkpoints and GGUF files")
    if bits != 4 or not isinstance(group, int) or (group != -1 and (group <= 0 or group % 32)):
        raise ModelLoadError(f"{source}: {method} with {bits} bits and groups of {group} is "
                             "not supported (4 bits, groups a multiple of 32 or -1)")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm" or qc.get("zero_point", True) is False:
            raise ModelLoadError(f"{source}: AWQ {version} without zero points is not "
                                 "supported (AWQ gemm with zero points is)")
        return {"method": "awq", "group": group}
    if method == "gptq":
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ModelLoadError(f"{source}: GPTQ checkpoint_format {fmt!r} is not supported")
        return {"method": "gptq", "group": group, "zero_plus": 1 if fmt == "gptq" else 0,
                "desc_act": bool(qc.get("desc_act", False))}
    return {"method": OWN_INT4, "group": group}


ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _moe(cfg: dict, arch: str) -> dict:
    """A mixture of experts' fields of ModelConfig."""
    n = int(cfg["num_hidden_layers"])
    if arch in ("MixtralForCausalLM", GPT_OSS):  # every layer a mixture
        oss = arch == GPT_OSS  # the router's top-k logits, then their softmax; biases
        return {"num_experts": int(cfg["num_local_experts"]),
                "experts_per_tok": int(cfg["num_experts_per_tok"]),
                "moe_intermediate_size": int(cfg["intermediate_size"]),
                "norm_topk_prob": not oss, "router_topk_first": oss, "moe_bias": oss,
                "moe_layers": (True,) * n}
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense = set(cfg.get("mlp_only_layers") or ())
    experts = int(cfg.get("num_experts") or cfg["num_local_experts"])  # 4.x / 5.x names
    return {"num_experts": experts, "experts_per_tok": int(cfg["num_experts_per_tok"]),
            "moe_intermediate_size": int(cfg.get("moe_intermediate_size")
                                         or cfg["intermediate_size"]),
            "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
            "moe_layers": tuple(i not in dense and experts > 0 and (i + 1) % step == 0
                                for i in range(n))}


# sliding windows on the layers that layer_types names (else from max_window_layers on), as
# transformers' Qwen2 and Qwen3 configs; Mistral, Mixtral, Phi-3 and Qwen3-MoE window every
# layer when sliding_window is set
QWEN_WINDOWS = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
LAYER_TYPES = (*QWEN_WINDOWS[:2], GPT_OSS)  # windows where layer_types says (gpt-oss: every
# other layer from the first, by default)


def _gpt_oss(cfg: dict) -> dict:
    """gpt-oss's fields of ModelConfig beside its mixture's: the clamped SwiGLU, the sinks."""
    return {"activation": "swiglu_oai", "swiglu_limit": float(cfg.get("swiglu_limit", 7.0)),
            "swiglu_alpha": float(cfg.get("swiglu_alpha", 1.702)), "attn_sinks": True,
            "interleaved_gate_up": True}


def _sliding_window(cfg: dict, arch: str) -> int:
    """The config's sliding window where transformers' model of ``arch`` applies one, else 0
    (its Qwen configs drop it without use_sliding_window; Llama and OLMoE have none)."""
    if arch in QWEN_WINDOWS and not cfg.get("use_sliding_window", False):
        return 0
    if arch in ("LlamaForCausalLM", "OlmoeForCausalLM"):
        return 0
    return int(cfg.get("sliding_window") or 0)


def _windows(cfg: dict, window: int, arch: str) -> dict:
    """ModelConfig.layer_windows of a non-Gemma family, as transformers applies its
    sliding_window ({} where none)."""
    if window <= 0:
        return {}
    n = int(cfg["num_hidden_layers"])
    if arch in LAYER_TYPES:
        types = cfg.get("layer_types")
        if not isinstance(types, list) or len(types) != n:  # each family's default
            first = int(cfg.get("max_window_layers", 28))
            types = ["sliding_attention" if (i % 2 == 0 if arch == GPT_OSS else i >= first)
                     else "full_attention" for i in range(n)]
        windows = tuple(window if t == "sliding_attention" else 0 for t in types)
    else:
        windows = (window,) * n
    return {"layer_windows": windows} if any(windows) else {}


def _gemma(cfg: dict, window: int, arch: str) -> dict:
    """Gemma 2's and 3's fields of ModelConfig."""
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not supported")
    n = int(cfg["num_hidden_layers"])
    every = 2 if arch == "Gemma2ForCausalLM" else 6  # each such layer is a global one
    types = cfg.get("layer_types") or ["full_attention" if (i + 1) % every == 0
                                       else "sliding_attention" for i in range(n)]
    scalar = cfg.get("query_pre_attn_scalar")
    return {"norm_offset": True, "embed_scale": True, "sandwich_norms": True,
            "activation": ACTIVATIONS[act],
            "attn_scale": float(scalar) ** -0.5 if scalar else None,
            "attn_softcap": cfg.get("attn_logit_softcapping"),
            "final_softcap": cfg.get("final_logit_softcapping"),
            "layer_windows": tuple(window if t == "sliding_attention" else 0 for t in types),
            "rope_local_theta": _rope(cfg)[3] if arch != "Gemma2ForCausalLM" else None}


def _with_text_defaults(path, cfg: dict) -> dict:
    """A multimodal Gemma 3 config with its text_config completed by transformers' defaults
    (its config.json lists only what differs from them)."""
    try:
        from transformers import AutoConfig

        text = AutoConfig.from_pretrained(str(path)).text_config.to_dict()
    except Exception as e:  # noqa: BLE001 (whatever transformers raises for a bad config)
        raise ModelLoadError(f"{path}: cannot read the text model's config ({e})") from None
    return {**cfg, "text_config": text}


def _rope(cfg: dict) -> tuple[float, dict, float, float | None]:
    """(rope_theta, the scaling parameters ({} for none), partial_rotary_factor, the
    sliding layers' own base or None) of a config in either spelling (Gemma 3's per layer
    type ones: the global layers' are the model's)."""
    rope = dict(cfg.get("rope_parameters") or {})
    local = cfg.get("rope_local_base_freq")
    if isinstance(rope.get("full_attention"), dict):
        local = (rope.get("sliding_attention") or {}).get("rope_theta", local)
        rope = dict(rope["full_attention"])
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    if not scaling and rope.get("rope_type", "default") != "default":
        scaling = rope
    partial = float(cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor")
                    or scaling.get("partial_rotary_factor") or 1.0)
    scaling.pop("rope_theta", None)
    scaling.pop("partial_rotary_factor", None)
    if scaling.get("type") and not scaling.get("rope_type"):
        scaling["rope_type"] = scaling["type"]
    if scaling.get("rope_type", "default") == "default":
        scaling = {}
    elif scaling["rope_type"] in ("llama3", "yarn", "longrope"):  # (transformers' rule)
        if cfg.get("original_max_position_embeddings"):  # Phi-3's, beside the scaling
            scaling["original_max_position_embeddings"] = int(
                cfg["original_max_position_embeddings"])
        scaling.setdefault("original_max_position_embeddings",
                           int(cfg.get("max_position_embeddings", 2048)))
    return theta, scaling, partial, float(local) if local else None


@dataclass(frozen=True)
class ModelConfig:
    """What the Llama-family forward pass needs to know about a model."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q/k/v projections
    o_bias: bool = False  # attention_bias (Llama's spelling; not Qwen2): o_proj's bias too
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k
    fused_checkpoint: bool = False  # Phi-3: qkv_proj and gate_up_proj stored fused
    partial_rotary_factor: float = 1.0  # Phi-4-mini: RoPE on the first part of each head
    # Gemma 2: norms scale by (1 + weight) (the loader adds the 1), the embedding is scaled
    # by sqrt(hidden_size), a norm after attention and around the MLP ("sandwich"), GeGLU,
    # its own attention scale, tanh soft-capping of the scores and of the logits
    norm_offset: bool = False
    embed_scale: bool = False
    sandwich_norms: bool = False
    activation: str = "silu"  # or "gelu_tanh", or "swiglu_oai" (gpt-oss: clamped, below)
    swiglu_limit: float = 7.0  # gpt-oss: gate clamped above, up on both sides, at this
    swiglu_alpha: float = 1.702  # ... and act = (up + 1) * gate * sigmoid(alpha * gate)
    attn_sinks: bool = False  # gpt-oss: a learned logit a head beside every row's scores
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # each layer's sliding window (0: a global layer; () none), as transformers applies the
    # config's sliding_window per family (_windows, _gemma); every attention honours it
    layer_windows: tuple[int, ...] = ()
    rope_local_theta: float | None = None  # Gemma 3: the windowed layers' rope base
    # mixture of experts: each token's MLP is the routing-weighted sum of its top
    # experts_per_tok experts' (softmax over num_experts router logits; the top weights
    # renormalised with norm_topk_prob); moe_layers says which layers (others are dense)
    num_experts: int = 0
    experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    router_topk_first: bool = False  # gpt-oss: softmax over the top-k logits only
    moe_bias: bool = False  # gpt-oss: biases on the router and each expert's projections
    # gpt-oss: the checkpoint's expert gate_up interleaves gate and up outputs (0, 2, .. gate);
    # ours stacks them, so its rows (and an adapter's B rows for them) are split at load
    interleaved_gate_up: bool = False
    moe_layers: tuple[bool, ...] = ()
    qk_norm_whole: bool = False  # OLMoE: q and k normed as whole vectors, not per head
    clip_qkv: float | None = None  # OLMoE: q, k and v clipped to this magnitude
    # a 4-bit checkpoint's format (models/quantized.py: GPTQ, AWQ, a converted GGUF), or {}
    quant: dict = field(default_factory=dict, compare=False, hash=False)
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        sizes = {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                 "intermediate_size": self.intermediate_size, "num_layers": self.num_layers,
                 "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                 "head_dim": self.head_dim,
                 "max_position_embeddings": self.max_position_embeddings}
        bad = [k for k, v in sizes.items() if not 0 < v <= 1 << 24]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be positive (and below 2**24)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        rot = self.head_dim * self.partial_rotary_factor
        if not 0 < rot <= self.head_dim or rot != int(rot) or int(rot) % 2:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} must leave "
                             f"an even number of rotary dimensions of {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value}")

    @property
    def torch_only(self) -> bool:
        """Features the Triton kernels and the native whole-step decode lack (Gemma's): such
        a model runs on the torch ops on CUDA, and on the native ones op by op on CPU, torch's
        where they have no kernel (``kernels.backend.select``, ``NativeOps``). Not gpt-oss's:
        its activation is the model's own, Triton's attention takes its sinks and windows,
        and the whole-step decode refuses biases and sinks itself."""
        return bool(self.sandwich_norms or self.activation not in ("silu", "swiglu_oai")
                    or self.attn_softcap or self.final_softcap or self.embed_scale
                    or self.qk_norm_whole)

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (the first ones, as transformers)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_window(self) -> int:
        """The widest sliding window where every layer has one, else 0: how far back any
        token's attention reaches (the scheduler releases KV pages behind it)."""
        windows = self.layer_windows
        return max(windows) if windows and all(windows) else 0

    @property
    def kv_groups(self) -> tuple[tuple[int, ...], ...]:
        """The layers whose KV blocks share a page list: every layer, or where global and
        windowed layers mix (Gemma 2/3, gpt-oss, Qwen2 with max_window_layers) the global
        layers', then the windowed layers' (pages of their own, those behind the window
        released as a model windowed throughout releases its own)."""
        windows = self.layer_windows
        if not any(windows) or all(windows):
            return (tuple(range(self.num_layers)),)
        return (tuple(i for i, w in enumerate(windows) if not w),
                tuple(i for i, w in enumerate(windows) if w))

    @property
    def group_window(self) -> int:
        """The windowed layers' widest window where they are a KV group of their own
        (:attr:`kv_groups`), else 0."""
        return max(self.layer_windows) if len(self.kv_groups) > 1 else 0

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + output) the engine accepts for this model (sliding
        windows are honoured by every attention kernel: no cap at the window)."""
        return self.max_position_embeddings

    def tp_refusal(self, world: int) -> str | None:
        """Why ``world`` tensor-parallel ranks cannot shard this model (the counts that do not
        divide, named), or None (models/tp.py)."""
        if world <= 1:
            return None
        bad = []
        if self.num_heads % world:
            bad.append(f"{self.num_heads} attention heads")
        if self.num_kv_heads % world and world % self.num_kv_heads:
            bad.append(f"{self.num_kv_heads} KV heads")
        if self.intermediate_size % world:
            bad.append(f"intermediate size {self.intermediate_size}")
        if self.moe_intermediate_size % world:
            bad.append(f"expert intermediate size {self.moe_intermediate_size}")
        if self.vocab_size % world:
            bad.append(f"vocabulary of {self.vocab_size}")
        if bad:
            return (f"tensor parallelism over {world} ranks needs counts it divides: "
                    f"{', '.join(bad)} are not")
        if self.qk_norm_whole and self.num_kv_heads < world:
            return (f"{self.architecture}: whole-vector q/k norms (OLMoE's) over {world} ranks "
                    f"need a KV head a rank ({self.num_kv_heads} KV heads: replicated k rows "
                    "would count twice in k's norm)")
        if self.quant:  # a 4-bit checkpoint: o and down cut between whole groups
            group = self.quant["group"]
            if self.quant.get("desc_act"):
                return "act-order (desc_act) GPTQ checkpoints are not sharded"
            cuts = {"o_proj's input": self.q_size // world,
                    "down_proj's input": self.intermediate_size // world}
            if self.num_experts:
                cuts["the experts' down_proj input"] = self.moe_intermediate_size // world
            bad = [f"{name} of {n}" for name, n in cuts.items() if group == -1 or n % group]
            if bad:
                return (f"a 4-bit checkpoint's groups of {group} columns must not be cut: "
                        f"over {world} ranks, {', '.join(bad)} columns a rank are not whole "
                        "groups")
        return None

    def kv_bytes_per_token(self, element_bytes: int) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * element_bytes

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> ModelConfig:
        archs = cfg.get("architectures") or []
        archs = archs if isinstance(archs, list) else [archs]
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"gpupool supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if arch == "Gemma3ForConditionalGeneration":  # the text model's config
            text = cfg.get("text_config")
            if not isinstance(text, dict):
                raise ModelLoadError(f"{source}: {arch} without a text_config")
            cfg = {"tie_word_embeddings": cfg.get("tie_word_embeddings", True), **text,
                   "eos_token_id": cfg.get("eos_token_id", text.get("eos_token_id"))}
        try:
            num_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            head_dim = cfg.get("head_dim") or hidden // num_heads
            theta, scaling, partial, _ = _rope(cfg)
            window = _sliding_window(cfg, arch)
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rope_theta=theta,
                rope_scaling=scaling,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
                o_bias=arch != "Qwen2ForCausalLM" and bool(cfg.get("attention_bias", False)),
                qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM",
                                 *GEMMA[1:]),
                qk_norm_whole=arch == "OlmoeForCausalLM",
                clip_qkv=float(cfg["clip_qkv"]) if cfg.get("clip_qkv") is not None else None,
                fused_checkpoint=arch == "Phi3ForCausalLM",
                partial_rotary_factor=partial,
                **(_gemma(cfg, window, arch) if arch in GEMMA
                   else _windows(cfg, window, arch)),
                **(_moe(cfg, arch) if arch in MOE else {}),
                **(_gpt_oss(cfg) if arch == GPT_OSS else {}),
                quant=checkpoint_quant(cfg, source),
                torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
            raise ModelLoadError(f"{source}: malformed model config ({e!r})") from None

    @classmethod
    def from_folder(cls, path: str | Path) -> ModelConfig:
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{cfg_path}: no config.json in model folder")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise ModelLoadError(f"{cfg_path}: cannot read config ({type(e).__name__}: "
                                 f"{e})") from None
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{cfg_path}: must hold a JSON object, not "
                                 f"{type(cfg).__name__}")
        archs = cfg.get("architectures")
        if isinstance(archs, list) and "Gemma3ForConditionalGeneration" in archs:
            cfg = _with_text_defaults(path, cfg)
        if cfg.get("mlp_bias"):
            raise ModelLoadError(f"{cfg_path}: mlp_bias=true is not supported")
        gemma = isinstance(archs, list) and any(a in GEMMA for a in archs)
        if cfg.get("hidden_act", "silu") not in (("silu", *ACTIVATIONS) if gemma else ("silu",)):
            raise ModelLoadError(f"{cfg_path}: hidden_act {cfg['hidden_act']!r} not supported")
        return cls.from_dict(cfg, str(cfg_path))
