"""Replays of the real FreeSWITCH 1.10.12 recordings, compared header by header."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gevent
import pytest
from gevent.event import Event

from freeswitch.standin import StandIn

from .conftest import SCALE
from .helpers import ManualClock
from .trace_replay import Replay, Trace, load

REPLAYED = [
    "01_auth_ok",
    "02_auth_fail",
    "02b_command_before_auth",
    "03_api_basics",
    "04_api_errors",
    "05_session_commands",
    "06_originate_results_api",
    "07_bgapi_originate_events_plain",
    "09_full_call_plain_filtered",
    "10_full_call_json_filtered",
    "11c_myevents_unknown_uuid",
    "13_sendmsg_execute",
    "14_dtmf_from_far_end",
    "16a_bridge_app_ringback",
    "16b_bridge_app_early_media_ignored",
    "16c_bridge_app_a_hangs_up_while_b_rings",
    "16d_bridge_app_b_busy",
    "16e_bridge_app_b_busy_continue_on_fail",
]

# Under `event plain ALL`: the broadcast's internal command events are not generated, and whether a
# HEARTBEAT (with its RE_SCHEDULE) falls inside a replay depends on timing.
NOT_GENERATED = {"PRIVATE_COMMAND", "COMMAND", "RE_SCHEDULE", "HEARTBEAT"}

NOT_REPLAYED = {
    "15_inbound_call": "inbound calls (far end calling the switch) are not simulated",
}


@pytest.mark.parametrize("name", REPLAYED)
def test_replay_matches_recording(name: str, standin: StandIn, media_dir: Path) -> None:
    # HEARTBEAT comes every 20 plan seconds (1 s here): whether one falls inside a replay is timing.
    replay = Replay(load(name), standin.port, standin.time_scale, str(media_dir), skip={"HEARTBEAT", "RE_SCHEDULE"}).run()
    assert replay.problems == []


@pytest.mark.parametrize(("name", "skip_channels", "also_skip"), [
    ("split_08_full_call_plain_ALL", None, set()),
    # The same call with the far-end simulator inside the recording switch: its legs are not ours,
    # and there FreeSWITCH's B leg skipped a CS_CONSUME_MEDIA step split_08 shows (a thread race).
    ("08_full_call_plain_ALL", "sofia/carrier/", {"CHANNEL_STATE"}),
])
def test_replay_event_plain_all(name: str, skip_channels: str | None, also_skip: set[str], standin: StandIn,
                                media_dir: Path) -> None:
    """`event plain ALL`: every event type the stand-in generates matches; the rest are listed above."""
    replay = Replay(load(name), standin.port, standin.time_scale, str(media_dir), skip=NOT_GENERATED | also_skip,
                    skip_channels=skip_channels).run()
    assert replay.problems == []


def test_replay_uuid_commands_and_media(standin: StandIn, media_dir: Path, media_server: str) -> None:
    """12: uuid_* commands and every kind of media, http:// ones from a local server."""
    replay = Replay(load("12_uuid_commands_playback"), standin.port, standin.time_scale, str(media_dir),
                    rewrite={"127.0.0.1:8765": media_server}, skip={"HEARTBEAT", "RE_SCHEDULE"}).run()
    assert replay.problems == []


