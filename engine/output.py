"""Output processing: a step's logits to tokens (processors, grammars, sampling, logprobs),
token-level stop rules, and the OutputDelta messages a request's sink receives."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gpupool.engine.grammar import Grammars
from gpupool.engine.processors import apply_processors
from gpupool.engine.sampler import logprobs, sample
from gpupool.kernels import native
from gpupool.messages.types import OutputDelta, Usage
from gpupool.models.batch import BatchRow
from gpupool.scheduler.request import Sequence
from gpupool.scheduler.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

Sink = Callable[[OutputDelta], None]


@dataclass(eq=False)
class Tracked:
    """A request the engine runs: its sequence, where its outputs go, what was sent."""
    seq: Sequence
    sink: Sink | None
    emitted: int  # output tokens already sent (delivered ones of a resumed request included)
    stop_token: int | None = None
    logprobs: list | None = None  # new tokens' logprobs not sent yet, when asked for
    matcher: object | None = None  # structured output: its xgrammar matcher
    prompt_lps: list | None = None  # prompt logprobs by position, when asked for
    prompt_lps_sent: bool = False
    final_only: bool = False  # no delta before the last (EngineRequest.final_only)
    pooled: torch.Tensor | None = None  # params.pooling: the prompt's final-norm rows (fp32)
    embedding: tuple[float, ...] | None = None  # ... pooled, once the prompt is done


@dataclass
class Sampled:
    """One sampling row's outcome: the token appended (None: none), and the request's finish
    (reason and error) when this step ends it."""
    tr: Tracked
    token: int | None
    finish: str | None = None
    error: str | None = None


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Whether each row of float32 ``logits`` [R, V] is all finite: one native call on CPU
    (torch's isfinite(...).all(-1) is four ops: 61 us a row of SmolLM2's 49152 logits on the
    project's EPYC, the kernel ~5), torch's elsewhere."""
    if native.takes_rows(logits):
        return native.finite_rows(logits)
    return torch.isfinite(logits).all(dim=-1).tolist()


def zero_rows(logits: torch.Tensor, keep: list[bool]) -> torch.Tensor:
    """``logits`` with the rows where ``keep`` is False set to 0 (a harmless row that still
    samples; its request is failed instead)."""
    if all(keep):
        return logits
    mask = torch.tensor(keep, device=logits.device)[:, None]
    return torch.where(mask, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))


def record_prompt_logprobs(out: SchedulerOutput, rows: list[BatchRow], logits,
                           requests: dict[str, Tracked]) -> torch.Tensor:
    """Record prompt logprobs from rows that asked for every position's logits; the logits of
    the rows that sample, in order."""
    if not any(r.all_logits for r in rows):
        return logits
    keep, at = [], 0
    for item, row in zip(out.scheduled, rows):
        if row.hidden:  # its rows pool: none are in logits
            continue
        if not row.all_logits:
            if row.samples:
                keep.append(at)
                at += 1
            continue
        n = len(row.token_ids)
        prompt = item.seq.prompt_token_ids
        positions = [p for p in range(row.start, row.start + n) if p + 1 < len(prompt)]
        if positions:  # logits at position p rate the prompt's token p + 1
            j = [p - row.start + at for p in positions]
            targets = [prompt[p + 1] for p in positions]
            lps = logprobs(logits[j], targets, [item.seq.params.prompt_logprobs] * len(j),
                           ranks=True)
            tr = requests[item.seq.request_id]
            for p, t, lp in zip(positions, targets, lps):
                tr.prompt_lps[p + 1] = (t, *lp)
        if row.samples:
            keep.append(at + n - 1)
        at += n
    return logits[keep]


def record_pooled(out: SchedulerOutput, rows: list[BatchRow], hidden: torch.Tensor,
                  requests: dict[str, Tracked]) -> None:
    """Keep the final-norm rows of the step's pooling rows (``hidden``: theirs, in order) in
    float32 by prompt position (a chunk computed again after a preemption overwrites its
    rows); a request whose prompt is done gets its embedding: the last row, or the mean of
    every row (one sum over the whole prompt: the same bits however it was chunked)."""
    at = 0
    for item, row in zip(out.scheduled, rows):
        if not row.hidden:
            continue
        n = len(row.token_ids) if row.all_logits else int(row.samples)
        rows_here, at = hidden[at: at + n].float().cpu(), at + n  # host: a long prompt's
        tr = requests[item.seq.request_id]
        if not row.all_logits:  # last-token pooling: the final row only
            tr.pooled = rows_here
        else:
            if tr.pooled is None:
                tr.pooled = torch.empty(item.seq.num_prompt_tokens, hidden.shape[-1])
            tr.pooled[row.start: row.start + n] = rows_here
        if row.samples:  # the prompt's last chunk
            vec = tr.pooled.mean(dim=0) if row.all_logits else tr.pooled[-1]
            tr.embedding, tr.pooled = tuple(vec.tolist()), None


