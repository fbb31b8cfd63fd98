"""The bench's timing tap (``bench.switch``): what the event reaction figures of ``make bench`` are read from."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from bench.switch import TappedStandIn

from .conftest import EVENTS, SCALE
from .esl_client import EslClient
from .helpers import bg_originate, job_result


@pytest.fixture
def tapped() -> Iterator[TappedStandIn]:
    sw = TappedStandIn(host="127.0.0.1", port=0, password="ClueCon", time_scale=SCALE)
    sw.start()
    try:
        yield sw
    finally:
        sw.stop()


def test_tap_times_the_client_alone_between_an_answer_sent_and_its_sendmsg_received(tapped: TappedStandIn) -> None:
    client = EslClient(tapped.port)
    try:
        assert client.auth().h("Reply-Text") == "+OK accepted"
        assert client.cmd(f"event plain {EVENTS}").h("Reply-Text") == "+OK event listener enabled plain"
        before = time.time()
        a_leg, job = bg_originate(client, "15550000501")
        assert job_result(client, job).startswith("+OK")
        client.wait_event(lambda m: m.name == "CHANNEL_ANSWER" and m.e("Unique-ID") == a_leg)
        answer_read = time.time()
        time.sleep(0.05)  # the client's reaction, as the tap must see it: at least this long
        sent = time.time()
        client.cmd(f"sendmsg {a_leg}\ncall-command: execute\nexecute-app-name: playback\nexecute-app-arg: silence_stream://100")
        replied = time.time()
        leg = json.loads(client.api("standin benchtap"))["a"][a_leg]
    finally:
        client.close()

    assert before <= leg["answer_sent"] <= answer_read  # on the wall clock, as the kernel's timestamps are
    assert sent <= leg["sendmsg_received"] <= replied  # when the kernel had it, not when the stand-in read it
    assert leg["sendmsg_received"] - leg["answer_sent"] >= 0.05
    assert leg["answered"] is not None and leg["first_sendmsg"] is not None  # the times through its own loop
