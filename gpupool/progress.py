"""Progress of long operations as one self-overwriting line on stderr, only on a terminal.

``Progress(total, description, unit)`` draws ``converting x: 45% 231/513 MiB 380 MiB/s``
(``unit="bytes"``) or ``bench_engine: 33% 3/9 steps 40 s (about 1 min 20 s left)`` (any other
unit), the current phase after a comma when one is noted (``..., writing``), redrawn at most
ten times a second and ended with a newline. When stderr is not a terminal
(a server's log, a pipe, pytest) it writes nothing at all. ``GPUPOOL_PROGRESS=0`` turns it off
everywhere, ``GPUPOOL_PROGRESS=1`` draws on any stream (a log file gets the carriage returns).
One line at a time: a progress started while another is drawn (a model loaded inside a
benchmark's sweep) stays quiet, and the outer line goes on.

Standard library only: the model loader uses it, below every other layer.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

__all__ = ["ENV", "Progress", "enabled", "track"]

ENV = "GPUPOOL_PROGRESS"
MIN_INTERVAL = 0.1  # seconds between two redraws (at most ten a second)
RATE_WINDOW = 3.0  # seconds of recent progress the shown rate is measured over
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")
_MIB = 1 << 20
_GIB = 1 << 30

T = TypeVar("T")


def enabled(stream: TextIO | None = None) -> bool:
    """Whether progress lines go to ``stream`` (default stderr): ``GPUPOOL_PROGRESS`` 0/1 if
    set, else whether the stream is a terminal."""
    env = os.environ.get(ENV, "").strip().lower()
    if env in _OFF:
        return False
    if env in _ON:
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s"


class Progress:
    """One progress line for ``total`` units of work (``None``: unknown), advanced by
    :meth:`update`; a context manager that ends the line (a newline) on exit (used without
    ``with``, :meth:`close` it: until then no other line in the process draws).

    Inactive (``active`` False: not a terminal, ``GPUPOOL_PROGRESS=0``, or another line open),
    every method does nothing, so callers need no test of their own. A failed write (a closed
    stream) turns it off rather than failing the work it reports on. ``active`` True or False
    decides alone (tests)."""

    _lock = threading.Lock()
    _drawing: Progress | None = None  # the line open in this process (automatic ones only)

    def __init__(self, total: float | None, description: str, unit: str = "bytes", *,
                 stream: TextIO | None = None, active: bool | None = None,
                 min_interval: float = MIN_INTERVAL, clock=time.monotonic):
        self.stream = sys.stderr if stream is None else stream
        self._owner = False
        if active is None:
            active = enabled(self.stream)
            if active:
                with Progress._lock:
                    active = self._owner = Progress._drawing is None
                    if active:
                        Progress._drawing = self
        self.active = active
        self.total = total
        self.description = description
        self.unit = unit
        self.done = 0.0
        self.status = ""
        self.redraws = 0
        self._min_interval = min_interval
        self._clock = clock
        self._start = clock()
        self._last_draw: float | None = None
        self._samples: deque[tuple[float, float]] = deque()  # (time, done) at recent redraws
        self._drawn_len = 0
        self._closed = False

    def __enter__(self) -> Progress:
        self._draw()  # the line appears before the first (maybe slow) step
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        """``n`` more units done; redraws unless the last redraw was under 0.1 s ago (the
        update reaching the total always redraws)."""
        self.done += n
        if not self.active or self._closed:
            return
        finished = (self.total is not None and self.done >= self.total
                    and (not self._samples or self._samples[-1][1] < self.total))
        if (finished or self._last_draw is None
                or self._clock() - self._last_draw >= self._min_interval):
            self._draw()

    def note(self, status: str) -> None:
        """Show ``status`` after the figures (the current phase: "writing the file") and redraw
        now; for phases, not for every item (:meth:`update` is the throttled one)."""
        self.status = status
        if self.active and not self._closed:
            self._draw()

    def close(self) -> None:
        """Draw the final figures and end the line; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if self.active:
            self._draw(final=True)
            self._write("\n")
        if self._owner:
            with Progress._lock:
                Progress._drawing = None

    def line(self, final: bool = False) -> str:
        """The text of the line as it stands (without the carriage return); ``final``: the
        closing line (the time taken, no estimate of the time left)."""
        elapsed = max(self._clock() - self._start, 1e-9)
        parts = [f"{self.description}:"]
        if self.total:
            parts.append(f"{min(100, int(100 * self.done / self.total))}%")
        if self.unit == "bytes":
            size = self.total or self.done
            scale, name = (_GIB, "GiB") if size >= 4 * _GIB else (_MIB, "MiB")
            digits = 1 if size < 100 * scale else 0

            def fmt(n: float) -> str:
                return f"{n / scale:.{digits}f}"

            if self.total:
                parts.append(f"{fmt(self.done)}/{fmt(self.total)} {name}")
            elif self.done:  # nothing to show before the total is known and work begins
                parts.append(f"{fmt(self.done)} {name}")
            if final:
                parts.append(f"in {_duration(elapsed)}")
            elif self.done:
                parts.append(f"{self._rate() / _MIB:.0f} MiB/s")
        else:
            count = f"{self.done:g}/{self.total:g}" if self.total else f"{self.done:g}"
            parts.append(f"{count} {self.unit} {_duration(elapsed)}")
            if self.total and 0 < self.done < self.total and not final:
                parts.append(f"(about {_duration(elapsed / self.done * (self.total - self.done))}"
                             " left)")
        if self.status:
            if len(parts) > 1:
                parts[-1] += ","
            parts.append(self.status)
        return " ".join(parts)

    def _rate(self) -> float:
        """Units a second over the last few seconds of redraws: a slow phase before the
        counting began (reading a file's header) or long ago does not count."""
        now, samples = self._clock(), self._samples
        while len(samples) > 1 and now - samples[0][0] > RATE_WINDOW:
            samples.popleft()
        if not samples or now <= samples[0][0]:
            return self.done / max(now - self._start, 1e-9)
        then, done = samples[0]
        return (self.done - done) / (now - then)

    def _draw(self, final: bool = False) -> None:
        if not self.active:
            return
        self._last_draw = now = self._clock()
        if self._samples and self._samples[-1][1] == self.done:
            self._samples.pop()  # no progress since: the wait is not work done slowly
        self._samples.append((now, self.done))
        text = self.line(final)
        width = self._width() - 1
        if len(text) > width > 3:  # a wrapped line could not be overwritten in place
            text = text[: width - 3] + "..."
        pad = " " * max(0, self._drawn_len - len(text))  # wipe a longer previous line
        self._drawn_len = len(text)
        self.redraws += 1
        self._write("\r" + text + pad)

    def _width(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        # not a terminal, or one that reports no size: $COLUMNS, or 80
        return columns if columns > 0 else shutil.get_terminal_size((80, 24)).columns

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError, AttributeError):
            self.active = False


def track(items: Iterable[T], description: str, unit: str = "steps", *,
          total: int | None = None, stream: TextIO | None = None) -> Iterator[T]:
    """``items`` one by one, with a progress line counting them (``total``: their number when
    ``items`` has no ``len``)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(total, description, unit, stream=stream) as bar:
        for item in items:
            yield item
            bar.update()
