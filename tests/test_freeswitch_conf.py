"""The files an operator drops into a real FreeSWITCH 1.10 (freeswitch/conf/) and the docs that say how.

FreeSWITCH ignores what it does not know without a word (an unknown ``<param>``, a list name that is
not defined), so these checks read the XML as FreeSWITCH 1.10.12 would and hold it to what the daemon
relies on. References: src/mod/event_handlers/mod_event_socket/mod_event_socket.c (``config()``: the
params it reads), src/switch_core.c (ACL lists), conf/vanilla/ (the stock files).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "freeswitch" / "conf"
EVENT_SOCKET = CONF / "autoload_configs" / "event_socket.conf.xml"
ACL = CONF / "autoload_configs" / "acl.conf.xml"
MODULES = CONF / "autoload_configs" / "modules.conf.xml"
GATEWAY = CONF / "sip_profiles" / "external" / "carrier.xml"
FS_README = ROOT / "freeswitch" / "README.md"
README = ROOT / "README.md"

# Every <param> mod_event_socket 1.10 reads (config() in mod_event_socket.c); anything else is ignored.
EVENT_SOCKET_PARAMS = {"listen-ip", "listen-port", "password", "apply-inbound-acl", "nat-map", "debug",
                       "stop-on-bind-error"}
# What the daemon's commands need: the Event Socket, the API commands (originate, uuid_*, status, fsctl),
# the applications queued on A (park, playback, multiset, sched_hangup, bridge, hangup), SIP, WAV files
# (prompts and recordings) and tone_stream:// (the default ring tone, the busy notice).
NEEDED_MODULES = {"mod_event_socket", "mod_commands", "mod_dptools", "mod_sofia", "mod_sndfile",
                  "mod_tone_stream"}


def params(path: Path, parent: str) -> dict[str, str]:
    node = ET.parse(path).getroot().find(parent)
    assert node is not None, f"{path.name} has no <{parent}>"
    return {p.get("name", ""): p.get("value", "") for p in node.findall("param")}


def test_every_file_is_xml_freeswitch_reads() -> None:
    for path in sorted(CONF.rglob("*.xml")):
        root = ET.parse(path).getroot()
        assert root.tag in ("configuration", "include"), f"{path}: root element <{root.tag}>"


def test_event_socket_params_are_ones_mod_event_socket_knows() -> None:
    unknown = sorted(set(params(EVENT_SOCKET, "settings")) - EVENT_SOCKET_PARAMS)
    assert not unknown, f"mod_event_socket 1.10 ignores {unknown}"


def test_event_socket_is_on_loopback_with_a_password_of_its_own() -> None:
    settings = params(EVENT_SOCKET, "settings")
    assert ipaddress.ip_address(settings["listen-ip"]).is_loopback
    assert settings["password"] and settings["password"] != "ClueCon"


def test_every_acl_the_event_socket_applies_is_defined_and_allows_only_loopback() -> None:
    lists = {node.get("name"): node for node in ET.parse(ACL).getroot().iter("list")}
    applied = [p.get("value") for p in ET.parse(EVENT_SOCKET).getroot().iter("param")
               if p.get("name") == "apply-inbound-acl"]
    assert applied, "event_socket.conf.xml applies no ACL"
    for name in applied:
        # An undefined list name is neither a CIDR nor a host: FreeSWITCH then refuses every connection.
        assert name in lists, f"ACL {name!r} is not defined in acl.conf.xml"
        acl = lists[name]
        assert acl.get("default") == "deny"
        for node in acl.findall("node"):
            if node.get("type") == "allow":
                net = ipaddress.ip_network(node.get("cidr", ""))
                assert net.network_address.is_loopback and net.broadcast_address.is_loopback, net


def test_the_event_socket_comes_up_once_its_port_is_free() -> None:
    """With stop-on-bind-error, a port still taken at start makes mod_event_socket give up for good
    (``prefs.done = 1``): FreeSWITCH then runs without an Event Socket until it is restarted. Without it,
    the module retries the bind every 100 ms and callbridge connects as soon as the port is free."""
    settings = params(EVENT_SOCKET, "settings")
    assert settings.get("stop-on-bind-error", "false").lower() not in ("true", "yes", "on", "1", "enabled")


def test_modules_conf_loads_what_the_daemon_uses() -> None:
    loaded = {node.get("module") for node in ET.parse(MODULES).getroot().iter("load")}
    assert loaded >= NEEDED_MODULES, f"missing {sorted(NEEDED_MODULES - loaded)}"
    # mod_http_cache is named (commented: only media_mode = "http" needs it).
    assert "mod_http_cache" in MODULES.read_text()


def test_the_gateway_is_the_one_the_dial_strings_name() -> None:
    root = ET.parse(GATEWAY).getroot()
    gateways = root.findall("gateway")
    assert [g.get("name") for g in gateways] == ["carrier"]
    names = {p.get("name") for p in gateways[0].findall("param")}
    assert {"proxy", "register"} <= names


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def test_the_readmes_real_freeswitch_steps_name_every_file_to_install() -> None:
    """event_socket.conf.xml applies the ``callbridge_esl`` ACL: installed without acl.conf.xml's list,
    FreeSWITCH refuses every Event Socket connection (callbridge's and fs_cli's alike)."""
    section = _section(README.read_text(), "Against a real FreeSWITCH")
    for path in sorted(CONF.rglob("*.xml")):
        assert path.name in section, f"README's 'Against a real FreeSWITCH' does not name {path.name}"


def _daemon_commands(text: str) -> list[list[str]]:
    """Every ``python -m daemon ...`` command in backquotes, with ``[...]`` options and ``...`` dropped."""
    commands = []
    for quoted in re.findall(r"`([^`]*python -m daemon [^`]*)`", text.replace("\n   ", " ")):
        words = shlex.split(re.sub(r"\[[^\]]*\]|\.\.\.", "", quoted))
        commands.append(words[words.index("daemon") + 1:])
    return commands


def test_the_connecting_steps_run_the_daemons_commands_on_the_services_config() -> None:
    """After ``systemctl start callbridge``, a command run without the service's ``--config`` reads
    ./state: an endpoint made there is not in the service's store, and check-config shows defaults."""
    from daemon.cli import _parser

    commands = _daemon_commands(_section(FS_README.read_text(), "Connecting callbridge"))
    assert commands
    for args in commands:
        parsed = _parser().parse_args(args)
        assert getattr(parsed, "config", None) == "/etc/callbridge/callbridge.toml", " ".join(args)