def test_replay_myevents_with_its_control_connection(standin: StandIn, media_dir: Path) -> None:
    """11: the control connection makes the calls; two other connections follow them with myevents."""
    uuids: dict[str, str] = {}
    subscribed = [Event(), Event()]

    def known(theirs: str) -> Callable[[], object]:
        return lambda: standin.wait_for(lambda: theirs in uuids, 30)

    control = Replay(load("11_myevents_control"), standin.port, standin.time_scale, str(media_dir), uuids=uuids,
                     before_chunk={2: lambda: subscribed[0].wait(5), 5: lambda: subscribed[1].wait(5)})
    # and its first kill (3) once the follower saw the broadcast file end, as in the recording.
    control.before_chunk[3] = lambda: standin.wait_for(
        lambda: any(m.name == "CHANNEL_EXECUTE_COMPLETE" for m in nolinger.received), 30)
    # Control: broadcast (2) once the first follower listens, second kill (5) once the other lingers.
    nolinger = Replay(load("11_myevents_nolinger"), standin.port, standin.time_scale, str(media_dir), uuids=uuids,
                      before_chunk={1: known("c4a879ef-0888-4041-9b1e-d96036824585"), 2: subscribed[0].set})
    linger = Replay(load("11b_myevents_linger_json"), standin.port, standin.time_scale, str(media_dir), uuids=uuids,
                    before_chunk={2: known("0cb7622b-b016-4ec2-a1dc-fbaca82fb59a")}, after_send={3: subscribed[1].set})
    jobs = [gevent.spawn(r.run) for r in (control, nolinger, linger)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert control.problems == []
    assert nolinger.problems == []
    assert linger.problems == []


def on_trace_time(trace: Trace, clock: ManualClock) -> dict[int, Callable[[], object]]:
    """Hooks that move the session-rate clock to each client chunk's recorded time before it is sent:
    the switch's one-second ticks fall between the chunks exactly as they did in the recording."""
    def move_to(t: float) -> Callable[[], object]:
        return lambda: clock.set(t)

    return {i: move_to(chunk.t) for i, chunk in enumerate(trace.chunks)}


def per_second_lines(replay: Replay) -> list[str]:
    """The `N session(s) per Sec out of max M, ...` line of every `api status` answer received."""
    bodies = [m.body.decode() for m in replay.received if m.body.startswith(b"UP ")]
    return [line for body in bodies for line in body.splitlines() if "per Sec" in line]


def test_replay_17_sessions_per_second(media_dir: Path) -> None:
    """17: `fsctl sps 2`, a tick later six originates in a burst: one leg is created (its far end, a
    session of the same switch there, is refused: 503 -> NORMAL_TEMPORARY_FAILURE), the other five get
    -ERR DESTINATION_OUT_OF_ORDER and no CHANNEL_CREATE at all."""
    clock = ManualClock()
    sw = StandIn(host="127.0.0.1", port=0, password="ClueCon", time_scale=SCALE, far_end_sessions=True,
                 clock=clock).start()
    try:
        trace = load("17_throttle_sps")
        replay = Replay(trace, sw.port, SCALE, str(media_dir), before_chunk=on_trace_time(trace, clock)).run()
    finally:
        sw.stop()
    assert replay.problems == []
    assert per_second_lines(replay)[0].startswith("0 session(s) per Sec out of max 30, peak ")
    assert per_second_lines(replay)[1].startswith("0 session(s) per Sec out of max 2, peak ")
    assert [ch.hangup_cause for ch in sw.switch.all_channels.values()] == ["NORMAL_TEMPORARY_FAILURE"]


def test_replay_17b_max_sessions(media_dir: Path) -> None:
    """17b: `fsctl max_sessions 3`; the first call takes 2 sessions (its far end lives on the same
    switch there), so every later far end is refused: a created leg ending NORMAL_TEMPORARY_FAILURE,
    for bgapi and for a synchronous `api originate` alike."""
    clock = ManualClock()
    sw = StandIn(host="127.0.0.1", port=0, password="ClueCon", time_scale=SCALE, far_end_sessions=True,
                 clock=clock).start()
    try:
        trace = load("17b_max_sessions")
        # The far end's own legs (sofia/carrier/...) are not simulated as channels.
        replay = Replay(trace, sw.port, SCALE, str(media_dir), before_chunk=on_trace_time(trace, clock),
                        skip_channels="sofia/carrier/").run()
    finally:
        sw.stop()
    assert replay.problems == []


@pytest.mark.parametrize("name", sorted(NOT_REPLAYED))
def test_not_replayed(name: str) -> None:
    pytest.skip(NOT_REPLAYED[name])
