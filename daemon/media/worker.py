"""A media worker process: decodes, normalises and speaks, one job at a time, for daemon.media.pool.

Started as ``python -m daemon.media.worker`` by the pool, never imported by the daemon's event loop: it
does not import gevent, so libsndfile, soxr and libespeak-ng run with real threads and real locks, and
a blocking C call or a long decode stalls only this process.

Protocol: one JSON object per line on stdin (a job), one JSON object per line back (the answer) on the
file descriptor that was stdout when the process started; stdout itself is pointed at stderr, so
whatever a C library prints cannot corrupt an answer. End of stdin (the daemon stopped or died) ends
the worker.

Jobs:

* ``{"op": "normalise", "source": path, ...}``: decode the file at ``source`` (daemon.media.audio) under
  ``max_seconds`` and the ``limits``, write the mono 16-bit WAV into ``folder`` as a temporary file and
  answer its name: the HMAC-SHA256 of its bytes under ``key``, so the daemon can store it by that name.
* ``{"op": "speak", "text": ..., "voice": ..., "engine": "bundled" | "espeak-ng", ...}``: speak the text
  (daemon.media.tts), then normalise and write it the same way; the answer also names the voice used.
* ``{"op": "ping"}`` answers the worker's pid (the pool's warm-up); ``{"op": "spin"}`` burns CPU until
  killed, so that tests can prove the deadline and the CPU limit; ``{"op": "hog", "max_mb": n}``
  allocates memory in 16 MB steps until that fails (or ``n`` MB are held: then it answers ok), so that
  tests can prove the memory limit.

Every job runs under a CPU-time limit (``cpu_seconds``, RLIMIT_CPU): a file that costs more kills this
process with SIGXCPU, and the pool tells the request so. Answers carry the CPU seconds the job used.

The whole process runs under an address-space limit (``--memory-mb``, RLIMIT_AS, set once at start; 0 =
none), so a library bug or a hostile file cannot grow it until the host's OOM killer picks FreeSWITCH or
the daemon. A job that runs out (MemoryError, numpy's included) answers ``kind: "memory"`` with
``retire: true``: the pool ends this process rather than trust it with another job. A C library that
aborts on a failed allocation kills the process instead, which the pool reports as a death. And should
the host run short anyway, this process offers itself first to the OOM killer (oom_score_adj 1000).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import math
import os
import resource
import sys
import tempfile
import traceback
from typing import Any

from daemon.media.audio import AudioError, Limits, Normalised, TooLong, normalise, pcm16_wav
from daemon.media.tts import BundledEngine, CommandEngine, SpeechError, SpeechSetupError


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _limit_cpu(seconds: float) -> None:
    """Allow this process ``seconds`` more of CPU time (whole seconds, as RLIMIT_CPU counts)."""
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(_cpu()) + max(1, math.ceil(seconds))
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _limit_memory(megabytes: int) -> None:
    """Bound this process's address space to ``megabytes`` (0: leave it as it is), for good: the hard
    limit too, so that nothing running in here can raise it again."""
    if megabytes <= 0:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = megabytes * 1024 * 1024
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _offer_to_oom_killer() -> None:
    """Be the kernel's first choice when the host runs out of memory: a lost decode is retried, a lost
    FreeSWITCH or daemon drops calls. Raising one's own score is always allowed, but /proc may not be."""
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as fh:
        fh.write("1000")


def _hog(max_mb: int) -> dict[str, Any]:
    """Allocate 16 MB at a time until that fails (MemoryError, answered as such) or ``max_mb`` are held."""
    held: list[bytearray] = []
    while len(held) * 16 < max_mb:
        held.append(bytearray(16 * 1024 * 1024))
    return {"held_mb": len(held) * 16}


