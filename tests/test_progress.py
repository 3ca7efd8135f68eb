"""Progress lines (gpupool.progress): drawn in place on a terminal, throttled, ended with a
newline; nothing at all elsewhere; GPUPOOL_PROGRESS forces them off or on. Loading a model
writes nothing to stderr when it is not a terminal."""

import io

import pytest
import torch

from gpupool.models import loader
from gpupool.models.config import ModelConfig
from gpupool.progress import ENV, Progress, track


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def _lines(text: str) -> list[str]:
    """The successive states of the line: what each carriage return starts."""
    assert text.startswith("\r") and text.endswith("\n")
    return [part.rstrip(" \n") for part in text.split("\r")[1:]]


def test_a_terminal_gets_one_line_redrawn_in_place_up_to_100_percent():
    out, clock = Stream(tty=True), Clock()
    with Progress(10 << 20, "loading m", "bytes", stream=out, clock=clock) as bar:
        assert bar.active
        for _ in range(10):
            clock.now += 0.5
            bar.update(1 << 20)
        bar.note("writing")
    text = out.getvalue()
    assert text.count("\n") == 1  # one line, overwritten, ended once
    lines = _lines(text)
    assert lines[0] == "loading m: 0% 0.0/10.0 MiB"
    assert lines[5] == "loading m: 50% 5.0/10.0 MiB 2 MiB/s"  # 1 MiB each half second
    assert any(line.startswith("loading m: 100% 10.0/10.0 MiB") for line in lines)
    assert lines[-2].endswith(", writing")
    assert lines[-1] == "loading m: 100% 10.0/10.0 MiB in 5 s, writing"


def test_a_shorter_line_wipes_the_longer_one_before_it():
    out = Stream(tty=True)
    with Progress(4, "sweep", "steps", stream=out, clock=Clock()) as bar:
        bar.note("a long phase name")
        bar.note("short")
    states = out.getvalue().split("\r")
    assert len(states[3]) == len(states[2])  # padded with spaces over the longer text


def test_steps_show_the_time_left():
    out, clock = Stream(tty=True), Clock()
    with Progress(4, "bench", "steps", stream=out, clock=clock) as bar:
        clock.now += 30
        bar.update()
        assert bar.line() == "bench: 25% 1/4 steps 30 s (about 1 min 30 s left)"
    assert _lines(out.getvalue())[-1] == "bench: 25% 1/4 steps 30 s"


def test_not_a_terminal_gets_nothing():
    out = Stream(tty=False)
    with Progress(100, "loading", "bytes", stream=out) as bar:
        assert not bar.active
        for _ in range(100):
            bar.update(1)
        bar.note("writing")
    assert list(track(range(3), "sweep", stream=out)) == [0, 1, 2]
    assert out.getvalue() == ""


def test_the_environment_forces_it_on_or_off(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    piped = Stream(tty=False)
    with Progress(2, "x", "steps", stream=piped) as bar:
        bar.update(2)
    assert _lines(piped.getvalue())[-1].startswith("x: 100% 2/2 steps")
    monkeypatch.setenv(ENV, "0")
    terminal = Stream(tty=True)
    with Progress(2, "x", "steps", stream=terminal) as bar:
        assert not bar.active
        bar.update(2)
    assert terminal.getvalue() == ""


def test_many_tiny_updates_redraw_at_most_ten_times_a_second():
    out, clock = Stream(tty=True), Clock()
    with Progress(100_000, "x", "bytes", stream=out, clock=clock) as bar:
        for _ in range(100_000):  # 100k updates over 2 s
            clock.now += 2e-5
            bar.update(1)
        redraws = bar.redraws
    assert 20 <= redraws <= 23  # the first, one per 0.1 s, the one reaching 100%
    assert out.getvalue().count("\r") == redraws + 1  # and the closing one
    assert "100%" in _lines(out.getvalue())[-1]


def test_one_line_at_a_time():
    outer_out, inner_out = Stream(tty=True), Stream(tty=True)
    with Progress(2, "sweep", "steps", stream=outer_out) as outer:
        with Progress(10, "loading", "bytes", stream=inner_out) as inner:
            inner.update(10)
        outer.update(2)
    assert outer.active and not inner.active and inner_out.getvalue() == ""
    with Progress(1, "next", "steps", stream=inner_out) as bar:  # the first one has ended
        assert bar.active


def test_a_closed_stream_turns_it_off():
    out = Stream(tty=True)
    with Progress(3, "x", "steps", stream=out) as bar:
        out.close()
        bar.update(3)  # no ValueError from the closed stream
        assert not bar.active


def test_loading_a_model_writes_nothing_when_stderr_is_no_terminal(tiny_models, capfd,
                                                                   monkeypatch):
    folder = tiny_models("llama")
    cfg = ModelConfig.from_folder(folder)
    capfd.readouterr()  # making the model: transformers' own bars, not ours
    monkeypatch.setattr(loader, "PROGRESS_MIN_BYTES", 0)  # as if the tiny model were big
    loader.load_flat_weights(folder, cfg, torch.float32)
    assert capfd.readouterr().err == ""
    monkeypatch.setenv(ENV, "1")  # forced: the loader's line, ending at 100%
    layout, _ = loader.load_flat_weights(folder, cfg, torch.float32)
    err = capfd.readouterr().err
    assert err.startswith("\rloading ") and err.endswith("\n")
    size = f"{layout.num_bytes / 2**20:.1f}"
    assert f"100% {size}/{size} MiB" in err


def test_a_small_model_draws_no_line_even_when_forced(tiny_models, capfd, monkeypatch):
    monkeypatch.setenv(ENV, "1")
    folder = tiny_models("llama")
    capfd.readouterr()
    loader.load_flat_weights(folder, ModelConfig.from_folder(folder), torch.float32)
    assert capfd.readouterr().err == ""


def test_an_engine_adding_a_model_writes_nothing_to_stderr(tiny_models, capfd, monkeypatch):
    from tests.factories import make_engine

    folder = tiny_models("llama")
    capfd.readouterr()
    monkeypatch.setattr(loader, "PROGRESS_MIN_BYTES", 0)
    engine = make_engine(folder)
    try:
        assert capfd.readouterr().err == ""
    finally:
        engine.shutdown()
