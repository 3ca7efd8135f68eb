"""The operator's view (issue 19) against a live server with tiny models:

- ``gpupool ps | models | adapters | tenants``: add a model and an adapter, see them in ps,
  remove them, rotate a tenant key; errors are one line and exit code 1;
- the Grafana dashboard (docker/grafana/dashboards/gpupool.json): every metric its queries
  name is one the server exports (the cluster's metrics: tests/test_cluster.py);
- the status page (GET /admin/) in a real headless Chromium (Debian's chromium and
  chromium-driver, driven by Selenium with that executable; skipped, saying why, only when
  they are not installed): it loads, shows a model just added, and updates after requests."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
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
    r = cli(s, "models", "add", "extra", str(root / "extra"), "--quantization", "int8",
            "--ttft-ms", "500")
    assert r.returncode == 0 and "added model extra" in r.stdout, r.stderr
    r = cli(s, "adapters", "add", "ad", "tiny", str(root / "ad"))
    assert r.returncode == 0, r.stderr
    ps = cli(s, "ps")
    assert ps.returncode == 0
    lines = ps.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "KIND", "BASE", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line and line[0] != "K"}
    assert rows["extra"][1] == "model" and rows["ad"][1:3] == ["adapter", "tiny"]
    assert rows["extra"][6] == "float32+int8" and rows["extra"][-1] == "never"  # no step yet
    listed = {m["name"]: m for m in json.loads(cli(s, "models", "--json").stdout)}
    assert listed["extra"]["ttft_ms"] == 500
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


# ---- the dashboard ---------------------------------------------------------------------------
DASHBOARD = Path(__file__).parent.parent / "docker" / "grafana" / "dashboards" / "gpupool.json"
METRIC = re.compile(r"\b(gpupool_[a-z0-9_]+|vllm:[a-z0-9_:]+)")
CLUSTER_ONLY = "gpupool_cluster_"  # a gateway over workers exports these (test_cluster)


def dashboard_metrics() -> set[str]:
    """Every metric named by the dashboard's queries (panels and template variables)."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", ())]
    exprs += [v["definition"] for v in dash["templating"]["list"]]
    assert exprs and all(exprs)
    return {m for e in exprs for m in METRIC.findall(e)}


def exported_metrics(text: str) -> set[str]:
    """Sample names in Prometheus text (histograms as their _bucket/_sum/_count series)."""
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def test_the_dashboard_reads_only_metrics_the_server_exports(server):
    s, _ = server
    admin = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "w5 w6",
                                                    "max_tokens": 3}, headers=admin)
    assert r.status_code in (200, 401)  # open server, or tenants exist: use one
    if r.status_code == 401:
        t = httpx.post(s.url + "/admin/tenants", json={"name": "dash", "models": ["tiny"]},
                       headers=admin).json()
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "w5 w6",
                                                        "max_tokens": 3},
                       headers={"Authorization": f"Bearer {t['api_key']}"})
    try:
        assert r.status_code == 200, r.text
        exported = exported_metrics(httpx.get(s.url + "/metrics", headers=admin).text)
    finally:  # (a deleted tenant's series are dropped)
        httpx.delete(s.url + "/admin/tenants/dash", headers=admin)
    wanted = dashboard_metrics()
    assert len(wanted) >= 15  # throughput, latency, SLOs, swaps, KV, queues, workers
    missing = {m for m in wanted if m not in exported and not m.startswith(CLUSTER_ONLY)}
    assert not missing, f"the dashboard names metrics the server does not export: {missing}"
    dash = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p}
    assert uids == {"prometheus"}  # the uid docker/grafana/provisioning gives Prometheus
    provisioned = (DASHBOARD.parent.parent / "provisioning" / "datasources"
                   / "prometheus.yaml").read_text()
    assert "uid: prometheus" in provisioned


def test_a_renamed_metric_fails_the_dashboard_check():
    """The check above compares names, so a metric renamed in code shows up as missing."""
    exported = {"gpupool_generation_tokens_total", "vllm:kv_cache_usage_perc"}
    wanted = dashboard_metrics()
    assert "gpupool_generation_tokens_total" in wanted and "gpupool_tokens_out_total" not in wanted
    assert wanted - exported  # most are not in this short list: they would be reported


# ---- the status page in a real browser --------------------------------------------------------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--window-size=1200,1600")


