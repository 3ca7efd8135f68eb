"""Tool calls in a model's output text: the two formats of the tool-capable chat templates,
parsed whole or as the text streams in.

``hermes`` (Qwen2.5, Qwen3, Hermes): each call is a JSON object in tags, text may surround
them::

    Let me check.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``llama3`` (Llama 3.1/3.2 JSON tool calling): the whole output is the call(s), optionally
after ``<|python_tag|>``, several separated by ``;``::

    {"name": "get_weather", "parameters": {"city": "Paris"}}

A tag or object that does not parse as a call stays text: nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

FORMATS = ("hermes", "llama3")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])


def _call(obj) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _objects(text: str) -> list | None:
    """The JSON values of ``text`` (several separated by ';' or whitespace), or None."""
    dec, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == ";"):
            i += 1
        if i == len(text):
            return out
        try:
            value, i = dec.raw_decode(text, i)
        except ValueError:
            return None
        out.extend(value if isinstance(value, list) else [value])


def parse_tool_calls(text: str, fmt: str) -> tuple[str | None, list[ToolCall]]:
    """(the text that is not a call, or None when there is none; the calls in order)."""
    if fmt == "llama3":
        body = text.strip()
        body = body.removeprefix(PYTHON_TAG).strip()
        objs = _objects(body) if body.startswith(("{", "[")) else None
        calls = [_call(o) for o in objs or ()]
        if objs and all(calls):
            return None, calls
        return text, []
    content, calls, i = [], [], 0
    while True:
        start = text.find(OPEN, i)
        if start < 0:
            content.append(text[i:])
            break
        end = text.find(CLOSE, start + len(OPEN))
        if end < 0:  # an unclosed tag (cut by max_tokens): text as written
            content.append(text[i:])
            break
        objs = _objects(text[start + len(OPEN): end])
        parsed = [_call(o) for o in objs or ()]
        content.append(text[i:start])
        if objs and all(parsed):
            calls.extend(parsed)
        else:
            content.append(text[start: end + len(CLOSE)])
        i = end + len(CLOSE)
    rest = "".join(content).strip()
    return (rest or None) if calls else (text if text else None), calls


class ToolStreamParser:
    """Feed the text as it streams; get the content that is surely not part of a call at
    once, and the calls when the output ends (``finish``)."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.text = ""  # everything so far
        self.sent = 0  # characters of text sent as content

    def _safe_end(self) -> int:
        """How far the text may go out as content now."""
        if self.fmt == "llama3":
            head = self.text.lstrip()
            if not head or head.startswith(("{", "[", PYTHON_TAG)) or PYTHON_TAG.startswith(
                    head):
                return self.sent  # may be a call: wait for the end
            return len(self.text)
        start = self.text.find(OPEN, self.sent)
        if start >= 0:
            return start
        for k in range(len(OPEN) - 1, 0, -1):  # a tag may be starting at the end
            if self.text.endswith(OPEN[:k]):
                return len(self.text) - k
        return len(self.text)

    def feed(self, delta: str) -> str:
        """The content to send now for ``delta``."""
        self.text += delta
        end = max(self.sent, self._safe_end())
        out, self.sent = self.text[self.sent: end], end
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the content not sent yet, the calls)."""
        content, calls = parse_tool_calls(self.text, self.fmt)
        if not calls:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out, []
        # content already sent is a prefix of the content; send the rest of it
        rest = (content or "")
        sent = self.text[: self.sent].strip()
        out = rest[len(sent):] if rest.startswith(sent) else ""
        self.sent = len(self.text)
        return out, calls
