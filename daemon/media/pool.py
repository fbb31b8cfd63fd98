"""A bounded pool of media worker processes (daemon.media.worker), waited on without blocking the loop.

Decoding, resampling and speech are CPU work in C libraries (libsndfile, soxr, libespeak-ng). Run in the
daemon's process they would stall the gevent loop (and the Event Socket connection with it); run in the
hub's thread pool they take library locks that were created under monkey-patching, as gevent locks,
from real threads, and hang (soundfile's class-level lock did exactly that). So they run in separate
processes started fresh (``python -m daemon.media.worker``: no gevent, nothing inherited), one job per
process at a time.

``WorkerPool.run(job, timeout)`` checks a worker out (waiting at most ``queue_timeout`` for one; then
``MediaBusy``, which the API answers 503 with Retry-After), sends the job and waits for the answer with
``select`` on the pipe, which under gevent's monkey-patching yields to other greenlets and otherwise
blocks only the calling thread. A worker that does not answer by the deadline is killed (SIGKILL); one
that dies (a crash, or SIGXCPU from its CPU limit) is reaped. Either way the next job gets a new process,
and the caller gets ``WorkerFailed`` saying what happened. A worker that ran out of memory (its address
space is bounded by ``memory_mb``) answers so with ``retire``: the caller gets that answer, and the
process is ended rather than returned to the idle list. Workers start on first use and end when the
pool is closed or the daemon dies (their stdin reaches end of file).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class MediaBusy(Exception):
    """Every worker stayed busy for the whole wait; the request may be retried after ``retry_after`` s."""

    def __init__(self, waited: float, retry_after: int) -> None:
        super().__init__(f"the media workers are all busy (waited {waited:g} seconds); retry later")
        self.retry_after = retry_after


class WorkerFailed(Exception):
    """The worker died or overran its deadline; ``str()`` says which, for the user."""


@dataclass
class PoolStats:
    """What the pool did, for metrics, logs and tests."""

    jobs: int = 0
    cpu_seconds: float = 0.0  # as the workers reported it
    started: int = 0
    killed: int = 0  # deadline passed
    died: int = 0  # crashed or hit the CPU limit
    retired: int = 0  # answered, then ended at its own request (it ran out of memory)
    busy: int = 0  # MediaBusy raised
    pids: set[int] = field(default_factory=set)


class _Process:
    """One worker: the process and our ends of its pipes."""

    def __init__(self, python: str, memory_mb: int) -> None:
        to_child_r, self.to_child = os.pipe()
        self.from_child, from_child_w = os.pipe()
        # MALLOC_ARENA_MAX: glibc reserves 64 MiB of address space per arena, up to one per thread, and under
        # the worker's RLIMIT_AS that reservation counts as if it were used.
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   MALLOC_ARENA_MAX="2",
                   PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        argv = [python, "-m", "daemon.media.worker", "--memory-mb", str(memory_mb)]
        try:
            self.proc = subprocess.Popen(argv, stdin=to_child_r,
                                         stdout=from_child_w, env=env, close_fds=True,
                                         start_new_session=True)  # a terminal's Ctrl-C is the daemon's to handle
        except BaseException:
            for fd in (self.to_child, self.from_child):
                os.close(fd)
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        os.set_blocking(self.from_child, False)
        self.buffer = b""
        self.closed = False  # the process closed its end: it died
        self.ended = False  # end() ran: our pipe ends are closed

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def send(self, job: dict[str, Any]) -> None:
        data = memoryview((json.dumps(job) + "\n").encode())
        while data:
            data = data[os.write(self.to_child, data):]

    def receive(self, deadline: float) -> dict[str, Any] | None:
        """The next answer; None when the process closed its end (it died) or the deadline passed."""
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.from_child], [], [], remaining)
            if not ready:
                continue
            try:
                chunk = os.read(self.from_child, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                self.closed = True
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def end(self, kill: bool) -> int | None:
        """Stop the process (SIGKILL when ``kill``, else end of stdin) and reap it; its exit status. Once
        only: the pipes' numbers, once closed, may be another thread's files."""
        if self.ended:
            return self.proc.returncode
        self.ended = True
        with contextlib.suppress(OSError):
            os.close(self.to_child)
        if kill:
            with contextlib.suppress(OSError):
                self.proc.kill()
        try:
            status = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        with contextlib.suppress(OSError):
            os.close(self.from_child)
        return status


def _death(status: int | None, cpu_seconds: float) -> str:
    if status == -signal.SIGXCPU:
        return f"used more than {cpu_seconds:g} seconds of CPU"
    if status is not None and status < 0:
        return f"the worker died ({signal.Signals(-status).name})"
    return f"the worker stopped (exit status {status})"


def _close_all(idle: list[_Process]) -> None:
    # An idle worker holds no job: killing it loses nothing, and stopping the daemon never waits for an
    # interpreter to finish (a loaded machine took over 5 s, while the calls left to FreeSWITCH ran on).
    while idle:
        idle.pop().end(kill=True)


class WorkerPool:
    """At most ``size`` worker processes, each running one job at a time."""

    def __init__(self, size: int, *, queue_timeout: float, cpu_seconds: float, memory_mb: int,
                 python: str = sys.executable) -> None:
        self.size = size
        self.queue_timeout = queue_timeout
        self.cpu_seconds = cpu_seconds
        self.memory_mb = memory_mb  # each worker's address space (RLIMIT_AS), 0 = no limit
        self.stats = PoolStats()
        self._python = python
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[_Process] = []
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_all, self._idle)

    def run(self, job: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        """The worker's answer to ``job`` (``{"ok": ...}``); MediaBusy, WorkerFailed or OSError otherwise."""
        started = time.monotonic()
        if not self._slots.acquire(timeout=self.queue_timeout):
            self.stats.busy += 1
            raise MediaBusy(self.queue_timeout, retry_after=max(1, round(self.queue_timeout / 2)))
        try:
            if self._closed:
                raise WorkerFailed("the media workers are stopping")
            answer = self._run_on_a_worker({**job, "cpu_seconds": self.cpu_seconds}, timeout)
        finally:
            self._slots.release()
        self.stats.jobs += 1
        self.stats.cpu_seconds += float(answer.get("cpu", 0.0))
        answer["wall"] = time.monotonic() - started
        return answer

    def _run_on_a_worker(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        process = self._idle.pop() if self._idle else self._start()
        try:
            try:
                process.send(job)
            except BrokenPipeError:  # it died while idle (killed from outside): not this job's doing
                self._discard(process)
                process = self._start()
                process.send(job)
            answer = process.receive(time.monotonic() + timeout)
        except BaseException:  # including this greenlet being killed mid-job: the process is not reusable
            self._discard(process)
            raise
        if answer is not None:
            if answer.get("retire"):  # it ran out of memory: whatever state that left it in, no more jobs
                self.stats.retired += 1
                self._discard(process)
            elif self._closed:
                process.end(kill=False)
            else:
                self._idle.append(process)
            return answer
        status = self._discard(process)
        if not process.closed:
            self.stats.killed += 1
            raise WorkerFailed(f"took longer than {timeout:g} seconds")
        self.stats.died += 1
        raise WorkerFailed(_death(status, self.cpu_seconds))

    def _discard(self, process: _Process) -> int | None:
        self.stats.pids.discard(process.pid)
        return process.end(kill=True)

    def _start(self) -> _Process:
        process = _Process(self._python, self.memory_mb)
        self.stats.started += 1
        self.stats.pids.add(process.pid)
        return process

    def warm_up(self) -> None:
        """Start one worker now, so the first request does not wait for the interpreter to load."""
        self.run({"op": "ping"}, timeout=60.0)

    def close(self) -> None:
        """End the idle workers; jobs in progress finish, then their workers end too."""
        self._closed = True
        _close_all(self._idle)
        self._finalizer.detach()
