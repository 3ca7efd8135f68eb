"""Structured output (issue 18): response_format json_object / json_schema through xgrammar,
per row in mixed batches, over the engine and over HTTP with the official openai client.

The model is a tiny random Llama with SmolLM2's byte-level tokenizer (49152 tokens): the
word-level test tokenizer has no ``{``, ``"`` or digits, so no JSON could come out of it."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from gpupool import SamplingParams
from gpupool.messages.types import EngineRequest
from tests.factories import make_byte_model, make_engine, make_peft_adapter
from tests.serving import Server

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"type": "string", "enum": ["cat", "dog", "owl"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                 "maxItems": 3},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                  "indoor": {"type": "boolean"}},
                 "required": ["city", "indoor"], "additionalProperties": False},
    },
    "required": ["name", "kind", "age", "tags", "home"],
    "additionalProperties": False,
}
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory, smollm2_path):
    return make_byte_model(tmp_path_factory.mktemp("bytes"), smollm2_path)


def _close(folder) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).convert_tokens_to_ids("}")


def _valid(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value


def test_mixed_batch_constrained_free_and_adapter(byte_model, tmp_path):
    ad = make_peft_adapter(byte_model, tmp_path / "ad", 4, ["q_proj", "v_proj"])
    engine = make_engine(byte_model, kv_cache_bytes=16 << 20)
    try:
        engine.add_adapter("ad", "m", ad)
        schema = ("json_schema", json.dumps(SCHEMA))
        params = [
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0, structured=schema),
            SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=5, structured=schema),
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0, structured=schema),
            # any JSON object is unbounded for a random model: a bias on "}" closes it as
            # soon as the grammar allows (and checks a bias inside a grammar's mask)
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, seed=9,
                           structured=("json_object", ""), logit_bias={_close(byte_model): 30}),
            SamplingParams(max_tokens=12, temperature=0),  # free
        ]
        prompts = ["A pet:", "Another pet:", "Pet:", "Any object:", "Free text"]
        models = ["m", "m", "ad", "m", "m"]
        outs = engine.generate(prompts, params, model=models)
        for o in outs[:3]:
            assert o.finish_reason == "stop", o.text
            _valid(o.text)
        assert outs[3].finish_reason == "stop" and isinstance(json.loads(outs[3].text), dict)
        alone = engine.generate(prompts[4:], params[4:])[0]
        assert alone.token_ids == outs[4].token_ids  # a free row is not touched (fp32)
        free = engine.generate(["A pet:"], SamplingParams(max_tokens=20, temperature=0))[0]
        with pytest.raises(ValueError):
            json.loads(free.text)  # the random model alone writes no JSON
    finally:
        engine.shutdown()


def test_a_resumed_request_replays_its_tokens_into_the_grammar(byte_model):
    engine = make_engine(byte_model, kv_cache_bytes=16 << 20)
    try:
        ids = engine.tokenize("m", "A pet:")
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                structured=("json_schema", json.dumps(SCHEMA)))

        async def run(req):
            [stream] = await engine.client().submit([req])
            tokens = list(req.delivered_token_ids)
            async for delta in stream:
                tokens += delta.token_ids[len(tokens) - delta.index:]
            return tokens

        whole = asyncio.run(run(EngineRequest("w", "m", ids, params)))
        resumed = asyncio.run(run(EngineRequest("r", "m", ids, params,
                                                delivered_token_ids=whole[:7])))
        assert resumed == whole
        bad = EngineRequest("b", "m", ids, params, delivered_token_ids=[ids[0]] * 3)
        with pytest.raises(Exception, match="response_format"):
            asyncio.run(run(bad))
    finally:
        engine.shutdown()


# ---- over HTTP -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tmp_path_factory, byte_model):
    ad = make_peft_adapter(byte_model, tmp_path_factory.mktemp("ad") / "ad", 4, ["q_proj"])
    server = Server(tmp_path_factory.mktemp("home"), "--model", f"bytes={byte_model}",
                    "--adapter", f"ad=bytes:{ad}", kv=32 << 20)
    with server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}


@pytest.mark.parametrize("model,temperature", [("bytes", 0.0), ("ad", 1.0)])
def test_chat_json_schema_with_the_openai_client(client, model, temperature):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe a pet."}],
        max_tokens=MAX_TOKENS, temperature=temperature, seed=3,
        response_format=RESPONSE_FORMAT)
    assert r.choices[0].finish_reason == "stop"
    _valid(r.choices[0].message.content)
    text, reasons = "", []
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Describe a pet."}],
            max_tokens=MAX_TOKENS, temperature=temperature, seed=3, stream=True,
            response_format=RESPONSE_FORMAT):
        for c in chunk.choices:
            text += c.delta.content or ""
            reasons.append(c.finish_reason)
    assert reasons[-1] == "stop" and _valid(text)
    assert text == r.choices[0].message.content  # same seed: streamed or not


def test_completions_json_object_and_bad_formats(client, byte_model):
    r = client.completions.create(model="bytes", prompt="An object:", max_tokens=MAX_TOKENS,
                                  temperature=0.5, seed=1, n=2,
                                  logit_bias={str(_close(byte_model)): 30},
                                  extra_body={"response_format": {"type": "json_object"}})
    for c in r.choices:
        assert c.finish_reason == "stop" and isinstance(json.loads(c.text), dict)
    for fmt, code in (({"type": "json_schema", "json_schema": {"name": "x"}}, None),
                      ({"type": "json_schema",
                        "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, None),
                      ({"type": "regex"}, "unsupported_field")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="bytes", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                response_format=fmt)
        err = e.value.body
        assert err["param"] == "response_format", err
        assert code is None or err["code"] == code
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="bytes", messages=[{"role": "user", "content": "x"}], max_tokens=5,
            response_format={"type": "json_object"}, extra_body={"min_tokens": 2})
    assert "min_tokens" in e.value.body["message"]


def test_tokenize_detokenize_and_version(client, byte_model):
    import httpx

    base = str(client.base_url).removesuffix("/v1/")
    r = httpx.post(base + "/tokenize", json={"model": "bytes", "prompt": "Hello world"})
    assert r.status_code == 200, r.text
    body = r.json()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(byte_model))
    assert body["tokens"] == tok("Hello world")["input_ids"] and body["count"] == 2
    assert body["max_model_len"] == 512
    chat = httpx.post(base + "/tokenize", json={
        "model": "ad", "messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 2 and "<|im_start|>" in tok.decode(chat["tokens"])
    r = httpx.post(base + "/detokenize", json={"model": "bytes", "tokens": body["tokens"]})
    assert r.status_code == 200 and r.json()["prompt"] == "Hello world"
    for path, payload, param in (
            ("/detokenize", {"model": "bytes", "tokens": [10**6]}, "tokens"),
            ("/tokenize", {"model": "bytes"}, "prompt"),
            ("/tokenize", {"model": "bytes", "prompt": "x", "surprise": 1}, "surprise")):
        r = httpx.post(base + path, json=payload)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert httpx.post(base + "/tokenize", json={"model": "nope", "prompt": "x"}
                      ).status_code == 404
    assert httpx.get(base + "/version").json()["version"] == "0.1.0"


def test_vllm_structured_output_fields(client):
    """vLLM's structured_outputs and guided_* fields, through the same grammars."""
    ask = {"model": "bytes", "prompt": "Answer:", "max_tokens": 40, "temperature": 1.0,
           "seed": 2}
    r = client.completions.create(**ask, extra_body={"guided_choice": ["yes", "no way"]})
    assert r.choices[0].text in ("yes", "no way") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(
        **ask, extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-c]{2}"}})
    text = r.choices[0].text
    assert len(text) == 6 and text[:3].isdigit() and text[3] == "-", text
    assert set(text[4:]) <= set("abc")
    r = client.completions.create(**{**ask, "max_tokens": MAX_TOKENS},
                                  extra_body={"guided_json": SCHEMA})
    assert r.choices[0].finish_reason == "stop"
    _valid(r.choices[0].text)
    r = client.completions.create(
        **ask, extra_body={"guided_grammar": 'root ::= "x" ("y" | "z") "!"'})
    assert r.choices[0].text in ("xy!", "xz!")
    for extra in ({"guided_choice": ["a"], "guided_regex": "b"},
                  {"guided_choice": ["a"], "response_format": {"type": "json_object"}},
                  {"guided_regex": "(unclosed"}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(**ask, extra_body=extra)
