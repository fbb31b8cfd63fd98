"""api commands, subscriptions, filters, myevents, introspection and heartbeats."""

from __future__ import annotations

import json

from freeswitch.standin import StandIn

from .esl_client import EslClient
from .helpers import bg_originate, job_result, new_uuid, wait_gone


def test_show_channels_lags_like_the_core_db(client: EslClient, standin: StandIn) -> None:
    body = client.api("originate {origination_caller_id_number=15551230000}sofia/gateway/carrier/15550000501 &park()")
    uuid = body.split()[1]
    assert client.api("show channels as json") == '{"row_count": 0}\n'
    assert standin.wait_for(lambda: client.api("show channels as json") != '{"row_count": 0}\n', 30)
    rows = json.loads(client.api("show channels as json"))
    assert rows["row_count"] == 1
    row = rows["rows"][0]
    assert (row["uuid"], row["application"], row["dest"], row["state"]) == (uuid, "park", "15550000501", "CS_EXECUTE")
    assert client.api("show channels count") == "\n1 total.\n"
    assert client.api("show channels like 15550000501 as json").startswith('{"row_count":1,')
    assert client.api("show channels").endswith("\n\n1 total.\n")


def test_uuid_errors_and_getvar(client: EslClient) -> None:
    missing = "00000000-0000-0000-0000-000000000000"
    assert client.api(f"uuid_kill {missing}") == "-ERR No such channel!\n"
    assert client.api(f"uuid_exists {missing}") == "false"
    assert client.api(f"uuid_broadcast {missing} /x.wav aleg") == "-ERR invalid uuid\n"
    assert client.api("foobar") == "-ERR foobar Command not found!\n"
    uuid, job = bg_originate(client, "15550000502")
    job_result(client, job)
    assert client.api(f"uuid_getvar {uuid} nothing") == "_undef_"
    assert client.api(f"uuid_setvar {uuid} x hello world") == "+OK\n"
    assert client.api(f"uuid_getvar {uuid} x") == "hello world"
    assert client.api(f"uuid_kill {uuid} USER_BUSY") == "+OK\n"
    hup = client.wait_event(lambda m: m.name == "CHANNEL_HANGUP_COMPLETE" and m.e("Unique-ID") == uuid)
    assert hup.e("Hangup-Cause") == "USER_BUSY"


def test_uuid_bridge_two_parked_legs(client: EslClient, standin: StandIn) -> None:
    a, ja = bg_originate(client, "15550000503")
    b, jb = bg_originate(client, "15550000504")
    job_result(client, ja), job_result(client, jb)
    assert client.api(f"uuid_bridge {a} {b}") == f"+OK {b}\n"
    bridge = client.wait_event(lambda m: m.name == "CHANNEL_BRIDGE")
    assert (bridge.e("Unique-ID"), bridge.e("Other-Leg-Unique-ID")) == (a, b)
    assert {m.e("Unique-ID") for m in client.named("CHANNEL_EXECUTE_COMPLETE")} == {a, b}
    assert standin.heard(a)[-1]["kind"] == "bridge" and standin.heard(a)[-1]["source"] == b
    client.api(f"uuid_kill {a}")
    wait_gone(standin, a)
    wait_gone(standin, b)
    assert client.named("CHANNEL_UNBRIDGE", a)


def test_hupall_and_sched_api(client: EslClient, standin: StandIn) -> None:
    uuid, job = bg_originate(client, "15550000505")
    job_result(client, job)
    assert client.api(f"sched_api +2 none uuid_kill {uuid} CALL_REJECTED").startswith("+OK Added: ")
    wait_gone(standin, uuid)
    assert standin.channel(uuid).hangup_cause == "CALL_REJECTED"  # type: ignore[union-attr]
    bg_originate(client, "15550000506")
    assert standin.wait_for(lambda: len(standin.channels_live()) == 1, 30)
    assert client.api("hupall") == "+OK hangup all channels with cause MANAGER_REQUEST\n"
    assert standin.wait_for(lambda: not standin.channels_live(), 30)


def test_standin_introspection_over_the_socket(client: EslClient, standin: StandIn) -> None:
    uuid, job = bg_originate(client, "15550000507")
    job_result(client, job)
    assert json.loads(client.api(f"standin heard {uuid}")) == json.loads(json.dumps(standin.heard(uuid)))
    assert json.loads(client.api("standin channel " + uuid))["number"] == "15550000507"
    cmds = json.loads(client.api("standin commands"))
    assert any(c["text"].startswith("bgapi originate") for c in cmds)
    assert client.api(f"standin far_end_hangup {uuid}") == "+OK\n"
    wait_gone(standin, uuid)
    # the in-process view of the same
    texts = [c.text for c in standin.commands]
    assert texts[0] == "auth ClueCon\n\n"
    assert all(c.conn_id == standin.commands[0].conn_id for c in standin.commands)
    assert standin.commands[0].at <= standin.commands[-1].at


