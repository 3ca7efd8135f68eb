"""What clients still tripped on (issue 33), over HTTP with the official openai client, on one
server: a thinking model's ``reasoning_content`` (items 3), ``/v1/embeddings`` (item 7) and
``/v1/responses`` (item 7).

The models are tiny random Llamas with SmolLM2's byte-level tokenizer: ``thinker`` has
``<think>`` and ``</think>`` in its vocabulary, a Qwen3-style template (tools, and
``enable_thinking: false`` closing the block in the prompt) and the qwen3 reasoning parser;
``embedder`` (no sentence-transformers files: last token, normalised) and ``meaner`` (a
sentence-transformers Pooling module of mean tokens, no Normalize) serve embeddings. A random
model does not think on its own: a logit bias or an assistant prefill opens and closes its
blocks where a test needs them."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.factories import make_byte_model, make_peft_adapter
from tests.serving import Server

TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nCall tools as <tool_call>\n{\"name\": ..., "
    "\"arguments\": {...}}\n</tool_call>{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}"
    "<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.tool_calls %}{%- for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n"
    "</tool_call>{%- endfor %}{%- else %}{{ m.content }}{%- endif %}<|im_end|>\n"
    "{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{%- endif %}{% endif %}")
START, END = 49152, 49153  # <think>, </think>
ADMIN_KEY = "admin-secret-for-clients"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smollm2_path):
    thinker = make_byte_model(tmp_path_factory.mktemp("thinker"), smollm2_path, seed=3,
                              chat_template=TEMPLATE, extra_tokens=("<think>", "</think>"))
    r1 = make_byte_model(tmp_path_factory.mktemp("r1"), smollm2_path, seed=3,
                         chat_template=TEMPLATE.replace("{%- if enable_thinking is defined",
                                                        "<think>\n{%- if false")
                         .replace("<think>\n\n</think>", ""),
                         extra_tokens=("<think>", "</think>"))
    embedder = make_byte_model(tmp_path_factory.mktemp("embedder"), smollm2_path, seed=4)
    meaner = make_byte_model(tmp_path_factory.mktemp("meaner"), smollm2_path, seed=5)
    (meaner / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    (meaner / "1_Pooling").mkdir()
    (meaner / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True,
         "pooling_mode_lasttoken": False}))
    root = thinker.parent
    for name, seed, targets in (("tune-a", 1, ["q_proj", "v_proj"]),
                                ("tune-b", 2, ["k_proj", "o_proj"])):
        make_peft_adapter(thinker, root / name, 4, targets, seed=seed)
    make_peft_adapter(embedder, embedder.parent / "emb-ad", 4, ["q_proj", "down_proj"], seed=3)
    return {"thinker": thinker, "r1": r1, "embedder": embedder, "meaner": meaner,
            "tune-a": root / "tune-a", "tune-b": root / "tune-b",
            "emb-ad": embedder.parent / "emb-ad"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, folders):
    models = "".join(
        f'\n[[models]]\nname = "{n}"\npath = "{folders[n]}"\n{extra}\n'
        for n, extra in (("thinker", 'reasoning_parser = "qwen3"'),
                         ("r1", 'reasoning_parser = "deepseek_r1"'),
                         ("embedder", 'task = "embed"'), ("meaner", 'task = "embed"')))
    models += f'\n[[models]]\nname = "plain"\npath = "{folders["thinker"]}"\n'
    models += (f'\n[[adapters]]\nname = "emb-ad"\nbase = "embedder"\n'
               f'path = "{folders["emb-ad"]}"\n')
    roots = [a for n in ("thinker", "r1", "embedder", "meaner")
             for a in ("--model-root", str(folders[n].parent))]
    with Server(tmp_path_factory.mktemp("home"), "--admin-key", ADMIN_KEY, *roots,
                kv=32 << 20, engine_toml=models) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


ASK = [{"role": "user", "content": "Is the sky blue?"}]


def _tokens(server, messages, **options) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json={"model": "thinker", "messages": messages,
                                                   **options})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _completion_text(client, ids: list[int], max_tokens: int) -> str:
    return client.completions.create(model="thinker", prompt=ids, max_tokens=max_tokens,
                                     temperature=0).choices[0].text


def _streamed(client, **kw) -> tuple[str, str]:
    reasoning = content = ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
            content += c.delta.content or ""
    return reasoning, content


# ---- a thinking model's reasoning -------------------------------------------------------------
def test_an_unclosed_block_is_all_reasoning_streamed_or_not(client, server):
    """An assistant prefill opens the block (continue_final_message): the output is the
    reasoning, exactly the text the same prompt continues with on /v1/completions."""
    messages = ASK + [{"role": "assistant", "content": "<think>Let me see"}]
    opts = {"add_generation_prompt": False, "continue_final_message": True}
    ids = _tokens(server, messages, **opts)
    assert START in ids and END not in ids
    plain = _completion_text(client, ids, 12)
    assert "</think>" not in plain  # the random model did not close it
    kw = {"model": "thinker", "messages": messages, "max_tokens": 12, "temperature": 0,
          "extra_body": opts}
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == plain and msg.content is None
    assert _streamed(client, **kw) == (plain, "")


def test_a_closed_block_in_the_prompt_leaves_content_only(client, server):
    kw = {"model": "thinker", "messages": ASK, "max_tokens": 10, "temperature": 0,
          "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}
    ids = _tokens(server, ASK, chat_template_kwargs={"enable_thinking": False})
    assert ids[-4:].count(END) == 1  # the template closed the block
    plain = _completion_text(client, ids, 10)
    msg = client.chat.completions.create(**kw).choices[0].message
    assert msg.content == plain and msg.model_extra.get("reasoning_content") is None
    assert _streamed(client, **kw) == ("", plain)


@pytest.mark.parametrize("prefill", [False, True])
def test_the_grammar_starts_after_the_reasoning(client, prefill):
    """A bias makes the model write <think> then </think> where they are allowed: with a
    reasoning parser the grammar lets them through and applies after </think>; the content
    follows the schema."""
    messages, extra = ASK, {"logit_bias": {str(START): 90, str(END): 100}}
    if prefill:  # the block is open already: the model closes it at once
        messages = ASK + [{"role": "assistant", "content": "<think>Hmm"}]
        extra.update(add_generation_prompt=False, continue_final_message=True)
    kw = {"model": "thinker", "messages": messages, "max_tokens": 40, "temperature": 0,
          "response_format": FORMAT}
    r = client.chat.completions.create(**kw, extra_body=extra)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert json.loads(msg.content) in ({"ok": True}, {"ok": False})
    assert msg.model_extra["reasoning_content"] == ""
    assert _streamed(client, **kw, extra_body=extra) == ("", msg.content)


def test_admin_options_are_checked_when_a_model_is_added(server, folders):
    admin = httpx.Client(base_url=server.url, headers=ADMIN, timeout=60)
    dense = folders["meaner"].parent / "dense"
    shutil.copytree(folders["meaner"], dense)
    modules = json.loads((dense / "modules.json").read_text())
    (dense / "modules.json").write_text(json.dumps(modules + [
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    for body, words in (
            ({"path": str(folders["embedder"]), "reasoning_parser": "qwen3"}, "<think>"),
            ({"path": str(dense), "task": "embed"}, "Dense"),
            ({"path": str(folders["embedder"]), "reasoning_parser": "r2"}, "reasoning_parser"),
            ({"path": str(folders["embedder"]), "task": "rank"}, "task")):
        r = admin.post("/admin/models", json={"name": "x", **body})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        assert "x" not in [m["name"] for m in admin.get("/admin/models").json()["data"]]
    listed = {m["name"]: m for m in admin.get("/admin/models").json()["data"]}
    assert listed["thinker"]["reasoning_parser"] == "qwen3"
    assert listed["meaner"]["task"] == "embed" and listed["thinker"]["task"] == "generate"


# ---- embeddings -------------------------------------------------------------------------------
def _hf_hidden(folder, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return model.model(torch.tensor([ids])).last_hidden_state[0]


def test_embeddings_match_transformers_hidden_states(client, server, folders):
    texts = ["The sky is blue.", "A much longer sentence about the colour of the sea and "
             "of the sky, with more words than the first.", "ok"]
    tokens = [httpx.post(server.url + "/tokenize", json={"model": "embedder", "prompt": t})
              .json()["tokens"] for t in texts]
    for name in ("embedder", "meaner"):
        r = client.embeddings.create(model=name, input=texts, encoding_format="float")
        assert [d.index for d in r.data] == [0, 1, 2] and r.model == name
        assert r.usage.prompt_tokens == sum(map(len, tokens)) == r.usage.total_tokens
        for d, ids in zip(r.data, tokens):
            h = _hf_hidden(folders[name], ids)
            want = (torch.nn.functional.normalize(h[-1], dim=0) if name == "embedder"
                    else h.mean(dim=0))  # meaner: mean tokens, no Normalize module
            got = torch.tensor(d.embedding)
            assert got.shape == (64,)
            assert (got - want).abs().max().item() < 1e-5, name
    # the client's default: base64 (little-endian float32), decoded by the client
    b = client.embeddings.create(model="embedder", input=texts[0])
    f = client.embeddings.create(model="embedder", input=texts[0], encoding_format="float")
    assert b.data[0].embedding == pytest.approx(f.data[0].embedding, abs=1e-7)
    raw = httpx.post(server.url + "/v1/embeddings", json={
        "model": "embedder", "input": tokens[0], "encoding_format": "base64"}).json()
    vec = struct.unpack(f"<{64}f", base64.b64decode(raw["data"][0]["embedding"]))
    assert list(vec) == pytest.approx(f.data[0].embedding, abs=1e-7)  # token ids as input


def test_embeddings_of_an_adapter_match_peft(client, server, folders):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = httpx.post(server.url + "/tokenize", json={"model": "embedder", "prompt": "sea"}
                     ).json()["tokens"]
    base = AutoModelForCausalLM.from_pretrained(str(folders["embedder"]), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(folders["emb-ad"]))
    with torch.no_grad():
        h = tuned.base_model.model.model(torch.tensor([ids])).last_hidden_state[0, -1]
    got = client.embeddings.create(model="emb-ad", input=ids, encoding_format="float")
    plain = client.embeddings.create(model="embedder", input=ids, encoding_format="float")
    want = torch.nn.functional.normalize(h, dim=0)
    assert (torch.tensor(got.data[0].embedding) - want).abs().max().item() < 1e-5
    assert (torch.tensor(plain.data[0].embedding) - want).abs().max().item() > 1e-3


def test_embedding_errors_are_400s_naming_the_field(client):
    for kw, param in (
            ({"model": "embedder", "input": "x", "dimensions": 8}, "dimensions"),
            ({"model": "thinker", "input": "x"}, "model"),  # not an embedding model
            ({"model": "embedder", "input": ""}, "input"),
            ({"model": "embedder", "input": [[1, 2], [99999999]]}, "input")):
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(encoding_format="float", **kw)
        assert e.value.body["param"] == param, kw
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="embedder", messages=ASK, max_tokens=2)
    assert "embedding model" in e.value.body["message"]


# ---- adapters replaced in place ---------------------------------------------------------------
def test_load_inplace_replaces_an_adapter(client, server, folders):
    admin = httpx.Client(base_url=server.url, headers=ADMIN, timeout=60)

    def load(name, path, **kw):
        return admin.post("/v1/load_lora_adapter",
                          json={"lora_name": name, "lora_path": str(path), **kw})

    def text(model):
        return client.completions.create(model=model, prompt="The sea is", max_tokens=8,
                                         temperature=0).choices[0].text

    assert load("tune", folders["tune-a"]).status_code == 200
    assert load("tune-b", folders["tune-b"]).status_code == 200
    a, b = text("tune"), text("tune-b")
    assert a != b
    r = load("tune", folders["tune-b"])  # taken, without load_inplace
    assert r.status_code == 409, r.text
    r = load("tune", folders["tune-b"], load_inplace=True)
    assert r.status_code == 200 and r.json()["path"] == str(folders["tune-b"]), r.text
    assert text("tune") == b
    listed = {m["name"]: m for m in admin.get("/admin/adapters").json()["data"]}
    assert listed["tune"]["path"] == str(folders["tune-b"]) and listed["tune"]["loaded"]
    assert load("tune", folders["thinker"].parent / "missing", load_inplace=True
                ).status_code == 404
    assert text("tune") == b  # a failed replacement leaves the adapter as it was
    for name in ("tune", "tune-b"):
        assert admin.post("/v1/unload_lora_adapter", json={"lora_name": name}
                          ).status_code == 200


# ---- the Responses API ------------------------------------------------------------------------
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "maxLength": 10}}, "required": ["city"],
               "additionalProperties": False}}


def _chat_text(client, model, messages, max_tokens, **kw) -> str:
    return client.chat.completions.create(model=model, messages=messages, temperature=0,
                                          max_tokens=max_tokens, **kw).choices[0].message.content


def test_a_response_is_the_chat_answer_whole_and_streamed(client):
    r = client.responses.create(model="plain", input="Is the sky blue?", max_output_tokens=8,
                                temperature=0)
    want = _chat_text(client, "plain", ASK, 8)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == want and [o.type for o in r.output] == ["message"]
    assert r.usage.output_tokens == 8 and r.usage.input_tokens > 0
    types, numbers = [], []
    with client.responses.stream(model="plain", input="Is the sky blue?",
                                 max_output_tokens=8, temperature=0) as stream:
        for event in stream:
            types.append(event.type)
            numbers.append(event.sequence_number)
        final = stream.get_final_response()
    assert final.output_text == want and final.status == "incomplete"
    assert numbers == list(range(len(types)))
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]


def test_previous_response_id_instructions_get_and_delete(client):
    r1 = client.responses.create(model="plain", input="Hi", max_output_tokens=6,
                                 temperature=0)
    r2 = client.responses.create(model="plain", input="More", instructions="Be brief",
                                 previous_response_id=r1.id, max_output_tokens=6,
                                 temperature=0)
    messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": r1.output_text},
                {"role": "user", "content": "More"}]
    assert r2.output_text == _chat_text(client, "plain", messages, 6)
    assert r2.previous_response_id == r1.id
    got = client.responses.retrieve(r1.id)
    assert got.id == r1.id and got.output_text == r1.output_text
    client.responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r1.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="plain", input="x", previous_response_id=r1.id)
    unstored = client.responses.create(model="plain", input="Hi", max_output_tokens=2,
                                       store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_function_calls_and_their_outputs(client):
    ask = "What is the weather in Paris?"
    r1 = client.responses.create(model="plain", input=ask, tools=[WEATHER],
                                 tool_choice="required", max_output_tokens=60, temperature=0)
    calls = [o for o in r1.output if o.type == "function_call"]
    assert r1.status == "completed" and len(calls) >= 1
    assert calls[0].name == "get_weather" and "city" in json.loads(calls[0].arguments)
    with client.responses.stream(model="plain", input=ask, tools=[WEATHER],
                                 tool_choice="required", max_output_tokens=60,
                                 temperature=0) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    assert [(o.name, o.arguments) for o in final.output if o.type == "function_call"] == [
        (c.name, c.arguments) for c in calls]
    # the call's output, sent back: the model continues after a tool message
    r2 = client.responses.create(model="plain", previous_response_id=r1.id, tools=[WEATHER],
                                 tool_choice="none", max_output_tokens=6, temperature=0,
                                 input=[{"type": "function_call_output",
                                         "call_id": calls[0].call_id, "output": "sunny"}])
    chat_calls = [{"id": c.call_id, "type": "function",
                   "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
    messages = [{"role": "user", "content": ask},
                {"role": "assistant", "content": None, "tool_calls": chat_calls},
                {"role": "tool", "tool_call_id": calls[0].call_id, "content": "sunny"}]
    tools = [{"type": "function", "function": {k: v for k, v in WEATHER.items()
                                               if k != "type"}}]
    if r1.output[0].type == "message":  # text before the calls
        messages[1]["content"] = r1.output[0].content[0].text
    assert r2.output_text == _chat_text(client, "plain", messages, 6, tools=tools,
                                        tool_choice="none")


def test_json_schema_text_format(client):
    r = client.responses.create(model="plain", input="Answer.", max_output_tokens=40,
                                temperature=0, text={"format": {
                                    "type": "json_schema", "name": "answer",
                                    "schema": SCHEMA, "strict": True}})
    assert r.status == "completed" and json.loads(r.output_text) in ({"ok": True},
                                                                     {"ok": False})


def test_a_thinking_models_reasoning_item(client, server):
    """r1's template opens the block: a short answer is all reasoning."""
    r = client.responses.create(model="r1", input="Is the sky blue?", max_output_tokens=8,
                                temperature=0)
    ids = httpx.post(server.url + "/tokenize", json={"model": "r1", "messages": ASK}
                     ).json()["tokens"]
    assert ids[-1] == START
    plain = client.completions.create(model="r1", prompt=ids, max_tokens=8,
                                      temperature=0).choices[0].text
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == plain and r.output_text == ""
    assert r.usage.output_tokens_details.reasoning_tokens == 8
    with client.responses.stream(model="r1", input="Is the sky blue?", max_output_tokens=8,
                                 temperature=0) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.reasoning_text.delta" in kinds
    assert final.output[0].content[0].text == plain


