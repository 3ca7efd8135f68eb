"""A hostile tenant and a careless operator against the HTTP API, in process (ASGI): bad
adapters and model folders, names, paths, bodies, fields, exposure, grants.

The tests run in file order on one app: the first part with the server open, then with
tenants (auth on for good)."""

import json
import re
import shutil

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from gpupool import SamplingParams
from gpupool.api.limits import TenantLimiter
from gpupool.api.server import build_state, create_app
from gpupool.config import ModelSpec, ServerConfig, TenantSpec, load_server_config
from gpupool.llm import local_client
from gpupool.messages.types import EngineRequest
from tests.factories import make_peft_adapter

ADMIN_KEY = "admin-secret-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("root")
    outside = tmp_path_factory.mktemp("outside")
    base = root / "base"
    shutil.copytree(tiny_models("llama"), base)
    make_peft_adapter(base, root / "good", 4, ["q_proj", "v_proj"], seed=1)
    config = ServerConfig(
        admin_key=ADMIN_KEY, model_roots=(str(root),), models=(ModelSpec("tiny", str(base)),),
        engine={"device": "cpu", "dtype": "float32", "home": tmp_path_factory.mktemp("home"),
                "kv_cache_bytes": 8 << 20, "kv_page_bytes": 16 << 10,
                "weight_bytes": 256 << 20, "host_cache_bytes": 1 << 30})
    state = build_state(config, local_client(config))
    with TestClient(create_app(state)) as client:
        yield {"client": client, "state": state, "root": root, "outside": outside,
               "base": base}


def _err(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def _adapter_variant(env, name, edit_config=None, edit_weights=None):
    src, dst = env["root"] / "good", env["root"] / name
    shutil.copytree(src, dst)
    if edit_config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(edit_config(cfg))
    if edit_weights is not None:
        tensors = load_file(str(dst / "adapter_model.safetensors"))
        edit_weights(tensors)
        save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def _first(tensors, value):
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[3] = value


BAD_ADAPTERS = {
    "alpha-nan": dict(edit_config=lambda c: json.dumps({**c, "lora_alpha": float("nan")})),
    "alpha-inf": dict(edit_config=lambda c: json.dumps({**c, "lora_alpha": float("inf")})),
    "rank-float": dict(edit_config=lambda c: json.dumps({**c, "r": 4.5})),
    "config-list": dict(edit_config=lambda c: "[]"),
    "config-deep": dict(edit_config=lambda c: "[" * 100_000 + "]" * 100_000),
    "unknown-target": dict(edit_config=lambda c: json.dumps({**c, "target_modules":
                                                             ["q_proj", "lm_head"]})),
}
# weights are read on first use, not at registration (thousands of adapters register fast):
# non-finite values are refused when a request first needs them
BAD_WEIGHTS = {
    "weights-nan": dict(edit_weights=lambda t: _first(t, float("nan"))),
    "weights-inf": dict(edit_weights=lambda t: _first(t, float("-inf"))),
}


@pytest.mark.parametrize("name", sorted(BAD_ADAPTERS))
def test_bad_adapters_are_refused_at_registration(env, name):
    c = env["client"]
    path = _adapter_variant(env, name, **BAD_ADAPTERS[name])
    r = c.post("/admin/adapters", headers=ADMIN, json={"name": name, "base": "tiny",
                                                        "path": str(path)})
    _err(r, 400, "path")
    assert name not in [a["name"] for a in c.get("/admin/adapters", headers=ADMIN).json()["data"]]
    _err(c.post("/v1/completions", json={"model": name, "prompt": "w1"}), 404)


@pytest.mark.parametrize("name", sorted(BAD_WEIGHTS))
def test_adapters_with_bad_weights_are_refused_at_first_use(env, name):
    """Registered (the header is sound), the first request for it is a 400 naming the
    adapter and what is wrong; the base model and other requests are unaffected."""
    c = env["client"]
    path = _adapter_variant(env, name, **BAD_WEIGHTS[name])
    r = c.post("/admin/adapters", headers=ADMIN, json={"name": name, "base": "tiny",
                                                        "path": str(path)})
    assert r.status_code == 201, r.text
    for _ in range(2):  # and again: nothing cached from the failed read
        err = _err(c.post("/v1/completions", json={"model": name, "prompt": "w1"}), 400)
        assert name in err["message"] and "NaN or infinite" in err["message"]
    assert c.post("/v1/completions", json={"model": "tiny", "prompt": "w1",
                                           "max_tokens": 2}).status_code == 200
    assert c.delete(f"/admin/adapters/{name}", headers=ADMIN).status_code in (200, 204)


@pytest.mark.parametrize("text", ["[]", "[" * 100_000 + "]" * 100_000,
                                  '{"architectures": ["LlamaForCausalLM"], "hidden_size": 0}',
                                  '{"architectures": 3}'])
def test_model_folders_of_the_wrong_shape_are_400(env, text, tmp_path):
    folder = env["root"] / f"m{abs(hash(text)) % 10**8}"
    shutil.copytree(env["base"], folder)
    (folder / "config.json").write_text(text)
    r = env["client"].post("/admin/models", headers=ADMIN,
                           json={"name": folder.name, "path": str(folder)})
    _err(r, 400, "path")


def test_bodies_that_nest_too_deeply_are_400(env):
    c = env["client"]
    for depth in (100_000, 70):
        body = '{"model": "tiny", "prompt": ' + "[" * depth + "]" * depth + "}"
        for path, headers in (("/v1/completions", {}), ("/admin/tenants", ADMIN)):
            r = c.post(path, content=body, headers={**headers,
                                                    "Content-Type": "application/json"})
            assert _err(r, 400)["code"] == "invalid_json"


def test_a_symlinked_file_out_of_the_root_is_refused(env):
    folder = env["root"] / "sneaky-file"
    shutil.copytree(env["base"], folder)
    secret = env["outside"] / "config.json"
    shutil.copy(folder / "config.json", secret)
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(secret)
    r = env["client"].post("/admin/models", headers=ADMIN,
                           json={"name": "sneaky", "path": str(folder)})
    assert _err(r, 403, "path")["code"] == "path_not_allowed"


def test_a_shard_index_pointing_out_of_the_folder_is_refused(env):
    folder = env["root"] / "escaping-index"
    shutil.copytree(env["base"], folder)
    names = list(load_file(str(folder / "model.safetensors")))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "../base/model.safetensors" for n in names}}))
    r = env["client"].post("/admin/models", headers=ADMIN,
                           json={"name": "escaping", "path": str(folder)})
    assert "plain file names" in _err(r, 400, "path")["message"]