def test_fs_cli_commands_after_the_password_change_give_the_password() -> None:
    """fs_cli connects to the Event Socket with ClueCon unless told otherwise (-p or its own config file):
    once event_socket.conf.xml's password is in place, a bare ``fs_cli -x ...`` is refused."""
    steps = _section(FS_README.read_text(), "Connecting callbridge")
    after = steps[steps.index("set a long random password"):]
    calls = re.findall(r"`(fs_cli [^`]*)`", after)
    assert calls
    for call in calls:
        assert call.startswith("fs_cli -p "), call
    for path in (GATEWAY, MODULES):
        for call in re.findall(r"fs_cli [^'\n]*", path.read_text()):
            assert call.startswith("fs_cli -p "), f"{path.name}: {call}"


def test_the_http_media_step_names_every_setting_http_mode_needs() -> None:
    """FreeSWITCH on another host fetches ``media_base_url/media/<name>.wav``: the API must listen where
    it can reach it (``http_host`` is 127.0.0.1 by default) and let its address in (``media_route_allow``
    defaults to loopback and esl_host, which is 127.0.0.1 through an SSH tunnel); anything else is
    refused or a 404, and A hears nothing. Recordings are written by FreeSWITCH on its own host."""
    from daemon.config import FIELDS

    steps = _section(FS_README.read_text(), "Connecting callbridge")
    step = next(part for part in re.split(r"\n(?=\d\. )", steps) if "media_mode = \"http\"" in part)
    for name in ("media_mode", "media_base_url", "http_host", "media_route_allow"):
        assert name in FIELDS
        assert f"`{name}" in step, f"the http media step does not name {name}"
    assert "recording" in step
