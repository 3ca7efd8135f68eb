"""Functions stay readable where newcomers change the forward pass and the step: no function in
models/ or engine/ reaches 60 lines (STYLE.md: under ~40, a short median)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 60


def test_no_function_in_models_or_engine_reaches_the_limit():
    long = {}
    for folder in ("models", "engine"):
        for f in sorted((ROOT / folder).glob("*.py")):
            for n in ast.walk(ast.parse(f.read_text())):
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = n.end_lineno - n.lineno + 1
                    if lines >= LIMIT:
                        long[f"{folder}/{f.name}:{n.name}"] = lines
    assert long == {}
