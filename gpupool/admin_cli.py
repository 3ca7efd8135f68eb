"""``gpupool ps | models | adapters | tenants``: a running server's admin API from the shell.

``--url`` (or ``GPUPOOL_URL``, default http://127.0.0.1:8000) names the server and
``GPUPOOL_ADMIN_KEY`` (or ``--admin-key``) its admin key. Plain tables by default, ``--json``
for scripts; an error is one line on stderr and exit code 1. Standard library only: the
shell commands work where only the client is installed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request


class AdminError(Exception):
    """One line for the user."""


def _request(args, method: str, path: str, body: dict | None = None):
    url = (args.url or os.environ.get("GPUPOOL_URL") or "http://127.0.0.1:8000").rstrip("/")
    key = args.admin_key or os.environ.get("GPUPOOL_ADMIN_KEY")
    if not key:
        raise AdminError("no admin key: set GPUPOOL_ADMIN_KEY (or pass --admin-key)")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise AdminError(f"{method} {path}: {e.code} {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise AdminError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [["-" if v is None or v == "" else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _ago(when: float | None) -> str:
    """'12 s ago', '3 min ago', 'never' for a Unix time (this machine's clock)."""
    if when is None:
        return "never"
    s = max(0.0, time.time() - when)
    if s < 120:
        return f"{s:.0f} s ago"
    return f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.0f} h ago"


def _ps(args) -> tuple[object, str]:
    pool = _request(args, "GET", "/admin/pool")
    models = _request(args, "GET", "/admin/models")["data"]
    adapters = _request(args, "GET", "/admin/adapters")["data"]
    live = pool.get("models", {})
    rows = []
    for m in models:
        s = live.get(m["name"], {})
        state = ("resident" if s.get("resident") else "host-cached") if s else "not loaded"
        dtype = s.get("dtype") or ""
        if s.get("quantization") and s["quantization"] != "none":
            dtype += "+" + s["quantization"]
        weights = f"{s['weight_bytes'] / 2**20:.1f} MiB" if s.get("weight_bytes") else ""
        rows.append([m["name"], "model", "", state, s.get("running", 0), s.get("waiting", 0),
                     dtype, weights, _ago(s.get("last_used"))])
    for a in adapters:
        base = live.get(a["base"], {})
        state = ("on device" if a["name"] in base.get("resident_adapters", ())
                 else "registered" if a["loaded"] else "not loaded")
        rows.append([a["name"], "adapter", a["base"], state, "", "", "", "", ""])
    kv = pool.get("kv_pages", {})
    footer = (f"KV pages: {kv.get('used', 0)} used, {kv.get('cached', 0)} cached prefix, "
              f"{kv.get('total', 0)} total; requests: {pool.get('requests', 0)}")
    for w in pool.get("workers", ()):
        footer += (f"\nworker {w.get('name')}: {'alive' if w.get('alive') else 'dead'}, "
                   f"resident {', '.join(w.get('models', ())) or '-'}, "
                   f"running {w.get('running', 0)}, queued {w.get('queued', 0)}")
    text = table(rows, ["NAME", "KIND", "BASE", "STATE", "RUNNING", "WAITING", "DTYPE",
                        "WEIGHTS", "LAST USED"]) + "\n" + footer
    return {"pool": pool, "models": models, "adapters": adapters}, text


def _registry(args, kind: str, body: dict, columns: list[str], row) -> tuple[object, str]:
    """list / add / rm of ``/admin/{kind}s``: ``body`` the add request, ``row(item)`` a
    listed item's cells under ``columns``."""
    path = f"/admin/{kind}s"
    if args.action == "add":
        out = _request(args, "POST", path, body)
        return out, f"added {kind} {out['name']}" + (f" of {out['base']}" if out.get("base")
                                                      else f" from {out['path']}")
    if args.action == "rm":
        return _request(args, "DELETE", f"{path}/{args.name}"), f"removed {kind} {args.name}"
    data = _request(args, "GET", path)["data"]
    return data, table([row(item) for item in data], columns)


