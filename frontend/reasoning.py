"""A thinking model's reasoning: the text between ``<think>`` and ``</think>`` goes out as
``reasoning_content``, the rest as ``content`` (vLLM's ``--reasoning-parser``), whole or as
the text streams in.

Both parsers (``qwen3``: Qwen3, QwQ; ``deepseek_r1``: DeepSeek-R1 and its distills) read the
same markers, each one token of the vocabulary, and one rule decides where the output begins
from the prompt's last marker:

- ``</think>`` (the template closed the block: Qwen3 with ``enable_thinking: false``): the
  output is content;
- ``<think>`` (the template opened it: DeepSeek-R1's, or an assistant prefill): the output
  begins as reasoning, up to ``</think>``; an output that never closes it is all reasoning;
- neither: the output is reasoning if it opens with ``<think>``, else content.

Whitespace right after ``</think>`` is dropped (the models write a blank line there).

A third parser, ``gpt_oss``, reads gpt-oss's harmony channels instead (``frontend/harmony.py``:
its analysis channel is the reasoning, its tool calls its own).
"""

from __future__ import annotations

from typing import NamedTuple

from gpupool.frontend.harmony import MARKERS as HARMONY
from gpupool.frontend.harmony import HarmonyStream, read_harmony
from gpupool.frontend.tools import ToolStreamParser, parse_tool_calls

PARSERS = ("qwen3", "deepseek_r1", "gpt_oss")
START, END = "<think>", "</think>"


class Markers(NamedTuple):
    """A thinking model's marker ids: the block's start and end (gpt_oss: ``<|channel|>``
    and ``<|end|>``, ``harmony`` set), and the other special ids (turn boundaries)."""
    start: int
    end: int
    stops: frozenset = frozenset()
    harmony: bool = False


def marker_ids(tokenizer, markers: tuple[str, ...] = (START, END)) -> tuple[int, ...] | None:
    """The ids of ``markers`` (``<think>`` and ``</think>``) when each is one token of the
    vocabulary."""
    if tokenizer is None:
        return None
    out = []
    for marker in markers:
        tid = tokenizer.convert_tokens_to_ids(marker)
        if not isinstance(tid, int) or tokenizer.convert_ids_to_tokens(tid) != marker:
            return None
        out.append(tid)
    return tuple(out)


def reasoning_markers(tokenizer, parser: str = "qwen3") -> Markers | None:
    """The markers of ``parser`` (``<think>`` id, ``</think>`` id, the other special token
    ids: turn boundaries that end the search for a marker in the prompt; gpt_oss: harmony's),
    or None where the vocabulary lacks them."""
    if parser == "gpt_oss":
        ids = marker_ids(tokenizer, HARMONY)
        return None if ids is None else Markers(ids[0], ids[1], frozenset(), True)
    ids = marker_ids(tokenizer)
    if ids is None:
        return None
    return Markers(*ids, frozenset(getattr(tokenizer, "all_special_ids", ()) or ()) - set(ids))


def is_harmony(think) -> bool:
    """Whether ``think`` (markers, a plain (start, end) pair, or None) are gpt_oss's."""
    return bool(getattr(think, "harmony", False))


def prompt_state(prompt: list[int], markers: tuple) -> str:
    """``closed``, ``inside`` or ``open`` (the output may open a block): the rule above,
    looking back only to the last other special token (the assistant turn's header: a
    ``<think>`` a user typed in an earlier turn is not the answer's)."""
    start, end = markers[0], markers[1]
    stops = markers[2] if len(markers) > 2 else ()
    for t in reversed(prompt):
        if t == end:
            return "closed"
        if t == start:
            return "inside"
        if t in stops:
            break
    return "open"


