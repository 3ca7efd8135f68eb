"""Schema-driven fuzzing of the HTTP API, in process: schemathesis generates requests from
the app's own OpenAPI document (api/openapi.py) and checks every answer: no 5xx (nor a
server error inside an event stream), a documented status code and content type, a body
matching the declared schema (each streamed event too), and a 4xx for every body the schema
says is invalid.

Positive cases come from a copy of the document tightened for this run (the served names,
``max_tokens`` <= 8, small lists, sampling values in range), so most of them reach the
engine; negative cases come from the document as served. Each case carries the key its route
needs (the tenant's on OpenAI routes, the admin key on /admin and /metrics); before each
case the fixture tenant, its key and its limits are restored, since admin cases may patch,
re-key or delete it; DELETE cases name scratch models and adapters, never the fixtures. The
tiny model's context is cut to 32 tokens, so nothing generates for long. Deterministic: a
fixed Hypothesis seed, no example database.

Knobs for a longer hunt: GPUPOOL_FUZZ_SCALE=10 (ten times the cases), GPUPOOL_FUZZ_SEED,
GPUPOOL_FUZZ_WIDE=1 (sampling values over the full ranges the server accepts).
``test_known_finding`` holds what fuzzing found and the handlers do not handle yet.
"""

import contextlib
import copy
import json
import os
import re
import shutil
import time

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.errors import FailureGroup

from gpupool.api.protocol import ChatCompletionRequest, CompletionRequest
from gpupool.api.server import build_state, create_app
from gpupool.api.state import hash_key
from gpupool.config import AdapterSpec, ModelSpec, ServerConfig
from gpupool.llm import local_client
from tests.factories import VOCAB_SIZE, make_peft_adapter

ADMIN_KEY = "admin-secret-key"
TENANT = "acme"
MODELS = ["tiny", "tiny-lora"]
CONTEXT = 32
MAX_TOKENS = 8
SEED = int(os.environ.get("GPUPOOL_FUZZ_SEED", "0"))
SCALE = int(os.environ.get("GPUPOOL_FUZZ_SCALE", "1"))
WIDE = bool(os.environ.get("GPUPOOL_FUZZ_WIDE"))
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")
CONFIG = {"output": {"sanitization": {"enabled": False}}}  # show max_tokens in reports

# cases per operation: (positive, negative); ~100 in all
BUDGET = {
    ("POST", "/v1/completions"): (14, 6),
    ("POST", "/v1/chat/completions"): (12, 6),
    ("POST", "/tenants/{tenant}/v1/completions"): (5, 2),
    ("POST", "/tenants/{tenant}/v1/chat/completions"): (5, 2),
    ("GET", "/v1/models"): (1, 0),
    ("GET", "/v1/models/{model}"): (2, 0),
    ("GET", "/tenants/{tenant}/v1/models"): (1, 0),
    ("GET", "/tenants/{tenant}/v1/models/{model}"): (2, 0),
    ("POST", "/admin/models"): (3, 2),
    ("GET", "/admin/models"): (1, 0),
    ("DELETE", "/admin/models/{name}"): (2, 0),
    ("POST", "/admin/adapters"): (3, 2),
    ("GET", "/admin/adapters"): (1, 0),
    ("DELETE", "/admin/adapters/{name}"): (2, 0),
    ("POST", "/admin/tenants"): (3, 2),
    ("GET", "/admin/tenants"): (1, 0),
    ("POST", "/admin/tenants/{name}/keys"): (2, 1),
    ("GET", "/admin/tenants/{name}"): (2, 0),
    ("PATCH", "/admin/tenants/{name}"): (3, 2),
    ("DELETE", "/admin/tenants/{name}"): (2, 0),
    ("GET", "/admin/pool"): (1, 0),
    ("GET", "/admin/"): (1, 0),
    ("GET", "/health"): (1, 0),
    ("GET", "/metrics"): (1, 0),
    ("GET", "/"): (1, 0),
    ("POST", "/tokenize"): (3, 2),
    ("POST", "/detokenize"): (3, 2),
    ("GET", "/version"): (1, 0),
    ("POST", "/v1/load_lora_adapter"): (3, 2),
    ("POST", "/v1/unload_lora_adapter"): (2, 1),
    ("POST", "/v1/embeddings"): (3, 2),
    ("POST", "/tenants/{tenant}/v1/embeddings"): (1, 1),
    ("POST", "/v1/responses"): (6, 3),
    ("POST", "/tenants/{tenant}/v1/responses"): (2, 1),
    ("GET", "/v1/responses/{response_id}"): (1, 0),
    ("GET", "/tenants/{tenant}/v1/responses/{response_id}"): (1, 0),
    ("DELETE", "/v1/responses/{response_id}"): (1, 0),
    ("DELETE", "/tenants/{tenant}/v1/responses/{response_id}"): (1, 0),
}


