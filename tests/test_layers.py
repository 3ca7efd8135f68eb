"""The layers hold: import-linter's contracts (pyproject.toml) pass, and each one fails when an
import that breaks it is added; the light packages load without torch in a fresh interpreter."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("lint-imports",
                                             path=str(Path(sys.executable).parent)) is None
                                and shutil.which("lint-imports") is None,
                                reason="import-linter is not installed (pip install -e .[dev])")


def _script():
    spec = importlib.util.spec_from_file_location("lint_imports",
                                                  ROOT / "scripts" / "lint_imports.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    return _script().stage(ROOT, tmp_path_factory.mktemp("staged"))


def _lint(staged: Path) -> subprocess.CompletedProcess:
    return _script().lint(staged, ROOT / "pyproject.toml", capture_output=True, text=True,
                          timeout=300)


def test_the_contracts_hold(staged):
    out = _lint(staged)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("scheduler/policy.py", "import gpupool.engine.core", "Layers"),
    ("api/routes_openai.py", "from gpupool.engine.local import LocalClient", "Layers"),
    ("frontend/text.py", "from gpupool.models.tokenizer import load_tokenizer", "Layers"),
    ("kernels/reference.py", "import gpupool.pool.pages", "Kernels import nothing"),
    ("scheduler/slo.py", "import torch", "No torch"),
    ("scheduler/router.py", "import redis", "The scheduler knows no Redis"),
    ("cluster/client.py", "from gpupool.engine.local import LocalClient", "A gateway runs no"),
], ids=["scheduler->engine", "api->engine", "frontend->models", "kernels->pool",
        "scheduler->torch", "scheduler->redis", "cluster->engine"])
def test_a_broken_layer_is_caught(tmp_path, module, line, contract):
    staged = _script().stage(ROOT, tmp_path)
    path = staged / "gpupool" / module
    path.write_text(path.read_text() + f"\n{line}  # the violation under test\n")
    out = _lint(staged)
    assert out.returncode != 0
    broken = [ln for ln in out.stdout.splitlines() if ln.rstrip().endswith("BROKEN")]
    assert any(ln.startswith(contract) for ln in broken), out.stdout


def _fresh(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


HEAVY = ("torch", "transformers", "triton", "numpy", "safetensors")


def test_the_scheduler_and_the_messages_load_without_torch():
    loaded = _fresh(
        "import json, sys\n"
        "import gpupool.scheduler, gpupool.scheduler.scheduler, gpupool.scheduler.simulator\n"
        "import gpupool.scheduler.policy, gpupool.scheduler.workload, gpupool.scheduler.metrics\n"
        "import gpupool.messages.types, gpupool.messages.codec, gpupool.messages.client\n"
        "import gpupool.frontend.text, gpupool.pool.pages, gpupool.config\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))")
    assert loaded == []


def test_importing_the_kernels_loads_neither_transformers_nor_the_engine():
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import gpupool.kernels"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    modules = [ln.split("|")[-1].strip() for ln in out.stderr.splitlines()
               if ln.startswith("import time:") and "|" in ln]
    assert "gpupool.kernels" in modules and "torch" in modules  # the check sees imports
    bad = [m for m in modules if m.split(".")[0] == "transformers" or m.startswith(
        ("gpupool.engine", "gpupool.llm", "gpupool.models", "gpupool.scheduler",
         "gpupool.api", "gpupool.adapters", "gpupool.pool"))]
    assert bad == []