def test_responses_refuse_what_they_do_not_do(client):
    for kw, param in (({"tools": [{"type": "web_search"}]}, "tools"),
                      ({"background": True}, "background"),
                      ({"input": [{"role": "user", "content": [
                          {"type": "input_image", "image_url": "x"}]}]}, "input")):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**{"model": "plain", "input": "x", **kw})
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="embedder", input="x")


def test_stored_responses_belong_to_their_tenant(server):
    """Last in this module: the first tenant makes the server need keys."""
    admin = httpx.Client(base_url=server.url, headers=ADMIN, timeout=60)
    keys = {}
    for name in ("acme", "other"):
        r = admin.post("/admin/tenants", json={"name": name, "models": ["plain"]})
        assert r.status_code == 201, r.text
        keys[name] = r.json()["api_key"]
    acme, other = (openai.OpenAI(base_url=server.url + "/v1", api_key=keys[n], max_retries=0)
                   for n in ("acme", "other"))
    r = acme.responses.create(model="plain", input="Hi", max_output_tokens=3)
    assert acme.responses.retrieve(r.id).output_text == r.output_text
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model="plain", input="x", previous_response_id=r.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(r.id)
    acme.responses.delete(r.id)


# ---- vLLM's metrics ---------------------------------------------------------------------------
DASHBOARD = Path(__file__).parent / "data" / "vllm_grafana_v0.34.0.json"