def test_model_names_may_hold_slashes_and_every_route_reaches_them(env):
    c = env["client"]
    r = c.post("/admin/models", headers=ADMIN, json={"name": "org/tiny-2",
                                                      "path": str(env["base"])})
    assert r.status_code == 201, r.text
    assert c.get("/v1/models/org/tiny-2").json()["id"] == "org/tiny-2"
    r = c.post("/v1/completions", json={"model": "org/tiny-2", "prompt": "w1 w2",
                                        "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert c.delete("/admin/models/org/tiny-2", headers=ADMIN).json()["deleted"]
    for bad in ("org/../tiny", "org//tiny", "./tiny", "/tiny", "tiny/", "a" * 129, "sp ace"):
        _err(c.post("/admin/models", headers=ADMIN, json={"name": bad,
                                                          "path": str(env["base"])}), 400)


def test_tenant_names_never_hold_a_slash_anywhere():
    with pytest.raises(ValueError, match="tenant name"):
        TenantSpec("a/b", ("*",))
    with pytest.raises(ValueError, match="model name"):
        load_server_config(models=["a/../b=/x"])
    with pytest.raises(ValueError, match="adapter name"):
        load_server_config(adapters=["x/=tiny:/y"])


@pytest.mark.parametrize("field,value", [
    ("suffix", "x"), ("tools", [{"type": "function"}]),
    ("guided_decoding_backend", "outlines"), ("use_beam_search", True),
    ("truncate_prompt_tokens", 4), ("chat_template_kwargs", {"x": 1}),
    ("skip_special_tokens", False), ("best_of", 3), ("add_special_tokens", False)])
def test_output_changing_fields_are_honoured_or_refused_by_name(env, field, value):
    r = env["client"].post("/v1/completions", json={"model": "tiny", "prompt": "w1",
                                                    "max_tokens": 2, field: value})
    assert _err(r, 400, field)["code"] == "unsupported_field"


def test_neutral_values_of_refused_fields_are_accepted(env):
    body = {"model": "tiny", "prompt": "w1", "max_tokens": 2, "tools": [],
            "skip_special_tokens": True, "use_beam_search": False}
    assert env["client"].post("/v1/completions", json=body).status_code == 200


def test_vllm_sampling_fields_are_honoured(env):
    c = env["client"]

    def run(**extra):
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7],
                                            "max_tokens": 12, "temperature": 0, **extra})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    assert len(run(min_tokens=12, ignore_eos=False)["text"]) > 0
    allowed = [10, 11, 12]
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 8,
                                        "temperature": 0, "allowed_token_ids": allowed,
                                        "logprobs": 0, "ignore_eos": True})
    tokens = env["state"].client.tokenizer("tiny").convert_tokens_to_ids(
        r.json()["choices"][0]["logprobs"]["tokens"])
    assert r.status_code == 200 and set(tokens) <= set(allowed), tokens
    plain = run(ignore_eos=True)["text"]
    stop = plain[3:6]
    cut = run(ignore_eos=True, stop=[stop])
    kept = run(ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    assert kept["text"] == cut["text"] + stop and kept["text"].endswith(stop)
    assert run(repetition_penalty=5.0, ignore_eos=True)["text"] != plain
    tok = env["state"].client.tokenizer("tiny")
    forced = run(logit_bias={"17": 100}, ignore_eos=True, logprobs=0)
    assert set(tok.convert_tokens_to_ids(forced["logprobs"]["tokens"])) == {17}
    assert run(frequency_penalty=2.0, presence_penalty=2.0, ignore_eos=True)["text"] != plain
    echoed = run(echo=True, ignore_eos=True)["text"]
    assert echoed == env["state"].client.tokenizer("tiny").decode([5, 6, 7]) + plain
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "w9 w10", "max_tokens": 3,
                                        "echo": True, "stream": True, "n": 2})
    events = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: {")]
    texts = ["".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i)
             for i in (0, 1)]
    assert all(t.startswith("w9 w10") and len(t) > len("w9 w10") for t in texts), texts
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2,
                                        "prompt_logprobs": 2})
    plp = r.json()["choices"][0]["prompt_logprobs"]
    assert r.status_code == 200 and plp[0] is None and len(plp) == 3, r.text
    assert "6" in plp[1] and "7" in plp[2] and len(plp[2]) <= 3  # the token and its top 2
    assert all(v["logprob"] <= 0 for d in plp[1:] for v in d.values())
    _err(c.post("/v1/completions", json={"model": "tiny", "prompt": "w1", "stream": True,
                                         "prompt_logprobs": 1}), 400, "prompt_logprobs")
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "w1", "max_tokens": 4,
                                        "response_format": {"type": "json_object"}})
    assert "vocabulary" in _err(r, 400, "response_format")["message"]  # words: no "{"
    banned = plain.split()[:2]  # the words greedy decoding chose first
    words = run(bad_words=banned, ignore_eos=True)["text"].split()
    assert words and not set(words) & set(banned), (banned, words)
    for field, value in (("repetition_penalty", 0), ("min_p", 1.5), ("min_tokens", 99),
                         ("allowed_token_ids", [10**6])):
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "w1", "max_tokens": 4,
                                            field: value})
        _err(r, 400)


