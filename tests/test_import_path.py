"""The checkout's root is never on sys.path: its top-level folders (kernels, api, models,
engine, pool, ...) are named like PyPI packages, and a dependency that probes for one of those
names must not find the checkout's folder (transformers 5 imports Hugging Face's ``kernels``
when ``find_spec("kernels")`` answers; the checkout's answered, and 234 tests failed)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _folder_names() -> list[str]:
    """Every top-level folder whose name Python could import. ``gpupool`` is left out: the
    editable install maps it into the checkout on purpose (its finder, not sys.path)."""
    return sorted(p.name for p in ROOT.iterdir()
                  if p.is_dir() and p.name.isidentifier() and p.name != "gpupool")


def _readme_python() -> list[str]:
    """How README.md's test command starts Python: ``python3 [flags] -m pytest`` gives the
    flags; the ``pytest`` script itself runs with its own folder first on sys.path, which
    ``-P`` stands for here (neither puts the working directory there)."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    command = block.strip().splitlines()[1].split("&&")[-1]
    words = shlex.split(command)
    if words[0] == "pytest":
        return [sys.executable, "-P"]
    assert re.fullmatch(r"python3?(\.\d+)?", words[0]), command
    flags = words[1:words.index("-m")]
    assert words[words.index("-m") + 1] == "pytest", command
    return [sys.executable, *flags]


def _outside(origin: str | None) -> bool:
    return origin is None or not Path(origin).resolve().is_relative_to(ROOT)


def test_the_readme_test_command_leaves_the_checkout_off_sys_path():
    code = (
        "import importlib.util, json, sys\n"
        f"names = {_folder_names()!r}\n"
        "found = {}\n"
        "for name in names:\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    found[name] = spec.origin or str(list(spec.submodule_search_locations or []))"
        " if spec else None\n"
        "import transformers.integrations.hub_kernels\n"
        "import gpupool.kernels\n"
        "print(json.dumps(found))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    out = subprocess.run([*_readme_python(), "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(found) >= {"kernels", "api", "models", "engine", "pool", "scheduler"}
    inside = {name: origin for name, origin in found.items()
              if not _outside(origin.strip("[]'") if origin else None)}
    assert inside == {}


def test_pytest_itself_put_no_checkout_folder_on_sys_path():
    """pytest's import mode (importlib, pyproject.toml) inserts no rootdir; ``tests`` is the
    package pytest imported by path, so it is the one name left out here."""
    assert all(Path(p or ".").resolve() != ROOT for p in sys.path), sys.path
    for name in _folder_names():
        if name == "tests":
            continue
        spec = importlib.util.find_spec(name)
        origin = (spec.origin or next(iter(spec.submodule_search_locations or []), None)
                  if spec else None)
        assert _outside(origin), (name, origin)
    import transformers.integrations.hub_kernels  # noqa: F401  # the import that broke
