"""Every third-party module the package imports is a declared dependency (deptry).

A dependency that other packages happen to pull in (psutil through accelerate, pydantic and
starlette through fastapi) still counts as missing when it is not declared: a user's install
that lacks the puller would fail. Test and benchmark code is excluded (dev extras).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _deptry(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deptry", ".", "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_every_import_is_declared():
    r = _deptry(ROOT / "pyproject.toml")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dep", ["psutil", "pydantic>=2", "starlette", "gguf>=0.19"])
def test_an_undeclared_import_fails_the_check(tmp_path, dep):
    text = (ROOT / "pyproject.toml").read_text()
    line = f'    "{dep}",\n'
    assert line in text
    (tmp_path / "pyproject.toml").write_text(text.replace(line, ""))
    r = _deptry(tmp_path / "pyproject.toml")
    name = re.split(r"[<>=]", dep)[0]
    assert r.returncode != 0 and f"'{name}' imported but" in r.stdout + r.stderr