def test_every_series_of_vllms_dashboard_has_samples(tmp_path_factory, tiny_models):
    """vLLM's own Grafana dashboard (pinned) reads gpupool: after a workload with a prefix
    cache hit and preemptions (a 16-page KV pool of 32 tokens each), every series its
    queries name is in /metrics with samples for the model."""
    names = sorted(set(re.findall(r"vllm:[a-z0-9_:]+", DASHBOARD.read_text())))
    assert len(names) >= 20
    home = tmp_path_factory.mktemp("metrics")
    with Server(home, "--model", f"tiny={tiny_models('llama')}", kv=16 << 14,
                page=16 << 10) as s:
        prompt = list(range(3, 103))
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0}
        for _ in range(2):  # the second finds the first's full pages
            assert httpx.post(s.url + "/v1/completions", json=body, timeout=60
                              ).status_code == 200
        long = {"model": "tiny", "max_tokens": 120, "ignore_eos": True, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:  # 6 x ~220 tokens > 512 in the pool: preempts
            codes = list(pool.map(lambda i: httpx.post(
                s.url + "/v1/completions", json={**long, "prompt": [3 + i] * 100},
                timeout=120).status_code, range(6)))
        assert codes == [200] * 6
        text = httpx.get(s.url + "/metrics").text
    samples = {}
    for line in text.splitlines():
        m = re.match(r'(vllm:[a-z0-9_:]+)\{([^}]*)\} (\S+)$', line)
        if m and 'model_name="tiny"' in m.group(2):
            samples.setdefault(m.group(1), []).append(float(m.group(3)))
    missing = [n for n in names if n not in samples]
    assert not missing, missing
    for name in ("vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "vllm:request_num_preemptions_sum", "vllm:e2e_request_latency_seconds_count",
                 "vllm:request_success_total"):
        assert max(samples[name]) > 0, name
    assert samples["vllm:request_generation_tokens_sum"] == [4 * 2 + 120 * 6]
