"""README.md's lists of honoured and refused request fields are what the server does."""

import re
from pathlib import Path

from gpupool.api.protocol import REFUSED, ChatCompletionRequest, CompletionRequest

README = Path(__file__).resolve().parents[1] / "README.md"


def _listed(label: str) -> set[str]:
    text = README.read_text()
    start = text.index(label)
    block = text[start: text.index("\n\n", start)]
    return set(re.findall(r"`([a-z_]+)`", block))


def test_honoured_fields_are_the_request_models_fields():
    declared = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    assert _listed("  Honoured:") == declared


def test_refused_fields_are_the_servers_refused_table():
    listed = _listed("  Refused with a 400 naming the field") - {"0", "false"}
    assert listed == set(REFUSED)
