"""Discrete-event simulation of a device (``simulate_device``) or a cluster of them
(``simulate_cluster``, the gateway's ``Router`` placing every request): the real
:class:`Scheduler` and policy objects, driven by simulated time and a table cost model
instead of a GPU.

Cost model (:class:`TableCost`), from step times measured with vLLM on real GPUs
(scheduler/data/step_times.csv, fp16, eager): a step costs
``prefill_s(prefill tokens) + decode_s(decode rows)``, each interpolated linearly over the
measured grid: prefill over total prompt tokens (input_len x batch); decode over batch size,
at the measured input_len nearest 512 tokens among those whose grid covers that batch.
Mixing both terms in one step is an approximation (vLLM's figures are for pure prefill and
pure decode batches). Switching a model in costs ``model_bytes / (PCIe GiB/s x efficiency)``:
by default the Aegaeon artifact's own estimate (32 GiB/s on H100, its deliberately
pessimistic efficiency 0.15), as listed in scheduler/data/model_sizes.csv; callers may pass
another efficiency (gpupool's bulk copy measured at 1.0x a raw copy in bench_swap.py).

Weight copies: by default a switch stalls the device for the whole copy (the engine with
``PoolConfig.prefetch`` off). With ``DeviceConfig.prefetch`` the simulator models a copy
engine working beside compute, as the engine's ``WeightPool.prefetch`` does: each step the
policy's ``prefetch_hint`` model is copied into the least recently used slot other than the
running model's, one copy at a time, and a later switch to it waits only for the rest of
that copy (Aegaeon prefetches weights the same way).

Trace (off by default): ``simulate_device(..., trace=[])`` or ``SimDevice(..., trace=[])``
appends one :class:`StepRecord` per step (when it ran, which model, its batch, whether the
device had switched models and how long it waited for a weight copy), for timelines such as
benchmarks/plots.py draws. With no list given nothing is recorded.
"""

from __future__ import annotations

import bisect
import csv
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from gpupool.messages.params import SamplingParams
from gpupool.pool.pages import PagePool
from gpupool.scheduler.metrics import RequestTiming
from gpupool.scheduler.policy import make_policy
from gpupool.scheduler.request import Sequence
from gpupool.scheduler.router import Router, WorkerView
from gpupool.scheduler.scheduler import Scheduler, SchedulerConfig
from gpupool.scheduler.slo import SLO, CostModel
from gpupool.scheduler.workload import WorkloadRequest


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    if x <= xs[0]:
        return ys[0] * x / xs[0] if xs[0] else ys[0]
    if x >= xs[-1]:  # extend linearly from the last two points
        if len(xs) == 1:
            return ys[-1]
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + slope * (x - xs[-1])
    i = bisect.bisect_right(xs, x)
    f = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[i - 1] + f * (ys[i] - ys[i - 1])


@dataclass(frozen=True)
class TableCost:
    """Step time of one model on one GPU, interpolated from measured figures."""

    prefill_tokens: tuple[float, ...]
    prefill_s: tuple[float, ...]
    decode_by_len: dict  # input_len -> (batch sizes, seconds)

    @classmethod
    def from_csv(cls, path: str | Path, model: str, gpu: str, tp: int = 1) -> TableCost:
        rows = [r for r in csv.DictReader(open(path))
                if r["model"] == model and r["gpu"] == gpu and int(r["tp"]) == tp]
        if not rows:
            raise ValueError(f"{path}: no step times for {model} on {gpu} (tp {tp})")
        prefill: dict[int, list[float]] = {}
        decode: dict[int, dict[int, float]] = {}
        for r in rows:
            n, b = int(r["input_len"]), int(r["batch_size"])
            prefill.setdefault(n * b, []).append(float(r["prefill_s"]))
            decode.setdefault(n, {})[b] = float(r["decode_step_s"])
        tokens = sorted(prefill)
        return cls(tuple(tokens), tuple(min(prefill[t]) for t in tokens),
                   {n: (sorted(d), [d[b] for b in sorted(d)]) for n, d in decode.items()})

    def prefill(self, tokens: int) -> float:
        return _interp(list(self.prefill_tokens), list(self.prefill_s), tokens) if tokens else 0

    def decode(self, batch: int, context: int = 512) -> float:
        """One decode step of ``batch`` rows at about ``context`` tokens: the measured input
        length nearest ``context`` among those measured up to that batch size."""
        if not batch:
            return 0.0
        covering = [n for n, (bs, _) in self.decode_by_len.items() if bs[-1] >= batch]
        if covering:
            n = min(covering, key=lambda n: abs(math.log(n / context)))
        else:
            n = max(self.decode_by_len, key=lambda n: self.decode_by_len[n][0][-1])
        bs, secs = self.decode_by_len[n]
        return _interp(bs, secs, batch)


