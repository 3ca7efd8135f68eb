"""Per-request sampling parameters, checked when made."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

MAX_LOGPROBS = 20  # most alternatives a request may ask for per token
GREEDY_BELOW = 1e-5  # temperatures below this sample greedily
# a penalty outside this range only overflows float32 logits (vLLM asks > 0 and no more)
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_PENALTY = 2.0  # frequency_penalty and presence_penalty lie in [-2, 2] (OpenAI's range)
MAX_LOGIT_BIAS = 100.0  # a logit_bias value lies in [-100, 100] (OpenAI's range)
MAX_LOGIT_BIAS_ENTRIES = 1024
POOLINGS = ("last", "mean")  # how an embedding request pools its prompt's hidden states
STRUCTURED_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar", "tagged_json")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop (vLLM's names and meanings).

    max_tokens: most new tokens; temperature: 0 is greedy; top_p: nucleus mass in (0, 1];
    top_k: keep the k most likely (-1: all); seed: per-request RNG, so a seeded request gives
    the same tokens whatever else is in the batch; stop: strings that end the output (not
    included in the text); stop_token_ids: ids that end it (kept in token_ids);
    ignore_eos: keep generating past the model's end-of-sequence token;
    logprobs: None, or return each sampled token's log-probability with this many most likely
    alternatives (0 to MAX_LOGPROBS), from the model's distribution before temperature,
    top-k and top-p (as vLLM and OpenAI report them).
    repetition_penalty: in [0.01, 100]; tokens already in the prompt or output have positive logits
    divided and negative ones multiplied by it (1: off); min_p: in [0, 1], after temperature
    drop tokens whose probability is below min_p times the most likely one's (0: off);
    min_tokens: no EOS, stop token or stop string ends the output before this many tokens;
    allowed_token_ids: only these ids may be generated (None: all);
    include_stop_str_in_output: keep the matched stop string at the end of the text;
    frequency_penalty, presence_penalty: in [-2, 2]; each output token's logit loses
    frequency_penalty times the times it was generated so far, and presence_penalty once if
    it was (0: off); logit_bias: token id -> a value in [-100, 100] added to its logit
    (a dict, or (id, value) pairs; kept as sorted pairs); structured: None, or
    ("json_object", ""), ("json_schema", the schema as JSON text), ("regex", a pattern),
    ("choice", a JSON list of strings) or ("grammar", EBNF text): the output follows it;
    bad_words_token_ids: token id sequences never generated (a sequence's last token is
    banned whenever the output ends with the rest of it; vLLM's bad_words, tokenized);
    prompt_logprobs: None, or each prompt token's log-probability given the ones before it
    with this many most likely alternatives (0 to MAX_LOGPROBS; the first token has none);
    reasoning: None, or (start id, end id, inside) of a thinking model's reasoning block
    (``<think>``, ``</think>``): ``structured`` then applies only after the end id; inside:
    the output begins within the block (the prompt opened it), else the first token may open
    one (the start id) or begin the structured output;
    pooling: None, or "last" / "mean": an embedding request, the prompt's final-norm hidden
    states pooled (the last token's, or the mean of all) instead of any output token.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: str | list[str] | tuple[str, ...] | None = None
    stop_token_ids: list[int] | tuple[int, ...] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    allowed_token_ids: list[int] | tuple[int, ...] | None = None
    include_stop_str_in_output: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict | tuple | None = None
    structured: tuple[str, str] | list | None = None
    bad_words_token_ids: tuple | list | None = None
    prompt_logprobs: int | None = None
    reasoning: tuple[int, int, bool] | list | None = None
    pooling: str | None = None

    def __post_init__(self):
        def bad(msg):
            raise ValueError(msg)

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            bad(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            bad(f"max_tokens must be at least 1, got {self.max_tokens}")
        if (not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature)
                or self.temperature < 0):
            bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or (self.top_k != -1 and self.top_k < 1):
            bad(f"top_k must be -1 (disabled) or >= 1, got {self.top_k!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not -(2**63) <= seed < 2**63):
            bad(f"seed must be a 64-bit signed integer, in [-2**63, 2**63), got "
                f"{self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            bad("stop must be non-empty strings")
        object.__setattr__(self, "stop", stop)
        ids = tuple(self.stop_token_ids or ())
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            bad("stop_token_ids must be non-negative integers")
        object.__setattr__(self, "stop_token_ids", ids)
        lp = self.logprobs
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int)
                               or not 0 <= lp <= MAX_LOGPROBS):
            bad(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {lp!r}")
        if not _is_number(self.repetition_penalty) or not (
                MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY):
            bad(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, "
                f"{MAX_REPETITION_PENALTY}], got {self.repetition_penalty!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        mt = self.min_tokens
        if isinstance(mt, bool) or not isinstance(mt, int) or not 0 <= mt <= self.max_tokens:
            bad(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                f"got {mt!r}")
        if self.allowed_token_ids is not None:
            allowed = tuple(self.allowed_token_ids)
            if not allowed or any(isinstance(t, bool) or not isinstance(t, int) or t < 0
                                  for t in allowed):
                bad("allowed_token_ids must be a non-empty list of non-negative integers")
            object.__setattr__(self, "allowed_token_ids", allowed)
        if not isinstance(self.include_stop_str_in_output, bool):
            bad("include_stop_str_in_output must be a boolean")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                bad(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {v!r}")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        object.__setattr__(self, "structured", _structured(self.structured))
        object.__setattr__(self, "reasoning", _reasoning(self.reasoning))
        if self.pooling not in (None, *POOLINGS):
            bad(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.pooling and (self.logprobs is not None or self.prompt_logprobs is not None
                             or self.structured is not None):
            bad("pooling (an embedding) takes no logprobs, prompt_logprobs or structured")
        plp = self.prompt_logprobs
        if plp is not None and (isinstance(plp, bool) or not isinstance(plp, int)
                                or not 0 <= plp <= MAX_LOGPROBS):
            bad(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {plp!r}")
        if self.bad_words_token_ids is not None:
            seqs = tuple(tuple(s) for s in self.bad_words_token_ids)
            if not seqs or any(not s or any(isinstance(t, bool) or not isinstance(t, int)
                                            or t < 0 for t in s) for s in seqs):
                bad("bad_words_token_ids must be non-empty sequences of token ids")
            object.__setattr__(self, "bad_words_token_ids", seqs)

    @property
    def needs_processors(self) -> bool:
        """Whether any logits processor changes this request's logits before sampling."""
        return (self.repetition_penalty != 1.0 or self.min_tokens > 0
                or self.allowed_token_ids is not None or self.frequency_penalty != 0
                or self.presence_penalty != 0 or self.logit_bias is not None
                or self.bad_words_token_ids is not None)

    @property
    def is_greedy(self) -> bool:
        # below 1e-5 the distribution is one-hot in float32 anyway (vLLM's threshold too)
        return self.temperature < GREEDY_BELOW or self.top_k == 1


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _logit_bias(value) -> tuple[tuple[int, float], ...] | None:
    """``{id: bias}`` (ids as ints or digit strings, as JSON has them) or pairs -> sorted
    pairs; ValueError naming logit_bias when malformed."""
    if value is None:
        return None
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = [(k, v) for k, v in items]
    except (TypeError, ValueError):
        raise ValueError("logit_bias must map token ids to numbers") from None
    if len(pairs) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries")
    out = {}
    for k, v in pairs:
        if isinstance(k, str) and k.strip().isdigit():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"logit_bias keys must be token ids (non-negative integers), "
                             f"got {k!r}")
        if not _is_number(v) or not math.isfinite(v) or abs(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, "
                             f"{MAX_LOGIT_BIAS:g}], got {v!r}")
        out[k] = float(v)
    return tuple(sorted(out.items())) or None


