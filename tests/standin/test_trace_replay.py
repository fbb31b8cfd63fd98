"""Replays of the real FreeSWITCH 1.10.12 recordings, compared header by header."""

from __future__ import annotations

from pathlib import Path

import pytest

from freeswitch.standin import StandIn

from .conftest import SCALE
from .trace_replay import Replay, load

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

NOT_REPLAYED = {
    "08_full_call_plain_ALL": "holds the far-end simulator's own legs (same FreeSWITCH) and CHANNEL_STATE/CALLSTATE/"
    "CODEC/CALL_UPDATE/API/MEDIA_BUG events the stand-in does not generate",
    "split_08_full_call_plain_ALL": "event plain ALL: CHANNEL_STATE/CALLSTATE/CODEC/MEDIA_BUG/API events not generated",
    "11_myevents_nolinger": "needs the control connection of 11_myevents_control running concurrently and "
    "CHANNEL_STATE events the stand-in does not generate; myevents is tested directly in test_api.py",
    "11b_myevents_linger_json": "same as 11_myevents_nolinger",
    "15_inbound_call": "inbound calls (far end calling the switch) are not simulated",
}


@pytest.mark.parametrize("name", REPLAYED)
def test_replay_matches_recording(name: str, standin: StandIn, media_dir: Path) -> None:
    replay = Replay(load(name), standin.port, SCALE, str(media_dir)).run()
    assert replay.problems == []


def test_replay_uuid_commands_and_media(standin: StandIn, media_dir: Path, media_server: str) -> None:
    """12: uuid_* commands and every kind of media, http:// ones from a local server."""
    replay = Replay(load("12_uuid_commands_playback"), standin.port, SCALE, str(media_dir),
                    rewrite={"127.0.0.1:8765": media_server}).run()
    assert replay.problems == []


@pytest.mark.parametrize("name", sorted(NOT_REPLAYED))
def test_not_replayed(name: str) -> None:
    pytest.skip(NOT_REPLAYED[name])
