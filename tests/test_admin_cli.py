"""``gpupool ps | models | adapters | tenants`` against a live server (issue 19's shell):
add a model and an adapter, see them in ps, remove them, rotate a tenant key; errors are
one line and exit code 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.factories import make_peft_adapter
from tests.serving import Server

KEY = "admin-key-for-the-cli-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("root")
    base = tiny_models("llama")
    make_peft_adapter(base, root / "ad", 4, ["q_proj"])
    import shutil

    shutil.copytree(base, root / "extra")
    s = Server(tmp_path_factory.mktemp("home"), "--model", f"tiny={base}", "--admin-key", KEY,
               "--model-root", str(root), kv=16 << 20)
    with s:
        yield s, root


def cli(server, *args, key=KEY):
    env = {**os.environ, "GPUPOOL_URL": server.url}
    env.pop("GPUPOOL_ADMIN_KEY", None)
    if key:
        env["GPUPOOL_ADMIN_KEY"] = key
    return subprocess.run([sys.executable, "-m", "gpupool.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_add_see_remove_and_rotate(server):
    s, root = server
    r = cli(s, "models", "add", "extra", str(root / "extra"))
    assert r.returncode == 0 and "added model extra" in r.stdout, r.stderr
    r = cli(s, "adapters", "add", "ad", "tiny", str(root / "ad"))
    assert r.returncode == 0, r.stderr
    ps = cli(s, "ps")
    assert ps.returncode == 0
    lines = ps.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "KIND", "BASE", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line and line[0] != "K"}
    assert rows["extra"][1] == "model" and rows["ad"][1:3] == ["adapter", "tiny"]
    assert "KV pages:" in ps.stdout
    data = json.loads(cli(s, "ps", "--json").stdout)
    assert {m["name"] for m in data["models"]} >= {"tiny", "extra"}
    assert cli(s, "adapters", "rm", "ad").returncode == 0
    assert cli(s, "models", "rm", "extra").returncode == 0
    names = [line.split()[0] for line in cli(s, "ps").stdout.splitlines()[1:]]
    assert "extra" not in names and "ad" not in names
    r = cli(s, "tenants", "add", "acme", "--models", "tiny")
    first = r.stdout.rsplit(" ", 1)[-1].strip()
    assert r.returncode == 0 and first.startswith("gp-")
    r = cli(s, "tenants", "key", "acme")
    second = r.stdout.rsplit(" ", 1)[-1].strip()
    assert r.returncode == 0 and second.startswith("gp-") and second != first
    assert "acme" in cli(s, "tenants").stdout
    assert cli(s, "tenants", "rm", "acme").returncode == 0


def test_errors_are_one_line_and_exit_1(server):
    s, _ = server
    for args, key, words in ((("ps",), None, "GPUPOOL_ADMIN_KEY"),
                             (("ps",), "wrong-key", "401"),
                             (("models", "rm", "nope"), KEY, "404")):
        r = cli(s, *args, key=key)
        assert r.returncode == 1 and r.stdout == "", r
        assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
