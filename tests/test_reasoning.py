"""Thinking models (issue 33 item 3): the reasoning parser on text, whole and streamed in
every split, and the grammar that starts after ``</think>`` (``ReasoningGate``) on a real
xgrammar matcher and in the engine. Over HTTP: tests/test_clients.py."""

from __future__ import annotations

import json

import pytest

from gpupool import SamplingParams
from gpupool.frontend.reasoning import (
    ReasoningStream,
    marker_ids,
    prompt_state,
    split_reasoning,
)
from tests.factories import make_byte_model, make_engine

START, END = 100, 101


@pytest.mark.parametrize("prompt,state", [
    ([1, 2, 3], "open"), ([1, START, 5], "inside"), ([START, 5, END, 7], "closed"),
    ([END, 4, START], "inside"), ([START, END], "closed")])
def test_the_prompts_last_marker_decides_where_the_output_begins(prompt, state):
    assert prompt_state(prompt, (START, END)) == state


def test_a_marker_before_the_last_turn_boundary_is_not_the_answers():
    """A user who typed <think> in an earlier turn: the special token that opened the
    assistant's turn ends the search."""
    turn = 7  # <|im_start|>, say
    assert prompt_state([START, 5, turn, 9, 10], (START, END, frozenset({turn}))) == "open"
    assert prompt_state([turn, 9, START, 4], (START, END, frozenset({turn}))) == "inside"


@pytest.mark.parametrize("text,state,want", [
    ("<think>a b</think>\n\nThe answer", "open", ("a b", "The answer")),
    ("  <think>x</think>y", "open", ("x", "y")),
    ("The answer", "open", (None, "The answer")),
    ("<thin", "open", (None, "<thin")),  # a marker's start, never finished: content
    ("", "open", (None, "")),
    ("half a thought", "inside", ("half a thought", None)),  # cut before </think>
    ("a</think>b", "inside", ("a", "b")),
    ("a</thi", "inside", ("a</thi", None)),
    ("<think>a</think>b", "closed", (None, "<think>a</think>b")),  # the template closed it
    ("<think></think>", "open", ("", None)),
    ("<think>a</think>b</think>c", "open", ("a", "b</think>c")),  # the first end only
])
def test_split_reasoning_whole_and_streamed_in_every_split(text, state, want):
    assert split_reasoning(text, state) == want
    for cut in range(len(text) + 1):  # two pieces at every place, then one char at a time
        for pieces in ([text[:cut], text[cut:]], list(text)):
            p = ReasoningStream(state)
            r = c = ""
            for piece in pieces:
                dr, dc = p.feed(piece)
                r, c = r + dr, c + dc
            dr, dc = p.finish()
            r, c = r + dr, c + dc
            assert r == (want[0] or "") and c == (want[1] or "")


def test_content_goes_out_as_soon_as_it_is_surely_content():
    p = ReasoningStream("open")
    assert p.feed("<th") == ("", "")  # may be a marker
    assert p.feed("ink>I am") == ("I am", "")
    assert p.feed(" sure</") == (" sure", "")  # "</" may start </think>
    assert p.feed("think>\n") == ("", "")
    assert p.feed("\nYes") == ("", "Yes")
    assert p.feed(" and no") == ("", " and no")


# ---- the grammar after the reasoning ----------------------------------------------------------
@pytest.fixture(scope="module")
def thinker(tmp_path_factory, smollm2_path):
    return make_byte_model(tmp_path_factory.mktemp("thinker"), smollm2_path, seed=2,
                           extra_tokens=("<think>", "</think>"))


def test_marker_ids_are_found_only_when_each_marker_is_one_token(thinker, smollm2_path):
    from transformers import AutoTokenizer

    assert marker_ids(AutoTokenizer.from_pretrained(str(thinker))) == (49152, 49153)
    assert marker_ids(AutoTokenizer.from_pretrained(str(smollm2_path))) is None


