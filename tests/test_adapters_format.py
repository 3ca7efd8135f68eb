"""PEFT adapter folders that gpupool must refuse with a clear error (never serve wrongly)."""

import json
import shutil

import pytest

from gpupool import AdapterError, SamplingParams
from tests.factories import make_engine, make_peft_adapter, random_prompts


@pytest.fixture(scope="module")
def base(tiny_models):
    return tiny_models("llama")


@pytest.fixture(scope="module")
def engine(base):
    e = make_engine(base, name="base", max_lora_rank=16)
    yield e
    e.shutdown()


def _refused(engine, path, match):
    with pytest.raises(AdapterError, match=match):
        engine.add_adapter("bad", "base", path)
    assert "bad" not in engine.adapters
    engine.check_integrity()


@pytest.mark.parametrize("extra,match", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "bias"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
])
def test_unsupported_peft_features(engine, base, tmp_path, extra, match):
    path = make_peft_adapter(base, tmp_path / "a", 4, ["q_proj", "v_proj"], **extra)
    _refused(engine, path, match)


def test_embedding_lora_is_refused(engine, base, tmp_path):
    path = make_peft_adapter(base, tmp_path / "a", 4, ["embed_tokens", "q_proj"])
    _refused(engine, path, "embed_tokens")


def test_rank_above_the_maximum(engine, base, tmp_path):
    path = make_peft_adapter(base, tmp_path / "a", 32, ["q_proj"])
    _refused(engine, path, "max_lora_rank")


def test_pickle_weights_and_missing_files(engine, base, tmp_path):
    path = make_peft_adapter(base, tmp_path / "a", 4, ["q_proj"])
    _refused(engine, tmp_path / "nowhere", "does not exist")
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    _refused(engine, path, "pickle")
    (path / "adapter_model.bin").write_bytes(b"junk")
    (path / "adapter_model.safetensors").write_bytes(b"\x00junk")
    _refused(engine, path, "corrupt")
    (path / "adapter_config.json").unlink()
    _refused(engine, path, "adapter_config.json")


def test_adapter_of_another_base_shape(engine, tiny_models, tmp_path):
    other = tiny_models("qwen3")  # head_dim 32: q_proj is 64 -> 128
    path = make_peft_adapter(other, tmp_path / "a", 4, ["q_proj"])
    _refused(engine, path, "shape")


def test_engine_keeps_serving_after_refusals(engine, base, tmp_path):
    path = make_peft_adapter(base, tmp_path / "ok", 8, ["q_proj", "down_proj"], seed=3)
    cfg = json.loads((path / "adapter_config.json").read_text())
    bad = tmp_path / "dora"
    shutil.copytree(path, bad)
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    _refused(engine, bad, "DoRA")
    engine.add_adapter("ok", "base", path)
    out = engine.generate(random_prompts(1, 5, 5)[0],
                          SamplingParams(max_tokens=4, ignore_eos=True), model="ok")[0]
    assert len(out.token_ids) == 4
    engine.remove_adapter("ok")