@pytest.fixture
def browser(tmp_path):
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"no headless browser: {CHROMIUM} and {CHROMEDRIVER} are not installed "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # never a browser download
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_for(driver, test, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = test()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"the page never showed {what}; it shows:\n"
                         + driver.find_element("tag name", "body").text)


def _rows(driver, table: str) -> dict[str, list[str]]:
    """A table's rows by first cell, read in one script call (the page redraws its tables
    every 2 s: elements found by one call may be gone by the next)."""
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map("
        "r => Array.from(r.cells).map(c => c.textContent.trim()))", f"#{table} tbody tr")
    return {cells[0]: cells for cells in rows if cells}


def test_the_status_page_shows_the_pool_live(server, browser):
    s, root = server
    admin = {"Authorization": f"Bearer {KEY}"}
    browser.get(s.url + "/admin/")
    assert browser.title == "gpupool status"
    assert not browser.find_element("id", "status").is_displayed()  # nothing before a key

    browser.find_element("id", "key").send_keys("wrong-key")
    browser.find_element("id", "connect").click()
    _wait_for(browser, lambda: browser.find_element("id", "error").text, "an error")
    assert "key" in browser.find_element("id", "error").text.lower()

    key = browser.find_element("id", "key")
    key.clear()
    key.send_keys(KEY)
    browser.find_element("id", "connect").click()
    _wait_for(browser, lambda: "tiny" in _rows(browser, "models"), "the model tiny")
    assert browser.find_element("id", "error").text == ""
    assert _rows(browser, "models")["tiny"][1] in ("resident", "host-cached")

    # a model added now appears, and a tenant's requests and the switch they cause
    shutil.copytree(root / "extra", root / "live", dirs_exist_ok=True)
    r = httpx.post(s.url + "/admin/models", json={"name": "live", "path": str(root / "live")},
                   headers=admin, timeout=60)
    assert r.status_code == 201, r.text
    _wait_for(browser, lambda: "live" in _rows(browser, "models"), "the model just added")
    r = httpx.post(s.url + "/admin/tenants", json={"name": "web", "models": ["tiny", "live"]},
                   headers=admin)
    assert r.status_code == 201, r.text
    tenant_key = r.json()["api_key"]
    _wait_for(browser, lambda: _rows(browser, "tenants").get("web", [""] * 3)[2] == "0",
              "tenant web with no requests")
    try:
        for model in ("live", "tiny", "live"):
            r = httpx.post(s.url + "/v1/completions",
                           json={"model": model, "prompt": "w5 w6 w7", "max_tokens": 4},
                           headers={"Authorization": f"Bearer {tenant_key}"}, timeout=60)
            assert r.status_code == 200, r.text
        _wait_for(browser, lambda: _rows(browser, "tenants")["web"][2] == "3",
                  "the tenant's three requests")
        _wait_for(browser, lambda: any(c[1:2] == ["live"]
                                       for c in _rows(browser, "switches").values()),
                  "a switch to the model live")
        kv = browser.find_element("id", "kv-text").text
        assert re.search(r"\d+ of \d+ pages held by requests", kv), kv
    finally:
        httpx.delete(s.url + "/admin/tenants/web", headers=admin)
        httpx.delete(s.url + "/admin/models/live", headers=admin)


def test_the_status_page_needs_the_admin_api(tmp_path):
    """A server without an admin key has no admin API: /admin/ is a 403 in OpenAI's format;
    with one, the page is served without a key (it asks for it)."""
    from fastapi.testclient import TestClient

    from gpupool.api.server import build_state, create_app
    from gpupool.config import ServerConfig
    from tests.fake_engine import FakeClient

    for admin_key, status in ((None, 403), ("k", 200)):
        fake = FakeClient(str(tmp_path), models={})
        config = ServerConfig(admin_key=admin_key, engine={"home": str(tmp_path)})
        with TestClient(create_app(build_state(config, fake))) as client:
            r = client.get("/admin/")
            assert r.status_code == status
            if status == 403:
                assert r.json()["error"]["code"] == "admin_disabled"
            else:
                assert r.headers["content-type"].startswith("text/html")
                assert "<title>gpupool status</title>" in r.text
                assert "http://" not in r.text and "https://" not in r.text  # nothing fetched
