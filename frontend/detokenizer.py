"""Incremental detokenisation: text deltas that never split a multi-byte character.

Decoding each new token alone breaks words (a leading space is lost, a UTF-8 character spread
over tokens shows as U+FFFD). Instead we decode a short window twice: the tokens already shown
(``prefix_offset:read_offset``) and the same window plus the new ones; the difference is the
new text. A delta ending in U+FFFD is held back until the character completes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CONTEXT_TOKENS = 5  # prompt tokens decoded before the output, for spacing context


@dataclass
class DetokenizerState:
    tokens: list[int]  # prompt tail + output so far
    prefix_offset: int
    read_offset: int
    text: str = ""
    stop_checked_upto: int = 0
    extra: dict = field(default_factory=dict)
    skip_special: bool = True  # special tokens left out of the text

    @classmethod
    def start(cls, prompt_token_ids: list[int], skip_special: bool = True) -> DetokenizerState:
        tail = list(prompt_token_ids[-CONTEXT_TOKENS:])
        return cls(tokens=tail, prefix_offset=0, read_offset=len(tail),
                   skip_special=skip_special)


def append_token(tokenizer, state: DetokenizerState, token_id: int) -> str:
    """Add one output token; return the text it completes (maybe empty)."""
    state.tokens.append(token_id)
    if tokenizer is None:
        return ""
    skip = state.skip_special
    prefix = tokenizer.decode(
        state.tokens[state.prefix_offset : state.read_offset], skip_special_tokens=skip
    )
    full = tokenizer.decode(state.tokens[state.prefix_offset :], skip_special_tokens=skip)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        delta = full[len(prefix) :]
        state.prefix_offset = state.read_offset
        state.read_offset = len(state.tokens)
        state.text += delta
        return delta
    return ""