@contextlib.contextmanager
def serving(root, model, home):
    """The app in process: ``model`` (a tiny model folder, copied under ``root`` with a
    32-token context and a chat template), an adapter of it, and the fixture tenant."""
    base = root / "tiny"
    shutil.copytree(model, base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": CONTEXT}))
    tok = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**tok,
                                                            "chat_template": CHAT_TEMPLATE}))
    lora = make_peft_adapter(base, root / "lora", 4, ["q_proj", "v_proj"], seed=1)
    config = ServerConfig(
        admin_key=ADMIN_KEY, model_roots=(str(root),), models=(ModelSpec("tiny", str(base)),),
        adapters=(AdapterSpec("tiny-lora", "tiny", str(lora)),),
        engine={"device": "cpu", "dtype": "float32", "home": home, "kv_cache_bytes": 8 << 20,
                "kv_page_bytes": 16 << 10, "weight_bytes": 256 << 20,
                "host_cache_bytes": 1 << 30})
    state = build_state(config, local_client(config))
    # a 500 is an answer to check, not an exception in the test
    with TestClient(create_app(state), raise_server_exceptions=False) as client:
        r = client.post("/admin/tenants", headers=_bearer(ADMIN_KEY),
                        json={"name": TENANT, "models": MODELS})
        assert r.status_code == 201, r.text
        yield {"client": client, "state": state, "root": root, "base": base, "lora": lora,
               "key": r.json()["api_key"]}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_models):
    with serving(tmp_path_factory.mktemp("fuzz"), tiny_models("llama"),
                 tmp_path_factory.mktemp("home")) as e:
        yield e


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _restore(env) -> None:
    """The fixture tenant as it was made: its models, its one key, no limits."""
    env["state"].store.put_tenant(TENANT, MODELS, [hash_key(env["key"])], replace_keys=True,
                                  limits={})


# ---- the document, tightened for positive cases -----------------------------------------------
def _ints(lo: int, hi: int, max_items: int, min_items: int = 0) -> dict:
    return {"type": "array", "items": {"type": "integer", "minimum": lo, "maximum": hi},
            "minItems": min_items, "maxItems": max_items}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _text(min_length: int = 0, max_length: int = 24) -> dict:
    return {"type": "string", "minLength": min_length, "maxLength": max_length}


