"""Tenants, keys and the admin API of ``gpupool serve``, including a restart."""

import json
import shutil

import httpx
import openai
import pytest

from tests.factories import make_peft_adapter
from tests.serving import Server

ADMIN = {"Authorization": "Bearer admin-secret"}


def _long_context_copy(src, dst):
    """A copy of a tiny model with a long context, so a stream can outlive an admin call."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["max_position_embeddings"] = 8192
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("root")
    outside = tmp_path_factory.mktemp("outside")
    long = _long_context_copy(tiny_models("llama"), root / "long")
    make_peft_adapter(long, root / "long-ad", 4, ["q_proj", "v_proj"], seed=3)
    shutil.copytree(tiny_models("qwen3"), root / "keep")
    make_peft_adapter(root / "keep", root / "keep-ad", 4, ["k_proj"], seed=4)
    shutil.copytree(tiny_models("llama"), outside / "m")
    (root / "sneaky").symlink_to(outside / "m")
    home = tmp_path_factory.mktemp("home")
    args = ("--model", f"tiny={tiny_models('llama')}", "--admin-key", "admin-secret",
            "--model-root", str(root))
    return {"root": root, "outside": outside, "home": home, "args": args}


def _err(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_admin_flow_isolation_and_restart(setup):
    root = setup["root"]
    server = Server(setup["home"], *setup["args"]).start()
    try:
        url = server.url
        a = httpx.Client(base_url=url, headers=ADMIN, timeout=60)

        # open until the first tenant exists
        assert httpx.get(url + "/v1/models").status_code == 200
        r = a.post("/admin/tenants", json={"name": "acme", "models": ["tiny"]})
        assert r.status_code == 201, r.text
        acme_key = r.json()["api_key"]
        assert acme_key.startswith("gp-") and "api_key" not in a.get("/admin/tenants").text
        assert acme_key not in server.output()
        _err(httpx.get(url + "/v1/models"), 401)
        _err(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)

        # load a model and an adapter at run time
        r = a.post("/admin/models", json={"name": "long", "path": str(root / "long")})
        assert r.status_code == 201, r.text
        r = a.post("/admin/adapters", json={"name": "long-ad", "base": "long",
                                            "path": str(root / "long-ad")})
        assert r.status_code == 201, r.text
        r = a.post("/admin/tenants", json={"name": "beta", "models": ["long", "long-ad"]})
        beta_key = r.json()["api_key"]

        # each tenant sees and uses only its own models
        acme = openai.OpenAI(base_url=url + "/tenants/acme/v1", api_key=acme_key,
                             max_retries=0)
        beta = openai.OpenAI(base_url=url + "/v1", api_key=beta_key, max_retries=0)
        assert [m.id for m in acme.models.list()] == ["tiny"]
        assert {m.id for m in beta.models.list()} == {"long", "long-ad"}
        with pytest.raises(openai.NotFoundError) as hidden:
            acme.completions.create(model="long-ad", prompt="w5", max_tokens=2)
        with pytest.raises(openai.NotFoundError) as missing:
            acme.completions.create(model="no-such", prompt="w5", max_tokens=2)
        assert (hidden.value.body["message"].replace("long-ad", "X")
                == missing.value.body["message"].replace("no-such", "X"))
        r = beta.completions.create(model="long-ad", prompt="w5 w6", max_tokens=3,
                                    temperature=0)
        assert r.usage.completion_tokens == 3
        # a key only works under its own tenant's URL
        _err(httpx.get(url + "/tenants/acme/v1/models",
                       headers={"Authorization": f"Bearer {beta_key}"}), 401)
        # tenant keys are not admin keys
        _err(httpx.get(url + "/admin/pool", headers={"Authorization": f"Bearer {acme_key}"}),
             401)

        # bad admin input: 4xx in OpenAI format, nothing changes
        assert _err(a.post("/admin/models", json={"name": "x", "path": str(
            setup["outside"] / "m")}), 403)["code"] == "path_not_allowed"
        assert _err(a.post("/admin/models", json={"name": "x", "path": str(
            root / "sneaky")}), 403)["code"] == "path_not_allowed"
        _err(a.post("/admin/models", json={"name": "x", "path": 5}), 400)
        _err(a.post("/admin/models", content=b"{not json"), 400)
        _err(a.post("/admin/models", json={"name": "tiny", "path": str(root / "keep")}), 409)
        _err(a.post("/admin/adapters", json={"name": "x", "base": "nope",
                                             "path": str(root / "keep-ad")}), 404)
        _err(a.post("/admin/tenants", json={"name": "c", "models": ["ghost"]}), 400)
        _err(a.post("/admin/tenants", json={"name": "acme", "models": []}), 409)
        assert {m["name"] for m in a.get("/admin/models").json()["data"]} == {"tiny", "long"}

        # the same model added twice at once: one wins, the other gets 409, nothing breaks
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            codes = sorted(pool.map(lambda _: a.post("/admin/models", json={
                "name": "twice", "path": str(root / "keep")}).status_code, range(2)))
        assert codes == [201, 409]
        assert a.delete("/admin/models/twice").status_code == 200

        # unload the adapter and its base while a stream on the adapter runs: it finishes
        body = {"model": "long-ad", "prompt": "w5 w6", "max_tokens": 3000, "ignore_eos": True,
                "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.Client(timeout=120) as c, c.stream(
                "POST", url + "/v1/completions", json=body,
                headers={"Authorization": f"Bearer {beta_key}"}) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            assert a.delete("/admin/adapters/long-ad").status_code == 200
            assert a.delete("/admin/models/long").status_code == 200
            with pytest.raises(openai.NotFoundError):
                beta.completions.create(model="long-ad", prompt="w5", max_tokens=2)
            events = [json.loads(line[6:]) for line in lines
                      if line.startswith("data: {")]
        assert events[-1]["usage"]["completion_tokens"] == 3000
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        pool = a.get("/admin/pool").json()
        assert "long" not in pool["models"] and pool["kv_pages"]["used"] == 0
        assert set(pool["arena"]) == {"total_bytes", "weights", "kv"}
        assert pool["swaps"]["weight_swaps"] >= 1 and "long" not in pool["resident_models"]

        # registrations that stay, key rotation, tenant removal
        assert a.post("/admin/models", json={"name": "keep", "path": str(root / "keep"),
                                             "tbt_ms": 150}).status_code == 201
        assert a.post("/admin/adapters", json={"name": "keep-ad", "base": "keep",
                                               "path": str(root / "keep-ad")}).status_code == 201
        r = a.patch("/admin/tenants/acme", json={"models": ["tiny", "keep-ad"]})
        assert r.json()["models"] == ["tiny", "keep-ad"]
        r = a.post("/admin/tenants/acme/keys")
        assert r.status_code == 201
        new_acme = r.json()["api_key"]
        _err(httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {acme_key}"}), 401)
        assert a.delete("/admin/tenants/beta").status_code == 200
        _err(httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {beta_key}"}), 401)
        assert a.post("/admin/tenants", json={"name": "gone", "models": []}).status_code == 201
        assert a.delete("/admin/tenants/gone").status_code == 200
        want = openai.OpenAI(base_url=url + "/v1", api_key=new_acme, max_retries=0) \
            .completions.create(model="keep-ad", prompt="w7 w8 w9", max_tokens=6,
                                temperature=0).choices[0].text
        server.stop()  # SIGTERM: a graceful shutdown (uvicorn re-raises the signal after it)
        assert "Application shutdown complete" in server.output()
    finally:
        server.stop()

    # a restarted server has the same tenants and registrations, loaded on first use
    with Server(setup["home"], *setup["args"]) as again:
        a = httpx.Client(base_url=again.url, headers=ADMIN, timeout=60)
        tenants = a.get("/admin/tenants").json()["data"]
        assert [(t["name"], t["models"], t["num_keys"]) for t in tenants] == [
            ("acme", ["tiny", "keep-ad"], 1)]
        models = {m["name"]: m for m in a.get("/admin/models").json()["data"]}
        assert set(models) == {"tiny", "keep"} and not models["keep"]["loaded"]
        assert models["keep"]["tbt_ms"] == 150
        assert [x["name"] for x in a.get("/admin/adapters").json()["data"]] == ["keep-ad"]
        acme = openai.OpenAI(base_url=again.url + "/tenants/acme/v1", api_key=new_acme,
                             max_retries=0)
        got = acme.completions.create(model="keep-ad", prompt="w7 w8 w9", max_tokens=6,
                                      temperature=0).choices[0].text
        assert got == want
        assert {m["name"]: m["loaded"] for m in a.get("/admin/models").json()["data"]} == {
            "tiny": True, "keep": True}


def test_a_stored_model_outside_a_narrower_root_is_not_loaded_after_a_restart(
        tmp_path, tiny_models):
    """Registered through the admin API under --model-root A; restarted with --model-root
    A/sub, the stored path is checked again when the model is first used: 503
    model_load_failed, nothing loaded (and a model under the new root still loads)."""
    root = tmp_path / "root"
    shutil.copytree(tiny_models("llama"), root / "m")
    shutil.copytree(tiny_models("llama"), root / "sub" / "n")
    home = tmp_path / "home"
    base = ("--model", f"tiny={tiny_models('llama')}", "--admin-key", "admin-secret")
    with Server(home, *base, "--model-root", str(root)) as server:
        for name, path in (("stored", root / "m"), ("inside", root / "sub" / "n")):
            r = httpx.post(server.url + "/admin/models", headers=ADMIN,
                           json={"name": name, "path": str(path)})
            assert r.status_code == 201, r.text
    with Server(home, *base, "--model-root", str(root / "sub")) as again:
        body = {"model": "stored", "prompt": [5, 6], "max_tokens": 2}
        err = _err(httpx.post(again.url + "/v1/completions", json=body), 503)
        assert err["code"] == "model_load_failed" and str(root) not in err["message"]
        r = httpx.post(again.url + "/v1/completions",
                       json={**body, "model": "inside"})
        assert r.status_code == 200, r.text


def test_a_server_that_had_tenants_fails_closed_when_its_store_comes_back_empty(
        tmp_path, tiny_models):
    """Tenants created, then the state store lost (its file deleted: as a Redis restarted
    without persistence): the restarted server refuses requests without a key (401) instead
    of serving everyone; the admin API still works and a new tenant's key is served. A fresh
    server with --require-auth needs keys before its first tenant."""
    home = tmp_path / "home"
    base = ("--model", f"tiny={tiny_models('llama')}", "--admin-key", "admin-secret")
    body = {"model": "tiny", "prompt": [5, 6], "max_tokens": 1}
    with Server(home, *base) as server:
        assert httpx.post(server.url + "/v1/completions", json=body).status_code == 200
        r = httpx.post(server.url + "/admin/tenants", headers=ADMIN,
                       json={"name": "acme", "models": ["*"]})
        assert r.status_code == 201, r.text
        _err(httpx.post(server.url + "/v1/completions", json=body), 401)
    shutil.rmtree(home / "state")
    with Server(home, *base) as again:
        _err(httpx.post(again.url + "/v1/completions", json=body), 401)
        r = httpx.post(again.url + "/admin/tenants", headers=ADMIN,
                       json={"name": "acme", "models": ["*"]})
        assert r.status_code == 201, r.text
        key = {"Authorization": f"Bearer {r.json()['api_key']}"}
        assert httpx.post(again.url + "/v1/completions", json=body,
                          headers=key).status_code == 200
    with Server(tmp_path / "fresh", *base, "--require-auth") as strict:
        _err(httpx.post(strict.url + "/v1/completions", json=body), 401)
