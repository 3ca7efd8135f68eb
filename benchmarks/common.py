"""Helpers shared by the benchmarks: median timing, printing a result, a sweep's progress."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

from gpupool.progress import Progress


def load_tests_package() -> None:
    """Make the checkout's ``tests`` helpers importable (``from tests.factories import ...``)
    without putting the checkout's root on ``sys.path``: there its folders (``kernels``,
    ``api``, ``models``, ...) would answer for PyPI packages of the same names that
    dependencies probe for (transformers looks for Hugging Face's ``kernels``)."""
    if "tests" in sys.modules:
        return
    folder = Path(__file__).resolve().parent.parent / "tests"
    spec = importlib.util.spec_from_file_location(
        "tests", folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["tests"] = module
    spec.loader.exec_module(module)


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


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    wanted = [f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")]
    return f"{model}: {' '.join(sorted(wanted))}"


def variants(text: str) -> list[tuple[str, str, str | None]]:
    """``"float32,bfloat16,bfloat16+int8"`` -> [(label, dtype, quantization or None)]."""
    out = []
    for item in text.split(","):
        dtype, _, quant = item.strip().partition("+")
        out.append((item.strip(), dtype, quant or None))
    return out


def in_subprocess(fn, *args):
    """``fn(*args)`` in a fresh process (spawned: no torch state shared). Benchmarks run
    their baselines there: a second torch thread team in the engine's process (the baseline
    on the main thread beside the engine's step loop) slows both by about a quarter, which
    a server process never pays (gpupool's CLI keeps its main thread to one torch thread)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(fn, *args).result()


def engine_threads() -> int:
    """As ``gpupool serve`` does: the step loop gets torch's thread count, this (main) thread
    one thread, so the engine's process has one OpenMP team (see LocalEngine._loop)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def sweep(steps: int, name: str) -> Progress:
    """A sweep's progress line on stderr (only on a terminal, see gpupool.progress): use it as
    a context manager, ``note`` the step starting ("bfloat16 bs8") and ``update()`` after it.
    The result still goes to stdout alone."""
    return Progress(steps, name, "steps")