def tightened(doc: dict, env, wide: bool = False) -> dict:
    """``doc`` with the names, sizes and (unless ``wide``) sampling values a served request
    can take."""
    doc = copy.deepcopy(doc)
    s = doc["components"]["schemas"]
    sizes = {
        "model": {"enum": MODELS},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS},
        "n": {"type": "integer", "minimum": 1, "maximum": 2},
    }
    sampling = {
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "top_k": _nullable({"type": "integer", "minimum": -1, "maximum": 50}),
        "min_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
        # from 0.01: below ~1e-38 it is a known finding (see KNOWN_FINDINGS)
        "repetition_penalty": _nullable({"type": "number", "minimum": 0.01, "maximum": 4}),
        "seed": _nullable({"type": "integer", "minimum": 0, "maximum": 2**32}),
        "stop": _nullable({"anyOf": [{"type": "string", "minLength": 1, "maxLength": 8},
                                     {"type": "array", "maxItems": 2, "items": {
                                         "type": "string", "minLength": 1, "maxLength": 8}}]}),
        "stop_token_ids": _nullable(_ints(0, VOCAB_SIZE - 1, 3)),
        "allowed_token_ids": _nullable(_ints(3, VOCAB_SIZE - 1, 5, min_items=1)),
        "min_tokens": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_TOKENS}),
        "user": _nullable(_text()),
    }
    for name, special in (("CompletionRequest", True), ("ChatCompletionRequest", False)):
        s[name]["properties"].update(sizes, **({} if wide else sampling))
        s[name]["properties"]["add_special_tokens"] = {"enum": [special, None]}
        s[name]["required"] = sorted({*s[name]["required"], "max_tokens", "stream"})
        s[name]["additionalProperties"] = False
    s["CompletionRequest"]["properties"]["prompt"] = {"anyOf": [
        _text(1), {"type": "array", "items": _text(1), "minItems": 1, "maxItems": 2},
        _ints(3, VOCAB_SIZE - 1, 8, min_items=1),
        {"type": "array", "items": _ints(3, VOCAB_SIZE - 1, 6, min_items=1), "minItems": 1,
         "maxItems": 2}]}
    s["CompletionRequest"]["properties"]["best_of"] = _nullable(
        {"type": "integer", "minimum": 1, "maximum": 2})
    chat = s["ChatCompletionRequest"]["properties"]
    chat["messages"]["maxItems"] = 3
    chat["max_completion_tokens"] = _nullable(
        {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS})
    chat["top_logprobs"] = _nullable({"type": "integer", "minimum": 0, "maximum": 3})
    chat["response_format"] = _nullable({"type": "object", "required": ["type"],
                                         "properties": {"type": {"const": "text"}},
                                         "additionalProperties": False})
    message = s["ChatMessage"]
    message["additionalProperties"] = False
    message["properties"]["content"] = _nullable({"anyOf": [
        _text(), {"type": "array", "maxItems": 2, "items": {
            "type": "object", "required": ["type", "text"], "additionalProperties": False,
            "properties": {"type": {"const": "text"}, "text": _text()}}}]})
    message["properties"]["name"] = _nullable(_text(0, 8))
    s["StreamOptions"]["additionalProperties"] = False

    granted = {"type": "array", "maxItems": 3, "items": {"enum": [*MODELS, "*"]}}
    s["ModelBody"]["properties"].update(
        name={"enum": ["scratch", "tiny"]},
        path={"enum": [str(env["base"]), str(env["root"] / "missing"), "/etc"]})
    s["AdapterBody"]["properties"].update(
        name={"enum": ["scratch-lora", "tiny-lora"]}, base={"enum": MODELS},
        path={"enum": [str(env["lora"]), str(env["root"] / "missing")]})
    s["TenantBody"]["properties"].update(name={"enum": ["scratch", TENANT]}, models=granted)
    s["TenantUpdate"]["properties"]["models"] = _nullable(granted)

    names = {"tenant": [TENANT], "model": MODELS}
    for path, item in doc["paths"].items():
        for op in item.values():
            for p in op.get("parameters", ()):
                if p["in"] != "path":
                    continue
                if p["name"] in names:
                    p["schema"] = {"enum": names[p["name"]]}
                elif path.startswith("/admin/models/"):
                    p["schema"] = {"enum": ["scratch", "no-such-model"]}
                elif path.startswith("/admin/adapters/"):
                    p["schema"] = {"enum": ["scratch-lora", "no-such-adapter"]}
                elif path.startswith("/admin/tenants/"):
                    p["schema"] = {"enum": [TENANT, "scratch", "no-such-tenant"]}
    return doc


# ---- the run ----------------------------------------------------------------------------------
def no_server_error_in_stream(ctx, response, case):
    """A streamed answer has its status before generation fails: an error event there must
    not be a server error either."""
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return None
    for line in response.content.decode().splitlines():
        if line.startswith("data: {") and '"server_error"' in line:
            error = json.loads(line[6:]).get("error") or {}
            if error.get("type") == "server_error":
                raise AssertionError(f"server error in the event stream: {error}")
    return None


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection, no_server_error_in_stream]


def _send(client, case):
    kw = case.as_transport_kwargs(base_url="http://testserver")
    body = {}
    if "json" in kw:
        body["json"] = kw["json"]
    elif kw.get("data") is not None:
        body["content"] = kw["data"]
    return client.request(kw["method"], kw["url"], headers=kw["headers"],
                          params=kw.get("params") or None, **body)


