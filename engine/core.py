"""The engine loop's body: admit requests, run steps, turn sampled tokens into output deltas.

Single-threaded by design: :class:`gpupool.engine.local.LocalEngine` drives it from one
thread. A step is ``schedule -> LoadedModel.execute -> sample -> append, check stop tokens ->
OutputDelta messages``. Token ids in, token ids out: text (tokenising, detokenising, stop
strings) is the front end's. Its parts, one job a file: what is loaded (``registry.py``),
admission (``admission.py``), output processing (``output.py``), the checks of its state
(``integrity.py``); this file holds the requests and the step.
"""

from __future__ import annotations

import itertools
import logging
import time

from gpupool.adapters.base import AdapterRef
from gpupool.engine import admission, integrity, output
from gpupool.engine.output import Sink, Tracked
from gpupool.engine.registry import ModelRegistry
from gpupool.messages.errors import RequestError
from gpupool.messages.types import EngineRequest, OutputDelta
from gpupool.models.batch import BatchRow
from gpupool.pool.pages import PagePool, prefix_root
from gpupool.scheduler.policy import make_policy
from gpupool.scheduler.request import Sequence
from gpupool.scheduler.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from gpupool.scheduler.slo import SLO, CostModel

__all__ = ["EngineCore", "Sink", "batch_rows"]

logger = logging.getLogger(__name__)
# queued requests per step whose adapters are read from disk while the step runs
ADAPTER_PREFETCH_DEPTH = 16


