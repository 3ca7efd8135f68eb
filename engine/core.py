"""The engine loop's body: admit requests, run steps, turn sampled tokens into output deltas.

Single-threaded by design: :class:`gpupool.engine.local.LocalEngine` drives it from one
thread. A step is ``schedule -> worker.execute -> sample -> append, check stop tokens ->
OutputDelta messages``. Token ids in, token ids out: text (tokenising, detokenising, stop
strings) is the front end's.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gpupool.adapters.base import AdapterRef
from gpupool.adapters.peft_format import read_peft_adapter
from gpupool.adapters.registry import AdapterRegistry
from gpupool.engine.grammar import Grammars
from gpupool.engine.processors import apply_processors
from gpupool.engine.sampler import logprobs, sample
from gpupool.kernels import native
from gpupool.messages.errors import AdapterError, RequestError
from gpupool.messages.types import EngineRequest, OutputDelta, Usage
from gpupool.models.batch import BatchRow
from gpupool.pool.pages import PagePool, prefix_root
from gpupool.scheduler.policy import make_policy
from gpupool.scheduler.request import Sequence, Status
from gpupool.scheduler.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from gpupool.scheduler.slo import SLO, CostModel

logger = logging.getLogger(__name__)

Sink = Callable[[OutputDelta], None]


@dataclass(eq=False)
class _Tracked:
    seq: Sequence
    sink: Sink | None
    emitted: int  # output tokens already sent (delivered ones of a resumed request included)
    stop_token: int | None = None
    logprobs: list | None = None  # new tokens' logprobs not sent yet, when asked for
    matcher: object | None = None  # structured output: its xgrammar matcher
    prompt_lps: list | None = None  # prompt logprobs by position, when asked for
    prompt_lps_sent: bool = False
    final_only: bool = False  # no delta before the last (EngineRequest.final_only)


def _finite_rows(logits: torch.Tensor) -> list[bool]:
    """Whether each row of float32 ``logits`` [R, V] is all finite: one native call on CPU
    (torch's isfinite(...).all(-1) is four ops: 61 us a row of SmolLM2's 49152 logits on the
    project's EPYC, the kernel ~5), torch's elsewhere."""
    if native.takes_rows(logits):
        return native.finite_rows(logits)
    return torch.isfinite(logits).all(dim=-1).tolist()


def _zero_rows(logits: torch.Tensor, keep: list[bool]) -> torch.Tensor:
    """``logits`` with the rows where ``keep`` is False set to 0 (a harmless row that still
    samples; its request is failed instead)."""
    if all(keep):
        return logits
    mask = torch.tensor(keep, device=logits.device)[:, None]
    return torch.where(mask, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))


class EngineCore:
    """EngineRequests in, OutputDelta messages out. Workers are added by the LocalEngine."""

    def __init__(self, config: SchedulerConfig, pages: PagePool, kv=None,
                 prefetch: bool = False):
        """``kv``: the :class:`KVStorage`; with host pages enabled, preempted requests' KV is
        swapped out to host memory instead of recomputed. ``prefetch``: each step, start
        copying the weights of the model the policy expects next (``prefetch_hint``) while
        this one runs."""
        self.pages = pages
        self.kv = kv
        host = kv.host_pages if kv is not None else None
        self.cost = CostModel()
        self.policy = make_policy(config.policy, self.cost,
                                  default_slo=SLO(config.ttft_ms, config.tbt_ms))
        self.scheduler = Scheduler(config, pages, host, self.policy)
        self.workers: dict = {}
        self.removing_models: set[str] = set()
        self.adapters = AdapterRegistry()
        self.requests: dict[str, _Tracked] = {}
        self.last_used: dict[str, float] = {}  # model -> wall-clock time of its last step
        self.grammars = Grammars()
        self.prefetch = prefetch
        self.ran = False  # whether the last step ran a batch
        self._orphans: list[str] = []  # requests whose sink failed: aborted before a step

    # ---- models -------------------------------------------------------------------------
    def set_slo(self, model: str, slo: SLO) -> None:
        """The model's latency objectives (used by the token policy)."""
        self.policy.set_slo(model, slo)

    def add_worker(self, worker) -> None:
        if worker.name in self.workers:
            raise RequestError(f"model {worker.name!r} is already loaded")
        if worker.name in self.adapters.refs:
            raise RequestError(f"{worker.name!r} is already the name of an adapter")
        self.workers[worker.name] = worker
        self.scheduler.add_model(worker.name, worker.block_tokens,
                                 worker.adapter_config.max_loras_on_device)

    # ---- adapters -----------------------------------------------------------------------
    def add_adapter(self, name: str, base: str, path: str) -> AdapterRef:
        """Read, validate and register a PEFT LoRA adapter of a loaded base model."""
        if name in self.workers or name in self.adapters.refs:
            raise AdapterError(f"{name!r} is already the name of a model or adapter")
        worker = self.workers.get(base)
        if worker is None:
            raise AdapterError(f"base model {base!r} is not loaded")
        rank, scaling, weights = read_peft_adapter(
            path, worker.cfg, worker.adapter_config.max_lora_rank)
        targets = tuple(sorted({proj for _, proj in weights}))
        ref = AdapterRef(name, base, str(path), rank, scaling, targets)
        worker.add_adapter(name, rank, targets, weights)
        self.adapters.add(ref)
        return ref

    def remove_adapter(self, name: str) -> None:
        """New requests for it fail at once; running ones finish, then it is dropped."""
        if self.adapters.remove(name):
            self._drop_adapter(name)

    def _drop_adapter(self, name: str) -> None:
        ref = self.adapters.drop(name)
        self.workers[ref.base].remove_adapter(name)
        self.pages.drop(ref.base, adapter=name)  # a new adapter of that name is another KV

    def resolve(self, model: str) -> tuple[str, str | None]:
        """(base model, adapter or None) for a model or adapter name; RequestError if none."""
        if model in self.workers and model not in self.removing_models:
            return model, None
        ref = self.adapters.get(model)
        if ref is None or ref.base in self.removing_models:
            raise RequestError(f"model {model!r} is not loaded")
        return ref.base, ref.name

    def remove_model(self, name: str) -> None:
        """New requests for the model (and its adapters) fail at once; running ones finish,
        then its weights, adapters and queues are dropped."""
        if name not in self.workers or name in self.removing_models:
            raise RequestError(f"model {name!r} is not loaded")
        self.removing_models.add(name)
        self._drop_model_if_idle(name)

    def _drop_model_if_idle(self, name: str) -> None:
        if name not in self.removing_models or self.scheduler.num_unfinished(name):
            return
        for adapter in [n for n, r in self.adapters.refs.items() if r.base == name]:
            self._drop_adapter(adapter)
        worker = self.workers.pop(name)
        self.pages.drop(name, everything=True)
        self.grammars.forget(name)
        if worker.weight_pool is not None:
            worker.weight_pool.unregister(name)
        self.scheduler.remove_model(name)
        self.removing_models.discard(name)

    # ---- requests -----------------------------------------------------------------------
    def check_request(self, req: EngineRequest) -> int:
        """Raise RequestError if the request can never run; else its max total tokens. The
        engine's own guard at the boundary (a remote client may send anything): the front end
        has checked the same with messages for users (``gpupool.frontend.text``)."""
        model, prompt_ids, params = req.model, req.prompt_token_ids, req.params
        worker = self.workers[self.resolve(model)[0]]
        vocab = worker.cfg.vocab_size
        if not prompt_ids:
            raise RequestError("prompt is empty")
        for what, ids in (("prompt", prompt_ids), ("delivered", req.delivered_token_ids)):
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab
                   for t in ids):
                raise RequestError(f"{what} token ids must be integers in [0, {vocab})")
        if len(req.delivered_token_ids) >= params.max_tokens:
            raise RequestError("a resumed request must have fewer delivered tokens than "
                               "max_tokens")
        max_len = worker.cfg.max_model_len
        if len(prompt_ids) >= max_len:
            raise RequestError(
                f"prompt has {len(prompt_ids)} tokens, but model {model!r} has a context "
                f"window of {max_len} tokens (prompt + at least one new token)"
            )
        total = len(prompt_ids) + params.max_tokens
        if total > max_len:
            raise RequestError(
                f"model {model!r} has a context window of {max_len} tokens, but the request "
                f"asks for {total} ({len(prompt_ids)} in the prompt, max_tokens "
                f"{params.max_tokens}); lower max_tokens"
            )
        allowed = params.allowed_token_ids
        biased = [t for t, _ in params.logit_bias or ()]
        bad = [t for seq in params.bad_words_token_ids or () for t in seq]
        for name, ids in (("allowed_token_ids", allowed), ("stop_token_ids",
                                                           params.stop_token_ids),
                          ("logit_bias", biased), ("bad_words", bad)):
            if ids and max(ids) >= vocab:
                raise RequestError(f"{name} must be below the vocabulary size {vocab}")
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos
                                             else set(worker.eos_token_ids))
        if allowed and params.min_tokens and set(allowed) <= ends:
            raise RequestError("allowed_token_ids holds only end tokens, which min_tokens "
                               "forbids: nothing could be generated")
        if params.structured is not None:
            if params.min_tokens:
                raise RequestError("min_tokens cannot be combined with response_format (the "
                                   "grammar decides where the output ends)")
            if not self.grammars.can_start(self.compile_grammar(req), vocab):
                err = RequestError("response_format: no token of this model's vocabulary can "
                                   "begin the required output")
                err.param = "response_format"
                raise err
        capacity = self.pages.num_pages * worker.block_tokens
        if total > capacity:
            raise RequestError(
                f"request needs up to {total} tokens of KV cache, but the pool holds "
                f"{capacity} tokens of model {model!r}; lower max_tokens or the prompt"
            )
        return total

    def compile_grammar(self, req: EngineRequest):
        """The request's compiled grammar (cached per model and schema); RequestError if its
        schema does not compile. Safe outside the engine lock."""
        worker = self.workers[self.resolve(req.model)[0]]
        tokenizer = worker.tokenizer
        if tokenizer is None:  # a cluster worker skips it until a grammar needs it
            from gpupool.models.tokenizer import load_tokenizer

            tokenizer = worker.tokenizer = load_tokenizer(worker.folder)
        return self.grammars.compile(worker.name, tokenizer, worker.cfg.vocab_size,
                                     worker.eos_token_ids, req.params.structured)

    def add_request(self, req: EngineRequest, sink: Sink | None = None,
                    arrival_time: float | None = None, total: int | None = None) -> str:
        """Queue a request; ``sink(OutputDelta)`` gets its outputs. ``total``: what
        ``check_request`` returned for it, when the caller has checked it already (else it
        is checked here)."""
        if total is None:
            total = self.check_request(req)
        if req.request_id in self.requests:
            raise RequestError(f"request id {req.request_id!r} is already in use")
        base, adapter = self.resolve(req.model)
        if adapter is not None:
            self.adapters.acquire(adapter)
        seq = Sequence(req.request_id, base, list(req.prompt_token_ids), req.params,
                       time.monotonic() if arrival_time is None else arrival_time, total,
                       adapter=adapter, tenant=req.tenant,
                       output_token_ids=list(req.delivered_token_ids),
                       num_delivered=len(req.delivered_token_ids))
        if self.scheduler.config.enable_prefix_caching:
            seq.cache_root = prefix_root(base, adapter, req.cache_salt)
        matcher = None
        if req.params.structured is not None:
            matcher = self.grammars.matcher(self.compile_grammar(req),
                                            list(req.delivered_token_ids))
        self.requests[req.request_id] = _Tracked(
            seq, sink, emitted=len(req.delivered_token_ids),
            logprobs=[] if req.params.logprobs is not None else None, matcher=matcher,
            prompt_lps=([None] * len(seq.prompt_token_ids)
                        if req.params.prompt_logprobs is not None else None),
            final_only=req.final_only)
        self.scheduler.add_request(seq)
        return req.request_id

    def abort(self, request_id: str) -> None:
        """Finish a request now (reason ``abort``); unknown or finished ids are ignored."""
        tr = self.requests.get(request_id)
        if tr is not None:
            self._finish(tr, "abort")

    def fail_all(self, error: str) -> None:
        """Finish every unfinished request with ``error`` and reset the request state (after
        a failure the engine cannot step past): queues emptied, every KV page free, adapter
        counts zero. Registered models and adapters stay, so the next request is served."""
        for tr in list(self.requests.values()):
            try:
                self._finish(tr, "abort", error=error)
            except Exception:  # keep going: the others must still be told
                logger.exception("could not finish request %s", tr.seq.request_id)
                self.requests.pop(tr.seq.request_id, None)
                if tr.sink is not None:
                    self._tell(tr, error)
        self.requests.clear()
        self._orphans.clear()
        for queues in (self.scheduler.waiting, self.scheduler.running):
            for q in queues.values():
                q.clear()
        self.pages.reset()
        if self.scheduler.host_pages is not None:
            self.scheduler.host_pages.reset()
        for adapter in self.adapters.clear_in_flight():
            self._drop_adapter(adapter)
        for model in list(self.removing_models):
            self._drop_model_if_idle(model)

    def _tell(self, tr: _Tracked, error: str) -> None:
        """Last word to a request whose normal finish failed: a bare final output."""
        seq = tr.seq
        try:
            tr.sink(OutputDelta(seq.request_id, tr.emitted,
                                tuple(seq.output_token_ids[tr.emitted:]),
                                finish_reason="abort", error=error,
                                usage=Usage(seq.num_prompt_tokens, len(seq.output_token_ids))))
        except Exception:
            logger.exception("output sink of request %s failed", seq.request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[OutputDelta]:
        while self._orphans:
            self.abort(self._orphans.pop())
        out = self.scheduler.schedule()
        self.ran = not out.is_empty  # the loop yields after a step that ran nothing
        if out.is_empty:
            return []
        sampling = [s.seq for s in out.scheduled if s.samples]
        if out.swap_out or out.swap_in:
            self.kv.copy_pages(list(out.swap_out), to_host=True)
            self.kv.copy_pages(list(out.swap_in), to_host=False)
        try:
            worker = self.workers[out.model]
            swap = worker.make_resident(frozenset({out.model}))  # once a step, here only
            if swap is not None:  # what switching to the model cost the device: the wait
                self.cost.observe_swap(out.model, swap.seconds)
            if self.prefetch:
                self._prefetch(out.model)
            start = time.perf_counter()
            self.last_used[out.model] = time.time()
            rows = batch_rows(out)
            logits = self._prompt_logprobs(out, rows, worker.execute(rows))
            self.cost.observe_step(out.model, time.perf_counter() - start,
                                   sum(x.num_new_tokens for x in out.scheduled),
                                   sum(x.num_new_tokens for x in out.scheduled
                                       if not x.is_decode))
        except Exception as e:  # a failed step fails its requests, never the engine
            logger.exception("step for model %s failed", out.model)
            return [self._finish(self.requests[s.seq.request_id], "abort", error=str(e))
                    for s in out.scheduled]
        self.scheduler.update_from_output(out)
        try:
            return self._process(out, sampling, logits)
        except Exception as e:  # sampling failed: this step's requests, not the engine's
            logger.exception("sampling for model %s failed", out.model)
            return [self._finish(self.requests[s.seq.request_id], "abort", error=str(e))
                    for s in out.scheduled if s.seq.request_id in self.requests]

    def _prompt_logprobs(self, out: SchedulerOutput, rows: list[BatchRow], logits):
        """Record prompt logprobs from rows that asked for every position's logits; the
        logits of the rows that sample, in order."""
        if not any(r.all_logits for r in rows):
            return logits
        keep, at = [], 0
        for item, row in zip(out.scheduled, rows):
            if not row.all_logits:
                if row.samples:
                    keep.append(at)
                    at += 1
                continue
            n = len(row.token_ids)
            tr = self.requests[item.seq.request_id]
            prompt = item.seq.prompt_token_ids
            positions = [p for p in range(row.start, row.start + n) if p + 1 < len(prompt)]
            if positions:  # logits at position p rate the prompt's token p + 1
                j = [p - row.start + at for p in positions]
                targets = [prompt[p + 1] for p in positions]
                k = item.seq.params.prompt_logprobs
                lps = logprobs(logits[j], targets, [k] * len(j))
                for p, t, lp in zip(positions, targets, lps):
                    tr.prompt_lps[p + 1] = (t, *lp)
            if row.samples:
                keep.append(at + n - 1)
            at += n
        return logits[keep]

    def _prefetch(self, running: str) -> None:
        """Start copying the weights of the model the policy expects after ``running``. A
        prefetch is an optimisation: its failure is logged and the step goes on."""
        hint = self.policy.prefetch_hint(self.scheduler, time.monotonic())
        if hint == running or hint in self.removing_models:
            return
        worker = self.workers.get(hint)
        if worker is None or worker.weight_pool is None:
            return
        try:
            worker.weight_pool.prefetch(hint, protect=frozenset({running}))
        except Exception:
            logger.exception("prefetch of %s failed", hint)

    def _process(self, out: SchedulerOutput, sampling: list[Sequence], logits) -> list:
        tracked = [self.requests[s.request_id] for s in sampling]
        worker = self.workers[out.model]
        params = [s.params for s in sampling]
        raw = _finite_rows(logits)  # a bad row fails alone
        logits = _zero_rows(logits, raw)
        processed = apply_processors(logits, params, [s.prompt_token_ids for s in sampling],
                                     [s.output_token_ids for s in sampling],
                                     worker.eos_token_ids)
        matchers = [tr.matcher for tr in tracked]
        if any(m is not None for m in matchers):  # grammars: mask a copy, never raw logits
            processed = processed.clone() if processed is logits else processed
            self.grammars.mask(processed, matchers)
        finite = raw  # the model's own logits were fine (a row may fail later)
        if processed is not logits:  # processors may mask (-inf), never make NaN or +inf
            sane = (~(processed.isnan() | processed.isposinf()).any(-1) & (
                processed > float("-inf")).any(-1)).tolist()
            finite = [a and b for a, b in zip(raw, sane)]
            processed = _zero_rows(processed, sane)
        tokens = sample(processed, params, [len(s.output_token_ids) for s in sampling])
        lps = logprobs(logits, tokens, [p.logprobs for p in params])  # the raw distribution
        outputs = []
        for tr, token, lp, ok, raw_ok in zip(tracked, tokens, lps, finite, raw):
            seq = tr.seq
            if not ok and tr.matcher is not None and raw_ok:
                outputs.append(self._finish(tr, "abort", error="no token of this model's "
                                            "vocabulary satisfies the request's grammar here"))
                continue
            if not ok:
                logger.error("request %s: model %s produced non-finite logits; failing it",
                             seq.request_id, seq.adapter or seq.model)
                outputs.append(self._finish(tr, "abort", error="the model produced NaN or "
                                            "infinite logits for this request"))
                continue
            seq.output_token_ids.append(token)
            if lp is not None:
                tr.logprobs.append((token, *lp))
            if tr.matcher is not None and not tr.matcher.accept_token(token):
                outputs.append(self._finish(tr, "abort", error="sampled a token the grammar "
                                            "does not accept"))
                continue
            reason = self._stop_reason(tr, token, worker.eos_token_ids)
            if reason is not None:
                outputs.append(self._finish(tr, reason))
            elif not tr.final_only:
                outputs.append(self._emit(tr, finished=False))
        return outputs

    def _stop_reason(self, tr: _Tracked, token: int, eos_ids) -> str | None:
        """Token-level stops: a stop token or EOS (not before ``min_tokens``), or length.
        Stop strings are the front end's (it aborts the request when one appears)."""
        seq, p = tr.seq, tr.seq.params
        if tr.matcher is not None and tr.matcher.is_terminated():  # the grammar ended it
            tr.stop_token = token
            return "stop"
        if len(seq.output_token_ids) >= p.min_tokens and (
                token in p.stop_token_ids or (not p.ignore_eos and token in eos_ids)):
            tr.stop_token = token
            return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= seq.max_total_tokens:
            return "length"
        return None

    def _emit(self, tr: _Tracked, finished: bool, error: str | None = None) -> OutputDelta:
        seq = tr.seq
        new = tuple(seq.output_token_ids[tr.emitted:])
        lps = None
        if tr.logprobs is not None:
            lps, tr.logprobs = tuple(tr.logprobs), []
        out = OutputDelta(
            request_id=seq.request_id,
            index=tr.emitted,
            token_ids=new,
            logprobs=lps,
            finish_reason=seq.finish_reason if finished else None,
            stop_token=tr.stop_token if finished else None,
            usage=Usage(seq.num_prompt_tokens, len(seq.output_token_ids),
                        seq.num_cached_tokens) if finished else None,
            error=error,
            cached_tokens=seq.num_cached_tokens,
            prompt_logprobs=self._take_prompt_logprobs(tr, new, finished),
        )
        tr.emitted = len(seq.output_token_ids)
        if tr.sink is not None:
            try:
                tr.sink(out)
            except Exception:  # the consumer is gone: its failure never reaches the engine
                logger.exception("output sink of request %s failed; aborting it",
                                 seq.request_id)
                tr.sink = None
                if not finished:
                    self._orphans.append(seq.request_id)
        return out

    @staticmethod
    def _take_prompt_logprobs(tr: _Tracked, new: tuple, finished: bool) -> tuple | None:
        """The prompt logprobs, once: with the first delta that has tokens (the prompt is
        computed by then), or the final one."""
        if tr.prompt_lps is None or tr.prompt_lps_sent or not (new or finished):
            return None
        tr.prompt_lps_sent = True
        return tuple(tr.prompt_lps)

    def _finish(self, tr: _Tracked, reason: str, error: str | None = None) -> OutputDelta:
        self.scheduler.finish(tr.seq, reason)
        self.requests.pop(tr.seq.request_id, None)
        if tr.seq.adapter is not None and self.adapters.release(tr.seq.adapter):
            self._drop_adapter(tr.seq.adapter)
        self._drop_model_if_idle(tr.seq.model)
        return self._emit(tr, finished=True, error=error)

    def check_integrity(self) -> None:
        """Pages held by live sequences plus free pages account for the whole pool."""
        holders = Counter(p for tr in self.requests.values() for p in tr.seq.pages)
        self.pages.check_integrity(dict(holders))  # shared prefix pages: one count per holder
        for tr in self.requests.values():
            seq = tr.seq
            assert len(seq.pages) == len(set(seq.pages)), "a sequence lists a page twice"
            bt = self.scheduler.block_tokens[seq.model]
            for i, p in enumerate(seq.pages[: seq.num_indexed_pages]):
                if self.pages.is_indexed(p) and holders[p] > 1:  # shared: a full page
                    assert (i + 1) * bt <= seq.num_computed_tokens, "a shared page is partial"
        for entry in self.pages.entries():
            assert entry.model in self.workers, f"cached pages of removed model {entry.model}"
            assert entry.adapter is None or entry.adapter in self.adapters.refs, (
                f"cached pages of removed adapter {entry.adapter}")
        host = [p for tr in self.requests.values() for p in tr.seq.host_pages]
        if self.scheduler.host_pages is not None:
            self.scheduler.host_pages.check_integrity()
            assert len(host) == len(set(host)) == self.scheduler.host_pages.num_used_pages
        else:
            assert not host
        live: dict[str, int] = {}
        for tr in self.requests.values():
            assert tr.seq.status is not Status.FINISHED
            if tr.seq.adapter:
                live[tr.seq.adapter] = live.get(tr.seq.adapter, 0) + 1
        self.adapters.check_integrity(live)
        for worker in self.workers.values():
            if worker.slots is not None:
                worker.slots.check_integrity()
                assert set(worker.slots.host) == {
                    n for n, r in self.adapters.refs.items() if r.base == worker.name}


def batch_rows(out: SchedulerOutput) -> list[BatchRow]:
    """The model's typed description of a step: one row per scheduled sequence, in the
    scheduler's order (decode rows first), with the token ids it computes."""
    rows = []
    for item in out.scheduled:
        seq, start = item.seq, item.seq.num_computed_tokens
        rows.append(BatchRow(token_ids=seq.token_ids(start, start + item.num_new_tokens),
                             start=start, pages=seq.pages, is_decode=item.is_decode,
                             samples=item.samples, adapter=seq.adapter,
                             all_logits=(seq.params.prompt_logprobs is not None
                                         and start < seq.num_prompt_tokens - 1)))
    return rows
