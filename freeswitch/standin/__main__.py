"""Run the stand-in: ``python -m freeswitch.standin --host 127.0.0.1 --port 8021 --password ClueCon --time-scale 1.0``."""

from __future__ import annotations

import argparse
import signal
import sys

import gevent
from gevent.event import Event

from .limits import DEFAULT_MAX_SESSIONS, DEFAULT_SPS
from .server import StandIn


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, listen, print one line, and run until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m freeswitch.standin", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8021)
    parser.add_argument("--password", default="ClueCon")
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--sps", type=int, default=DEFAULT_SPS,
                        help="sessions-per-second, refilled every real second (FreeSWITCH's default: %(default)s)")
    parser.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS,
                        help="max-sessions at once (FreeSWITCH's default: %(default)s)")
    parser.add_argument("--far-end-sessions", action="store_true",
                        help="count each far end as a session of this switch, as on the host that recorded the traces")
    args = parser.parse_args(argv)
    if args.time_scale <= 0:
        parser.error("--time-scale must be > 0")
    if args.sps <= 0:
        parser.error("--sps must be > 0")
    if args.max_sessions <= 0:
        parser.error("--max-sessions must be > 0")
    standin = StandIn(host=args.host, port=args.port, password=args.password, time_scale=args.time_scale,
                      sps=args.sps, max_sessions=args.max_sessions, far_end_sessions=args.far_end_sessions)
    try:
        standin.start()
    except OSError as e:
        print(f"freeswitch stand-in: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    print(f"freeswitch stand-in listening on {args.host}:{standin.port} (time scale {args.time_scale}, "
          f"{args.sps} sessions per second, {args.max_sessions} max)", flush=True)
    done = Event()
    gevent.signal_handler(signal.SIGTERM, done.set)
    gevent.signal_handler(signal.SIGINT, done.set)
    done.wait()
    standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
