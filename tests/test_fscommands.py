"""Everything that reaches FreeSWITCH is built from checked values: hostile input is refused, not sent."""

from __future__ import annotations

import uuid

import pytest

from daemon.switch import commands as fs

A = str(uuid.uuid4())
B = str(uuid.uuid4())
HOSTILE = [
    "1555,origination_uuid=x",
    "1555}sofia/gateway/evil/1",
    "1555]",
    "1555[x=y]",
    "15'55",
    '15"55',
    "^^:a:b",
    "${system rm -rf /}",
    "$${hostname}",
    "\n\napi hupall",
    "1555\r\nbgapi originate",
    "1555\0",
    "1" * 21,
    "１５５５",  # full-width digits
    "",
]


def leg_vars(**over: object) -> dict[str, str | int | bool]:
    args: dict = {"leg_uuid": A, "callid": "abcdef0123456789", "caller_id_number": "15551230000",
                  "caller_id_name": "Acme Sales", "originate_timeout": 30}
    args.update(over)
    return fs.leg_variables(**args)


def test_originate_a_has_the_shape_freeswitch_was_run_with() -> None:
    line = fs.originate_a(template="sofia/gateway/carrier/{number}", phone="15550001161", variables=leg_vars())
    assert line == (
        f"originate {{origination_uuid={A},origination_caller_id_number=15551230000,"
        "origination_caller_id_name='Acme Sales',ignore_early_media=true,originate_timeout=30,"
        "cb_callid=abcdef0123456789,app_disable_expand_variables=true}sofia/gateway/carrier/15550001161 &park()"
    )


def test_bridge_target_dials_b_with_its_own_uuid() -> None:
    arg = fs.bridge_target(template="sofia/gateway/carrier/{number}", phone="+15550003164",
                           variables=leg_vars(leg_uuid=B, caller_id_name=""))
    assert arg.startswith(f"{{origination_uuid={B},")
    assert arg.endswith("}sofia/gateway/carrier/+15550003164")
    assert "origination_caller_id_name" not in arg


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_numbers_are_refused(value: str) -> None:
    with pytest.raises(fs.UnsafeValue):
        fs.dial_string("sofia/gateway/carrier/{number}", value)


@pytest.mark.parametrize("value", [v for v in HOSTILE[:-1] if v != "1" * 21] + ["Sales, Inc", "a{b}", "Name\tTab", "x" * 41])
def test_hostile_caller_names_are_refused(value: str) -> None:
    with pytest.raises(fs.UnsafeValue):
        fs.var_block(leg_vars(caller_id_name=value))


@pytest.mark.parametrize("value", [v for v in HOSTILE if v != "1" * 21])
def test_hostile_callids_are_refused(value: str) -> None:
    with pytest.raises(fs.UnsafeValue):
        leg_vars(callid=value)


@pytest.mark.parametrize("template", [
    "sofia/gateway/carrier/{number},user/1000",
    "sofia/gateway/carrier/{number}|sofia/gateway/other/{number}",
    "{origination_uuid=x}sofia/gateway/carrier/{number}",
    "sofia/gateway/carrier/{number} &bgsystem(ls)",
    "sofia/gateway/carrier/${number}",
    "sofia/gateway/carrier/number",
    "sofia/gateway/carrier/{number}/{number}",
    "sofia/gateway/carrier/{number}\napi hupall",
])
def test_dial_templates_that_could_break_out_are_refused(template: str) -> None:
    with pytest.raises(fs.DialStringError):
        fs.check_dial_template(template)


def test_good_dial_templates() -> None:
    for template in ("sofia/gateway/carrier/{number}", "loopback/{number}", "sofia/internal/{number}@10.0.0.1:5060",
                     "user/{number}"):
        assert fs.check_dial_template(template) == template


@pytest.mark.parametrize("path", [
    "shell_stream:///bin/ls", "/etc/passwd", "/srv/media/../../etc/passwd", "relative.wav",
    "/srv/media/a b.wav", "/srv/media/x.wav;loops=5", "/srv/media/${x}.wav", "/srv/media/x.wav\nhangup",
    "http_cache://http://evil/x.wav", "tone_stream://%(1,1,1)",
])
def test_only_our_own_files_are_played(path: str) -> None:
    with pytest.raises(fs.UnsafeValue):
        fs.media_path(path, media_root="/srv/media")


