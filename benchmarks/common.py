"""Helpers shared by the benchmarks: median timing and printing a result."""

from __future__ import annotations

import json
import statistics
import time


def median_seconds(fn, runs: int, warmup: bool = True) -> float:
    """Median wall time of ``runs`` calls of ``fn`` (after one untimed call if ``warmup``)."""
    if warmup:
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32s} {value}")
