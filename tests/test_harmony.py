"""gpt-oss's harmony answers (reasoning_parser gpt_oss): reasoning, content and tool calls
read from the channels, whole and streamed in every split."""

from __future__ import annotations

import json

import pytest

from gpupool.frontend.harmony import HarmonyStream, read_harmony

THINK = "<|channel|>analysis<|message|>The user wants weather.<|end|>"
FINAL = "<|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>"
CALL = ('<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json'
        '<|message|>{"city": "Paris"}<|call|>')


@pytest.mark.parametrize("text,want", [
    (THINK + FINAL, ("The user wants weather.", "It is sunny.", [])),
    (THINK + CALL, ("The user wants weather.", None, [("get_weather", {"city": "Paris"})])),
    ("<|channel|>final<|message|>Hi<|return|>", (None, "Hi", [])),
    # the recipient after the channel, two calls, a preamble on commentary
    ("<|channel|>commentary<|message|>Checking.<|end|>"
     "<|start|>assistant<|channel|>commentary to=functions.a <|constrain|>json"
     '<|message|>{"x": 1}<|call|>', (None, "Checking.", [("a", {"x": 1})])),
    ("Plain text, no header", (None, "Plain text, no header", [])),
    ('{"json": "forced by a grammar"}', (None, '{"json": "forced by a grammar"}', [])),
    (THINK[:-len("<|end|>")], ("The user wants weather.", None, [])),  # cut short
    ("<|channel|>analysis<|message|>a <|en", ("a <|en", None, [])),  # a marker's start
    ("<|channel|>final<|message|>x < y, a|b<|return|>", (None, "x < y, a|b", [])),
    ("", (None, "", [])),
])
def test_harmony_answers_whole_and_streamed_in_every_split(text, want):
    def calls(cs):
        return [(c.name, json.loads(c.arguments)) for c in cs]

    reasoning, content, got = read_harmony(text)
    assert (reasoning, content, calls(got)) == want
    for cut in range(len(text) + 1):  # two pieces at every place, then one char at a time
        for pieces in ([text[:cut], text[cut:]], list(text)):
            p = HarmonyStream()
            r = c = ""
            for piece in pieces:
                dr, dc = p.feed(piece)
                r, c = r + dr, c + dc
            dr, dc, cs = p.finish()
            assert (r + dr, c + dc, calls(cs)) == (want[0] or "", want[1] or "", want[2])


def test_a_harmony_answer_through_the_text_stream_and_the_chat_route(smollm2_path):
    """A tokenizer with harmony's special tokens: the request's text keeps them (only for
    this parser: dropped, the channels could not be told apart), and the chat route gives
    the reasoning, no content and the call, whole and streamed, with finish_reason
    tool_calls; a vocabulary without them is refused as a gpt_oss model."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from gpupool import SamplingParams
    from gpupool.api.routes_openai import CHAT
    from gpupool.frontend.reasoning import reasoning_markers
    from gpupool.frontend.text import TextStream
    from gpupool.messages.types import OutputDelta

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    assert reasoning_markers(tok, "gpt_oss") is None
    tok.add_special_tokens({"additional_special_tokens": [
        "<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>",
        "<|constrain|>"]})
    think = reasoning_markers(tok, "gpt_oss")
    assert think is not None and think.harmony
    ids = tok(THINK + CALL, add_special_tokens=False)["input_ids"]
    for keep in (True, False):
        stream = TextStream("r", "m", tok, [1, 2], SamplingParams(max_tokens=len(ids)),
                            keep_special=keep)
        offsets, chunks, out = {}, [], None
        for i, t in enumerate(ids):
            out = stream.feed(OutputDelta("r", i, (t,), finish_reason=(
                "stop" if i == len(ids) - 1 else None))) or out
            if out is not None and out.delta_text or i == len(ids) - 1:
                chunks += CHAT.chunks(SimpleNamespace(index=0), out, tok, offsets, None, think)
        msg = CHAT.choice(0, out, tok, None, think)
        streamed = "".join(c["delta"].get("reasoning_content") or "" for c in chunks)
        calls = [tc for c in chunks for tc in c["delta"].get("tool_calls") or ()]
        if not keep:  # the markers dropped: no channel to read, all content
            assert "<|channel|>" not in out.text and msg["message"]["tool_calls"] == []
            continue
        assert out.text == THINK + CALL
        assert msg["message"]["reasoning_content"] == streamed == "The user wants weather."
        assert msg["message"]["content"] is None and msg["finish_reason"] == "tool_calls"
        (call,) = msg["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        assert [c["function"]["name"] for c in calls] == ["get_weather"]
        assert chunks[-1]["finish_reason"] == "tool_calls"