def test_json_events_and_background_job_body(standin: StandIn) -> None:
    c = EslClient(standin.port)
    c.auth()
    assert c.cmd("event json BACKGROUND_JOB CHANNEL_CREATE").h("Reply-Text") == "+OK event listener enabled json"
    c.cmd("bgapi originate {origination_caller_id_name='Acme Sales'}sofia/gateway/carrier/15550003508 &park()")
    job = c.wait_event(lambda m: m.name == "BACKGROUND_JOB")
    assert job.content_type == "text/event-json"
    assert job.event_body == "-ERR USER_BUSY\n"
    assert job.e("Content-Length") == "15"
    create = c.wait_event(lambda m: m.name == "CHANNEL_CREATE")
    assert create.e("Caller-Caller-ID-Name") == "Acme Sales"
    assert b'"Caller-Caller-ID-Name":"Acme Sales"' in create.raw
    c.close()


def test_filters_nixevent_noevents(standin: StandIn) -> None:
    c = EslClient(standin.port)
    c.auth()
    c.cmd("event plain CHANNEL_CREATE CHANNEL_ANSWER")
    keep = new_uuid()
    assert c.cmd(f"filter Unique-ID {keep}").h("Reply-Text") == f"+OK filter added. [Unique-ID]=[{keep}]"
    c.api(f"originate {{origination_uuid={new_uuid()}}}sofia/gateway/carrier/15550000509 &park()")
    c.api(f"originate {{origination_uuid={keep}}}sofia/gateway/carrier/15550000510 &park()")
    c.wait_event(lambda m: m.name == "CHANNEL_ANSWER")
    assert {m.e("Unique-ID") for m in c.events} == {keep}
    assert c.cmd("nixevent CHANNEL_ANSWER").h("Reply-Text") == "+OK events nixed"
    assert c.cmd("filter delete all").h("Reply-Text") == "+OK filter deleted. [all][]"
    assert c.cmd("noevents").h("Reply-Text") == "+OK no longer listening for events"
    assert c.cmd("noevents").h("Reply-Text") == "-ERR not listening for events"
    c.close()


def test_myevents_then_disconnect_notice(client: EslClient, standin: StandIn) -> None:
    uuid, job = bg_originate(client, "15550000511")
    job_result(client, job)
    other, job2 = bg_originate(client, "15550000512")
    job_result(client, job2)
    c = EslClient(standin.port)
    c.auth()
    assert c.cmd(f"myevents {uuid}").h("Reply-Text") == "+OK Events Enabled"
    assert c.cmd(f"myevents {uuid}").h("Reply-Text") == "-ERR aready enabled."
    # The far end hangs up once myevents is on (a row that hangs up by itself after 2 plan seconds
    # raced the three commands before it on a loaded machine).
    assert standin.far_end_hangup(uuid)
    c.wait_event(lambda m: m.name == "CHANNEL_HANGUP_COMPLETE", timeout=30)
    assert {m.e("Unique-ID") for m in c.events} == {uuid}
    notice = c.read_reply()
    assert notice.content_type == "text/disconnect-notice"
    assert notice.h("Content-Disposition") == "disconnect"
    c.pump(0.2)
    assert c.closed


def test_myevents_linger(client: EslClient, standin: StandIn) -> None:
    uuid, job = bg_originate(client, "15550000513")
    job_result(client, job)
    c = EslClient(standin.port)
    c.auth()
    assert c.cmd("linger").h("Reply-Text") == "-ERR not controlling a session"
    c.cmd(f"myevents {uuid} json")
    assert c.cmd("linger").h("Reply-Text") == "+OK will linger"
    client.api(f"uuid_kill {uuid}")
    notice = c.read_reply()
    assert (notice.h("Content-Disposition"), notice.h("Linger-Time")) == ("linger", "-1")
    assert c.events[0].content_type == "text/event-plain"  # 1.10.12 ignores the format
    assert c.cmd("exit").h("Reply-Text") == "+OK bye"
    c.close()


def test_heartbeat_every_20_plan_seconds(client: EslClient) -> None:
    beats = []
    for _ in range(2):
        beats.append(client.wait_event(lambda m: m.name == "HEARTBEAT" and m not in beats, timeout=30))
    assert beats[0].e("Event-Info") == "System Ready"


def test_sendevent_custom(standin: StandIn) -> None:
    c = EslClient(standin.port)
    c.auth()
    c.cmd("event plain CUSTOM fsreal::test")
    reply = c.cmd("sendevent CUSTOM\nEvent-Subclass: fsreal::test\nX-Test-Header: hello world")
    assert reply.h("Reply-Text", ).startswith("+OK ")  # type: ignore[union-attr]
    ev = c.wait_event(lambda m: m.name == "CUSTOM")
    assert ev.e("X-Test-Header") == "hello world"
    assert ev.e("Event-UUID") == reply.h("Reply-Text")[4:]  # type: ignore[index]
    c.close()
