"""The media worker pool: no deadlock under concurrency, bounded waits, deadlines, CPU limits, crashes.

Decoding and speech used to run in gevent's hub thread pool, where soundfile's class-level lock (made
as a gevent lock by the monkey-patching) was taken from real threads: 9 of 30 concurrent normalisations
hung for good. They now run in worker processes; these tests drive them from greenlets, as the daemon
does, with deadlines that only detect a hang.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
import soundfile as sf

from bench.common import cpu_seconds
from daemon.config import Settings
from daemon.media.library import MediaError, MediaFile, MediaLibrary
from daemon.media.pool import MediaBusy, WorkerFailed, WorkerPool
from tests.conftest import create, data_of
from tests.flac_bomb import silent_flac
from tests.test_media import MediaServer, tone_file

HANG = 120.0  # seconds: only a hang detector, never a speed target
MEMORY_MB = Settings.media_memory_mb  # the default


@pytest.fixture
def server() -> Any:
    srv = MediaServer()
    yield srv
    srv.close()


@pytest.fixture
def make_pool() -> Iterator[Callable[..., WorkerPool]]:
    """``make_pool(size=1, queue_timeout=HANG, cpu_seconds=HANG, memory_mb=MEMORY_MB)``: a worker pool, closed
    after the test."""
    pools: list[WorkerPool] = []

    def make(size: int = 1, *, queue_timeout: float = HANG, cpu_seconds: float = HANG,
             memory_mb: int = MEMORY_MB) -> WorkerPool:
        pool = WorkerPool(size, queue_timeout=queue_timeout, cpu_seconds=cpu_seconds, memory_mb=memory_mb)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"state_dir": str(tmp_path / "state"), "media_allow_private": ["127.0.0.1"],
                              "media_queue_timeout": HANG}
    values.update(overrides)
    return Settings(**values)


def finish_all(greenlets: list[gevent.Greenlet]) -> None:
    gevent.joinall(greenlets, timeout=HANG)
    stuck = [g for g in greenlets if not g.ready()]
    assert not stuck, f"{len(stuck)} of {len(greenlets)} never finished"


def outcome(work: Any, *args: Any, **kwargs: Any) -> Any:
    """``work(...)``'s result or the exception it raised (so that greenlets never die with one)."""
    try:
        return work(*args, **kwargs)
    except Exception as exc:
        return exc


def test_fifty_normalisations_and_fifty_renders_from_greenlets_all_finish(tmp_path: Path,
                                                                          server: MediaServer) -> None:
    for i in range(50):
        server.body(f"/p{i}.wav", tone_file(freq=300 + 10 * i, rate=44100, channels=2))
    lib = MediaLibrary(settings_for(tmp_path))
    try:
        started = time.monotonic()
        jobs = [gevent.spawn(outcome, lib.from_url, server.url(f"/p{i}.wav"), kind="play") for i in range(50)]
        jobs += [gevent.spawn(outcome, lib.speak, f"Your code is {i} {i + 1} {i + 2}.", "en-GB") for i in range(50)]
        ticks = []

        def tick() -> None:  # the event loop keeps turning while the workers work
            while True:
                ticks.append(time.monotonic())
                gevent.sleep(0.01)
        ticker = gevent.spawn(tick)
        finish_all(jobs)
        ticker.kill()
        elapsed = time.monotonic() - started
        results = [job.value for job in jobs]
        assert all(isinstance(r, MediaFile) for r in results), [r for r in results if not isinstance(r, MediaFile)]
        assert len({r.name for r in results}) == 100
        gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
        print(f"\n50 normalisations + 50 renders from greenlets on {lib.pool.size} workers: {elapsed:.2f} s; "
              f"longest event-loop stall {max(gaps) * 1000:.0f} ms; worker CPU {lib.pool.stats.cpu_seconds:.2f} s")
        assert lib.pool.stats.started == lib.pool.size  # the workers were reused, never more than the bound
    finally:
        lib.close()