class StepRecord(NamedTuple):
    """One step of a traced device: ``model`` computed from ``t_start`` to ``t_end`` for
    ``rows`` sequences (``tokens`` tokens, ``prefill_tokens`` of them prompt tokens).
    ``switched``: the device ran another model (or nothing yet) the step before, as the
    device's ``switches`` counts; ``wait_s``: seconds it waited just before ``t_start`` for
    the model's weight copy (0 when the weights were already there)."""

    t_start: float
    t_end: float
    model: str
    rows: int
    tokens: int
    prefill_tokens: int
    switched: bool
    wait_s: float


@dataclass(frozen=True)
class SimModel:
    name: str
    cost: TableCost
    switch_s: float  # time to make the model resident


@dataclass(frozen=True)
class DeviceConfig:
    resident_models: int = 1  # how many models' weights the device holds at once
    kv_tokens: int = 200_000  # KV capacity in tokens (pages of block_tokens)
    block_tokens: int = 16
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 8192
    prefetch: bool = False  # overlap the next model's weight copy with compute (see above)


class SimDevice:
    """One simulated device: its own clock, scheduler, policy and resident weights. Requests
    are ``add``-ed at their arrival; ``run_until(t)`` steps while there is work and the clock
    is before ``t``. ``trace``, if a list, receives a :class:`StepRecord` per step."""

    def __init__(self, models: dict[str, SimModel], policy_name: str, slos: dict[str, SLO],
                 device: DeviceConfig, trace: list[StepRecord] | None = None):
        self.models, self.device = models, device
        self.trace = trace
        self.cost = CostModel()
        for m in models.values():
            self.cost.swap_s[m.name] = m.switch_s
            self.cost.step_s[m.name] = m.cost.decode(8)
        self.policy = make_policy(policy_name, self.cost, slos=dict(slos))
        pages = PagePool(device.kv_tokens // device.block_tokens)
        self.sched = Scheduler(SchedulerConfig(
            max_num_seqs=device.max_num_seqs,
            max_num_batched_tokens=device.max_num_batched_tokens), pages, policy=self.policy)
        for name in models:
            self.sched.add_model(name, device.block_tokens)
        self.resident: OrderedDict[str, float] = OrderedDict()  # model -> copy completes at
        self.copy_free = 0.0  # when the copy engine is next idle
        self.last = None
        self.stall = self.busy = 0.0
        self.switches = self.steps = 0
        self.now = 0.0
        self.times: dict[str, list[float]] = {}
        self.info: dict[str, WorkloadRequest] = {}
        self.served: set[str] = set()  # models it has had requests for (in its host cache)

    def add(self, rid: str, r: WorkloadRequest) -> None:
        seq = Sequence(rid, r.model, [0] * r.prompt_tokens,
                       SamplingParams(max_tokens=r.output_tokens), r.arrival,
                       r.prompt_tokens + r.output_tokens)
        self.sched.enqueue(seq)
        self.times[rid], self.info[rid] = [], r
        self.served.add(r.model)

    def load(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        s = self.sched
        return (sum(len(q) for q in s.running.values()),
                sum(len(q) for q in s.waiting.values()))

    def step(self) -> bool:
        """One step at the current time; False when the scheduler had nothing to run."""
        out = self.sched.schedule(self.now)
        if out.is_empty:
            return False
        device, resident, cost = self.device, self.resident, self.cost
        model = self.models[out.model]
        if out.model not in resident:  # copy now, the device waits
            self.copy_free = max(self.now, self.copy_free) + model.switch_s
            resident[out.model] = self.copy_free
            while len(resident) > device.resident_models:
                resident.popitem(last=False)
        wait = 0.0
        if resident[out.model] > self.now or out.model != self.last:  # waits for a copy
            wait = max(0.0, resident[out.model] - self.now)
            cost.observe_swap(out.model, wait)
            self.stall += wait
            self.now = max(self.now, resident[out.model])
        switched = out.model != self.last
        self.switches += switched
        self.last = out.model
        resident.move_to_end(out.model)
        prefill = sum(s.num_new_tokens for s in out.scheduled if not s.is_decode)
        decode = sum(1 for s in out.scheduled if s.is_decode)
        step = model.cost.prefill(prefill) + model.cost.decode(decode)
        cost.observe_step(out.model, step)
        sampling = [s.seq for s in out.scheduled if s.samples]
        if device.prefetch and device.resident_models > 1 and self.copy_free <= self.now:
            hint = self.policy.prefetch_hint(self.sched, self.now)
            if hint is not None and hint not in resident:
                if len(resident) >= device.resident_models:  # evict the LRU other model
                    del resident[next(m for m in resident if m != out.model)]
                self.copy_free = self.now + self.models[hint].switch_s
                resident[hint] = self.copy_free
                resident.move_to_end(out.model)
        if self.trace is not None:
            self.trace.append(StepRecord(self.now, self.now + step, out.model,
                                         len(out.scheduled), prefill + decode, prefill,
                                         switched, wait))
        self.now += step
        self.busy += step
        self.steps += 1
        self.sched.update_from_output(out)
        for seq in sampling:
            seq.output_token_ids.append(0)
            self.times[seq.request_id].append(self.now)
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                self.sched.finish(seq, "length")
        return True

    def run_until(self, t: float) -> None:
        """Step while there is work and the clock is before ``t``; an idle device's clock
        jumps to ``t``."""
        while self.now < t:
            if not self.sched.has_work() or not self.step():
                self.now = max(self.now, t)

    def timings(self) -> list[RequestTiming]:
        return [RequestTiming(self.info[rid].model, self.info[rid].arrival, tuple(t))
                for rid, t in self.times.items()]


def simulate_device(models: dict[str, SimModel], requests: list[WorkloadRequest],
                    policy_name: str, slos: dict[str, SLO], device: DeviceConfig,
                    horizon_s: float | None = None, stats: dict | None = None,
                    trace: list[StepRecord] | None = None) -> list[RequestTiming]:
    """Run one device until every request finishes (or ``horizon_s``); token times per request.

    Requests are admitted at their arrival times; each step the policy picks a model, the
    scheduler builds its batch, and simulated time advances by the switch (if the model is
    not resident) plus the step cost. ``stats``, if given, receives the seconds the device
    computed (``busy_s``) and waited for weight copies (``stall_s``), the number of model
    switches and of steps, and the end time. ``trace``, if a list, receives a
    :class:`StepRecord` per step (see :class:`SimDevice`).
    """
    dev = SimDevice(models, policy_name, slos, device, trace)
    pending = list(requests)
    nxt = 0
    while nxt < len(pending) or dev.sched.has_work():
        while nxt < len(pending) and pending[nxt].arrival <= dev.now:
            dev.add(f"r{nxt}", pending[nxt])
            nxt += 1
        if not dev.step():
            if nxt >= len(pending):
                break
            dev.now = max(dev.now, pending[nxt].arrival)
            continue
        if horizon_s is not None and dev.now > horizon_s:
            break
    if stats is not None:
        stats.update(busy_s=dev.busy, stall_s=dev.stall, switches=dev.switches,
                     steps=dev.steps, end_s=dev.now)
    return dev.timings()


def simulate_cluster(models: dict[str, SimModel], requests: list[WorkloadRequest],
                     policy_name: str, slos: dict[str, SLO], device: DeviceConfig,
                     num_devices: int, router: Router | None = None,
                     placements: dict | None = None) -> list[RequestTiming]:
    """``num_devices`` simulated devices, each with every model registered; the cluster's
    ``Router`` places each request at its arrival, seeing each device's resident models, the
    models it has served (a worker's host cache; unbounded here) and its load as they are
    then (a gateway sees them one heartbeat late; here they are exact).
    ``placements``, if given, receives request index -> (device, reason)."""
    router = router or Router()
    devices = [SimDevice(models, policy_name, slos, device) for _ in range(num_devices)]
    for i, r in enumerate(requests):
        views = []
        for k, dev in enumerate(devices):
            dev.run_until(r.arrival)
            running, waiting = dev.load()
            views.append(WorkerView(str(k), resident=frozenset(dev.resident),
                                    cached=frozenset(dev.served), running=running,
                                    queued=waiting))
        route = router.route(r.model, views)
        devices[int(route.worker)].add(f"r{i}", r)
        if placements is not None:
            placements[i] = (int(route.worker), route.reason)
    for dev in devices:
        dev.run_until(math.inf)
    return [t for dev in devices for t in dev.timings()]


DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"  # measured tables; see README


def load_sim_models(data_dir: str | Path, gpu: str, names: list[str],
                    efficiency: float | None = None,
                    bytes_ratio: float = 1.0) -> dict[str, SimModel]:
    """Models named ``<base>#<i>`` use the figures of ``<base>`` (several copies of a 7B);
    ``data_dir`` holds the tables (``DEFAULT_DATA_DIR``: the package's own copy).
    ``bytes_ratio``: the weights' bytes against the tables' fp16 (0.375 for 4-bit weights
    in groups of 32): the switch costs scale with it; the step times are the tables'."""
    data_dir = Path(data_dir)
    sizes = {r["model"]: r for r in csv.DictReader(open(data_dir / "model_sizes.csv"))}
    pcie = {"H800": 64.0}.get(gpu, 32.0)
    out, tables = {}, {}
    for name in names:
        base = name.split("#")[0]
        if base not in tables:
            tables[base] = TableCost.from_csv(data_dir / "step_times.csv", base, gpu)
        row = sizes[base]
        if efficiency is None:
            switch = float(row[f"switch_s_{gpu}"])
        else:
            switch = int(row["model_bytes"]) / (pcie * 2**30 * efficiency)
        out[name] = SimModel(name, tables[base], switch * bytes_ratio)
    return out
