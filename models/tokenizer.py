"""A model folder's tokenizer and end-of-sequence ids. No torch here: a gateway (text only)
reads them too; transformers is imported only when a tokenizer is loaded."""

from __future__ import annotations

import json
from pathlib import Path

from gpupool.models.config import ModelConfig
from gpupool.models.errors import ModelLoadError


def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it has none (token-id prompts only)."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; report the folder
        raise ModelLoadError(f"{folder}: cannot load tokenizer ({e})") from e


def eos_token_ids(folder: Path, cfg: ModelConfig, tokenizer,
                  load_if_needed: bool = False) -> tuple[int, ...]:
    """End-of-sequence ids as transformers' generate uses them (generation_config first;
    the tokenizer's last, loaded here when ``tokenizer`` is None and ``load_if_needed``)."""
    gen = folder / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except (OSError, ValueError):
            eos = None
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (int(eos),)
    if cfg.eos_token_ids:
        return cfg.eos_token_ids
    if tokenizer is None and load_if_needed:
        tokenizer = load_tokenizer(folder)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return (int(tokenizer.eos_token_id),)
    return ()