def test_max_tokens_beyond_the_context_is_400_and_the_default_fits(env):
    c = env["client"]
    limit = env["state"].client.model_info("tiny").context_limit
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": [5] * 10,
                                        "max_tokens": limit - 9})
    assert _err(r, 400, "max_tokens")["code"] == "context_length_exceeded"
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": [5] * (limit - 3),
                                        "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_readding_a_model_that_still_drains_is_409(env):
    c = env["client"]
    engine = env["state"].client.engine
    r = c.post("/admin/models", headers=ADMIN, json={"name": "drain", "path": str(env["base"])})
    assert r.status_code == 201

    [rid] = engine.submit([EngineRequest(engine.new_request_id(), "drain", [5, 6],
                                         SamplingParams(max_tokens=200, ignore_eos=True))],
                          [None])
    try:
        assert c.delete("/admin/models/drain", headers=ADMIN).status_code == 200
        r = c.post("/admin/models", headers=ADMIN, json={"name": "drain",
                                                          "path": str(env["base"])})
        assert _err(r, 409, "name")["code"] == "name_draining"
    finally:
        engine.abort(rid)


def test_health_says_only_ok(env):
    r = env["client"].get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert "tiny" not in r.text


# ---- from here on, tenants exist -----------------------------------------------------------
def test_metrics_need_a_key_once_tenants_exist(env):
    c, state = env["client"], env["state"]
    assert c.get("/metrics").status_code == 200  # open server: open metrics
    r = c.post("/admin/tenants", headers=ADMIN, json={"name": "acme", "models": ["tiny"]})
    key = r.json()["api_key"]
    _err(c.get("/metrics"), 401)
    _err(c.get("/metrics", headers={"Authorization": f"Bearer {key}"}), 401)
    assert 'model="tiny"' in c.get("/metrics", headers=ADMIN).text
    import dataclasses

    config = state.config
    try:
        state.config = dataclasses.replace(config, metrics_key="scraper-key-0123456789")
        assert c.get("/metrics", headers={"Authorization": "Bearer scraper-key-0123456789"}
                     ).status_code == 200
        state.config = dataclasses.replace(config, public_metrics=True)
        assert c.get("/metrics").status_code == 200
    finally:
        state.config = config