def _store(result: Normalised, job: dict[str, Any]) -> dict[str, Any]:
    """Write the normalised WAV as a temporary file in the job's folder; answer its content name."""
    mac = hmac.new(bytes.fromhex(job["key"]), digestmod=hashlib.sha256)
    for piece in result.pieces:
        mac.update(piece)
    name = mac.hexdigest()
    fd, temp = tempfile.mkstemp(prefix=".tmp-", suffix=".wav", dir=job["folder"])
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.writelines(result.pieces)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(temp, 0o644)  # FreeSWITCH runs as another user and must read it
    except BaseException:
        os.unlink(temp)
        raise
    return {"temp": temp, "name": name, "seconds": result.seconds, "bytes": result.size}


class Worker:
    """Runs jobs; keeps the speech library loaded between them."""

    def __init__(self, memory_mb: int = 0) -> None:
        self.memory_mb = memory_mb  # this process's address-space limit (0: none), for the answers
        self._bundled: BundledEngine | None = None

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        limits = Limits(**job.get("limits", {}))
        if job["op"] == "normalise":
            result = normalise(job["source"], rate=job["rate"], max_seconds=job["max_seconds"], limits=limits)
            return _store(result, job)
        if job["op"] == "speak":
            max_samples = int(job["max_seconds"] * 48_000)
            if job["engine"] == "bundled":
                if self._bundled is None:
                    self._bundled = BundledEngine(max_samples)
                engine: BundledEngine | CommandEngine = self._bundled
            else:
                engine = CommandEngine(job["engine"], timeout=job.get("timeout", 30.0))
            speech = engine.speak(job["text"], job["voice"])
            if not speech.pcm:
                raise SpeechSetupError(f"could not be spoken with voice {job['voice']}: the engine made no sound")
            wav = pcm16_wav(speech.pcm, speech.rate)
            answer = _store(normalise(wav, rate=job["rate"], max_seconds=job["max_seconds"], limits=limits), job)
            answer["voice"] = speech.voice
            return answer
        if job["op"] == "ping":
            return {"pid": os.getpid()}
        if job["op"] == "spin":  # for tests of the CPU limit and the deadline
            while True:
                pass
        if job["op"] == "hog":  # for tests of the memory limit
            return _hog(int(job["max_mb"]))
        raise ValueError(f"unknown job {job['op']!r}")


def answer_for(worker: Worker, job: dict[str, Any]) -> dict[str, Any]:
    """The answer to one job: ``ok`` with the result, or the error's kind and text."""
    start = _cpu()
    _limit_cpu(float(job.get("cpu_seconds", 10.0)))
    try:
        answer = {"ok": True, **worker.run(job)}
    except TooLong as exc:
        answer = {"ok": False, "kind": "too_long", "limit": exc.limit, "message": str(exc)}
    except AudioError as exc:
        answer = {"ok": False, "kind": "audio", "message": str(exc)}
    except SpeechSetupError as exc:
        answer = {"ok": False, "kind": "speech_setup", "message": str(exc)}
    except SpeechError as exc:
        answer = {"ok": False, "kind": "speech", "message": str(exc)}
    except MemoryError:  # numpy's _ArrayMemoryError too. This process may be in a bad state: retire it.
        limit = f"{worker.memory_mb} MB" if worker.memory_mb else "the memory available"
        answer = {"ok": False, "kind": "memory", "message": f"needed more than {limit} of memory",
                  "retire": True}
    except Exception as exc:  # a bug or an OS error: the daemon logs it and answers 503
        traceback.print_exc(file=sys.stderr)
        answer = {"ok": False, "kind": "internal", "message": f"{type(exc).__name__}: {exc}"}
    answer["cpu"] = round(_cpu() - start, 4)
    return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.media.worker")
    parser.add_argument("--memory-mb", type=int, default=0, help="address-space limit in MB (0: none)")
    args = parser.parse_args(argv)
    _limit_memory(args.memory_mb)
    _offer_to_oom_killer()
    answers = os.dup(1)
    os.dup2(2, 1)  # whatever a C library prints goes to stderr, not into an answer
    sys.stdout = sys.stderr
    worker = Worker(args.memory_mb)
    for line in sys.stdin.buffer:
        job = json.loads(line)
        data = (json.dumps(answer_for(worker, job)) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(answers, view):]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
