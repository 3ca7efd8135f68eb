"""``load_server_config``: defaults < TOML file < GPUPOOL_* variables < flags; clear errors."""

import pytest

from gpupool.config import load_server_config

TOML = """
port = 9001
admin_key = "from-file"
model_roots = ["/models"]

[engine]
policy = "request"
tbt_ms = 120.0

[[models]]
name = "a"
path = "/models/a"
ttft_ms = 500

[[adapters]]
name = "x"
base = "a"
path = "/models/x"

[[tenants]]
name = "acme"
models = ["a", "x"]
api_keys = ["k1-0123456789abcdef"]
"""


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    for var in ("GPUPOOL_CONFIG", "GPUPOOL_PORT", "GPUPOOL_ADMIN_KEY", "GPUPOOL_POLICY",
                "GPUPOOL_HOST", "GPUPOOL_REDIS_URL", "GPUPOOL_MODEL_ROOTS", "GPUPOOL_DEVICE"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "gpupool.toml"
    path.write_text(TOML)
    return path


def test_defaults_serve_smollm2(config_file):
    c = load_server_config()
    assert [(m.name, m.path) for m in c.models] == [("smollm2", "smollm2")]
    assert c.host == "127.0.0.1" and c.port == 8000 and c.admin_key is None


def test_file_then_environment_then_flags(config_file, monkeypatch):
    c = load_server_config(str(config_file))
    assert c.port == 9001 and c.admin_key == "from-file" and c.model_roots == ("/models",)
    assert c.engine == {"policy": "request", "tbt_ms": 120.0}
    assert c.models[0].ttft_ms == 500 and c.adapters[0].base == "a"
    assert c.tenants[0].api_keys == ("k1-0123456789abcdef",) and c.tenants[0].models == ("a", "x")
    monkeypatch.setenv("GPUPOOL_CONFIG", str(config_file))
    monkeypatch.setenv("GPUPOOL_PORT", "9002")
    monkeypatch.setenv("GPUPOOL_POLICY", "fcfs")
    c = load_server_config()
    assert c.port == 9002 and c.engine["policy"] == "fcfs"
    c = load_server_config(port=9003, policy="token", models=["b=/m/b"],
                           adapters=["y=b:/m/y"])
    assert c.port == 9003 and c.engine["policy"] == "token"
    assert [m.name for m in c.models] == ["a", "b"]
    assert [(a.name, a.base, a.path) for a in c.adapters] == [("x", "a", "/models/x"),
                                                              ("y", "b", "/m/y")]


def test_reasoning_parser_and_task_from_the_file_and_the_flags(config_file):
    config_file.write_text("[[models]]\nname = 'a'\npath = '/m/a'\n"
                           "reasoning_parser = 'deepseek_r1'\n")
    c = load_server_config(str(config_file), models=["b=/m/b"], reasoning_parser="qwen3",
                           task="generate")
    assert [(m.name, m.reasoning_parser, m.task) for m in c.models] == [
        ("a", "deepseek_r1", "generate"), ("b", "qwen3", "generate")]  # flags: their models
    c = load_server_config(task="embed")  # no --model: the default model
    assert [(m.name, m.task) for m in c.models] == [("smollm2", "embed")]


@pytest.mark.parametrize("text,match", [
    ("[[models]]\nname='a'\npath='p'\nreasoning_parser='r9'", "reasoning_parser"),
    ("[[models]]\nname='a'\npath='p'\ntask='rank'", "task must be"),
    ("bogus = 1", "unknown keys"),
    ("[[models]]\nname = 'a'", "bad entry in models"),
    ("[[models]]\nname = 'a'\npath = 'p'\nextra = 1", "unknown keys in models"),
    ("port = 0", "port"),
    ("[[tenants]]\nname='a'\nmodels=['m']\napi_keys='a-single-string-key'", "list of strings"),
    ("[[tenants]]\nname='a'\nmodels='m'", "list of strings"),
    ("[[tenants]]\nname='a'\nmodels=['m']\napi_keys=['short']", "at least 16"),
    ("[[tenants]]\nname='a'\nmodels=['m']\nkey_hashes=['abc']", "sha256"),
    ("port = [", "config file"),
    ("[[models]]\nname='a'\npath='p'\n[[adapters]]\nname='a'\nbase='a'\npath='q'",
     "declared twice"),
])
def test_bad_config_files(config_file, text, match):
    config_file.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_server_config(str(config_file))


@pytest.mark.parametrize("flags,match", [
    ({"models": ["nopath"]}, "NAME=PATH"),
    ({"adapters": ["x=/no/base"]}, "NAME=BASE:PATH"),
])
def test_bad_flags(config_file, flags, match):
    with pytest.raises(ValueError, match=match):
        load_server_config(**flags)


def test_serve_reports_a_bad_config_and_exits(config_file, capsys):
    from gpupool.cli import main

    config_file.write_text("bogus = 1")
    assert main(["serve", "--config", str(config_file)]) == 2
    assert "unknown keys" in capsys.readouterr().err