def test_tenant_names_with_a_slash_are_refused_by_the_admin_api(env):
    c = env["client"]
    _err(c.post("/admin/tenants", headers=ADMIN, json={"name": "a/b", "models": ["*"]}), 400,
         "name")
    assert "a/b" not in [t["name"] for t in c.get("/admin/tenants", headers=ADMIN).json()["data"]]


def test_deleting_a_model_or_adapter_revokes_its_grants(env):
    c = env["client"]
    r = c.post("/admin/adapters", headers=ADMIN, json={"name": "ad", "base": "tiny",
                                                        "path": str(env["root"] / "good")})
    assert r.status_code == 201, r.text
    r = c.post("/admin/tenants", headers=ADMIN, json={"name": "beta", "models": ["tiny", "ad"]})
    key = {"Authorization": f"Bearer {r.json()['api_key']}"}
    assert c.post("/v1/completions", headers=key, json={"model": "ad", "prompt": "w1",
                                                         "max_tokens": 1}).status_code == 200
    assert c.delete("/admin/adapters/ad", headers=ADMIN).status_code == 200
    assert c.get("/admin/tenants/beta", headers=ADMIN).json()["models"] == ["tiny"]
    assert c.post("/admin/adapters", headers=ADMIN, json={
        "name": "ad", "base": "tiny", "path": str(env["root"] / "good")}).status_code == 201
    _err(c.post("/v1/completions", headers=key, json={"model": "ad", "prompt": "w1",
                                                      "max_tokens": 1}), 404)
    assert c.get("/health").json() == {"status": "ok"}  # still whole after all of the above


def test_tenant_limits_give_429_with_retry_after_across_front_ends(env):
    c, state = env["client"], env["state"]
    r = c.post("/admin/tenants", headers=ADMIN, json={
        "name": "gamma", "models": ["tiny"], "limits": {"max_concurrent_requests": 1}})
    assert r.status_code == 201, r.text
    key = {"Authorization": f"Bearer {r.json()['api_key']}"}
    body = {"model": "tiny", "prompt": [5, 6, 7, 8, 9], "max_tokens": 3}
    assert c.post("/v1/completions", headers=key, json=body).status_code == 200
    other_front_end = TenantLimiter(state.store.r)  # a second gateway on the same Redis
    assert other_front_end.admit("gamma", "held", {"max_concurrent_requests": 1}, 0) is None
    r = c.post("/v1/completions", headers=key, json=body)
    assert _err(r, 429)["code"] == "rate_limit_exceeded" and r.headers["Retry-After"] == "1"
    other_front_end.finished("gamma", "held", 0)
    assert c.post("/v1/completions", headers=key, json=body).status_code == 200
    usage = c.get("/admin/tenants/gamma", headers=ADMIN).json()["usage"]
    assert usage["requests_in_flight"] == 0 and usage["tokens_this_minute"] >= 2 * (5 + 1)

    r = c.patch("/admin/tenants/gamma", headers=ADMIN, json={"limits": {"tokens_per_minute": 1}})
    assert r.json()["limits"]["tokens_per_minute"] == 1 and r.json()["models"] == ["tiny"]
    for _ in range(2):  # this minute's tokens are spent (or, past a minute's end, soon are)
        r = c.post("/v1/completions", headers=key, json=body)
        if r.status_code == 429:
            break
    assert _err(r, 429)["message"].startswith("tenant limit tokens_per_minute")
    assert 1 <= int(r.headers["Retry-After"]) <= 61
    _err(c.patch("/admin/tenants/gamma", headers=ADMIN,
                 json={"limits": {"tokens_per_minute": 0}}), 400)
    _err(c.patch("/admin/tenants/gamma", headers=ADMIN, json={"limits": {"bogus": 3}}), 400)
    c.patch("/admin/tenants/gamma", headers=ADMIN, json={"limits": {}})
    assert c.post("/v1/completions", headers=key, json=body).status_code == 200