def _models(args) -> tuple[object, str]:
    body = {"name": args.name, "path": args.path}
    for field in ("dtype", "quantization", "ttft_ms", "tbt_ms", "reasoning_parser",
                  "task"):  # only those given
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    return _registry(args, "model", body, ["NAME", "PATH", "LOADED", "RESIDENT"],
                     lambda m: [m["name"], m["path"], m["loaded"], m["resident"]])


def _adapters(args) -> tuple[object, str]:
    return _registry(args, "adapter", {"name": args.name, "base": args.base, "path": args.path},
                     ["NAME", "BASE", "PATH", "LOADED"],
                     lambda a: [a["name"], a["base"], a["path"], a["loaded"]])


def _tenants(args) -> tuple[object, str]:
    if args.action == "add":
        models = [m for m in (args.models or "").split(",") if m]
        out = _request(args, "POST", "/admin/tenants", {"name": args.name, "models": models})
        return out, f"added tenant {out['name']}; its API key (shown once): {out['api_key']}"
    if args.action == "rm":
        out = _request(args, "DELETE", f"/admin/tenants/{args.name}")
        return out, f"removed tenant {args.name}"
    if args.action == "key":
        out = _request(args, "POST", f"/admin/tenants/{args.name}/keys",
                       {"revoke_existing": not args.keep_old})
        return out, f"new API key for {args.name} (shown once): {out['api_key']}"
    data = _request(args, "GET", "/admin/tenants")["data"]
    return data, table([[t["name"], ",".join(t["models"]), t["num_keys"],
                         time.strftime("%Y-%m-%d %H:%M", time.gmtime(t["created"]))]
                        for t in data], ["NAME", "MODELS", "KEYS", "CREATED (UTC)"])


def run(args) -> int:
    try:
        data, text = {"ps": _ps, "models": _models, "adapters": _adapters,
                      "tenants": _tenants}[args.command](args)
    except AdminError as e:
        print(f"gpupool: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


def add_parsers(sub) -> None:
    def common(p):
        p.add_argument("--url", default=None,
                       help="the server (default $GPUPOOL_URL or http://127.0.0.1:8000)")
        p.add_argument("--admin-key", default=None, help="default $GPUPOOL_ADMIN_KEY")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--timeout", type=float, default=120.0)
        p.set_defaults(func=run)

    common(sub.add_parser("ps", help="a running server's models, adapters and KV pages"))
    m = sub.add_parser("models", help="list, add or remove a running server's models")
    common(m)
    m.add_argument("action", nargs="?", choices=["ls", "add", "rm"], default="ls")
    m.add_argument("name", nargs="?")
    m.add_argument("path", nargs="?")
    m.add_argument("--dtype", default=None, help="add: float32, bfloat16, ... (default: the "
                   "server's)")
    m.add_argument("--quantization", default=None, choices=["none", "int8"],
                   help="add: int8 weight-only (default: the server's)")
    m.add_argument("--ttft-ms", type=float, default=None, help="add: time-to-first-token SLO")
    m.add_argument("--tbt-ms", type=float, default=None, help="add: time-between-tokens SLO")
    m.add_argument("--reasoning-parser", default=None,
                   choices=["qwen3", "deepseek_r1", "gpt_oss"],
                   help="add: a thinking model (its <think> text, or gpt-oss's analysis "
                        "channel, as reasoning_content)")
    m.add_argument("--task", default=None, choices=["generate", "embed"],
                   help="add: embed serves /v1/embeddings (default generate)")
    a = sub.add_parser("adapters", help="list, add or remove a running server's adapters")
    common(a)
    a.add_argument("action", nargs="?", choices=["ls", "add", "rm"], default="ls")
    a.add_argument("name", nargs="?")
    a.add_argument("base", nargs="?")
    a.add_argument("path", nargs="?")
    t = sub.add_parser("tenants", help="list, add or remove tenants, or rotate a key")
    common(t)
    t.add_argument("action", nargs="?", choices=["ls", "add", "rm", "key"], default="ls")
    t.add_argument("name", nargs="?")
    t.add_argument("--models", default=None, help="add: models and adapters, comma-separated")
    t.add_argument("--keep-old", action="store_true", help="key: keep the old keys")