def test_the_gate_masks_nothing_inside_and_the_grammar_after(thinker):
    import torch
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from gpupool.engine.grammar import Grammars

    tok = AutoTokenizer.from_pretrained(str(thinker))
    vocab = 49154
    compiled = Grammars().compile("t", tok, vocab, [2], ("json_schema", '{"type": "boolean"}'))
    start, end = marker_ids(tok)

    def allowed(m) -> set[int]:
        logits = torch.zeros(1, vocab)
        Grammars.mask(logits, [m])
        return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())

    plain = allowed(xgr.GrammarMatcher(compiled))
    assert start not in plain and len(plain) < 100  # "t", "f", "tr", ... only
    gate = Grammars.matcher(compiled, [], (start, end, False))
    assert allowed(gate) == plain | {start}  # the first token may open a block
    assert gate.accept_token(start) and allowed(gate) == set(range(vocab))  # inside: free
    word = tok.convert_tokens_to_ids("hello")
    assert gate.accept_token(word) and gate.accept_token(end)
    assert allowed(gate) == plain and not gate.is_terminated()  # the grammar from here
    assert not gate.accept_token(word)
    # a resumed request replays its delivered tokens through the gate
    again = Grammars.matcher(compiled, [start, word, end], (start, end, False))
    assert allowed(again) == plain
    closed = Grammars.matcher(compiled, [], (start, end, False))
    assert closed.accept_token(tok.convert_tokens_to_ids("true"))  # no block: the grammar
    assert not closed.is_terminated() and closed.accept_token(2) and closed.is_terminated()


def test_engine_rows_think_freely_then_follow_the_grammar(thinker):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(thinker))
    start, end = marker_ids(tok)
    schema = ("json_schema", json.dumps({"type": "object", "properties": {
        "ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}))
    engine = make_engine(thinker, kv_cache_bytes=16 << 20)
    try:
        prompt = tok("Think, then answer:")["input_ids"]
        free = SamplingParams(max_tokens=8, temperature=0)
        inside = SamplingParams(max_tokens=8, temperature=0, structured=schema,
                                reasoning=(start, end, True))
        # the bias writes </think> as soon as it may: never at the start of a plain grammar
        biased = {end: 100.0}
        closes = SamplingParams(max_tokens=40, temperature=0, structured=schema,
                                reasoning=(start, end, True), logit_bias=biased)
        opens = SamplingParams(max_tokens=40, temperature=0, structured=schema,
                               reasoning=(start, end, False),
                               logit_bias={start: 90.0, end: 100.0})
        plain = SamplingParams(max_tokens=40, temperature=0, structured=schema,
                               logit_bias=biased)
        outs = engine.generate([prompt] * 5, [free, inside, closes, opens, plain])
        # inside the block the grammar does not apply: the tokens of the free row
        assert outs[1].token_ids == outs[0].token_ids and end not in outs[0].token_ids
        assert outs[2].token_ids[0] == end and outs[2].finish_reason == "stop"
        answer = json.loads(tok.decode(outs[2].token_ids[1:], skip_special_tokens=True))
        assert answer in ({"ok": True}, {"ok": False})
        assert outs[3].token_ids[:2] == (start, end) and outs[3].finish_reason == "stop"
        json.loads(tok.decode(outs[3].token_ids[2:], skip_special_tokens=True))
        assert end not in outs[4].token_ids and outs[4].finish_reason == "stop"
        json.loads(outs[4].text)
    finally:
        engine.shutdown()


def test_tool_calls_are_read_from_the_content_only():
    from gpupool.api.routes_openai import CHAT
    from gpupool.frontend.text import RequestOutput

    call = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    for text, calls, reasoning in (
            (f"<think>maybe {call}</think>no call", 0, f"maybe {call}"),
            (f"<think>first</think>{call}", 1, "first")):
        out = RequestOutput("r", "m", (1, 2), (3,), text, (3,), text, True, "stop")
        msg = CHAT.choice(0, out, None, tools="hermes", think=(START, END))["message"]
        assert len(msg["tool_calls"]) == calls and msg["reasoning_content"] == reasoning