def test_queued_requests_count_until_the_first_token(env):
    limiter = env["state"].limiter
    limits = {"max_queued_requests": 1}
    assert limiter.admit("delta", "a", limits, 3) is None
    assert limiter.admit("delta", "b", limits, 3).limit == "max_queued_requests"
    limiter.started("delta", "a")
    assert limiter.admit("delta", "b", limits, 3) is None
    assert limiter.usage("delta") == {"requests_in_flight": 2, "requests_queued": 1,
                                      "tokens_this_minute": 6}
    limiter.finished("delta", "a", 4)
    limiter.finished("delta", "b", 0)
    assert limiter.usage("delta")["requests_in_flight"] == 0
    assert limiter.admit("delta", "c", limits, 0) is None
    limiter.forget("delta")  # a deleted tenant's counters go with it
    assert limiter.usage("delta")["requests_in_flight"] == 0


def test_a_model_may_have_its_own_dtype(env):
    c = env["client"]
    r = c.post("/admin/models", headers=ADMIN,
               json={"name": "half", "path": str(env["base"]), "dtype": "bfloat16"})
    assert r.status_code == 201, r.text
    try:
        pool = c.get("/admin/pool", headers=ADMIN).json()
        assert pool["models"]["half"]["dtype"] == "bfloat16"
        assert pool["models"]["tiny"]["dtype"] == "float32"  # the engine's own
    finally:
        assert c.delete("/admin/models/half", headers=ADMIN).status_code == 200
    r = c.post("/admin/models", headers=ADMIN,
               json={"name": "quarter", "path": str(env["base"]), "dtype": "int4"})
    assert _err(r, 400, "dtype")


