"""Start ``gpupool serve`` in a subprocess on a free port, as a user would, for e2e tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

# small pools so each server starts fast and several fit beside the test process
POOL_TOML = """
[engine]
device = "cpu"
dtype = "float32"
kv_cache_bytes = {kv}
kv_page_bytes = {page}
weight_bytes = {weights}
host_cache_bytes = 2147483648
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path, *args: str, kv: int = 128 << 20, weights: int = 1 << 30,
                 env: dict | None = None, engine_toml: str = "", command: str = "serve",
                 page: int = 262144, launcher: tuple[str, ...] = ()):
        """``engine_toml``: more ``key = value`` lines for the config's ``[engine]`` table;
        ``command``: serve, or gateway (``args`` then name the cluster's Redis);
        ``launcher``: a program that starts gpupool (e.g. torchrun's arguments, ending in
        ``--no-python``), run from the home folder."""
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.config = self.home / "gpupool.toml"
        self.config.write_text(POOL_TOML.format(kv=kv, weights=weights, page=page)
                               + engine_toml)
        self.args = args
        self.command = command
        self.launcher = launcher
        self.env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.home / f"server-{self.port}.log"

    def start(self, timeout: float = 120.0) -> Server:
        exe = shutil.which("gpupool")
        cmd = [exe] if exe else [sys.executable, "-P", "-m", "gpupool.cli"]
        env = {**os.environ, "GPUPOOL_HOME": str(self.home), **self.env}
        self.proc = subprocess.Popen(
            [*self.launcher, *cmd, self.command, "--port", str(self.port), "--config",
             str(self.config), "--log-level", "info", *self.args],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=env,
            cwd=self.home if self.launcher else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   + self.log.read_text())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become healthy:\n" + self.log.read_text())

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit code. Also checks that the server left no child
        process behind (the embedded Redis)."""
        if self.proc is None:
            return None
        children = []
        if self.proc.poll() is None:
            children = psutil.Process(self.proc.pid).children(recursive=True)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code, self.proc = self.proc.returncode, None
        # the embedded Redis daemonises (its parent is init), so find it by its folder too
        state = str(self.home / "state")
        for p in psutil.process_iter(["name"]):
            try:
                if p.info["name"] == "redis-server" and p.cwd() == state:
                    children.append(p)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(children, timeout=10)
        for p in alive:
            p.kill()
        assert not alive, f"server left {[p.pid for p in alive]} running"
        return code

    def output(self) -> str:
        return self.log.read_text()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
