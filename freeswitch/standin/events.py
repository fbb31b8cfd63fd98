"""FreeSWITCH events: ordered headers, an optional body, and their plain/json/xml serialisations."""

from __future__ import annotations

import itertools
import json
import socket
import time
from dataclasses import dataclass, field

from .protocol import url_encode

# Event names FreeSWITCH knows (a subset is enough to validate `event` keywords).
KNOWN_EVENTS = frozenset(
    ["CUSTOM", "CLONE", "CHANNEL_CREATE", "CHANNEL_DESTROY", "CHANNEL_STATE", "CHANNEL_CALLSTATE", "CHANNEL_ANSWER", "CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HOLD", "CHANNEL_UNHOLD", "CHANNEL_BRIDGE", "CHANNEL_UNBRIDGE", "CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA", "CHANNEL_OUTGOING", "CHANNEL_PARK", "CHANNEL_UNPARK", "CHANNEL_APPLICATION", "CHANNEL_ORIGINATE", "CHANNEL_UUID", "API", "LOG", "INBOUND_CHAN", "OUTBOUND_CHAN", "STARTUP", "SHUTDOWN", "PUBLISH", "UNPUBLISH", "TALK", "NOTALK", "SESSION_CRASH", "MODULE_LOAD", "MODULE_UNLOAD", "DTMF", "MESSAGE", "PRESENCE_IN", "NOTIFY_IN", "PRESENCE_OUT", "PRESENCE_PROBE", "MESSAGE_WAITING", "MESSAGE_QUERY", "ROSTER", "CODEC", "BACKGROUND_JOB", "DETECTED_SPEECH", "DETECTED_TONE", "PRIVATE_COMMAND", "HEARTBEAT", "TRAP", "ADD_SCHEDULE", "DEL_SCHEDULE", "EXE_SCHEDULE", "RE_SCHEDULE", "RELOADXML", "NOTIFY", "PHONE_FEATURE", "PHONE_FEATURE_SUBSCRIBE", "SEND_MESSAGE", "RECV_MESSAGE", "REQUEST_PARAMS", "CHANNEL_DATA", "GENERAL", "COMMAND", "SESSION_HEARTBEAT", "CLIENT_DISCONNECTED", "SERVER_DISCONNECTED", "SEND_INFO", "RECV_INFO", "RECV_RTCP_MESSAGE", "SEND_RTCP_MESSAGE", "CALL_SECURE", "NAT", "RECORD_START", "RECORD_STOP", "PLAYBACK_START", "PLAYBACK_STOP", "CALL_UPDATE", "FAILURE", "SOCKET_DATA", "MEDIA_BUG_START", "MEDIA_BUG_STOP", "CONFERENCE_DATA_QUERY", "CONFERENCE_DATA", "CALL_SETUP_REQ", "CALL_SETUP_RESULT", "CALL_DETAIL", "DEVICE_STATE", "TEXT", "SHUTDOWN_REQUESTED", "ALL"]
)


@dataclass
class Event:
    """One event: headers in FreeSWITCH's order (duplicates allowed) and an optional body."""

    name: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: str | None = None
    _cache: dict[str, bytes] = field(default_factory=dict, repr=False)

    def add(self, key: str, value: object) -> None:
        """Append a header (values are stored as text)."""
        self.headers.append((key, str(value)))

    def get(self, key: str, default: str | None = None) -> str | None:
        """First value of a header."""
        for k, v in self.headers:
            if k == key:
                return v
        return default

    @property
    def subclass(self) -> str | None:
        """Event-Subclass of CUSTOM events."""
        return self.get("Event-Subclass")

    def frame(self, fmt: str) -> bytes:
        """The whole ESL message for this event in format plain|json|xml (cached per format)."""
        cached = self._cache.get(fmt)
        if cached is None:
            if fmt == "json":
                inner, ctype = self._json(), "text/event-json"
            elif fmt == "xml":
                inner, ctype = self._xml(), "text/event-xml"
            else:
                inner, ctype = self._plain(), "text/event-plain"
            cached = b"Content-Length: %d\nContent-Type: %s\n\n" % (len(inner), ctype.encode()) + inner
            self._cache[fmt] = cached
        return cached

    def _plain(self) -> bytes:
        lines = [f"{k}: {url_encode(v)}\n" for k, v in self.headers]
        if self.body is not None:
            body = self.body.encode("utf-8")
            return ("".join(lines) + f"Content-Length: {len(body)}\n\n").encode("utf-8") + body
        return ("".join(lines) + "\n").encode("utf-8")

    def _json(self) -> bytes:
        # Built by hand: FreeSWITCH's cJSON output keeps duplicate keys (e.g. Hangup-Cause twice).
        parts = [f"{json.dumps(k)}:{json.dumps(v, ensure_ascii=False)}" for k, v in self.headers]
        if self.body is not None:
            parts.append(f'"Content-Length":"{len(self.body.encode("utf-8"))}"')
            parts.append(f'"_body":{json.dumps(self.body, ensure_ascii=False)}')
        return ("{" + ",".join(parts) + "}").encode("utf-8")

    def _xml(self) -> bytes:
        from xml.sax.saxutils import escape

        rows = "".join(f"    <{k}>{escape(url_encode(v))}</{k}>\n" for k, v in self.headers)
        out = f"<event>\n  <headers>\n{rows}  </headers>\n"
        if self.body is not None:
            out += f"  <body>{escape(self.body)}</body>\n"
        return (out + "</event>").encode("utf-8")


class EventFactory:
    """Stamps the common header block (Core-UUID, dates, sequence) on new events."""

    def __init__(self, core_uuid: str, hostname: str | None = None) -> None:
        self.core_uuid = core_uuid
        self.hostname = hostname or socket.gethostname().split(".")[0]
        self._seq = itertools.count(1)

    def new(self, name: str, calling: tuple[str, str, int] = ("switch_event.c", "switch_event_fire", 1)) -> Event:
        """A new event with the header prefix every FreeSWITCH event carries."""
        now = time.time()
        ev = Event(name)
        h = ev.headers
        h.append(("Event-Name", name))
        h.append(("Core-UUID", self.core_uuid))
        h.append(("FreeSWITCH-Hostname", self.hostname))
        h.append(("FreeSWITCH-Switchname", self.hostname))
        h.append(("FreeSWITCH-IPv4", "127.0.0.1"))
        h.append(("FreeSWITCH-IPv6", "::1"))
        h.append(("Event-Date-Local", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))))
        h.append(("Event-Date-GMT", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))))
        h.append(("Event-Date-Timestamp", str(int(now * 1_000_000))))
        h.append(("Event-Calling-File", calling[0]))
        h.append(("Event-Calling-Function", calling[1]))
        h.append(("Event-Calling-Line-Number", str(calling[2])))
        h.append(("Event-Sequence", str(next(self._seq))))
        return ev
