"""One run per run directory: a run holds `<workdir>/.run.lock` from start to end.

The lock file names its holder (pid, host, the process's start time, when it started). A second run on
the same directory stops at once with one line naming the holder. A lock left by a run that was killed
(same host, its pid gone, or the pid now belongs to a process that started later) is stale and taken
over with a warning. A lock held from another host cannot be tested from here: the message says which
file to delete once that run is known to be gone.

Creation is atomic (the holder's record is written to a private file, then hard-linked to the lock's
name, which fails when the name exists); the test-and-take-over of a stale lock runs under an
`fcntl.flock` on a guard file, so two runs finding the same stale lock cannot both take it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger("ssb_jax")

LOCK_FILE = ".run.lock"
GUARD_FILE = ".run.lock.guard"


class WorkdirLocked(OSError):
    """Another live run holds the run directory (an OSError, so the command line prints its one line)."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot, /proc/<pid>/stat field 22), or None where
    /proc is unavailable; with the pid it names a process even after pids are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]  # fields after the command name, which may hold spaces


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    current = _process_start(pid)
    return start is None or current is None or current == start


def _holder_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def read_holder(directory: str | os.PathLike) -> dict | None:
    """The lock's record, None when unlocked, {} when the file is unreadable (torn by a crash)."""
    try:
        text = (Path(directory) / LOCK_FILE).read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def _guard(directory: Path):
    """An exclusive flock around the test-and-take-over; where the file system has no locks (some FUSE
    mounts), the atomic creation alone decides."""
    import fcntl
    with open(directory / GUARD_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:
            log.debug("%s: no file locks here (%s); relying on atomic creation", directory, error)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the run directory; `acquire()` / `release()` by hand."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.held = False

    def _try_create(self) -> bool:
        """Create the lock holding this process's record; False when it exists. A hard link makes the
        record appear whole; where the file system has none (gcsfuse), an exclusive create, then the write."""
        text = json.dumps(_holder_record())
        record = self.directory / f".run.lock.{os.getpid()}.tmp"
        record.write_text(text)
        try:
            os.link(record, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "w") as handle:
                handle.write(text)
            return True
        finally:
            record.unlink()

    def acquire(self) -> "WorkdirLock":
        """Take the lock, taking over a stale one; raise WorkdirLocked naming a live holder."""
        with _guard(self.directory):
            if not self._try_create():
                holder = read_holder(self.directory)
                host = socket.gethostname()
                if holder is None:  # released between our attempt and the read
                    pass
                elif holder and holder.get("host") == host and _alive(int(holder["pid"]), holder.get("process_start")):
                    raise WorkdirLocked(
                        f"{self.directory} is in use by another run (pid {holder['pid']} on {holder['host']}, "
                        f"started {holder.get('started_at', '?')}); wait for it or use another --config.workdir")
                elif holder and holder.get("host") != host:
                    raise WorkdirLocked(
                        f"{self.directory} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                        f"started {holder.get('started_at', '?')}); if that run is gone, delete {self.path}")
                else:  # same host and its process gone, or a record torn by a crash
                    log.warning("%s: taking over the lock of a run that is gone (%s)", self.directory,
                                f"pid {holder['pid']} on {holder['host']}" if holder else "unreadable lock file")
                self.path.unlink(missing_ok=True)
                if not self._try_create():  # cannot happen under the guard unless the guard is not honoured
                    raise WorkdirLocked(f"{self.directory} was locked by another run while this one started")
        self.held = True
        return self

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        if not self.held:
            return
        self.held = False
        holder = read_holder(self.directory)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_workdir(directory: str | os.PathLike) -> WorkdirLock:
    """The run's lock, taken by the main process; every process stops alike when it is held elsewhere
    (the others learn it through the coordination service)."""
    from ssb_jax.distributed import is_main_process, sum_over_processes
    lock = WorkdirLock(directory)
    error = None
    if is_main_process():
        try:
            lock.acquire()
        except WorkdirLocked as refused:
            error = refused
    if sum_over_processes(error is not None):
        raise error or WorkdirLocked(f"{directory} is in use by another run (see process 0's error)")
    return lock
