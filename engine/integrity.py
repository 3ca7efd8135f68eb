"""The engine's state checks (tests and idle time): every page, host page, adapter count and
adapter's pages accounted for."""

from __future__ import annotations

from collections import Counter

from gpupool.scheduler.request import Status


def check(core) -> None:
    """Pages held by live sequences plus free pages account for the whole pool; shared pages
    are full; cached pages belong to loaded models and adapters; host pages, adapter counts
    and each model's slots agree with the requests."""
    requests = core.requests.values()
    holders = Counter(p for tr in requests for p in tr.seq.pages + tr.seq.window_pages)
    core.pages.check_integrity(dict(holders))  # shared prefix pages: one count per holder
    scheduler = core.scheduler
    for tr in requests:
        seq = tr.seq
        held = seq.pages + seq.window_pages
        assert len(held) == len(set(held)), "a sequence lists a page twice"
        group = scheduler.window_groups.get(seq.model)
        assert group is not None or not (seq.window_pages or seq.host_window_pages), (
            "windowed layers' pages of a model without their group")
        for pages, bt, dropped, indexed, dead in (
                (seq.pages, scheduler.block_tokens[seq.model], seq.num_dropped_pages,
                 seq.num_indexed_pages, scheduler.dead_blocks(seq, seq.num_computed_tokens)),
                (seq.window_pages, group[0] if group else 1, seq.num_dropped_window_pages,
                 seq.num_indexed_window_pages,
                 scheduler.dead_window_blocks(seq, seq.num_computed_tokens))):
            assert dropped <= dead, "a page in a layer's window was released"
            for i, p in enumerate(pages[: max(0, indexed - dropped)], dropped):
                if core.pages.is_indexed(p) and holders[p] > 1:  # shared: a full page
                    assert (i + 1) * bt <= seq.num_computed_tokens, "a shared page is partial"
    for entry in core.pages.entries():
        assert entry.model in core.workers, f"cached pages of removed model {entry.model}"
        assert entry.adapter is None or entry.adapter in core.adapters.refs, (
            f"cached pages of removed adapter {entry.adapter}")
    _check_host_pages(core)
    live: dict[str, int] = {}
    for tr in requests:
        assert tr.seq.status is not Status.FINISHED
        if tr.seq.adapter:
            live[tr.seq.adapter] = live.get(tr.seq.adapter, 0) + 1
    core.adapters.check_integrity(live)
    for worker in core.workers.values():
        if worker.adapter_pages is not None:
            worker.adapter_pages.check_integrity()
            assert set(worker.adapter_pages.ranks) == {
                n for n, r in core.adapters.refs.items() if r.base == worker.name}
    for model, adapter in core.pages.adapters():  # no device copy outlives its adapter
        worker = core.workers.get(model)
        assert worker is not None and worker.adapter_pages is not None \
            and adapter in worker.adapter_pages.ranks, (
                f"pages of adapter {adapter!r} of {model!r}, which is not registered")
    held = core.pages.adapters()
    for tr in requests:  # a running request's adapter is never evicted
        key = (tr.seq.model, tr.seq.adapter)
        if tr.seq.adapter and tr.seq.status is Status.RUNNING and key in held:
            assert core.pages.is_pinned(key), f"adapter {key} of a running request is idle"


def _check_host_pages(core) -> None:
    host = [p for tr in core.requests.values()
            for p in tr.seq.host_pages + tr.seq.host_window_pages]
    if core.scheduler.host_pages is not None:
        core.scheduler.host_pages.check_integrity()
        assert len(host) == len(set(host)) == core.scheduler.host_pages.num_used_pages
    else:
        assert not host
