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
import shutil
import struct

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
    return {"thinker": thinker, "embedder": embedder, "meaner": meaner,
            "tune-a": root / "tune-a", "tune-b": root / "tune-b",
            "emb-ad": embedder.parent / "emb-ad"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, folders):
    models = "".join(
        f'\n[[models]]\nname = "{n}"\npath = "{folders[n]}"\n{extra}\n'
        for n, extra in (("thinker", 'reasoning_parser = "qwen3"'),
                         ("embedder", 'task = "embed"'), ("meaner", 'task = "embed"')))
    models += (f'\n[[adapters]]\nname = "emb-ad"\nbase = "embedder"\n'
               f'path = "{folders["emb-ad"]}"\n')
    roots = [a for n in ("thinker", "embedder", "meaner")
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
