"""The FreeSWITCH stand-in with the bench's timing tap: ``python -m bench.switch --port 0 --time-scale S
[--sps N] [--max-sessions N]`` (the switch's session limits, as switch.conf.xml sets them).

The stand-in itself is unchanged; this subclass only notes, per A leg, when its ``bgapi originate``
arrived (wall clock, to compare with ``due_at``), when the stand-in answered it (``Channel.answered_at``,
just before CHANNEL_ANSWER is queued to the connections) and when the first ``sendmsg`` for it arrived.
Monotonic times share one clock across the processes of this machine. ``api standin benchtap`` returns
them as JSON; ``api standin benchtap reset`` forgets them.

Those two times include the stand-in's own delays at both ends: its loop (Python, every call's timers)
queues CHANNEL_ANSWER and later reads the ``sendmsg``, on the same two cores as the daemon. To time the
daemon alone it also notes, on the wall clock, when CHANNEL_ANSWER's bytes were handed to the daemon's
socket (``answer_sent``) and when the kernel received the first ``sendmsg`` (``sendmsg_received``: the
socket's receive timestamp, ``SO_TIMESTAMPNS``, of the last segment of the read that brought it, so never
early). In between: the daemon's reading, its wake-up and queueing on its loop, its handling, its write.

It keeps no other command log (the stock ``commands`` list would grow by ~15 entries per call).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import struct
import sys
import time

import gevent
from gevent.event import Event

from freeswitch.standin import StandIn
from freeswitch.standin.limits import DEFAULT_MAX_SESSIONS, DEFAULT_SPS

ORIGINATION_UUID = re.compile(r"origination_uuid=([0-9a-fA-F-]{36})")
ANSWERED_UUID = re.compile(rb"Event-Name: CHANNEL_ANSWER\n(?:[^\n]+\n)*?Unique-ID: ([0-9a-fA-F-]{36})\n")
# Linux's receive timestamps (asm-generic/socket.h; Python's socket module does not name them).
SO_TIMESTAMPNS = SCM_TIMESTAMPNS = 35
TIMESPEC = struct.Struct("@qq")


class TappedStandIn(StandIn):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.originated: dict[str, float] = {}
        self.first_sendmsg: dict[str, float] = {}
        self.answer_sent: dict[str, float] = {}
        self.sendmsg_received: dict[str, float] = {}
        self._received_at: dict[int, float] = {}  # connection -> kernel time of its last read's data

    def receive(self, conn_id: int, sock: socket.socket) -> bytes:
        if conn_id not in self._received_at:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        data, ancillary, _flags, _address = sock.recvmsg(65536, socket.CMSG_SPACE(TIMESPEC.size))
        received = time.time()
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(value) >= TIMESPEC.size:
                seconds, nanoseconds = TIMESPEC.unpack_from(value)
                received = seconds + nanoseconds / 1e9
        self._received_at[conn_id] = received
        return data

    def sent(self, conn_id: int, data: bytes) -> None:
        if b"CHANNEL_ANSWER" not in data:
            return
        now = time.time()
        for match in ANSWERED_UUID.finditer(data):
            uuid = match.group(1).decode()
            if uuid in self.originated:  # A legs only
                self.answer_sent.setdefault(uuid, now)

    def record_command(self, conn_id: int, text: str) -> None:
        if text.startswith("bgapi originate"):
            match = ORIGINATION_UUID.search(text)
            if match:
                self.originated[match.group(1)] = time.time()
        elif text.startswith("sendmsg "):
            line = text.split("\n", 1)[0].split()
            if len(line) > 1 and line[1] not in self.first_sendmsg:
                self.first_sendmsg[line[1]] = time.monotonic()
                self.sendmsg_received[line[1]] = self._received_at.get(conn_id, time.time())

    def _introspect(self, args: str) -> str:
        parts = args.split()
        if parts[:1] == ["benchtap"]:
            if parts[1:2] == ["reset"]:
                for noted in (self.originated, self.first_sendmsg, self.answer_sent, self.sendmsg_received):
                    noted.clear()
                return "+OK\n"
            legs = {}
            for uuid in set(self.originated) | set(self.first_sendmsg):
                ch = self.channel(uuid)
                answered = getattr(ch, "answered_at", None) if ch is not None else None
                legs[uuid] = {
                    "originate_wall": self.originated.get(uuid),
                    "answered": answered if answered else None,
                    "first_sendmsg": self.first_sendmsg.get(uuid),
                    "answer_sent": self.answer_sent.get(uuid),
                    "sendmsg_received": self.sendmsg_received.get(uuid),
                }
            return json.dumps({"a": legs}) + "\n"
        return super()._introspect(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.switch")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--time-scale", type=float, default=0.001)
    parser.add_argument("--sps", type=int, default=DEFAULT_SPS)
    parser.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS)
    args = parser.parse_args(argv)
    standin = TappedStandIn(host="127.0.0.1", port=args.port, password="ClueCon", time_scale=args.time_scale,
                            sps=args.sps, max_sessions=args.max_sessions)
    standin.start()
    print(
        f"freeswitch stand-in listening on 127.0.0.1:{standin.port} (time scale {args.time_scale}, "
        f"{args.sps} sessions per second, {args.max_sessions} max)",
        flush=True,
    )
    done = Event()
    gevent.signal_handler(signal.SIGTERM, done.set)
    gevent.signal_handler(signal.SIGINT, done.set)
    done.wait()
    standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
