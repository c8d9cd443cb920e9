"""One run per run directory (ssb_jax/pipeline/lock.py), and --config.overwrite=STAGE clearing a stage's
outputs whatever their fingerprint (ssb_jax/pipeline/run.py)."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ssb_jax.data.records import RecordStore, RecordStoreError
from ssb_jax.pipeline.context import RunContext
from ssb_jax.pipeline.lock import LOCK_FILE, WorkdirLock, WorkdirLocked, read_holder
from ssb_jax.pipeline.run import execute
from ssb_jax.pipeline.stage import Stage

REPO = Path(__file__).resolve().parents[2]
HOLDER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("lock", sys.argv[2])  # the module alone: no jax to import
lock_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock_module)
lock = lock_module.WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
sys.stdin.read()  # holds until the parent closes stdin (or kills it)
lock.release()
"""


def _holder(workdir: Path) -> subprocess.Popen:
    """A child process holding the lock on `workdir` (it has printed 'held' when this returns)."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), str(REPO / "ssb_jax/pipeline/lock.py")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_run_stops_at_once_naming_the_holder(tmp_path):
    child = _holder(tmp_path)
    try:
        with pytest.raises(WorkdirLocked) as refused:
            WorkdirLock(tmp_path).acquire()
        message = str(refused.value)
        assert f"pid {child.pid} on {socket.gethostname()}" in message and "\n" not in message
        assert read_holder(tmp_path)["pid"] == child.pid  # the refused run left the holder's lock alone
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    assert read_holder(tmp_path) is None  # released on exit
    with WorkdirLock(tmp_path):
        assert read_holder(tmp_path)["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    child = _holder(tmp_path)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    child.stdout.close()
    child.stdin.close()
    assert read_holder(tmp_path)["pid"] == child.pid  # left behind
    with caplog.at_level(logging.WARNING, logger="ssb_jax"):
        lock = WorkdirLock(tmp_path).acquire()
    assert read_holder(tmp_path)["pid"] == os.getpid()
    assert f"taking over the lock of a run that is gone (pid {child.pid}" in caplog.text
    lock.release()


def test_a_reused_pid_is_not_the_holder(tmp_path):
    """A lock whose pid is alive but names a process that started at another time (the pid was reused)."""
    record = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": "1", "started_at": "then"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with WorkdirLock(tmp_path):
        assert read_holder(tmp_path)["process_start"] != "1"


def test_a_lock_from_another_host_is_not_guessed_at(tmp_path):
    record = {"pid": 1234, "host": "elsewhere-" + socket.gethostname(), "started_at": "then"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(WorkdirLocked, match=rf"pid 1234 on elsewhere-.*if that run is gone, delete .*{LOCK_FILE}"):
        WorkdirLock(tmp_path).acquire()


class IdsStage(Stage):
    """Appends one record per id to ids/records.jsonl, resuming by id like curation does."""
    name = "ids"

    def fingerprint(self, ctx, r):
        return {"ids": 3}

    def run(self, ctx, r):
        store = RecordStore(self.directory(ctx, r) / "records.jsonl")
        store.append({"id": i} for i in range(3) if i not in store.done_ids())
        return {}


def _context(workdir: Path, overwrite: set) -> SimpleNamespace:
    ctx = SimpleNamespace(workdir=workdir, overwrite=overwrite)
    ctx.check_fingerprint = lambda *args: RunContext.check_fingerprint(ctx, *args)
    return ctx


def test_overwrite_clears_a_stage_whose_fingerprint_matches(tmp_path):
    """Two runs that appended the same batch leave duplicate ids under a matching fingerprint: without
    --config.overwrite the stage stops on them; with it the stage is cleared and redone."""
    stage = IdsStage()
    execute(stage, _context(tmp_path, set()), None)
    records = tmp_path / "ids" / "records.jsonl"
    (tmp_path / "ids" / "DONE.json").unlink()  # as if a second run appended the same batch before either finished
    records.write_text(records.read_text() * 2)
    with pytest.raises(RecordStoreError, match="duplicate id"):
        execute(stage, _context(tmp_path, set()), None)
    execute(stage, _context(tmp_path, {"ids"}), None)
    assert [r["id"] for r in RecordStore(records).read_all()] == [0, 1, 2]
    assert (tmp_path / "ids" / "DONE.json").exists()
    # a finished stage with the same fingerprint is also redone when named
    (tmp_path / "ids" / "marker").write_text("from the earlier run")
    execute(stage, _context(tmp_path, {"ids"}), None)
    assert not (tmp_path / "ids" / "marker").exists() and (tmp_path / "ids" / "DONE.json").exists()


def test_run_pipeline_stops_before_any_stage_while_another_run_holds_the_workdir(tmp_path):
    from ssb_jax.config import parse_config_args
    from ssb_jax.pipeline import run_pipeline
    workdir = tmp_path / "run"
    workdir.mkdir()
    config, _ = parse_config_args([f"--config={REPO / 'configs' / 'tiny.py'}", f"--config.workdir={workdir}",
                                   "--config.compile_cache_dir="])
    child = _holder(workdir)
    try:
        with pytest.raises(WorkdirLocked, match=f"pid {child.pid} on "):
            run_pipeline(config)
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    assert sorted(p.name for p in workdir.iterdir() if not p.name.startswith(".")) == []  # nothing written


def test_a_file_system_without_hard_links_or_file_locks_still_locks(tmp_path, monkeypatch):
    """gcsfuse (a run directory the architecture allows) has neither: exclusive creation decides."""
    import fcntl

    def no_links(*args):
        raise PermissionError(1, "Operation not permitted")

    def no_locks(*args):
        raise OSError(95, "Operation not supported")
    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = WorkdirLock(tmp_path).acquire()
    assert read_holder(tmp_path)["pid"] == os.getpid()
    with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()} on "):  # held by a live process: this one
        WorkdirLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock.guard"]
