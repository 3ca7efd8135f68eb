"""Latency objectives and the online cost model the policies plan with."""

from __future__ import annotations

from dataclasses import dataclass

PREFILL_TOKENS = 32  # steps computing at least this many tokens measure the per-token cost


@dataclass(frozen=True)
class SLO:
    """Time to first token and time between tokens, in milliseconds."""

    ttft_ms: float = 2000.0
    tbt_ms: float = 200.0

    def __post_init__(self):
        if self.ttft_ms <= 0 or self.tbt_ms <= 0:
            raise ValueError("SLO times must be positive")

    def token_deadline(self, arrival: float, num_output_tokens: int) -> float:
        """When the next token (index ``num_output_tokens``) is due, in seconds (Aegaeon)."""
        return arrival + (self.ttft_ms + num_output_tokens * self.tbt_ms) / 1000.0


class CostModel:
    """Step and swap times per model: measured online (exponential moving averages), or set
    from a table by the simulator. Unknown values fall back to ``default_*``."""

    def __init__(self, default_step_s: float = 0.01, default_swap_s: float = 0.0,
                 smoothing: float = 0.2):
        self.default_step_s = default_step_s
        self.default_swap_s = default_swap_s
        self.smoothing = smoothing
        self.step_s: dict[str, float] = {}
        self.swap_s: dict[str, float] = {}
        self.token_s: dict[str, float] = {}  # seconds per prompt token (prefill-heavy steps)
        self.decode_fit: dict[str, _LineFit] = {}  # decode-only step seconds vs its rows

    def _ema(self, table: dict[str, float], model: str, seconds: float) -> None:
        old = table.get(model)
        table[model] = seconds if old is None else old + self.smoothing * (seconds - old)

    def observe_step(self, model: str, seconds: float, num_tokens: int = 0,
                     prefill_tokens: int = 0) -> None:
        """A step's time. It computed ``num_tokens`` tokens, ``prefill_tokens`` of them prompt
        (or recomputed) tokens: a step with none teaches the decode step's time; one with at
        least ``PREFILL_TOKENS`` the cost of a prompt token (its decode rows' share, as last
        measured, taken off)."""
        self._ema(self.step_s, model, seconds)
        rows = num_tokens - prefill_tokens  # a decode row computes one token
        if rows and not prefill_tokens:
            fit = self.decode_fit.setdefault(model, _LineFit(1.0 - self.smoothing))
            fit.add(rows, seconds)
        elif prefill_tokens >= PREFILL_TOKENS:
            decoding = (self.decode(model, rows) or 0.0) if rows else 0.0
            self._ema(self.token_s, model,
                      max(seconds - decoding, 0.2 * seconds) / prefill_tokens)

    def observe_swap(self, model: str, seconds: float) -> None:
        self._ema(self.swap_s, model, seconds)

    def step(self, model: str) -> float:
        return self.step_s.get(model, self.default_step_s)

    def swap(self, model: str) -> float:
        return self.swap_s.get(model, self.default_swap_s)

    def token(self, model: str) -> float | None:
        """Seconds per prefill token, once a prefill-heavy step has been seen."""
        return self.token_s.get(model)

    def decode(self, model: str, rows: int) -> float | None:
        """Seconds of a step of ``rows`` decode rows, once decode-only steps have been seen
        (a line fitted to their times: a fixed part plus a part per row)."""
        fit = self.decode_fit.get(model)
        return None if fit is None else fit.predict(rows)


class _LineFit:
    """Least-squares ``y = a + b x`` over past points, older ones weighted down by ``decay``
    per point. While a single x has been seen, ``y`` is taken as constant: for the prefill
    cap an underestimate only makes prompt chunks smaller, never a stream's wait longer."""

    def __init__(self, decay: float):
        self.decay = decay
        self.sums = [0.0] * 5  # weight, x, x*x, y, x*y

    def add(self, x: float, y: float) -> None:
        self.sums = [self.decay * s + v for s, v in zip(self.sums, (1.0, x, x * x, y, x * y))]

    def predict(self, x: float) -> float:
        w, sx, sxx, sy, sxy = self.sums
        var = w * sxx - sx * sx
        if var <= 1e-9 * max(w * sxx, 1.0):  # one x so far
            return sy / w
        b = max(0.0, (w * sxy - sx * sy) / var)
        a = max(0.0, (sy - b * sx) / w)
        return a + b * x