def test_a_model_may_be_stored_int8(env):
    c = env["client"]
    r = c.post("/admin/models", headers=ADMIN,
               json={"name": "small", "path": str(env["base"]), "quantization": "int8"})
    assert r.status_code == 201, r.text
    try:
        pool = c.get("/admin/pool", headers=ADMIN).json()
        small, tiny = pool["models"]["small"], pool["models"]["tiny"]
        assert small["quantization"] == "int8" and tiny["quantization"] is None
        assert small["weight_bytes"] < tiny["weight_bytes"] / 2  # fp32 engine: ~1/4
        r = c.post("/admin/tenants", headers=ADMIN, json={"name": "int8", "models": ["small"]})
        key = {"Authorization": f"Bearer {r.json()['api_key']}"}
        r = c.post("/v1/completions", headers=key,
                   json={"model": "small", "prompt": [1, 2, 3], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    finally:
        c.delete("/admin/tenants/int8", headers=ADMIN)
        assert c.delete("/admin/models/small", headers=ADMIN).status_code == 200
    r = c.post("/admin/models", headers=ADMIN,
               json={"name": "smaller", "path": str(env["base"]), "quantization": "int4"})
    assert r.status_code == 201, r.text  # 4-bit: issue 34
    assert c.get("/admin/pool", headers=ADMIN).json()["models"]["smaller"][
        "quantization"] == "int4"
    assert c.delete("/admin/models/smaller", headers=ADMIN).status_code == 200
    r = c.post("/admin/models", headers=ADMIN,
               json={"name": "smallest", "path": str(env["base"]), "quantization": "int3"})
    assert _err(r, 400, "quantization")


def test_tenants_share_no_cached_prompt_unless_marked(env):
    """Prefix cache hits show in timing, so tenants get their own namespace unless the
    operator marks them shared; a request's cache_salt splits it further."""
    c = env["client"]
    keys = {}
    for name, shared in (("pc1", False), ("pc2", False), ("pc3", True), ("pc4", True)):
        r = c.post("/admin/tenants", headers=ADMIN,
                   json={"name": name, "models": ["tiny"], "share_prefix_cache": shared})
        assert r.status_code == 201 and r.json()["share_prefix_cache"] is shared, r.text
        keys[name] = {"Authorization": f"Bearer {r.json()['api_key']}"}
    prompt = [3 + (7 * i) % 150 for i in range(70)]  # 2 full pages of 32 tokens, and 6

    def cached(tenant, **extra):
        r = c.post("/v1/completions", headers=keys[tenant],
                   json={"model": "tiny", "prompt": prompt, "max_tokens": 2, **extra})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    try:
        assert cached("pc1") == 0 and cached("pc1") == 64
        assert cached("pc2") == 0  # another tenant: nothing of pc1's
        assert cached("pc1", cache_salt="x") == 0 and cached("pc1", cache_salt="x") == 64
        assert cached("pc3") == 0 and cached("pc4") == 64  # both shared: one namespace
        r = c.post("/v1/completions", headers=keys["pc1"],
                   json={"model": "tiny", "prompt": "w5", "cache_salt": ""})
        _err(r, 400, "cache_salt")
        text = c.get("/metrics", headers=ADMIN).text
        hits = [line for line in text.splitlines()
                if line.startswith('gpupool_prefix_cache_hits_total{model="tiny"}')]
        assert hits and float(hits[0].split()[-1]) >= 3 * 64
        pool = c.get("/admin/pool", headers=ADMIN).json()
        assert pool["kv_pages"]["cached"] >= 3 * 2  # three namespaces' two pages
        for name in ('vllm:num_requests_running{model_name="tiny"}',  # vLLM's names too
                     'vllm:num_requests_waiting{model_name="tiny"}',
                     'vllm:kv_cache_usage_perc{model_name="tiny"}',
                     'vllm:prompt_tokens_total{model_name="tiny"}',
                     'vllm:generation_tokens_total{model_name="tiny"}',
                     'vllm:time_to_first_token_seconds_count{model_name="tiny"}',
                     'vllm:inter_token_latency_seconds_count{model_name="tiny"}'):
            assert any(line.startswith(name + " ") for line in text.splitlines()), name
        assert re.search(r'vllm:lora_requests_info{max_lora="\d+",model_name="tiny",', text)
    finally:
        for name in keys:
            c.delete(f"/admin/tenants/{name}", headers=ADMIN)


def test_vllm_load_and_unload_lora_adapter(env):
    """vLLM's operations: admin key only, the base from the adapter's
    base_model_name_or_path (a registered name or folder) or the only model, else 400; the
    model roots confine the path."""
    c = env["client"]
    src = env["root"] / "good"
    named = env["root"] / "vl-named"
    shutil.copytree(src, named)
    cfg = json.loads((named / "adapter_config.json").read_text())
    (named / "adapter_config.json").write_text(json.dumps({**cfg,
                                                           "base_model_name_or_path": "tiny"}))
    body = {"lora_name": "vl1", "lora_path": str(named)}
    _err(c.post("/v1/load_lora_adapter", json=body), 401)
    r = c.post("/v1/load_lora_adapter", headers=ADMIN, json=body)
    assert r.status_code == 200 and r.json()["base"] == "tiny", r.text
    assert "vl1" in c.get("/admin/adapters", headers=ADMIN).text
    # a second registered model makes "the only model" ambiguous for an unnamed base
    assert c.post("/admin/models", headers=ADMIN,
                  json={"name": "tiny2", "path": str(env["base"])}).status_code == 201
    try:
        other = env["root"] / "vl-other"
        shutil.copytree(src, other)
        cfg = json.loads((other / "adapter_config.json").read_text())
        (other / "adapter_config.json").write_text(json.dumps(
            {**cfg, "base_model_name_or_path": "org/unknown"}))
        r = c.post("/v1/load_lora_adapter", headers=ADMIN,
                   json={"lora_name": "vl2", "lora_path": str(other)})
        _err(r, 400, "lora_path")
    finally:
        assert c.delete("/admin/models/tiny2", headers=ADMIN).status_code == 200
    r = c.post("/v1/load_lora_adapter", headers=ADMIN,
               json={"lora_name": "vl3", "lora_path": str(env["outside"])})
    _err(r, 403)
    r = c.post("/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "vl1"})
    assert r.status_code == 200 and r.json() == {"name": "vl1", "deleted": True}
    _err(c.post("/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "vl1"}), 404)

def test_completion_logprobs_always_hold_the_sampled_token(env):
    """vLLM's rule: the sampled token is always in top_logprobs (logprobs: 0 gives just it,
    logprobs: 1 the top one and the sampled one where they differ)."""
    c = env["client"]
    r = c.post("/admin/tenants", headers=ADMIN, json={"name": "lp1", "models": ["tiny"]})
    assert r.status_code == 201, r.text
    key = {"Authorization": f"Bearer {r.json()['api_key']}"}
    try:
        r = c.post("/v1/completions", headers=key,
                   json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 6,
                         "temperature": 1.5, "seed": 3, "logprobs": 0})
        lps = r.json()["choices"][0]["logprobs"]
        assert r.status_code == 200 and len(lps["top_logprobs"]) == 6, r.text
        for token, lp, top in zip(lps["tokens"], lps["token_logprobs"], lps["top_logprobs"]):
            assert top == {token: lp}
        r = c.post("/v1/completions", headers=key,
                   json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 8,
                         "temperature": 2.0, "seed": 5, "logprobs": 1})
        lps = r.json()["choices"][0]["logprobs"]
        assert all(t in top and 1 <= len(top) <= 2
                   for t, top in zip(lps["tokens"], lps["top_logprobs"]))
    finally:
        c.delete("/admin/tenants/lp1", headers=ADMIN)


def test_completions_score_a_prompt_as_harnesses_ask(env):
    """lm-eval's loglikelihood requests: echo with logprobs and max_tokens 0 or 1. The answer
    is the prompt's text (then the one token), its logprobs OpenAI's legacy ones starting
    with the prompt's (None for the first token), each within 1e-4 of transformers' fp32
    log-softmax; max_tokens 0 returns and counts no token; stream with either is a 400."""
    import torch
    from transformers import AutoModelForCausalLM

    c = env["client"]
    r = c.post("/admin/tenants", headers=ADMIN, json={"name": "score1", "models": ["tiny"]})
    key = {"Authorization": f"Bearer {r.json()['api_key']}"}
    prompt = [5, 17, 9, 33, 2, 41, 8]
    hf = AutoModelForCausalLM.from_pretrained(str(env["base"]), dtype=torch.float32)
    with torch.no_grad():
        want = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    try:
        for max_tokens in (0, 1):
            r = c.post("/v1/completions", headers=key, json={
                "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "echo": True,
                "logprobs": 1, "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            choice, lps = body["choices"][0], body["choices"][0]["logprobs"]
            assert len(lps["tokens"]) == len(prompt) + max_tokens
            assert lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
            for i in range(1, len(prompt)):
                assert abs(lps["token_logprobs"][i] - want[i - 1, prompt[i]].item()) < 1e-4
                assert lps["tokens"][i] in lps["top_logprobs"][i]
            assert lps["text_offset"] == sorted(lps["text_offset"])
            assert len(lps["text_offset"]) == len(lps["tokens"])
            assert choice["text"].startswith(lps["tokens"][0])  # the prompt's text first
            assert choice["prompt_logprobs"] is None  # not asked for
            assert body["usage"]["completion_tokens"] == max_tokens
        r = c.post("/v1/completions", headers=key, json={"model": "tiny", "prompt": prompt,
                                                         "max_tokens": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "", r.text
        assert r.json()["usage"]["completion_tokens"] == 0
        _err(c.post("/v1/completions", headers=key, json={
            "model": "tiny", "prompt": prompt, "echo": True, "logprobs": 1, "stream": True}),
            400, "stream")
    finally:
        c.delete("/admin/tenants/score1", headers=ADMIN)


def test_a_missing_adapter_folder_is_404_and_outside_the_roots_403(env):
    """vLLM answers 404 for a LoRA path that is not there; a path outside the model roots
    stays refused (403) whether or not it exists."""
    c = env["client"]
    body = {"lora_name": "ghost", "lora_path": str(env["root"] / "no-such-adapter")}
    assert _err(c.post("/v1/load_lora_adapter", headers=ADMIN, json=body), 404,
                "path")["code"] == "not_found"
    for where in (env["outside"] / "no-such", env["outside"]):
        _err(c.post("/v1/load_lora_adapter", headers=ADMIN,
                    json={"lora_name": "ghost", "lora_path": str(where)}), 403, "path")
    assert "ghost" not in c.get("/admin/adapters", headers=ADMIN).text
