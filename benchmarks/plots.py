"""PNG figures for benchmarks/bench_multimodel.py (``--plot DIR``), drawn with matplotlib's
non-interactive Agg backend from the result dicts the benchmark already prints.

- :func:`plot_attainment_vs_rate`: SLO attainment against total arrival rate, one line per
  policy (``*_noprefetch`` dashed), the 90% target; goodput and Aegaeon's score side by side.
- :func:`plot_attainment_by_models` and :func:`plot_models_per_device` (``--simulate``):
  attainment against models per GPU per policy and setting; the most models per GPU at 90%.
- :func:`plot_timeline`: which model the device ran, step by step, for two policies one above
  the other, from :class:`gpupool.scheduler.simulator.StepRecord` lists (the simulator's
  ``trace`` or the one bench_multimodel records around the engine's step loop).

matplotlib is a development dependency only (this module lives outside the package).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

TARGET = 0.9
DPI = 100
POLICY_COLOURS = {"token": "tab:blue", "request": "tab:orange", "fcfs": "tab:green"}
POLICIES = ("token", "request", "fcfs", "token_noprefetch", "request_noprefetch")
SIM_SETTINGS = {  # result key prefix -> legend text
    "pessimistic_switch": "switch: artifact's estimate (15% of PCIe), copies stall",
    "bulk_copy_switch": "switch: bulk copy (80% of PCIe), copies stall",
    "pessimistic_switch_prefetch": "switch: artifact's estimate, prefetched",
    "bulk_copy_switch_prefetch": "switch: bulk copy, prefetched",
}
SIM_SHORT = {  # the same, for bar labels
    "pessimistic_switch": "artifact's switch\nestimate, stalls",
    "bulk_copy_switch": "bulk copy,\nstalls",
    "pessimistic_switch_prefetch": "artifact's switch\nestimate, prefetched",
    "bulk_copy_switch_prefetch": "bulk copy,\nprefetched",
}


def _style(label: str) -> dict:
    base = label.removesuffix("_noprefetch")
    off = label.endswith("_noprefetch")  # dashed, hollow markers: visible where lines meet
    return {"color": POLICY_COLOURS.get(base, "tab:gray"), "linestyle": "--" if off else "-",
            "marker": "o", "markersize": 6 if off else 4,
            "markerfacecolor": "white" if off else POLICY_COLOURS.get(base, "tab:gray")}


def _curve(d: dict) -> tuple[list[float], list[float]]:
    pts = sorted((float(k), float(v)) for k, v in d.items())
    return [x for x, _ in pts], [y for _, y in pts]


def _fmt(x: float) -> str:
    return f"{x:g}"


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _target_line(ax) -> None:
    ax.axhline(TARGET, color="black", linewidth=0.8, linestyle=":")
    ax.text(1.0, TARGET, "90% target ", transform=ax.get_yaxis_transform(), ha="right",
            va="bottom", fontsize=8)


def describe_engine_setting(result: dict) -> str:
    """One line saying where an engine-mode result was measured and under which SLOs."""
    ttft, tbt = result.get("slo_ms", ["?", "?"])
    cpu = result.get("cpu", "this CPU").split(":")[0]
    return (f"real engine on this CPU ({cpu}): {result.get('models', '?')} models "
            f"({result.get('model', '')}, {result.get('weights_mib_per_model', '?')} MiB "
            f"each), {result.get('resident_models', '?')} resident; SLO TTFT {_fmt(ttft)} ms, "
            f"TBT {_fmt(tbt)} ms; {_fmt(result.get('duration_s', 0))} s of Poisson arrivals "
            f"(Zipf {_fmt(result.get('zipf_skew', 1.0))}) per rate")


def describe_sim_setting(result: dict) -> str:
    ttft, tbt = result.get("slo_ms", ["?", "?"])
    return (f"simulator, {result.get('gpu', 'H100')} step times measured with vLLM "
            f"(7B/9B/13B in rotation), {result.get('resident_models', '?')} resident, "
            f"{_fmt(result.get('rate_per_model', 0.1))} req/s per model, "
            f"{_fmt(result.get('duration_s', 0))} s; SLO TTFT {_fmt(ttft / 1000)} s, "
            f"TBT {_fmt(tbt)} ms")


def plot_attainment_vs_rate(result: dict, path: str | Path, where: str | None = None) -> Path:
    """SLO attainment (y) against total arrival rate (x), one line per policy found in
    ``result`` (keys ``<policy>_attainment`` and ``<policy>_aegaeon_score``, each
    ``{rate: share}``); goodput and Aegaeon's score in two panels when both are there."""
    kinds = [(suffix, title) for suffix, title in (
        ("_attainment", "goodput: share of requests meeting TTFT and mean TPOT"),
        ("_aegaeon_score", "Aegaeon's score: share of time on token deadlines"))
        if any(f"{p}{suffix}" in result for p in POLICIES)]
    if not kinds:
        raise ValueError("no <policy>_attainment or <policy>_aegaeon_score in the result")
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.2 * len(kinds), 4.8), squeeze=False,
                             sharey=True)
    rates = set()
    for ax, (suffix, title) in zip(axes[0], kinds):
        best_key = "_max_rate_at_90" + ("" if suffix == "_attainment" else "_aegaeon")
        for p in POLICIES:
            if f"{p}{suffix}" not in result:
                continue
            xs, ys = _curve(result[f"{p}{suffix}"])
            rates.update(xs)
            best = result.get(f"{p}{best_key}")
            label = p if best is None else f"{p} (>=90% up to {_fmt(best)} req/s)"
            ax.plot(xs, ys, label=label, **_style(p))
        _target_line(ax)
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("total arrival rate (requests/s, log scale)")
        ax.set_ylim(-0.02, 1.04)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    if rates:
        for ax in axes[0]:
            ax.set_xticks(sorted(rates), [_fmt(r) for r in sorted(rates)])
            ax.minorticks_off()
    axes[0][0].set_ylabel("SLO attainment")
    fig.suptitle("SLO attainment vs arrival rate per scheduling policy\n"
                 + (where or describe_engine_setting(result))
                 + "\n(dashed: weight prefetch off; a policy stops after two rates "
                   "below 50% goodput)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _sim_settings(result: dict) -> list[str]:
    return [s for s in SIM_SETTINGS if f"{s}_token_attainment_by_models" in result]


def plot_attainment_by_models(result: dict, path: str | Path) -> Path:
    """``--simulate``: attainment (goodput solid, Aegaeon's score dotted) against models per
    GPU, one panel per setting, one colour per policy; the top axis is the total rate."""
    settings = _sim_settings(result)
    if not settings:
        raise ValueError("no <setting>_<policy>_attainment_by_models in the result")
    cols = 2 if len(settings) > 1 else 1
    rows = (len(settings) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 3.9 * rows), squeeze=False,
                             sharey=True)
    rate = float(result.get("rate_per_model", 0.1))
    for ax, s in zip(axes.flat, settings):
        n_max = 1
        for p in ("token", "request", "fcfs"):
            for kind, ls in (("attainment", "-"), ("aegaeon_score", ":")):
                d = result.get(f"{s}_{p}_{kind}_by_models")
                if not d:
                    continue
                xs, ys = _curve(d)
                n_max = max(n_max, int(max(xs)))
                best = result.get(f"{s}_{p}_models_per_gpu_at_90")
                label = (f"{p} goodput (>=90% up to {best})" if kind == "attainment"
                         else f"{p} Aegaeon score")
                ax.plot(xs, ys, color=POLICY_COLOURS[p], linestyle=ls, marker="o",
                        markersize=3, label=label)
        _target_line(ax)
        ax.set_title(SIM_SETTINGS[s], fontsize=9)
        ax.set_xlabel("models per GPU")
        ax.set_xticks(range(1, n_max + 1))
        ax.set_ylim(-0.02, 1.04)
        ax.grid(True, alpha=0.3)
        top = ax.secondary_xaxis("top", functions=(lambda n: n * rate, lambda r: r / rate))
        top.set_xlabel("total arrival rate (req/s)", fontsize=8)
        top.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="lower left")
    for ax in axes[:, 0]:
        ax.set_ylabel("SLO attainment")
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    fig.suptitle("SLO attainment vs models per GPU per policy\n" + describe_sim_setting(result)
                 + "\n(solid: goodput, TTFT and mean TPOT; dotted: Aegaeon's time score; "
                   "a policy stops after two counts below 50%)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_models_per_device(result: dict, path: str | Path) -> Path:
    """``--simulate``: bars of the most models per GPU with >= 90% attainment, per setting
    (and the routed cluster's per-device figure when present) and policy."""
    settings = _sim_settings(result)
    groups = [(SIM_SHORT[s],
               {p: (result.get(f"{s}_{p}_models_per_gpu_at_90"),
                    result.get(f"{s}_{p}_models_per_gpu_at_90_aegaeon"))
                for p in ("token", "request", "fcfs")}) for s in settings]
    if "cluster_token_models_per_device_at_90" in result:
        groups.append((f"{result.get('cluster_devices')} GPUs, router\n(bulk, prefetched)",
                       {p: (result.get(f"cluster_{p}_models_per_device_at_90"), None)
                        for p in ("token", "request")}))
    if not groups:
        raise ValueError("no per-setting results in the result")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    width = 0.26
    for ax, which, title in ((axes[0], 0, "goodput (TTFT and mean TPOT)"),
                             (axes[1], 1, "Aegaeon's time score")):
        for i, p in enumerate(("token", "request", "fcfs")):
            xs, hs = [], []
            for g, (_, vals) in enumerate(groups):
                v = vals.get(p, (None, None))[which]
                if v is not None:
                    xs.append(g + (i - 1) * width)
                    hs.append(v)
            bars = ax.bar(xs, hs, width, color=POLICY_COLOURS[p], label=p)
            ax.bar_label(bars, fontsize=7)
        for g, (_, vals) in enumerate(groups):
            if all(v[which] is None for v in vals.values()):
                ax.text(g, 0.2, "not\nmeasured", ha="center", fontsize=7, color="gray")
        ax.set_xticks(range(len(groups)), [g for g, _ in groups], fontsize=7)
        ax.set_title(f"most models per GPU at >= 90% {title}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("models per GPU")
    fig.suptitle("Models per device at the 90% SLO target\n" + describe_sim_setting(result)
                 + "\nswitch = the Aegaeon artifact's estimate (15% of PCIe) or a bulk copy "
                   "(80% of PCIe); stalls: the device waits for each copy; prefetched: the "
                   "next model is copied beside compute", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def busiest_window(trace: list, width: float) -> tuple[float, float]:
    """The ``width``-second window of ``trace`` that holds the most model switches (where a
    timeline shows interleaving best); the whole trace when it is shorter."""
    if not trace:
        return (0.0, width)
    start, end = trace[0].t_start - trace[0].wait_s, trace[-1].t_end
    if end - start <= width:
        return (start, end)
    times = [r.t_start for r in trace if r.switched]
    best, best_t, j = -1, start, 0
    for i, t in enumerate(times):
        while j < len(times) and times[j] <= t + width:
            j += 1
        if j - i > best:
            best, best_t = j - i, t
    best_t = min(max(start, best_t - 0.05 * width), end - width)
    return (best_t, best_t + width)


def _runs(records: list) -> list[tuple[str, float, float]]:
    """Consecutive steps of one model with no gap and no copy wait, as (model, start, end)."""
    runs: list[list] = []
    for r in records:
        last = runs[-1] if runs else None
        if (last and last[0] == r.model and r.wait_s == 0
                and r.t_start - last[2] <= 1e-9 + 1e-6 * abs(r.t_start)):
            last[2] = r.t_end
        else:
            runs.append([r.model, r.t_start, r.t_end])
    return [tuple(x) for x in runs]


def plot_timeline(traces: dict[str, list], path: str | Path, where: str,
                  window: tuple[float, float] | None = None,
                  models: list[str] | None = None, time_label: str = "time (s)",
                  min_wait_s: float = 0.0) -> tuple[Path, dict]:
    """Which model the device ran, step by step: one panel per policy (``traces`` maps a
    policy to its StepRecords, same workload), one row per model, a coloured bar per step
    (adjacent steps of a model merge into one bar), a red bar where the device waited for a
    weight copy, and a triangle at every model switch (filled red if it waited). ``window``:
    the (start, end) seconds shown (default: everything). ``min_wait_s``: shorter waits count
    as none (a measured engine reports microseconds for a finished prefetch). Returns the
    PNG's path and, per policy, what the window shows: steps, switches (triangles), copy
    waits longer than ``min_wait_s`` and the seconds of all waits."""
    names = models or sorted({r.model for t in traces.values() for r in t})
    row = {m: i for i, m in enumerate(names)}
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colour = {m: cmap(i % cmap.N) for i, m in enumerate(names)}
    fig, axes = plt.subplots(len(traces), 1, figsize=(12, 1.2 + 0.32 * len(names) * len(traces)
                                                      + 0.9 * len(traces)),
                             sharex=True, squeeze=False)
    shown = {}
    lo, hi = window if window else (-float("inf"), float("inf"))
    for ax, (policy, trace) in zip(axes[:, 0], traces.items()):
        recs = [r for r in trace if r.t_end >= lo and r.t_start - r.wait_s <= hi]
        by_model: dict[str, list] = {}
        for m, a, b in _runs(recs):
            by_model.setdefault(m, []).append((a, b - a))
        for m, bars in by_model.items():
            ax.broken_barh(bars, (row[m] - 0.4, 0.8), facecolors=colour[m], linewidth=0)
        waits = [r for r in recs if r.wait_s > min_wait_s]
        for r in waits:
            ax.broken_barh([(r.t_start - r.wait_s, r.wait_s)], (row[r.model] - 0.4, 0.8),
                           facecolors="red", alpha=0.55, linewidth=0)
        sw = [r for r in recs if r.switched]
        for waited, face in ((False, "none"), (True, "red")):
            pts = [r for r in sw if (r.wait_s > min_wait_s) == waited]
            ax.scatter([r.t_start - r.wait_s for r in pts], [row[r.model] + 0.5 for r in pts],
                       marker="v", s=14, facecolors=face, edgecolors="black",
                       linewidths=0.5, zorder=3)
        busy = sum(r.t_end - r.t_start for r in recs)
        more = f" over {1000 * min_wait_s:g} ms" if min_wait_s else ""
        shown[policy] = {"steps": len(recs), "switches": len(sw), "copy_waits": len(waits),
                         "wait_s": sum(r.wait_s for r in recs), "busy_s": busy}
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_ylim(-0.6, len(names) - 0.1)
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_title(f"policy {policy}: {len(recs)} steps, {len(sw)} model switches, "
                     f"{len(waits)} waited for a weight copy{more} "
                     f"({shown[policy]['wait_s']:.3g} s waiting in all)", fontsize=9)
    if window:
        axes[0, 0].set_xlim(*window)
    axes[-1, 0].set_xlabel(time_label)
    handles = [Patch(color="tab:gray", label="steps of the row's model (colour = model)"),
               Patch(color="red", alpha=0.55, label="device waits for the weight copy"),
               Line2D([], [], marker="v", linestyle="", markerfacecolor="none",
                      markeredgecolor="black", label="switch, weights already resident"),
               Line2D([], [], marker="v", linestyle="", markerfacecolor="red",
                      markeredgecolor="black", label="switch that waited for a copy"
                      + (f" (> {1000 * min_wait_s:g} ms)" if min_wait_s else ""))]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Which model held the device, step by step\n"
                 + textwrap.fill(where, 150), fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, path), shown


def write_engine_plots(result: dict, traces: dict[str, list], outdir: str | Path,
                       window_s: float = 1.0, rate: float | None = None) -> list[Path]:
    """The engine mode's figures into ``outdir``: attainment vs rate, and (with ``traces``,
    policy -> StepRecords of one rate's run) the timeline."""
    outdir = Path(outdir)
    paths = [plot_attainment_vs_rate(result, outdir / "cpu_attainment_vs_rate.png")]
    if traces:
        base = dict(traces).get("token") or next(iter(traces.values()))
        win = busiest_window(base, window_s)
        ttft, tbt = result.get("slo_ms", ["?", "?"])
        where = (f"real engine on this CPU, {_fmt(rate) if rate else '?'} req/s total "
                 f"(same arrivals for each policy), {window_s:g} s window; "
                 f"{result.get('models')} models, {result.get('resident_models')} resident, "
                 f"SLO TTFT {_fmt(ttft)} ms, TBT {_fmt(tbt)} ms; white gaps between steps: "
                 "host work (scheduling, sampling) or no request")
        path, _ = plot_timeline(traces, outdir / "cpu_timeline.png", where, win,
                                models=_model_order(traces),
                                time_label="wall-clock time since the first arrival (s)",
                                min_wait_s=1e-4)
        paths.append(path)
    return paths


def write_sim_plots(result: dict, traces: dict[str, list], outdir: str | Path,
                    trace_setting: str = "", window_s: float = 60.0) -> list[Path]:
    """The ``--simulate`` figures into ``outdir``: attainment vs models per GPU, models per
    GPU at 90%, and (with ``traces``) the timeline of one simulated GPU."""
    outdir = Path(outdir)
    paths = [plot_attainment_by_models(result, outdir / "sim_attainment_by_models.png"),
             plot_models_per_device(result, outdir / "sim_models_per_gpu.png")]
    if traces:
        base = dict(traces).get("token") or next(iter(traces.values()))
        ttft, tbt = result.get("slo_ms", ["?", "?"])
        where = (f"simulator, {result.get('gpu', 'H100')} step times (vLLM, measured), "
                 f"{trace_setting}; {window_s:g} s window with the most switches; "
                 f"SLO TTFT {_fmt(ttft / 1000)} s, TBT {_fmt(tbt)} ms")
        path, _ = plot_timeline(traces, outdir / "sim_timeline.png", where,
                                busiest_window(base, window_s), models=_model_order(traces),
                                time_label="simulated time (s)")
        paths.append(path)
    return paths


def _model_order(traces: dict[str, list]) -> list[str]:
    """Models in a natural order: ``m2`` before ``m10``, ``base#2`` before ``base#10``."""
    import re

    names = {r.model for t in traces.values() for r in t}
    return sorted(names, key=lambda n: [int(x) if x.isdigit() else x
                                        for x in re.split(r"(\d+)$", n)])