def test_our_files_and_our_media_urls_are_played() -> None:
    ours = "/srv/media/" + "a" * 64 + ".wav"
    assert fs.media_path(ours, media_root="/srv/media") == ours
    url = "http_cache://http://10.0.0.2:8080/media/" + "b" * 64 + ".wav"
    assert fs.media_target(url, media_root="/srv/media", media_base_url="http://10.0.0.2:8080") == url
    assert fs.media_target(ours, media_root="/srv/media", media_base_url="") == ours
    for foreign in ("http_cache://http://evil.example/media/" + "b" * 64 + ".wav",
                    "http://10.0.0.2:8080/media/" + "b" * 64 + ".wav",
                    "http_cache://http://10.0.0.2:8080/media/../x.wav",
                    "shell_stream://ls"):
        with pytest.raises(fs.UnsafeValue):
            fs.media_target(foreign, media_root="/srv/media", media_base_url="http://10.0.0.2:8080")


def test_sendmsg_puts_the_argument_in_the_body() -> None:
    event_uuid = str(uuid.uuid4())
    message = fs.sendmsg_execute(A, "playback", "/srv/media/x.wav", event_uuid=event_uuid)
    head, body = message.split("\n\n", 1)
    assert body == "/srv/media/x.wav"
    assert head.splitlines() == [
        f"sendmsg {A}", "call-command: execute", "execute-app-name: playback", f"Event-UUID: {event_uuid}",
        "event-lock: true", "content-type: text/plain", f"content-length: {len(body)}",
    ]
    with pytest.raises(fs.UnsafeValue):
        fs.sendmsg_execute(A, "playback", "x\n\napi hupall", event_uuid=event_uuid)
    with pytest.raises(fs.UnsafeValue):
        fs.sendmsg_execute(A, "system", "ls", event_uuid="not-a-uuid")


def test_set_and_uuid_commands_refuse_breakouts() -> None:
    assert fs.set_arg("ringback", "%(2000,4000,440,480)") == "ringback=%(2000,4000,440,480)"
    assert fs.set_arg("instant_ringback", True) == "instant_ringback=true"
    for bad in ("${system ls}", "a b", "x,y", "x\ny"):
        with pytest.raises(fs.UnsafeValue):
            fs.set_arg("ringback", bad)
    with pytest.raises(fs.UnsafeValue):
        fs.set_arg("x=y", "1")
    with pytest.raises(fs.UnsafeValue):
        fs.uuid_kill("not-a-uuid")
    with pytest.raises(fs.UnsafeValue):
        fs.uuid_kill(A, "NORMAL_CLEARING\napi hupall")
    assert fs.uuid_kill(A, "USER_BUSY") == f"uuid_kill {A} USER_BUSY"
    assert fs.uuid_setvar(A, "cb_requeued", 2) == f"uuid_setvar {A} cb_requeued 2"
    for name, value in (("cb_requeued", "2 3"), ("cb_requeued", "${x}"), ("cb x", "1"), ("cb_requeued", "1\n")):
        with pytest.raises(fs.UnsafeValue):
            fs.uuid_setvar(A, name, value)


@pytest.mark.parametrize("field", ["caller_id_number", "caller_id_name", "allowed_prefixes"])
def test_a_trailing_line_break_never_passes_a_rule(field: str) -> None:
    """``$`` matches before a final newline; every rule must hold for the whole value."""
    from daemon.accounts.endpoints import EndpointError, EndpointOptions

    values = {"caller_id_number": "15551230000", "caller_id_name": "Acme", "allowed_prefixes": "1555"}
    values[field] += "\n"
    options = EndpointOptions(name="n", dial_string="sofia/gateway/carrier/{number}", **values)
    with pytest.raises(EndpointError):
        options.check()
    for check in (fs.uuid, fs.number, fs.cause, fs.ring_tone):
        with pytest.raises(fs.UnsafeValue):
            check({fs.uuid: A, fs.number: "1555", fs.cause: "USER_BUSY", fs.ring_tone: "%(1,2,3)"}[check] + "\n")
    with pytest.raises(fs.UnsafeValue):
        fs.var_block({"name\n": "x"})


@pytest.mark.parametrize("bad", ["CHANNEL_ANSWER\n\napi hupall", "channel answer", "CHANNEL_ANSWER /.*/", ""])
def test_event_names_that_could_add_a_command_or_a_wider_filter_are_refused(bad: str) -> None:
    with pytest.raises(fs.UnsafeValue):
        fs.event_filters(["CHANNEL_CREATE", bad])
    with pytest.raises(fs.UnsafeValue):
        fs.event_subscription([bad])


@pytest.mark.parametrize("bad", ["park\n\napi hupall", "/.*/", "-park", "Park", ""])
def test_ignored_app_names_are_plain_app_names(bad: str) -> None:
    with pytest.raises(fs.UnsafeValue):
        fs.event_filters(["CHANNEL_EXECUTE"], ignored_apps=[bad])
