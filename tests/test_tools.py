"""Tools over HTTP with the official openai client (issue 18): a tiny random Llama with
SmolLM2's byte-level tokenizer and a chat template written here in the hermes format
(tools in the system turn, calls in <tool_call> tags), as Qwen2.5's carries them."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.factories import make_byte_model
from tests.serving import Server

TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou can call these tools; write each call as "
    "<tool_call>\n{\"name\": ..., \"arguments\": {...}}\n</tool_call>\n"
    "{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.tool_calls %}{%- for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n"
    "</tool_call>{%- endfor %}{%- else %}{{ m.content }}{%- endif %}<|im_end|>\n"
    "{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"],
        "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client(tmp_path_factory, smollm2_path):
    folder = make_byte_model(tmp_path_factory.mktemp("toolbot"), smollm2_path, seed=1,
                             max_len=1024, chat_template=TEMPLATE)
    server = Server(tmp_path_factory.mktemp("home"), "--model", f"toolbot={folder}",
                    "--model", f"smol={smollm2_path}", kv=32 << 20)
    with server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check(call, tool):
    assert call.type == "function" and call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_tool_choice_parses_into_the_declared_arguments(client, temperature):
    r = client.chat.completions.create(model="toolbot", messages=ASK, max_tokens=120,
                                       temperature=temperature, seed=4, tools=[WEATHER, TIME],
                                       tool_choice="required")
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    _check(call, WEATHER if call.function.name == "get_weather" else TIME)
    named = client.chat.completions.create(
        model="toolbot", messages=ASK, max_tokens=120, temperature=temperature, seed=4,
        tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    _check(named.choices[0].message.tool_calls[0], TIME)


def test_streamed_tool_call_and_a_multi_turn_conversation(client):
    deltas, reasons, text = [], [], ""
    for chunk in client.chat.completions.create(
            model="toolbot", messages=ASK, max_tokens=120, temperature=0, tools=[WEATHER],
            tool_choice="required", stream=True):
        for c in chunk.choices:
            deltas += c.delta.tool_calls or []
            text += c.delta.content or ""
            reasons.append(c.finish_reason)
    assert reasons[-1] == "tool_calls" and len(deltas) == 1 and "<tool_call>" not in text
    _check(deltas[0], WEATHER)
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": deltas[0].id, "type": "function",
             "function": {"name": "get_weather", "arguments": deltas[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": deltas[0].id, "content": "18 degrees, sunny"}]
    r = client.chat.completions.create(model="toolbot", messages=history, max_tokens=8,
                                       temperature=0, tools=[WEATHER])  # auto
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length", "tool_calls")
    assert c.message.content is not None or c.message.tool_calls


def test_a_template_without_tools_and_bad_tool_choices_are_400(client):
    for kw, param in (({"model": "smol", "tools": [WEATHER]}, "tools"),
                      ({"model": "toolbot", "tools": [WEATHER],
                        "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                       "tool_choice"),
                      ({"model": "toolbot", "tool_choice": "required"}, "tool_choice"),
                      ({"model": "toolbot", "tools": [{"type": "function"}]}, "tools"),
                      ({"model": "toolbot", "tools": [WEATHER], "tool_choice": "required",
                        "response_format": {"type": "json_object"}}, "tool_choice")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(messages=ASK, max_tokens=5, **kw)
        assert e.value.body["param"] == param, e.value.body
    r = client.chat.completions.create(model="smol", messages=ASK, max_tokens=3,
                                       tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.tool_calls == []


def test_tokenize_renders_tool_calls_and_results_as_the_chat_route_does(client):
    """/tokenize with messages counts the prompt the chat route builds: an assistant's
    tool_calls and a tool result with its call id are rendered by the template, not dropped."""
    import httpx

    args = json.dumps({"city": "Paris", "unit": "celsius"})
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    base = str(client.base_url).removesuffix("/v1/")
    r = httpx.post(base + "/tokenize", json={"model": "toolbot", "messages": history})
    assert r.status_code == 200, r.text
    chat = client.chat.completions.create(model="toolbot", messages=history, max_tokens=1,
                                          temperature=0)
    assert r.json()["count"] == chat.usage.prompt_tokens
    text = httpx.post(base + "/detokenize", json={"model": "toolbot",
                                                   "tokens": r.json()["tokens"]}).json()
    assert "<tool_call>" in text["prompt"] and "Paris" in text["prompt"]
