"""Model folders: flat-buffer layout, and clear errors naming the file for bad folders."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from gpupool import ModelLoadError
from gpupool.models.config import ModelConfig
from gpupool.models.loader import load_flat_weights
from gpupool.pool.weights import ALIGN_BYTES, WeightLayout
from tests.factories import make_engine


def test_weights_are_views_into_one_aligned_buffer(tiny_models):
    folder = tiny_models("qwen2")
    cfg = ModelConfig.from_folder(folder)
    layout, buf = load_flat_weights(folder, cfg, torch.float32)
    views = layout.views(buf)
    ptr = buf.data_ptr()
    for spec in layout.specs:
        v = views[spec.name]
        assert ptr <= v.data_ptr() < ptr + layout.num_bytes
        assert (v.data_ptr() - ptr) % ALIGN_BYTES == 0
    ckpt = load_file(str(folder / "model.safetensors"))
    q = ckpt["model.layers.1.self_attn.q_proj.weight"]
    v = ckpt["model.layers.1.self_attn.v_proj.weight"]
    qkv = views["layers.1.qkv_weight"]
    assert torch.equal(qkv[: q.shape[0]], q) and torch.equal(qkv[-v.shape[0]:], v)
    assert torch.equal(views["layers.1.qkv_bias"][-v.shape[0]:],
                       ckpt["model.layers.1.self_attn.v_proj.bias"])
    buf.zero_()  # the views see the buffer, not copies
    assert views["layers.1.qkv_weight"].abs().sum() == 0


def test_layout_rejects_a_short_buffer():
    layout = WeightLayout.build({"a": (3, 5)}, torch.float32)
    with pytest.raises(ValueError):
        layout.views(torch.empty(layout.num_bytes - 1, dtype=torch.uint8))


def _copy(tiny_models, tmp_path, variant="llama"):
    dst = tmp_path / "model"
    shutil.copytree(tiny_models(variant), dst)
    return dst


def _load_error(folder) -> str:
    engine = make_engine()
    try:
        with pytest.raises(ModelLoadError) as e:
            engine.add_model("bad", folder)
        return str(e.value)
    finally:
        engine.shutdown()


def test_unsupported_architecture(tiny_models, tmp_path):
    folder = _copy(tiny_models, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    msg = _load_error(folder)
    assert "unsupported architecture" in msg and "config.json" in msg


def test_corrupt_weight_file_is_named(tiny_models, tmp_path):
    folder = _copy(tiny_models, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    msg = _load_error(folder)
    assert "model.safetensors" in msg and "corrupt" in msg


def test_missing_shard_is_named(tiny_models, tmp_path):
    folder = _copy(tiny_models, tmp_path)
    index = {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model-00002-of-00002.safetensors" in _load_error(folder)


def test_missing_tensor_and_wrong_shape(tiny_models, tmp_path):
    from safetensors.torch import save_file

    folder = _copy(tiny_models, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.weight" in _load_error(folder)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(folder / "model.safetensors"))
    assert "shape" in _load_error(folder)


def test_pickle_only_folder_is_refused(tiny_models, tmp_path):
    folder = _copy(tiny_models, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    assert "safetensors" in _load_error(folder)


def test_sharded_checkpoint_loads_like_the_single_file(tiny_models, tmp_path):
    from safetensors.torch import save_file

    folder = _copy(tiny_models, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / fname))
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = ModelConfig.from_folder(folder)
    layout, buf = load_flat_weights(folder, cfg, torch.float32)
    ref_layout, ref = load_flat_weights(tiny_models("llama"), cfg, torch.float32)
    assert torch.equal(buf, ref)


def test_transformers5_and_4_rope_spellings_agree():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    v4 = ModelConfig.from_dict({**base, "rope_theta": 5e5, "rope_scaling": scaling})
    v5 = ModelConfig.from_dict({**base, "rope_parameters": {**scaling, "rope_theta": 5e5}})
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.rope_scaling["rope_type"] == "llama3"


def test_sliding_windows_are_read_as_transformers_applies_them():
    """Mistral, Mixtral, Phi-3 and Qwen3-MoE window every layer when sliding_window is set;
    Qwen2 and Qwen3 only with use_sliding_window, on the layers layer_types names (else from
    max_window_layers on); Llama and OLMoE never. A window does not cap the context (every
    attention kernel honours it): the checks against transformers are tests/test_parity.py's
    mistral and qwen2_window variants."""
    import transformers

    base = {"vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 4, "num_attention_heads": 2, "max_position_embeddings": 512,
            "sliding_window": 64}
    experts = {"num_local_experts": 4, "num_experts": 4, "num_experts_per_tok": 2}
    for arch in ("MistralForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM"):
        cfg = ModelConfig.from_dict({**base, **experts, "architectures": [arch]})
        assert cfg.layer_windows == (64,) * 4 and cfg.max_model_len == 512, arch
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "Qwen3MoeForCausalLM"):  # (the Qwens: use_sliding_window off)
        assert not any(ModelConfig.from_dict({**base, **experts,
                                              "architectures": [arch]}).layer_windows)
    moe = ModelConfig.from_dict({**base, **experts, "architectures": ["Qwen3MoeForCausalLM"],
                                 "use_sliding_window": True})
    assert moe.layer_windows == (64,) * 4
    for arch, cls in (("Qwen2ForCausalLM", "Qwen2Config"), ("Qwen3ForCausalLM", "Qwen3Config")):
        on = {**base, "architectures": [arch], "use_sliding_window": True,
              "max_window_layers": 3}
        hf = getattr(transformers, cls)(**{k: v for k, v in on.items() if k != "architectures"})
        want = tuple(64 if t == "sliding_attention" else 0 for t in hf.layer_types)
        assert ModelConfig.from_dict(on).layer_windows == want == (0, 0, 0, 64), arch
        types = ["sliding_attention", "full_attention"] * 2
        assert ModelConfig.from_dict({**on, "layer_types": types}).layer_windows == (
            64, 0, 64, 0)
