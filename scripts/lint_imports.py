"""Check the layer contracts in pyproject.toml (``[tool.importlinter]``) with import-linter.

gpupool's subpackages live in top-level folders (``scheduler/`` is ``gpupool.scheduler``,
through setuptools' ``package-dir``), which import-linter cannot walk from an editable
install. So this stages the package as it would be installed (``gpupool/scheduler/...``,
copied from the folders ``package-dir`` names) in a temporary folder and runs
``lint-imports`` there. Usage: python3 scripts/lint_imports.py [--root REPO] [lint-imports
args...]; exits with lint-imports' status.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path


def stage(root: Path, into: Path) -> Path:
    """Copy the package's Python files into ``into/gpupool/...`` as installed."""
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    package_dir = meta["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dir.items():
        dest = into.joinpath(*package.split("."))
        dest.mkdir(parents=True, exist_ok=True)
        for src in (root / folder).glob("*.py"):
            shutil.copy2(src, dest / src.name)
    return into


def lint(staged: Path, config: Path, *args: str, **run) -> subprocess.CompletedProcess:
    """Run lint-imports on a staged tree with ``config``; FileNotFoundError if it is not
    installed."""
    exe = shutil.which("lint-imports") or shutil.which("lint-imports",
                                                       path=str(Path(sys.executable).parent))
    if exe is None:
        raise FileNotFoundError("lint-imports is not installed (pip install import-linter)")
    env = {**os.environ, "PYTHONPATH": str(staged)}
    return subprocess.run([exe, str(config), "--no-cache", *args], cwd=staged, env=env, **run)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args, rest = ap.parse_known_args(argv)
    root = args.root.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        stage(root, Path(tmp))
        try:
            return lint(Path(tmp), root / "pyproject.toml", *rest).returncode
        except FileNotFoundError as e:
            print(e, file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