def _whole(value):
    """``value`` with whole floats as integers: JSON Schema's "integer" admits 2.0, which
    the server's strict models refuse (and a float field takes an integer)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, list):
        return [_whole(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    return value


def _positive(case):
    if isinstance(case.body, (dict, list)):
        case.body = _whole(case.body)
    return case


def _strategy(schema, method, path, mode, env):
    """Cases for one operation, with its key; negative ones keep the fixture tenant in the
    path (its body is what they get wrong)."""
    key = ADMIN_KEY if path.startswith(("/admin", "/metrics")) else env["key"]
    if mode is GenerationMode.POSITIVE:
        return schema[path][method].as_strategy(generation_mode=mode,
                                                headers=_bearer(key)).map(_positive)
    fixed = dict.fromkeys(re.findall(r"{(\w+)}", path), TENANT) or None
    return schema[path][method].as_strategy(generation_mode=mode, headers=_bearer(key),
                                            path_parameters=fixed)


def _checker(env, label: str, results: list, failures: list):
    def check(case):
        _restore(env)
        response = _send(env["client"], case)
        results.append((label, response.status_code))
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as e:  # collect every finding, then fail once
            failures.append(f"{label}: {e}")

    return check


def fuzz(env, positive_doc: dict, negative_doc: dict, scale: int = 1, seed_: int = SEED):
    """Run BUDGET x ``scale`` cases: ("mode METHOD path", status) of each, and the findings."""
    config = schemathesis.Config.from_dict(CONFIG)
    positive = schemathesis.openapi.from_dict(positive_doc, config=config)
    negative = schemathesis.openapi.from_dict(negative_doc, config=config)
    results, failures = [], []
    for (method, path), counts in BUDGET.items():
        for mode, count, schema in ((GenerationMode.POSITIVE, counts[0], positive),
                                    (GenerationMode.NEGATIVE, counts[1], negative)):
            if not count:
                continue
            check = _checker(env, f"{mode.value} {method} {path}", results, failures)
            run = given(case=_strategy(schema, method, path, mode, env))(check)
            run = settings(max_examples=count * scale, database=None, deadline=None,
                           phases=[Phase.generate],
                           suppress_health_check=list(HealthCheck))(run)
            seed(seed_)(run)()
    _restore(env)
    return results, failures


def _refs(node):
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for v in node.values():
            yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_the_document_declares_every_route_body_and_error(env):
    doc = env["client"].get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    schemas = doc["components"]["schemas"]
    assert all(r.removeprefix("#/components/schemas/") in schemas for r in _refs(doc))
    ops = {(m.upper(), p): op for p, item in doc["paths"].items() for m, op in item.items()}
    assert set(ops) == set(BUDGET), "an operation is neither fuzzed nor declared"
    for (method, path), op in ops.items():
        params = {p["name"] for p in op.get("parameters", ()) if p["in"] == "path"}
        assert params == set(re.findall(r"{(\w+)}", path)), path
        if path == "/admin/":  # the status page: HTML, or a 403 when there is no admin API
            assert "text/html" in op["responses"]["200"]["content"]
            error = op["responses"]["403"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorBody"}
            continue
        if path in ("/", "/health", "/metrics"):
            continue
        ok = op["responses"]["201" if method == "POST" and path.startswith("/admin")
                             else "200"]
        assert ok["content"]["application/json"]["schema"]["$ref"]
        for status in ("400", "401", "403", "404", "409", "413", "429", "503"):
            error = op["responses"][status]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorBody"}, (method, path)
        assert op["security"]
    for path, cls in (("/v1/completions", CompletionRequest),
                      ("/v1/chat/completions", ChatCompletionRequest)):
        body = ops[("POST", path)]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{cls.__name__}"}
        want = cls.model_json_schema(ref_template="#/components/schemas/{model}")
        want.pop("$defs")
        assert schemas[cls.__name__] == want
        stream = ops[("POST", path)]["responses"]["200"]["content"]["text/event-stream"]
        assert stream["schema"]["properties"]["data"]
    loaded = schemathesis.openapi.from_dict(doc)
    assert all(op.ok() for op in loaded.get_all_operations())
    try:
        from openapi_spec_validator import validate
    except ImportError:  # not a dependency; checked where it is installed
        return
    validate(doc)


def test_fuzz_the_api_against_its_own_schema(env):
    doc = env["client"].get("/openapi.json").json()
    started = time.monotonic()
    results, failures = fuzz(env, tightened(doc, env, WIDE), doc, SCALE)
    elapsed = time.monotonic() - started

    statuses = [status for _, status in results]
    past_auth = sum(s not in (401, 403) for s in statuses) / len(statuses)
    print(f"\n{len(results)} cases in {elapsed:.1f} s; past auth: {past_auth:.0%}; statuses: "
          f"{ {s: statuses.count(s) for s in sorted(set(statuses))} }")
    assert not failures, "\n\n".join(failures)
    assert len(results) >= 0.8 * SCALE * sum(map(sum, BUDGET.values()))
    assert past_auth > 0.8
    assert env["state"].client.alive


# ---- what fuzzing found -----------------------------------------------------------------------
# (id, method, path, raw JSON body, what happens now): each should get a 4xx. Strict xfail: a
# fix shows up as XPASS, and its entry goes.
KNOWN_FINDINGS = [  # (id, method, path, body, what it did before it was fixed)
    ("huge-stop-token-id", "POST", "/v1/completions",
     '{"model": "tiny", "prompt": [5, 6], "max_tokens": 4, "min_tokens": 1, '
     '"stop_token_ids": [9223372036854775808]}',
     "found in review: the min_tokens mask could not hold the id (overflow) and the engine "
     "failed every request in flight"),
    ("unknown-user-path", "POST", "/admin/models", '{"name": "tilde", "path": "~nosuchuser/x"}',
     "found in review: expanduser raised RuntimeError; 500"),
    ("tiny-repetition-penalty", "POST", "/v1/completions",
     '{"model": "tiny", "prompt": [5, 6], "max_tokens": 4, "repetition_penalty": 1e-40}',
     "repetition_penalty below ~1e-38 makes logits inf: the engine step raises (probability "
     "tensor contains inf or nan) and fail_all() fails every request in flight; 500"),
    ("tiny-repetition-penalty-stream", "POST", "/v1/chat/completions",
     '{"model": "tiny", "messages": [{"role": "user", "content": "w5"}], "max_tokens": 4, '
     '"stream": true, "repetition_penalty": 5e-324}',
     "the same, streamed: 200, then a server_error event"),
    ("huge-repetition-penalty", "POST", "/v1/completions",
     '{"model": "tiny", "prompt": [5, 6], "max_tokens": 4, "repetition_penalty": 1e39}',
     "repetition_penalty above float32's max: apply_processors raises (value cannot be "
     "converted to type float without overflow) in the engine step; 500"),
    ("surrogate-prompt", "POST", "/v1/completions",
     '{"model": "tiny", "prompt": "w5 \\ud800", "max_tokens": 2}',
     "a lone surrogate in the prompt: the tokenizer raises TypeError; 500"),
    ("surrogate-chat", "POST", "/v1/chat/completions",
     '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
     "a lone surrogate in a message: the tokenizer raises TypeError in _chat_prompt; 500"),
    ("surrogate-model", "POST", "/v1/completions",
     '{"model": "tiny\\ud800", "prompt": "w5", "max_tokens": 2}',
     "the 404 names the model: JSONResponse cannot encode the surrogate; 500"),
    ("surrogate-grant", "POST", "/admin/tenants",
     '{"name": "surrogate", "models": ["tiny\\ud800"]}',
     "the 400 names the unknown model: JSONResponse cannot encode the surrogate; 500"),
    ("nul-path", "POST", "/admin/models", '{"name": "nul", "path": "ROOT/tiny\\u0000"}',
     "check_path: ValueError (embedded null byte); 500"),
    ("surrogate-path", "POST", "/admin/adapters",
     '{"name": "sur", "base": "tiny", "path": "ROOT/lora\\ud800"}',
     "check_path: UnicodeEncodeError; 500"),
    ("infinite-slo", "POST", "/admin/models",
     '{"name": "inf-slo", "path": "ROOT/tiny", "ttft_ms": 1e400}',
     "1e400 parses as inf and ttft_ms > 0 takes it: 201, then GET /admin/models is a 500 "
     "(inf is not JSON) until the model is deleted"),
]


@pytest.mark.parametrize("name,method,path,body", [pytest.param(*f[:4], id=f[0])
                                                     for f in KNOWN_FINDINGS])
def test_known_finding(env, name, method, path, body):
    """Each input the fuzzer once turned into a 500 (the reason beside it) is a 4xx now."""
    client = env["client"]
    key = ADMIN_KEY if path.startswith("/admin") else env["key"]
    try:
        r = client.request(method, path, headers={**_bearer(key),
                                                  "Content-Type": "application/json"},
                           content=body.replace("ROOT", str(env["root"])).encode())
        answers = [r]
        if name == "infinite-slo":
            answers.append(client.get("/admin/models", headers=_bearer(ADMIN_KEY)))
        for a in answers:
            assert a.status_code < 500 and '"server_error"' not in a.text, a.text
        assert 400 <= r.status_code < 500 or name == "infinite-slo", r.text
    finally:
        client.delete("/admin/models/inf-slo", headers=_bearer(ADMIN_KEY))
        _restore(env)
