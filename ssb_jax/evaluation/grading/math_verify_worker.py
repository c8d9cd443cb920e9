"""math_verify in a bounded worker subprocess.

math_verify's own timeouts use SIGALRM, which only works on the main thread and cannot interrupt
long-running C code (e.g. sympy big integer arithmetic). Instead every math_verify comparison runs,
with math_verify's timeouts disabled, in one long-lived worker subprocess: this file run as a script
(`_worker_command`), so the worker imports only the standard library and math_verify, never the
`ssb_jax` package or JAX. The caller waits on the worker's pipe for at most `timeout_s`; on expiry the
worker is killed (SIGKILL), `MathVerifyTimeout` is raised, and the next call starts a fresh worker. The
bound thus holds from any thread and for any input (concurrent callers share the one worker, so their
comparisons run one at a time; waiting for a turn is not charged). The worker's one-off start-up
(importing sympy) is waited for separately, up to `WORKER_START_TIMEOUT_S`, so it is not charged to the
first answer; call `start_math_verify_worker()` to pay it early.

A request is a list of (prediction, gold) pairs, tried in order; the answer is whether any pair is
equal by math_verify. The caller builds the pairs (e.g. the answers as written, then normalized), so
the worker needs none of ssb_jax's code.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

WORKER_START_TIMEOUT_S = 120.0


def _worker_command() -> list[str]:
    # Run this file as a script, not with -m (which would import the ssb_jax package, and JAX with it):
    # the worker needs math_verify only. -P keeps the script's folder off sys.path so its modules shadow nothing.
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe_path, os.path.abspath(__file__), "--math-verify-worker"]


class MathVerifyTimeout(RuntimeError):
    """A math_verify comparison exceeded its time bound (its worker was killed)."""


class _MathVerifyWorker:
    """One long-lived subprocess answering `{"pairs": [[prediction, gold], ...]}` JSON lines with
    `{"equal": bool}`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._owner_pid: int | None = None

    def _alive(self) -> bool:
        return (self._process is not None and self._owner_pid == os.getpid()
                and self._process.poll() is None)

    def _read_line(self, deadline: float) -> bytes | None:
        assert self._process is not None and self._process.stdout is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([self._process.stdout], [], [], remaining)
        if not ready:
            return None
        return self._process.stdout.readline()

    def start(self) -> None:
        with self._lock:
            self._ensure_started()

    def _ensure_started(self) -> None:
        if self._alive():
            return
        self._kill()
        self._process = subprocess.Popen(
            _worker_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, close_fds=True)
        self._owner_pid = os.getpid()
        line = self._read_line(time.monotonic() + WORKER_START_TIMEOUT_S)
        if not line or line.strip() != b"ready":
            self._kill()
            raise RuntimeError("math_verify worker failed to start")

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if self._owner_pid == os.getpid():
            try:
                process.kill()
                process.wait(timeout=10)
            except Exception:
                pass
            for stream in (process.stdin, process.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except Exception:
                    pass

    def equal(self, pairs: Sequence[tuple[str, str]], timeout_s: float) -> bool:
        with self._lock:
            self._ensure_started()
            assert self._process is not None and self._process.stdin is not None
            request = json.dumps({"pairs": [list(pair) for pair in pairs]}) + "\n"
            deadline = time.monotonic() + timeout_s
            try:
                self._process.stdin.write(request.encode("utf-8"))
                self._process.stdin.flush()
                line = self._read_line(deadline)
            except (BrokenPipeError, OSError) as error:
                self._kill()
                raise RuntimeError("math_verify worker died") from error
            if line is None:
                self._kill()
                raise MathVerifyTimeout(f"math_verify took longer than {timeout_s}s")
            if not line:
                self._kill()
                raise RuntimeError("math_verify worker died")
            return bool(json.loads(line)["equal"])

    def close(self) -> None:
        with self._lock:
            self._kill()


_WORKER = _MathVerifyWorker()


def start_math_verify_worker() -> None:
    """Start the math_verify worker now, so its start-up is not paid mid-evaluation."""
    _WORKER.start()


def stop_math_verify_worker() -> None:
    """Kill the worker (the next comparison starts a fresh one)."""
    _WORKER.close()


def math_verify_any(pairs: Sequence[tuple[str, str]], timeout_s: float) -> bool:
    """Whether math_verify finds any (prediction, gold) pair equal, tried in order within `timeout_s`
    (the worker's start-up not counted). Raises MathVerifyTimeout past it, RuntimeError when the
    worker dies."""
    return _WORKER.equal(pairs, timeout_s)


def _verify_in_worker(parse: Callable, verify: Callable, pairs: Sequence[Sequence[str]]) -> bool:
    """Runs inside the worker; math_verify's signal timeouts are off (None)."""
    for pred_text, gold_text in pairs:
        gold_parsed = parse(f"${gold_text}$", parsing_timeout=None)
        pred_parsed = parse(f"${pred_text}$", parsing_timeout=None)
        if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None):
            return True
    return False


def _serve_math_verify() -> None:
    import logging
    logging.disable(logging.WARNING)  # math_verify warns that its timeout is off
    # Keep the protocol on a private fd; stray prints from libraries go to stderr.
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    from math_verify import parse, verify
    protocol.write("ready\n")
    protocol.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            equal = _verify_in_worker(parse, verify, request["pairs"])
        except Exception:
            equal = False
        protocol.write(json.dumps({"equal": bool(equal)}) + "\n")
        protocol.flush()


if __name__ == "__main__" and "--math-verify-worker" in sys.argv:
    _serve_math_verify()
