"""Structured output: xgrammar grammars compiled once per (model, schema), a matcher per
request, and the token mask they put on each row's logits before sampling.

``SamplingParams.structured`` is ``(kind, spec)``: ``("json_object", "")`` for any JSON
object, ``("json_schema", schema as JSON text)``. Each model gets one
``xgrammar.GrammarCompiler`` (its tokenizer's vocabulary, read once; compiled grammars cached
by the compiler). A request's ``GrammarMatcher`` advances with every token it is given, so
constrained and free rows, base and adapters share one batch; a resumed request replays its
delivered tokens. Whitespace is not free-form (``any_whitespace=False``): a model that
prefers spaces cannot spend its tokens on them.
"""

from __future__ import annotations

import json
import threading

import torch

from gpupool.messages.errors import RequestError


class Grammars:
    """Per-model compilers and compiled grammars (thread-safe: the API compiles off the
    engine loop, the loop builds matchers)."""

    def __init__(self):
        self._compilers: dict[str, object] = {}
        self._lock = threading.Lock()

    def forget(self, model: str) -> None:
        with self._lock:
            self._compilers.pop(model, None)

    def _compiler(self, model: str, tokenizer, vocab_size: int, eos_ids):
        import xgrammar as xgr

        with self._lock:
            if model not in self._compilers:
                if tokenizer is None:
                    raise RequestError(f"model {model!r} has no tokenizer: structured output "
                                       "needs one")
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                          stop_token_ids=list(eos_ids))
                self._compilers[model] = xgr.GrammarCompiler(info, max_threads=1)
            return self._compilers[model]

    def compile(self, model: str, tokenizer, vocab_size: int, eos_ids, structured):
        """The compiled grammar of ``structured``; RequestError naming response_format when
        the schema is not one xgrammar can compile."""
        kind, spec = structured
        compiler = self._compiler(model, tokenizer, vocab_size, eos_ids)
        try:
            if kind == "json_object":
                return compiler.compile_builtin_json_grammar()
            if kind == "regex":
                return compiler.compile_regex(spec)
            if kind == "grammar":
                return compiler.compile_grammar(spec)
            if kind == "tagged_json":  # begin text, a JSON value of the schema, end text
                import xgrammar as xgr

                t = json.loads(spec)
                body = xgr.Grammar.from_json_schema(json.dumps(t["schema"]),
                                                    any_whitespace=False)
                begin, end = ([xgr.Grammar.from_ebnf(f"root ::= {json.dumps(t[k])}")]
                              if t.get(k) else [] for k in ("begin", "end"))
                seq = begin + [body] + end
                return compiler.compile_grammar(xgr.Grammar.concat(*seq) if len(seq) > 1
                                                else body)
            if kind == "choice":  # one literal of the list, exactly (JSON escapes: EBNF's)
                literals = " | ".join(json.dumps(c) for c in json.loads(spec))
                return compiler.compile_grammar(f"root ::= {literals}")
            return compiler.compile_json_schema(spec, any_whitespace=False)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError subclasses
            what = "the JSON schema" if kind == "json_schema" else f"the {kind}"
            err = RequestError(f"response_format: cannot compile {what}: {e}")
            err.param = "response_format"  # the HTTP layer names it
            raise err from None

    @staticmethod
    def matcher(compiled, delivered: list[int], reasoning=None):
        """A matcher at the start of the output, advanced over ``delivered`` tokens; behind
        a ``ReasoningGate`` when the grammar starts after a reasoning block."""
        import xgrammar as xgr

        m = xgr.GrammarMatcher(compiled)
        if reasoning is not None:
            m = ReasoningGate(m, *reasoning)
        for t in delivered:
            if not m.accept_token(t):
                raise RequestError("the delivered tokens do not follow the request's "
                                   "response_format")
        return m

    @staticmethod
    def can_start(compiled, vocab_size: int) -> bool:
        """Whether some token of the vocabulary may begin the output (a word-level
        vocabulary cannot begin JSON, for one)."""
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        xgr.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask, 0)
        logits = torch.zeros(1, vocab_size)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        return bool(torch.isfinite(logits).any())

    @staticmethod
    def mask(logits: torch.Tensor, matchers: list) -> None:
        """Set to -inf, in place, each constrained row's tokens its grammar forbids now."""
        import xgrammar as xgr

        rows = [i for i, m in enumerate(matchers)
                if m is not None and not (isinstance(m, ReasoningGate) and not m.constrains())]
        if not rows:
            return
        bitmask = xgr.allocate_token_bitmask(len(matchers), logits.shape[-1])
        for i in rows:
            matchers[i].fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)


class ReasoningGate:
    """A grammar matcher that applies only after a thinking model's reasoning block: free
    tokens inside ``<think> ... </think>``, the grammar from the token after the end id. Not
    inside at the start (the prompt did not open a block), the first token may be the start
    id (a block opens) or one the grammar allows (no block: the grammar from there)."""

    def __init__(self, matcher, start: int, end: int, inside: bool):
        self.inner, self.start, self.end = matcher, start, end
        self.state = "inside" if inside else "first"

    def constrains(self) -> bool:
        return self.state != "inside"

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.inner.fill_next_token_bitmask(bitmask, row)
        if self.state == "first":  # the start id allowed besides the grammar's tokens
            word, bit = divmod(self.start, 32)
            v = (int(bitmask[row, word]) & 0xFFFFFFFF) | (1 << bit)
            bitmask[row, word] = v - (1 << 32) if v >= 1 << 31 else v

    def accept_token(self, token: int) -> bool:
        if self.state == "inside":
            if token == self.end:
                self.state = "grammar"
            return True
        if self.state == "first" and token == self.start:
            self.state = "inside"
            return True
        self.state = "grammar"
        return self.inner.accept_token(token)

    def is_terminated(self) -> bool:
        return self.state == "grammar" and self.inner.is_terminated()
