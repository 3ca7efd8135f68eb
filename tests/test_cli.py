"""``gpupool generate`` end to end, in a subprocess like a user runs it."""

import json
import subprocess
import sys

from tests.factories import make_engine


def _cli(*args, timeout=300):
    # float32: these compare tokens with make_engine's (float32) engine
    return subprocess.run([sys.executable, "-m", "gpupool.cli", "generate", "--dtype",
                           "float32", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_json_output_matches_the_engine(tiny_models):
    from gpupool import SamplingParams

    folder = tiny_models("qwen3")
    prompts = ["w5 w6 w7", "w40 w41"]
    r = _cli("--model", str(folder), "--prompt", prompts[0], "--prompt", prompts[1],
             "--max-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    engine = make_engine(folder)
    try:
        want = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    finally:
        engine.shutdown()
    assert [row["prompt"] for row in rows] == prompts
    assert [row["token_ids"] for row in rows] == [list(o.token_ids) for o in want]
    assert [row["text"] for row in rows] == [o.text for o in want]
    assert all(row["finish_reason"] in ("stop", "length") for row in rows)


def test_seeded_sampling_is_reproducible_across_processes(tiny_models):
    folder = str(tiny_models("llama"))
    args = ("--model", folder, "--prompt", "w9 w10", "--max-tokens", "8", "--temperature",
            "1.0", "--seed", "7", "--json")
    a, b = _cli(*args), _cli(*args)
    assert a.returncode == 0 and json.loads(a.stdout) == json.loads(b.stdout)


def test_errors_exit_non_zero_with_a_message(tiny_models):
    r = _cli("--model", "/no/such/folder", "--prompt", "hi")
    assert r.returncode != 0 and "does not exist" in r.stderr
    r = _cli("--model", str(tiny_models("llama")), "--prompt", "hi", "--max-tokens", "0")
    assert r.returncode != 0 and "max_tokens" in r.stderr


def test_default_model_with_chat_template(smollm2_path):
    r = _cli("--prompt", "What is the capital of France?", "--chat", "--max-tokens", "12",
             "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert "Paris" in row["text"]


def test_adapter_flag_matches_the_engine(tiny_models, tmp_path):
    from gpupool import SamplingParams
    from tests.factories import make_peft_adapter

    base = tiny_models("llama")
    adapter = make_peft_adapter(base, tmp_path / "a", 8, ["q_proj", "v_proj", "down_proj"])
    r = _cli("--model", str(base), "--adapter", str(adapter), "--prompt", "w5 w6 w7",
             "--max-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    engine = make_engine(base, name="b", max_lora_rank=8)
    try:
        engine.add_adapter("a", "b", adapter)
        want = engine.generate("w5 w6 w7", SamplingParams(max_tokens=6, temperature=0),
                               model="a")[0]
        base_out = engine.generate("w5 w6 w7", SamplingParams(max_tokens=6, temperature=0),
                                   model="b")[0]
    finally:
        engine.shutdown()
    assert json.loads(r.stdout)[0]["token_ids"] == list(want.token_ids)
    assert want.token_ids != base_out.token_ids
