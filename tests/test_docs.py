"""docs/architecture.md's "Claims a script checks" hold: where GPUPOOL_* variables are read, and
which modules make tensors from Python integers (checked with ast over the package's code)."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def _package_files() -> list[Path]:
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"].values()
    return sorted(f for d in set(dirs) for f in (ROOT / d).glob("*.py"))


def _claim(title: str) -> str:
    section = DOC.read_text().split("## Claims a script checks", 1)[1]
    item = next(part for part in section.split("\n- ") if part.startswith(title))
    return " ".join(item.split())


def _env_names(tree: ast.AST) -> set[str]:
    """GPUPOOL_ names this module reads: string constants, and f-strings built from a literal
    prefix over a tuple of literals (config.py's ``f"GPUPOOL_{key.upper()}"``)."""
    names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
             and isinstance(n.value, str) and re.fullmatch(r"GPUPOOL_[A-Z_]+", n.value)}
    for loop in (n for n in ast.walk(tree) if isinstance(n, ast.For)):
        if not (isinstance(loop.iter, ast.Tuple) and isinstance(loop.target, ast.Name)):
            continue
        keys = [e.value for e in loop.iter.elts if isinstance(e, ast.Constant)]
        for f in (n for n in ast.walk(loop) if isinstance(n, ast.JoinedStr)):
            head = f.values[0]
            if isinstance(head, ast.Constant) and head.value == "GPUPOOL_":
                names |= {f"GPUPOOL_{k.upper()}" for k in keys}
    return names


def _reads_env(tree: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr in ("environ", "getenv")
               for n in ast.walk(tree))


def test_gpupool_variables_are_read_where_the_doc_says():
    claim = _claim("`GPUPOOL_*` variables are read in:")
    listed = dict(re.findall(r"`([\w/]+\.py)` \(([^)]*)\)", claim))
    found = {}
    for f in _package_files():
        tree = ast.parse(f.read_text())
        names = _env_names(tree)
        if names and _reads_env(tree):
            found[str(f.relative_to(ROOT))] = names
    assert set(found) == set(listed), (found, listed)
    for path, names in found.items():
        if path != "gpupool/config.py":  # config's: the engine's and the server's settings
            assert names == set(re.findall(r"GPUPOOL_[A-Z_]+", listed[path])), path
    elsewhere = set().union(*(v for k, v in found.items() if k != "gpupool/config.py"))
    assert found["gpupool/config.py"] & elsewhere <= {"GPUPOOL_ADMIN_KEY"}  # the one shared


def test_tensors_are_made_from_integers_where_the_doc_says():
    claim = _claim("Tensors are made from Python integers in:")
    listed = set(re.findall(r"`([\w/]+\.py)`", claim))
    found = set()
    for f in _package_files():
        for n in ast.walk(ast.parse(f.read_text())):
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and n.func.attr in ("tensor", "as_tensor")
                    and isinstance(n.func.value, ast.Name) and n.func.value.id == "torch"):
                found.add(str(f.relative_to(ROOT)))
    assert found == listed
