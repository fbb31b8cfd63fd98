"""Faults a test can inject: dropped connections, a hung switch, restart, refusal, slow replies."""

from __future__ import annotations

import time

import pytest
from gevent import socket

from freeswitch.standin import StandIn

from .esl_client import EslClient
from .helpers import bg_originate, job_result


def connect(sw: StandIn) -> EslClient:
    c = EslClient(sw.port)
    assert c.auth().h("Reply-Text") == "+OK accepted"
    return c


def test_drop_connections_keeps_channels(client: EslClient, standin: StandIn) -> None:
    uuid, job = bg_originate(client, "15550000401")
    assert job_result(client, job).startswith("+OK")
    standin.drop_connections()
    client.pump(0.2)
    assert client.closed
    again = connect(standin)
    assert again.api(f"uuid_exists {uuid}") == "true"
    again.close()


def test_hang_stops_replies_then_resumes(client: EslClient, standin: StandIn) -> None:
    standin.hang(0.5)
    t0 = time.monotonic()
    client.send("api version\n\n")
    with pytest.raises(TimeoutError):
        client.read_reply(timeout=0.3)
    assert not client.closed
    reply = client.read_reply(timeout=30)
    assert reply.body.startswith(b"FreeSWITCH Version")
    assert time.monotonic() - t0 >= 0.45


def test_restart_drops_everything_silently(client: EslClient, standin: StandIn) -> None:
    uuid, job = bg_originate(client, "15550000402")
    assert job_result(client, job).startswith("+OK")
    before = standin.core_uuid
    events_before = len(client.events)
    standin.restart()
    client.pump(0.2)
    assert client.closed
    assert len(client.events) == events_before  # no hangup events
    assert standin.core_uuid != before
    assert standin.channels_live() == []
    again = connect(standin)
    assert again.api(f"uuid_exists {uuid}") == "false"
    assert again.api("originate sofia/gateway/carrier/15550000403 &park()").startswith("+OK ")
    again.cmd("event plain BACKGROUND_JOB")
    again.cmd("bgapi status")
    ev = again.wait_event(lambda m: m.name == "BACKGROUND_JOB")
    assert ev.e("Core-UUID") == standin.core_uuid
    assert standin.channel(uuid) is not None  # still inspectable after the restart
    again.close()


def test_refuse_connections(standin: StandIn) -> None:
    standin.refuse_connections(True)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", standin.port), timeout=1)
    standin.refuse_connections(False)
    c = connect(standin)
    c.close()


def test_refused_then_accepted_again_at_once(standin: StandIn) -> None:
    """The port is listened on again right after being closed (the listener used to stay open until its
    accept loop ran, and listening again at once failed with EADDRINUSE)."""
    connect(standin).close()  # the accept loop is waiting in accept()
    standin.refuse_connections(True)
    standin.refuse_connections(False)
    connect(standin).close()


def test_rude_rejection(standin: StandIn) -> None:
    standin.refuse_connections(True, rude=True)
    c = EslClient(standin.port)
    msg = c.read()
    assert msg.content_type == "text/rude-rejection"
    assert msg.body == b"Access Denied, go away.\n"
    c.pump(0.2)
    assert c.closed
    standin.refuse_connections(False)
    connect(standin).close()


def test_slow_replies(client: EslClient, standin: StandIn) -> None:
    standin.slow_replies(0.3)
    t0 = time.monotonic()
    assert client.api("version").startswith("FreeSWITCH")
    assert time.monotonic() - t0 >= 0.3
    standin.slow_replies(0)
    t0 = time.monotonic()
    client.api("version")
    assert time.monotonic() - t0 < 0.2


def test_a_fault_aimed_after_one_message_loses_the_rest_of_the_write(client: EslClient, standin: StandIn) -> None:
    """fault_after (stand-in only): the connection drops right after the message aimed at is handled, before
    its reply leaves: the messages before it and it take effect, those after it in the same write never arrive."""
    uuid, job = bg_originate(client, "15550000404")
    assert job_result(client, job).startswith("+OK")
    standin.fault_after(lambda text: "Event-UUID: 00000000-0000-4000-8000-000000000002" in text,
                        standin.drop_connections)
    write = b""
    for n in (1, 2, 3):
        arg = f"cb_test{n}=yes".encode()
        write += (f"sendmsg {uuid}\ncall-command: execute\nexecute-app-name: set\nevent-lock: true\n"
                  f"Event-UUID: 00000000-0000-4000-8000-00000000000{n}\ncontent-type: text/plain\n"
                  f"content-length: {len(arg)}\n\n").encode() + arg
    client.send(write)  # one write, as the daemon sends A's steps
    client.pump(0.2)
    assert client.closed
    again = connect(standin)
    assert standin.wait_for(lambda: again.api(f"uuid_getvar {uuid} cb_test2") == "yes", 5)
    assert [again.api(f"uuid_getvar {uuid} cb_test{n}") for n in (1, 3)] == ["yes", "_undef_"]
    again.close()