def sample_step(tracked: list[Tracked], logits: torch.Tensor, eos_ids,
                grammars: Grammars) -> list[Sampled]:
    """Each sampling row's token (after the processors and grammars), appended to its
    sequence, with logprobs from the raw distribution; a row with NaN or inf logits, or one
    no token of which its grammar accepts, fails its request alone."""
    seqs = [tr.seq for tr in tracked]
    params = [s.params for s in seqs]
    raw = finite_rows(logits)  # a bad row fails alone
    logits = zero_rows(logits, raw)
    processed = apply_processors(logits, params, [s.prompt_token_ids for s in seqs],
                                 [s.output_token_ids for s in seqs], eos_ids)
    matchers = [tr.matcher for tr in tracked]
    if any(m is not None for m in matchers):  # grammars: mask a copy, never raw logits
        processed = processed.clone() if processed is logits else processed
        grammars.mask(processed, matchers)
    finite = raw  # the model's own logits were fine (a row may fail later)
    if processed is not logits:  # processors may mask (-inf), never make NaN or +inf
        sane = (~(processed.isnan() | processed.isposinf()).any(-1) & (
            processed > float("-inf")).any(-1)).tolist()
        finite = [a and b for a, b in zip(raw, sane)]
        processed = zero_rows(processed, sane)
    tokens = sample(processed, params, [len(s.output_token_ids) for s in seqs])
    lps = logprobs(logits, tokens, [p.logprobs for p in params])  # the raw distribution
    return [_take(tr, token, lp, ok, raw_ok, eos_ids)
            for tr, token, lp, ok, raw_ok in zip(tracked, tokens, lps, finite, raw)]


def _take(tr: Tracked, token: int, lp, ok: bool, raw_ok: bool, eos_ids) -> Sampled:
    seq = tr.seq
    if not ok and tr.matcher is not None and raw_ok:
        return Sampled(tr, None, "abort", "no token of this model's vocabulary satisfies the "
                       "request's grammar here")
    if not ok:
        logger.error("request %s: model %s produced non-finite logits; failing it",
                     seq.request_id, seq.adapter or seq.model)
        return Sampled(tr, None, "abort", "the model produced NaN or infinite logits for this "
                       "request")
    seq.output_token_ids.append(token)
    if lp is not None:
        tr.logprobs.append((token, *lp))
    if tr.matcher is not None and not tr.matcher.accept_token(token):
        return Sampled(tr, token, "abort", "sampled a token the grammar does not accept")
    return Sampled(tr, token, stop_reason(tr, token, eos_ids))


def stop_reason(tr: Tracked, token: int, eos_ids) -> str | None:
    """Token-level stops: a stop token or EOS (not before ``min_tokens``), or length. Stop
    strings are the front end's (it aborts the request when one appears)."""
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


def emit(tr: Tracked, finished: bool, error: str | None, orphans: list[str]) -> OutputDelta:
    """The request's new tokens as one OutputDelta, handed to its sink. A sink that raises is
    dropped, and an unfinished request of it goes to ``orphans`` (aborted before a step)."""
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
        usage=Usage(seq.num_prompt_tokens, len(seq.output_token_ids), seq.num_cached_tokens,
                    max(0.0, (seq.first_scheduled_time or seq.arrival_time)
                        - seq.arrival_time), seq.num_preemptions) if finished else None,
        error=error,
        cached_tokens=seq.num_cached_tokens,
        prompt_logprobs=_take_prompt_logprobs(tr, new, finished),
        embedding=tr.embedding if finished else None,
    )
    tr.emitted = len(seq.output_token_ids)
    if tr.sink is not None:
        try:
            tr.sink(out)
        except Exception:  # the consumer is gone: its failure never reaches the engine
            logger.exception("output sink of request %s failed; aborting it", seq.request_id)
            tr.sink = None
            if not finished:
                orphans.append(seq.request_id)
    return out


def _take_prompt_logprobs(tr: Tracked, new: tuple, finished: bool) -> tuple | None:
    """The prompt logprobs, once: with the first delta that has tokens (the prompt is
    computed by then), or the final one."""
    if tr.prompt_lps is None or tr.prompt_lps_sent or not (new or finished):
        return None
    tr.prompt_lps_sent = True
    return tuple(tr.prompt_lps)


def tell(tr: Tracked, error: str) -> None:
    """Last word to a request whose normal finish failed: a bare final output."""
    seq = tr.seq
    try:
        tr.sink(OutputDelta(seq.request_id, tr.emitted, tuple(seq.output_token_ids[tr.emitted:]),
                            finish_reason="abort", error=error,
                            usage=Usage(seq.num_prompt_tokens, len(seq.output_token_ids))))
    except Exception:
        logger.exception("output sink of request %s failed", seq.request_id)
