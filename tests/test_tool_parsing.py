"""Tool-call parsing (issue 18) on outputs written as Qwen2.5 (hermes tags) and Llama 3.1
(JSON) models write them: whole, and streamed in pieces of every size."""

from __future__ import annotations

import json

import pytest

from gpupool.frontend.tools import ToolStreamParser, parse_tool_calls

QWEN_ONE = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}\n</tool_call>')
QWEN_TEXT_AND_TWO = ("Let me look both up.\n<tool_call>\n"
                     '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                     '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n'
                     "</tool_call>")
LLAMA_ONE = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
LLAMA_TAG_TWO = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                 '{"name": "get_time", "parameters": {"tz": "UTC"}}')

CASES = [
    ("hermes", QWEN_ONE, None, [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    ("hermes", QWEN_TEXT_AND_TWO, "Let me look both up.",
     [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"})]),
    ("hermes", "Just text, no <b>tags</b>.", "Just text, no <b>tags</b>.", []),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"x": 1}', None, []),  # cut off
    ("hermes", "<tool_call>not json</tool_call> after", None, []),
    ("llama3", LLAMA_ONE, None, [("get_weather", {"city": "Paris"})]),
    ("llama3", LLAMA_TAG_TWO, None, [("get_weather", {"city": "Paris"}),
                                     ("get_time", {"tz": "UTC"})]),
    ("llama3", "The weather is fine.", "The weather is fine.", []),
    ("llama3", '{"not": "a call"}', '{"not": "a call"}', []),
]


def _calls(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_whole_outputs(fmt, text, content, calls):
    got_content, got_calls = parse_tool_calls(text, fmt)
    assert _calls(got_calls) == calls
    if calls:
        assert got_content == content
    else:
        assert got_content == text  # no call: the text as the model wrote it
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_streamed_in_pieces(fmt, text, content, calls, piece):
    """The content sent while streaming plus what finish() adds is the whole output's
    content; no part of a call's markup is ever sent as content."""
    parser = ToolStreamParser(fmt)
    sent = "".join(parser.feed(text[i:i + piece]) for i in range(0, len(text), piece))
    rest, got = parser.finish()
    assert _calls(got) == calls
    streamed = (sent + rest)
    if calls:
        assert streamed.strip() == (content or "")
        assert "<tool_call>" not in streamed and '"name"' not in streamed
    else:
        assert streamed == text