class EngineCore:
    """EngineRequests in, OutputDelta messages out. Models are added by the LocalEngine."""

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
        self.registry = ModelRegistry(self.scheduler, pages)
        self.requests: dict[str, Tracked] = {}
        self.last_used: dict[str, float] = {}  # model -> wall-clock time of its last step
        self.prefetch = prefetch
        self.ran = False  # whether the last step ran a batch
        self._orphans: list[str] = []  # requests whose sink failed: aborted before a step

    # ---- what is loaded (the registry's) ------------------------------------------------
    @property
    def workers(self) -> dict:
        return self.registry.workers

    @property
    def adapters(self):
        return self.registry.adapters

    @property
    def removing_models(self) -> set[str]:
        return self.registry.removing_models

    @property
    def grammars(self):
        return self.registry.grammars

    def set_slo(self, model: str, slo: SLO) -> None:
        """The model's latency objectives (used by the token policy)."""
        self.policy.set_slo(model, slo)

    def add_worker(self, worker) -> None:
        self.registry.add_worker(worker)

    def add_adapter(self, name: str, base: str, path: str, replace: bool = False) -> AdapterRef:
        return self.registry.add_adapter(name, base, path, replace)

    def remove_adapter(self, name: str) -> None:
        self.registry.remove_adapter(name)

    def resolve(self, model: str) -> tuple[str, str | None]:
        return self.registry.resolve(model)

    def remove_model(self, name: str) -> None:
        self.registry.remove_model(name)

    def compile_grammar(self, req: EngineRequest):
        return self.registry.compile_grammar(req)

    # ---- requests -----------------------------------------------------------------------
    def check_request(self, req: EngineRequest) -> int:
        """Raise RequestError if the request can never run; else its max total tokens
        (engine/admission.py)."""
        return admission.check_request(self.registry, self.pages, req)

    def enqueue(self, req: EngineRequest, sink: Sink | None = None,
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
        delivered = list(req.delivered_token_ids)
        seq = Sequence(req.request_id, base, list(req.prompt_token_ids), req.params,
                       time.monotonic() if arrival_time is None else arrival_time, total,
                       adapter=adapter, tenant=req.tenant, output_token_ids=delivered,
                       num_delivered=len(delivered))
        if self.scheduler.config.enable_prefix_caching:
            seq.cache_root = prefix_root(base, adapter, req.cache_salt)
        matcher = None
        if req.params.structured is not None:
            matcher = self.grammars.matcher(self.compile_grammar(req), list(delivered),
                                            req.params.reasoning)
        self.requests[req.request_id] = Tracked(
            seq, sink, emitted=len(delivered),
            logprobs=[] if req.params.logprobs is not None else None, matcher=matcher,
            prompt_lps=([None] * len(seq.prompt_token_ids)
                        if req.params.prompt_logprobs is not None else None),
            final_only=req.final_only)
        self.scheduler.enqueue(seq)
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
                    output.tell(tr, error)
        self.requests.clear()
        self._orphans.clear()
        for queues in (self.scheduler.waiting, self.scheduler.running):
            for q in queues.values():
                q.clear()
        self.pages.reset()
        if self.scheduler.host_pages is not None:
            self.scheduler.host_pages.reset()
        for adapter in self.adapters.clear_in_flight():
            self.registry.drop_adapter(adapter)
        for model in list(self.removing_models):
            self.registry.drop_model_if_idle(model)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def check_integrity(self) -> None:
        """Pages, host pages, adapters and slots all accounted for (engine/integrity.py)."""
        integrity.check(self)

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[OutputDelta]:
        while self._orphans:
            self.abort(self._orphans.pop())
        for name, worker in self.workers.items():
            if worker.adapter_pages is not None:  # which adapters queued requests find warm,
                # and what a cold one's device copy takes of the pool (pool/pages.py)
                self.scheduler.resident_adapters[name] = worker.adapter_pages.resident
                self.scheduler.adapter_pages[name] = worker.adapter_page_request
            else:
                self.scheduler.resident_adapters.pop(name, None)
                self.scheduler.adapter_pages.pop(name, None)
            per_token = self.scheduler.policy.cost.token(name)
            if per_token is not None:  # the eviction policy's cost of a cached page
                self.pages.kv_page_cost[name] = per_token * worker.block_tokens
        out = self.scheduler.schedule()
        self.ran = not out.is_empty  # the loop yields after a step that ran nothing
        if out.is_empty:
            return []
        sampling = [s.seq for s in out.scheduled if s.samples and s.seq.params.pooling is None]
        pooled = [s.seq for s in out.scheduled if s.samples and s.seq.params.pooling]
        if out.swap_out or out.swap_in:
            self.kv.copy_pages(list(out.swap_out), to_host=True)
            self.kv.copy_pages(list(out.swap_in), to_host=False)
        try:
            logits = self._run(out)
        except Exception as e:  # a failed step fails its requests, never the engine
            logger.exception("step for model %s failed", out.model)
            return [self._finish(self.requests[s.seq.request_id], "abort", error=str(e))
                    for s in out.scheduled]
        self.scheduler.update_from_output(out)
        done = [self._finish(self.requests[s.request_id], "stop") for s in pooled]
        try:
            return done + self._process(out, sampling, logits)
        except Exception as e:  # sampling failed: this step's requests, not the engine's
            logger.exception("sampling for model %s failed", out.model)
            return [self._finish(self.requests[s.seq.request_id], "abort", error=str(e))
                    for s in out.scheduled if s.seq.request_id in self.requests]

    def _run(self, out: SchedulerOutput):
        """The step's forward pass on its model (made resident first): the logits of the
        rows that sample, the cost model fed."""
        worker = self.workers[out.model]
        swap = worker.make_resident(frozenset({out.model}))  # once a step, here only
        if swap is not None:  # what switching to the model cost the device: the wait
            self.cost.observe_swap(out.model, swap.seconds)
        if self.prefetch:
            self._prefetch(out.model)
        self._prefetch_adapters(out, worker)
        start = time.perf_counter()
        self.last_used[out.model] = time.time()
        rows = batch_rows(out)
        logits = worker.execute(rows)
        if isinstance(logits, tuple):  # rows that pool: embeddings
            logits, hidden = logits
            output.record_pooled(out, rows, hidden, self.requests)
        logits = output.record_prompt_logprobs(out, rows, logits, self.requests)
        new = [x.num_new_tokens for x in out.scheduled]
        self.cost.observe_step(out.model, time.perf_counter() - start, sum(new),
                               sum(n for n, x in zip(new, out.scheduled) if not x.is_decode))
        return logits

    def _prefetch_adapters(self, out: SchedulerOutput, worker) -> None:
        """Start reading the adapters of the model's queued requests (the first
        ADAPTER_PREFETCH_DEPTH waiting, oldest first) from disk while this step runs, so
        their first step finds a host copy. An optimisation: a failure is logged."""
        if worker.adapter_pages is None:
            return
        model = out.model
        waiting = self.scheduler.waiting.get(model, ())
        names = dict.fromkeys(s.adapter for s in itertools.islice(
            waiting, ADAPTER_PREFETCH_DEPTH) if s.adapter is not None)
        try:
            worker.prefetch_adapters(names, {x.seq.adapter for x in out.scheduled})
        except Exception:
            logger.exception("adapter prefetch for %s failed", model)

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
        eos_ids = self.workers[out.model].eos_token_ids
        outputs = []
        for row in output.sample_step(tracked, logits, eos_ids, self.grammars):
            if row.finish is not None:
                outputs.append(self._finish(row.tr, row.finish, row.error))
            elif not row.tr.final_only:
                outputs.append(output.emit(row.tr, False, None, self._orphans))
        return outputs

    def _finish(self, tr: Tracked, reason: str, error: str | None = None) -> OutputDelta:
        self.scheduler.finish(tr.seq, reason)
        self.requests.pop(tr.seq.request_id, None)
        if tr.seq.adapter is not None and self.adapters.release(tr.seq.adapter):
            self.registry.drop_adapter(tr.seq.adapter)
        self.registry.drop_model_if_idle(tr.seq.model)
        return output.emit(tr, True, error, self._orphans)


def batch_rows(out: SchedulerOutput) -> list[BatchRow]:
    """The model's typed description of a step: one row per scheduled sequence, in the
    scheduler's order (decode rows first), with the token ids it computes."""
    rows = []
    for item in out.scheduled:
        seq, start = item.seq, item.seq.num_computed_tokens
        rows.append(BatchRow(token_ids=seq.token_ids(start, start + item.num_new_tokens),
                             start=start, pages=seq.block_table, is_decode=item.is_decode,
                             samples=item.samples, adapter=seq.adapter, tenant=seq.tenant,
                             all_logits=(seq.params.pooling == "mean" or (
                                 seq.params.prompt_logprobs is not None
                                 and start < seq.num_prompt_tokens - 1)),
                             hidden=seq.params.pooling is not None,
                             rope_long=seq.long_rope,
                             window_pages=seq.window_block_table or None))
    return rows