class ReasoningStream:
    """Feed the output text as it streams; get (reasoning, content) text to send now."""

    def __init__(self, state: str):
        self.state = {"closed": "content", "inside": "reasoning", "open": "head"}[state]
        self.buf = ""
        self.reasoned = state == "inside"  # a block was opened

    def feed(self, delta: str) -> tuple[str, str]:
        self.buf += delta
        reasoning = content = ""
        while True:
            if self.state == "head":
                head = self.buf.lstrip()
                if head.startswith(START):
                    self.buf, self.state, self.reasoned = head[len(START):], "reasoning", True
                    continue
                if START.startswith(head):  # nothing yet, or a marker starting
                    return reasoning, content
                self.state = "content"
            elif self.state == "reasoning":
                i = self.buf.find(END)
                if i >= 0:
                    reasoning += self.buf[:i]
                    self.buf, self.state = self.buf[i + len(END):], "gap"
                    continue
                keep = next((k for k in range(min(len(END) - 1, len(self.buf)), 0, -1)
                             if self.buf.endswith(END[:k])), 0)  # a marker may be starting
                reasoning += self.buf[:len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                return reasoning, content
            elif self.state == "gap":
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return reasoning, content
                self.state = "content"
            else:
                content, self.buf = content + self.buf, ""
                return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The (reasoning, content) text held back, at the end of the output."""
        rest, self.buf = self.buf, ""
        if self.state == "reasoning":
            return rest, ""
        return "", rest if self.state != "gap" else ""


def split_reasoning(text: str, state: str) -> tuple[str | None, str | None]:
    """(reasoning or None, content) of a whole output; content None when the output was all
    reasoning."""
    p = ReasoningStream(state)
    r1, c1 = p.feed(text)
    r2, c2 = p.finish()
    reasoning, content = r1 + r2, c1 + c2
    if not p.reasoned:
        return None, content
    return reasoning, content or None


def read_answer(text: str, prompt: list[int], think: Markers | tuple | None,
                tools: str | None) -> tuple[str | None, str | None, list]:
    """(reasoning or None, content, tool calls) of a whole chat answer: a thinking model's
    reasoning apart (``think``: its markers, ``reasoning_markers``), then the calls of the
    model's tool-call format (``tools``) read from the content only."""
    if is_harmony(think):  # its channels, its own tool calls
        return read_harmony(text)
    reasoning, content, calls = None, text, []
    if think is not None:
        reasoning, content = split_reasoning(text, prompt_state(prompt, think))
    if tools is not None and content is not None:
        content, calls = parse_tool_calls(content, tools)
    return reasoning, content, calls


class AnswerStream:
    """``read_answer`` as the text streams in: ``feed`` gives the reasoning and the content
    to send now (content that may be a tool call held back), ``finish`` the content held
    back and the calls."""

    def __init__(self, prompt: list[int], think: Markers | tuple | None, tools: str | None):
        self.harmony = HarmonyStream() if is_harmony(think) else None
        self.thinking = (ReasoningStream(prompt_state(prompt, think))
                         if think is not None and self.harmony is None else None)
        self.tools = (ToolStreamParser(tools) if tools is not None and self.harmony is None
                      else None)
        self.held: list = []  # harmony's calls, read as its output ended

    @property
    def reasoned(self) -> bool:
        """Whether a reasoning block was opened."""
        if self.harmony is not None:
            return self.harmony.reasoned
        return self.thinking is not None and self.thinking.reasoned

    def feed(self, delta: str, finished: bool) -> tuple[str, str]:
        if self.harmony is not None:
            reasoning, content = self.harmony.feed(delta)
            if finished:
                more, rest, self.held = self.harmony.finish()
                reasoning, content = reasoning + more, content + rest
            return reasoning, content
        reasoning, content = "", delta
        if self.thinking is not None:
            reasoning, content = self.thinking.feed(delta)
            if finished:
                more, rest = self.thinking.finish()
                reasoning, content = reasoning + more, content + rest
        if self.tools is not None:
            content = self.tools.feed(content)
        return reasoning, content

    def finish(self) -> tuple[str, list]:
        """(the content held back as a possible call, the calls) at the answer's end."""
        if self.harmony is not None:
            return "", self.held
        return self.tools.finish() if self.tools is not None else ("", [])