def test_busy_workers_answer_503_with_retry_after(tmp_path: Path, make_endpoint: Any, db: Any) -> None:
    from webapi.app import create_app

    settings = settings_for(tmp_path, media_workers=1, media_queue_timeout=0.5)
    lib = MediaLibrary(settings)
    try:
        hold = gevent.spawn(outcome, lib.pool.run, {"op": "spin"}, timeout=HANG)  # the only worker is busy
        assert _wait(lambda: lib.pool.stats.started == 1)
        client = create_app(settings, media=lib).test_client()
        _, token = make_endpoint()
        response = create(client, token, msg="Hello there", msg_lang="en-GB")
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert data_of(response)["code_desc"] == ("msg: the media workers are all busy (waited 0.5 seconds); "
                                                  "retry later")
        (busy_pid,) = lib.pool.stats.pids
        hold.kill()  # the request holding the worker went away: its worker is killed, the slot freed
        assert not _pid_alive(busy_pid) and not lib.pool.stats.pids
        response = create(client, token, msg="Hello there", msg_lang="en-GB")
        assert response.status_code == 200, data_of(response)
    finally:
        lib.close()


def test_a_job_past_its_deadline_is_killed_and_its_worker_replaced(make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool()
    first = pool.run({"op": "ping"}, timeout=HANG)["pid"]
    with pytest.raises(WorkerFailed, match="^took longer than 1 seconds$"):
        pool.run({"op": "spin"}, timeout=1.0)
    assert not _pid_alive(first)
    second = pool.run({"op": "ping"}, timeout=HANG)["pid"]
    assert second != first and pool.stats.killed == 1


def test_a_failed_replacement_start_never_closes_descriptors_that_are_no_longer_the_workers(
        monkeypatch: pytest.MonkeyPatch, make_pool: Callable[..., WorkerPool]) -> None:
    # The idle worker was killed from outside; starting its replacement fails. Its pipes were closed when it
    # was discarded, and their numbers may already be another thread's files (a fetch's socket, the store):
    # closing them again would cut those.
    pool = make_pool()
    others: list[int] = []
    try:
        pid = pool.run({"op": "ping"}, timeout=HANG)["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _state(pid) not in ("Z", ""):  # dead: its end of the pipe is closed
            assert time.monotonic() < deadline
            time.sleep(0.01)
        dead = pool._idle[0]
        its_numbers = {dead.to_child, dead.from_child}

        def start_fails_after_another_thread_opened_files() -> Any:
            while not all(map(_open, its_numbers)) and len(others) < 256:  # the numbers freed are reused
                others.extend(os.pipe())
            raise OSError("no more processes")

        monkeypatch.setattr(pool, "_start", start_fails_after_another_thread_opened_files)
        with pytest.raises(OSError, match="no more processes"):
            pool.run({"op": "ping"}, timeout=HANG)
        assert all(map(_open, its_numbers)), "files opened after the worker's end were closed"
        assert all(map(_open, others))
    finally:
        for fd in others:
            with contextlib.suppress(OSError):
                os.close(fd)


def test_the_pools_counts_reach_metrics(make_pool: Callable[..., WorkerPool]) -> None:
    """/metrics reads the pool at each scrape: jobs by outcome, workers running and at most."""
    from prometheus_client.parser import text_string_to_metric_families

    from daemon.ops.metrics import Metrics

    pool = make_pool(2, memory_mb=300)  # a hog runs out early
    metrics = Metrics()
    metrics.watch_media_pool(pool)
    pool.run({"op": "ping"}, timeout=HANG)
    with pytest.raises(WorkerFailed):
        pool.run({"op": "spin"}, timeout=1.0)
    pool.run({"op": "ping"}, timeout=HANG)  # on a new worker: the killed one is gone
    assert pool.run({"op": "hog", "max_mb": 600}, timeout=HANG)["kind"] == "memory"
    samples = {(s.name, tuple(s.labels.values())): s.value
               for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    assert samples[("callbridge_media_jobs_total", ("done",))] == 2
    assert samples[("callbridge_media_jobs_total", ("killed",))] == 1
    assert samples[("callbridge_media_jobs_total", ("out_of_memory",))] == 1
    assert samples[("callbridge_media_jobs_total", ("busy",))] == 0
    assert samples[("callbridge_media_workers_max", ())] == 2
    assert samples[("callbridge_media_workers", ())] == len(pool.stats.pids)
    assert samples[("callbridge_media_workers_started_total", ())] == 2  # the killed one was replaced


def test_a_job_past_its_cpu_limit_dies_and_says_so(make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool(cpu_seconds=1)
    with pytest.raises(WorkerFailed, match="^used more than 1 seconds of CPU$"):
        pool.run({"op": "spin"}, timeout=HANG)
    assert pool.run({"op": "ping"}, timeout=HANG)["pid"] and pool.stats.died == 1


def test_a_worker_that_crashes_mid_job_or_while_idle_is_replaced(make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool()
    idle = pool.run({"op": "ping"}, timeout=HANG)["pid"]
    os.kill(idle, signal.SIGKILL)  # e.g. the kernel's OOM killer
    _wait(lambda: not _pid_alive(idle))
    again = pool.run({"op": "ping"}, timeout=HANG)["pid"]  # not this job's fault: it runs on a new worker
    assert again != idle
    idle_cpu = cpu_seconds(again)
    spinning = gevent.spawn(outcome, pool.run, {"op": "spin"}, timeout=HANG)
    assert _wait(lambda: cpu_seconds(again) > idle_cpu + 0.02), "the job never reached the worker"
    os.kill(again, signal.SIGSEGV)
    spinning.join(HANG)
    assert isinstance(spinning.value, WorkerFailed)
    assert str(spinning.value) == "the worker died (SIGSEGV)"
    assert pool.run({"op": "ping"}, timeout=HANG)["pid"] not in (idle, again)


def test_waiting_is_bounded_then_media_busy(make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool(2, queue_timeout=0.3)
    holds = [gevent.spawn(outcome, pool.run, {"op": "spin"}, timeout=HANG) for _ in range(2)]
    assert _wait(lambda: pool.stats.started == 2)
    started = time.monotonic()
    with pytest.raises(MediaBusy) as caught:
        pool.run({"op": "ping"}, timeout=HANG)
    assert time.monotonic() - started >= 0.3 and caught.value.retry_after == 1
    gevent.killall(holds)
    assert pool.run({"op": "ping"}, timeout=HANG)["ok"]


def test_the_flac_bomb_costs_the_daemon_nothing(tmp_path: Path, server: MediaServer) -> None:
    bomb = silent_flac(600, 655350, 8)
    for i in range(12):
        server.body(f"/bomb{i}.flac", bomb, content_type="audio/flac")
    server.body("/fine.wav", tone_file())
    lib = MediaLibrary(settings_for(tmp_path))
    try:
        started = time.monotonic()
        bombs = [gevent.spawn(outcome, lib.from_url, server.url(f"/bomb{i}.flac"), kind="play") for i in range(12)]
        fine = gevent.spawn(outcome, lib.from_url, server.url("/fine.wav"), kind="play")  # an unrelated request
        finish_all([*bombs, fine])
        elapsed = time.monotonic() - started
        reasons = {str(b.value) for b in bombs}
        assert reasons == {"has a sample rate of 655350 Hz; at most 192000 Hz is allowed"}, reasons
        assert isinstance(bombs[0].value, MediaError) and isinstance(fine.value, MediaFile)
        cpu = lib.pool.stats.cpu_seconds
        print(f"\n12 FLAC bombs at once ({len(bomb) / 1e6:.1f} MB each, 600 s, 655350 Hz, 8 ch) and one good "
              f"file: all answered in {elapsed:.2f} s, {cpu:.3f} s of worker CPU in all")
        assert cpu < 2.0
        assert not [p for p in lib._dir.iterdir() if p.name.startswith(".tmp-")]  # downloads removed
    finally:
        lib.close()


def test_what_the_worker_made_is_stored_and_playable(tmp_path: Path, server: MediaServer) -> None:
    server.body("/a.wav", tone_file(rate=44100, channels=2))
    lib = MediaLibrary(settings_for(tmp_path))
    try:
        media = lib.from_url(server.url("/a.wav"), kind="play")
        info = sf.info(media.path)
        assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
        assert oct(os.stat(media.path).st_mode & 0o777) == "0o644"  # FreeSWITCH runs as another user
        assert oct(os.stat(tmp_path / "state" / "media.key").st_mode & 0o777) == "0o600"
    finally:
        lib.close()


def _wait(condition: Any, timeout: float = HANG) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.01)
    return True


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _state(pid: int) -> str:
    """The process's state letter in /proc (R, S, Z...); "" once reaped (gevent's child watcher may)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_file_past_the_decode_deadline_is_refused_with_a_reason(tmp_path: Path, server: MediaServer) -> None:
    server.body("/a.wav", tone_file())
    server.body("/b.wav", tone_file(freq=550))
    lib = MediaLibrary(settings_for(tmp_path, media_decode_timeout=1e-6))
    try:
        with pytest.raises(MediaError, match=r"^could not be decoded: took longer than 1e-06 seconds$"):
            lib.from_url(server.url("/a.wav"), kind="play")
        lib._settings.media_decode_timeout = HANG
        assert lib.from_url(server.url("/b.wav"), kind="play").seconds == pytest.approx(1.0, abs=0.1)
        assert lib.pool.stats.killed == 1 and lib.pool.stats.started == 2
    finally:
        lib.close()


def test_a_job_that_runs_out_of_memory_is_refused_and_the_next_runs_on_a_fresh_worker(
        make_pool: Callable[..., WorkerPool]) -> None:
    # hog allocates 16 MB at a time up to twice the limit; without the limit it would hold it all and answer ok
    pool = make_pool(memory_mb=300)
    first = pool.run({"op": "ping"}, timeout=HANG)["pid"]
    answer = pool.run({"op": "hog", "max_mb": 600}, timeout=HANG)
    assert not answer["ok"], f"the worker held {answer['held_mb']} MB and never ran out"
    assert (answer["kind"], answer["message"]) == ("memory", "needed more than 300 MB of memory")
    assert answer["retire"] and not _pid_alive(first) and not pool.stats.pids  # never back in the idle list
    second = pool.run({"op": "ping"}, timeout=HANG)
    assert second["ok"] and second["pid"] != first
    assert (pool.stats.retired, pool.stats.died, pool.stats.killed, pool.stats.started) == (1, 0, 0, 2)


def test_a_worker_is_bounded_in_address_space_and_offered_first_to_the_oom_killer(
        make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool()
    pid = pool.run({"op": "ping"}, timeout=HANG)["pid"]
    assert resource.prlimit(pid, resource.RLIMIT_AS) == (MEMORY_MB << 20, MEMORY_MB << 20)
    with open(f"/proc/{pid}/oom_score_adj") as fh:
        assert fh.read().strip() == "1000"
    with open(f"/proc/{pid}/environ", "rb") as fh:  # glibc's per-thread arenas would count against it
        assert b"MALLOC_ARENA_MAX=2" in fh.read().split(b"\0")
    unbounded = make_pool(memory_mb=0)  # media_memory_mb = 0
    pid = unbounded.run({"op": "ping"}, timeout=HANG)["pid"]
    assert resource.prlimit(pid, resource.RLIMIT_AS) == resource.getrlimit(resource.RLIMIT_AS)


def test_the_largest_file_allowed_fits_a_small_memory_limit_at_8_khz_and_a_limit_too_small_is_a_400_naming_it(
        tmp_path: Path, server: MediaServer, make_endpoint: Any, db: Any) -> None:
    """590 s of 48 kHz stereo, as large as the default limits allow. Normalised to 8 kHz it fits in 160 MB
    (a worker takes about 115 MB idle; the decoding about 2 bytes a sample more, as each block is kept as
    16-bit PCM as soon as it is resampled: it peaked at about 195 MB when the whole file was held as
    floats). Kept at 48 kHz it fits the default limit and not 128 MB, the least the setting allows: the
    answer is a 400 that names the limit."""
    from webapi.app import create_app

    server.body("/long.flac", silent_flac(590, 48000, 2), content_type="audio/flac")
    for overrides in ({"media_memory_mb": 160}, {"sample_rate": 48000}):
        lib = MediaLibrary(settings_for(tmp_path, **overrides))
        try:
            assert lib.from_url(server.url("/long.flac"), kind="play").seconds == pytest.approx(590, abs=0.1)
            assert lib.pool.stats.retired == 0
        finally:
            lib.close()
    settings = settings_for(tmp_path, media_memory_mb=128, sample_rate=48000)
    lib = MediaLibrary(settings)
    try:
        client = create_app(settings, media=lib).test_client()
        _, token = make_endpoint()
        response = create(client, token, play_url=server.url("/long.flac"))
        assert response.status_code == 400
        assert data_of(response)["code_desc"] == "play_url: could not be decoded: needed more than 128 MB of memory"
        assert lib.pool.stats.retired == 1 and not lib.pool.stats.pids
    finally:
        lib.close()
