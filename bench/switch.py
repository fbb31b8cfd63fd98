"""The FreeSWITCH stand-in with the bench's timing tap: ``python -m bench.switch --port 0 --time-scale S
[--sps N] [--max-sessions N]`` (the switch's session limits, as switch.conf.xml sets them).

The stand-in itself is unchanged; this subclass only notes, per A leg, when its ``bgapi originate``
arrived (wall clock, to compare with ``due_at``), when the stand-in answered it (``Channel.answered_at``,
just before CHANNEL_ANSWER is queued to the connections) and when the first ``sendmsg`` for it arrived.
Monotonic times share one clock across the processes of this machine. ``api standin benchtap`` returns
them as JSON; ``api standin benchtap reset`` forgets them.

It keeps no other command log (the stock ``commands`` list would grow by ~15 entries per call).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time

import gevent
from gevent.event import Event

from freeswitch.standin import StandIn
from freeswitch.standin.limits import DEFAULT_MAX_SESSIONS, DEFAULT_SPS

ORIGINATION_UUID = re.compile(r"origination_uuid=([0-9a-fA-F-]{36})")


class TappedStandIn(StandIn):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.originated: dict[str, float] = {}
        self.first_sendmsg: dict[str, float] = {}

    def record_command(self, conn_id: int, text: str) -> None:
        if text.startswith("bgapi originate"):
            match = ORIGINATION_UUID.search(text)
            if match:
                self.originated[match.group(1)] = time.time()
        elif text.startswith("sendmsg "):
            line = text.split("\n", 1)[0].split()
            if len(line) > 1 and line[1] not in self.first_sendmsg:
                self.first_sendmsg[line[1]] = time.monotonic()

    def _introspect(self, args: str) -> str:
        parts = args.split()
        if parts[:1] == ["benchtap"]:
            if parts[1:2] == ["reset"]:
                self.originated.clear()
                self.first_sendmsg.clear()
                return "+OK\n"
            legs = {}
            for uuid in set(self.originated) | set(self.first_sendmsg):
                ch = self.channel(uuid)
                answered = getattr(ch, "answered_at", None) if ch is not None else None
                legs[uuid] = {
                    "originate_wall": self.originated.get(uuid),
                    "answered": answered if answered else None,
                    "first_sendmsg": self.first_sendmsg.get(uuid),
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
