"""gpt-oss's harmony format (its ``reasoning_parser`` ``gpt_oss``): an answer is messages,
each a header then a body::

    <|channel|>analysis<|message|>The user asks ...<|end|>
    <|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>
    <|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{..}<|call|>

The ``analysis`` channel is the reasoning, ``final`` the content, a message to
``functions.NAME`` (the recipient in the header, before or after the channel) a tool call
whose body is its arguments; other ``commentary`` (a preamble before calls) is content. A
body ends at ``<|end|>``, ``<|return|>`` or ``<|call|>``. Text before any header (a model
that did not write one, or a grammar that forbade it) is content. The markers are special
tokens: the request's text keeps them (``TextStream(keep_special=True)``) for this parser,
which drops them.
"""

from __future__ import annotations

import json

from gpupool.frontend.tools import ToolCall

CHANNEL, MESSAGE = "<|channel|>", "<|message|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>")
MARKERS = (CHANNEL, ENDS[0], MESSAGE)  # the vocabulary must hold these (reasoning_markers)
MARKER_START = "<|"


def _header(header: str) -> tuple[str, str | None]:
    """(kind, tool name) of a message header: ``reasoning``, ``content`` or ``call``."""
    recipient = None
    at = header.find("to=")
    if at >= 0:
        rest = header[at + 3:]
        end = min((i for i in (rest.find(" "), rest.find(MARKER_START)) if i >= 0),
                  default=len(rest))
        recipient = rest[:end]
    if recipient and recipient.startswith("functions."):
        return "call", recipient[len("functions."):]
    channel = header.split(CHANNEL, 1)[1] if CHANNEL in header else ""
    channel = channel.split(" ", 1)[0].split(MARKER_START, 1)[0]
    return ("reasoning" if channel == "analysis" else "content"), None


def _call(name: str, body: str) -> ToolCall:
    try:  # the arguments as OpenAI sends them: JSON text of an object
        args = json.loads(body)
        text = json.dumps(args, ensure_ascii=False) if isinstance(args, dict) else body
    except ValueError:
        text = body
    return ToolCall(name, text)


class HarmonyStream:
    """Feed the output text (markers kept) as it streams; get (reasoning, content) to send
    now; ``finish`` gives what was held back and the tool calls."""

    def __init__(self):
        self.buf = ""  # a header being written, or body text that may end in a marker
        self.state = "head"  # head (before a body), body, raw (no header: all content)
        self.first = True  # no header read yet
        self.kind: str | None = None
        self.name: str | None = None
        self.body = ""  # a call's arguments so far
        self.calls: list[ToolCall] = []
        self.reasoned = False  # an analysis message was opened

    def feed(self, delta: str) -> tuple[str, str]:
        self.buf += delta
        out = {"reasoning": "", "content": ""}
        while self.buf:
            if self.state == "raw":
                out["content"], self.buf = out["content"] + self.buf, ""
            elif self.state == "head":
                i = self.buf.find(MESSAGE)
                if i < 0:
                    lead = self.buf.lstrip()
                    if self.first and lead and not (lead.startswith(MARKER_START)
                                                    or MARKER_START.startswith(lead)):
                        self.state = "raw"  # text before any header: content
                        continue
                    break  # a header being written: wait for its <|message|>
                self.kind, self.name = _header(self.buf[:i])
                self.first, self.reasoned = False, self.reasoned or self.kind == "reasoning"
                self.buf, self.state = self.buf[i + len(MESSAGE):], "body"
            else:
                ends = [(j, m) for m in ENDS if (j := self.buf.find(m)) >= 0]
                if ends:
                    j, marker = min(ends)
                    self._emit(out, self.buf[:j])
                    self.buf = self.buf[j + len(marker):]
                    self._close()
                    continue
                keep = next((k for k in range(min(len(self.buf), 9), 0, -1)
                             if any(m.startswith(self.buf[-k:]) for m in ENDS)), 0)
                self._emit(out, self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                break
        return out["reasoning"], out["content"]

    def _emit(self, out: dict, text: str) -> None:
        if self.kind == "call":
            self.body += text
        else:
            out[self.kind] += text

    def _close(self) -> None:
        if self.kind == "call":
            self.calls.append(_call(self.name, self.body))
        self.state, self.kind, self.name, self.body = "head", None, None, ""

    def finish(self) -> tuple[str, str, list[ToolCall]]:
        """(reasoning, content) held back at the end of the output, and the calls (a body
        cut short ends there; header text after the last message is dropped)."""
        out = {"reasoning": "", "content": ""}
        if self.state == "body":
            self._emit(out, self.buf)
            self._close()
        elif self.state == "raw" or self.first:
            out["content"] += self.buf  # never a header: what it wrote
        self.buf = ""
        return out["reasoning"], out["content"], self.calls


def read_harmony(text: str) -> tuple[str | None, str | None, list[ToolCall]]:
    """(reasoning or None, content, calls) of a whole answer: content None where the
    answer held reasoning or calls but no content."""
    p = HarmonyStream()
    r1, c1 = p.feed(text)
    r2, c2, calls = p.finish()
    content = c1 + c2
    if not content and (p.reasoned or calls):
        content = None
    return (r1 + r2 if p.reasoned else None), content, calls