def _reasoning(reasoning) -> tuple[int, int, bool] | None:
    if reasoning is None:
        return None
    try:
        start, end, inside = reasoning
    except (TypeError, ValueError):
        raise ValueError("reasoning must be (start id, end id, inside)") from None
    if (any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in (start, end))
            or start == end or not isinstance(inside, bool)):
        raise ValueError("reasoning must be two different token ids and a boolean")
    return start, end, inside


def _structured(structured) -> tuple[str, str] | None:
    """``(kind, spec)`` checked (spec: JSON text of an object for json_schema)."""
    if structured is None:
        return None
    try:
        kind, spec = structured
    except (TypeError, ValueError):
        raise ValueError("structured must be a (kind, spec) pair") from None
    if kind not in STRUCTURED_KINDS:
        raise ValueError(f"structured kind must be one of {', '.join(STRUCTURED_KINDS)}, "
                         f"not {kind!r}")
    if kind == "json_schema":
        if not isinstance(spec, str):
            raise ValueError("structured json_schema spec must be JSON text")
        try:
            schema = json.loads(spec)
        except ValueError as e:
            raise ValueError(f"structured json_schema is not JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError("structured json_schema must be a JSON object")
    elif kind == "choice":
        try:
            choices = json.loads(spec)
        except (TypeError, ValueError):
            choices = None
        if (not isinstance(choices, list) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise ValueError("structured choice must be a JSON list of non-empty strings")
    elif kind == "tagged_json":  # {"begin": text, "schema": {...}, "end": text}
        try:
            tagged = json.loads(spec)
        except (TypeError, ValueError):
            tagged = None
        if (not isinstance(tagged, dict) or not isinstance(tagged.get("schema"), dict)
                or not all(isinstance(tagged.get(k, ""), str) for k in ("begin", "end"))):
            raise ValueError("structured tagged_json must be JSON {begin, schema, end}")
    elif kind in ("regex", "grammar") and (not isinstance(spec, str) or not spec):
        raise ValueError(f"structured {kind} must be a non-empty string")
    return kind, spec or ""
