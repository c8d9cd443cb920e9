"""Progress off a terminal is periodic log lines, never bar redraws (training.metrics.Progress and the
Sampler's progress)."""
import logging

from ssb_jax.sampling import driver
from ssb_jax.training import metrics


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_interval_lines_for_jumps_and_silence_for_short_calls(monkeypatch, caplog, capsys):
    clock = FakeClock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    caplog.set_level(logging.INFO, logger="ssb_jax.training.metrics")
    short = metrics.Progress(64, 1, desc="sampling", unit="seq", interval_s=30, terminal=False, main_process=True)
    for done in (16, 32, 48, 64):
        clock.now += 2
        short.update(done, {"tok/s": "9.0"})
    short.close()
    assert not caplog.records  # an 8 s call says nothing
    long = metrics.Progress(100, 1, desc="sampling", unit="seq", interval_s=30, terminal=False, main_process=True)
    for done in range(10, 101, 10):
        clock.now += 12
        long.update(done, {"tok/s": "9.0"})
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" ")[2] for line in lines] == ["30/100", "60/100", "90/100"]  # every 36 s: >= 30 s apart
    assert lines[0].startswith("sampling seq 30/100 (30%): tok/s 9.0, 36 s elapsed, ETA")
    assert not capsys.readouterr().err  # nothing drawn


def test_every_counts_crossings_when_updates_jump(caplog):
    caplog.set_level(logging.INFO, logger="ssb_jax.training.metrics")
    progress = metrics.Progress(20, 5, desc="x", label="x", terminal=False, main_process=True)
    for done in (3, 7, 9, 13, 20):
        progress.update(done)
    assert [r.getMessage().split(" ")[2].rstrip(":") for r in caplog.records] == ["3/20", "7/20", "13/20", "20/20"]


def test_sampler_progress_is_lines_off_a_terminal(capsys):
    progress = driver.sampling_progress(8, True)
    assert isinstance(progress, metrics.Progress) and progress.bar is None  # pytest's stderr is no terminal
    assert progress.interval_s == driver.PROGRESS_LOG_INTERVAL_S > 0
    progress.update(8, {"tok/s": "1"})
    progress.close()
    assert "\r" not in capsys.readouterr().err
    assert driver.sampling_progress(8, False) is None


def test_only_the_shared_progress_draws_bars():
    """A tqdm bar drawn anywhere else would redraw into log files: every loop goes through metrics.Progress."""
    from pathlib import Path
    package = Path(metrics.__file__).resolve().parents[1]
    drawing = [str(p.relative_to(package)) for p in package.rglob("*.py")
               if "tqdm" in p.read_text() and p.resolve() != Path(metrics.__file__).resolve()]
    assert drawing == []
