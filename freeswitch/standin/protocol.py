"""ESL wire framing: parsing client messages and building the replies FreeSWITCH sends.

Client messages are a block of lines ended by a blank line; the first line is the command,
the following ``Name: value`` lines are headers, and a ``content-length`` header announces a body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

# Characters FreeSWITCH's switch_url_encode() escapes, plus every control and non-ASCII character.
_URL_UNSAFE = re.compile(r'[\x00-\x20\x7f-\U0010ffff"#%&+:;<=>?@\[\\\]^`{|}]')

AUTH_REQUEST = b"Content-Type: auth/request\n\n"
RUDE_REJECTION = b"Content-Type: text/rude-rejection\nContent-Length: 24\n\nAccess Denied, go away.\n"
DISCONNECT_TEXT = "Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"


def _escape(m: re.Match[str]) -> str:
    return "".join(f"%{b:02X}" for b in m.group(0).encode("utf-8"))


@lru_cache(maxsize=65536)
def url_encode(value: str) -> str:
    """Percent-encode a header value the way FreeSWITCH does for text/event-plain."""
    return _URL_UNSAFE.sub(_escape, value)


def url_decode(value: str) -> str:
    """Undo url_encode (used by tests and by header parsing of plain events)."""
    from urllib.parse import unquote

    return unquote(value)


@dataclass
class Message:
    """One client message: the command line, its headers (in order) and the optional body."""

    command: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: str = ""
    raw: str = ""

    def header(self, name: str, default: str | None = None) -> str | None:
        """Case-insensitive header lookup (FreeSWITCH accepts either case)."""
        low = name.lower()
        for key, value in self.headers:
            if key.lower() == low:
                return value
        return default


class MessageReader:
    """Incremental parser for the client side of the protocol."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[Message]:
        """Add received bytes; return every message completed by them."""
        self._buf += data
        out: list[Message] = []
        while True:
            msg = self._take()
            if msg is None:
                return out
            out.append(msg)

    def _take(self) -> Message | None:
        buf = self._buf
        # Skip blank lines between messages, as FreeSWITCH does.
        while buf.startswith(b"\n") or buf.startswith(b"\r\n"):
            buf = buf[1:] if buf.startswith(b"\n") else buf[2:]
        self._buf = buf
        idx = buf.find(b"\n\n")
        idx_crlf = buf.find(b"\r\n\r\n")
        if idx < 0 and idx_crlf < 0:
            return None
        if idx_crlf >= 0 and (idx < 0 or idx_crlf < idx):
            head, sep_len = buf[:idx_crlf], 4
            idx = idx_crlf
        else:
            head, sep_len = buf[:idx], 2
        lines = head.decode("utf-8", "replace").replace("\r\n", "\n").split("\n")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if ":" in line:
                key, _, value = line.partition(":")
                headers.append((key.strip(), value.strip()))
        length = 0
        for key, value in headers:
            if key.lower() == "content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = 0
        start = idx + sep_len
        if len(buf) < start + length:
            return None
        body = buf[start : start + length].decode("utf-8", "replace")
        raw = buf[: start + length].decode("utf-8", "replace")
        self._buf = buf[start + length :]
        return Message(command=lines[0].strip(), headers=headers, body=body, raw=raw)


def command_reply(text: str, extra: list[tuple[str, str]] | None = None) -> bytes:
    """A ``command/reply`` message (Content-Type first, then Reply-Text)."""
    out = f"Content-Type: command/reply\nReply-Text: {text}\n"
    for key, value in extra or []:
        out += f"{key}: {value}\n"
    return (out + "\n").encode("utf-8")


def api_response(body: str) -> bytes:
    """An ``api/response`` message carrying body (Content-Length counts bytes)."""
    data = body.encode("utf-8")
    return b"Content-Type: api/response\nContent-Length: %d\n\n" % len(data) + data


def disconnect_notice() -> bytes:
    """The goodbye notice FreeSWITCH sends before closing after exit or a failed auth."""
    data = DISCONNECT_TEXT.encode()
    return b"Content-Type: text/disconnect-notice\nContent-Length: %d\n\n" % len(data) + data


def linger_notice(uuid: str, channel_name: str, linger: bool) -> bytes:
    """The notice sent to a myevents connection when its channel hangs up."""
    if linger:
        head = (
            f"Content-Type: text/disconnect-notice\nControlled-Session-UUID: {uuid}\n"
            f"Content-Disposition: linger\nChannel-Name: {channel_name}\nLinger-Time: -1\nContent-Length: 0\n\n"
        )
        return head.encode()
    text = DISCONNECT_TEXT.encode()
    head = (
        f"Content-Type: text/disconnect-notice\nControlled-Session-UUID: {uuid}\n"
        f"Content-Disposition: disconnect\nContent-Length: {len(text)}\n\n"
    )
    return head.encode() + text
