"""systemd's notify protocol (sd_notify): READY, STOPPING, STATUS and WATCHDOG pings over $NOTIFY_SOCKET.

No dependency: it is one datagram per message. Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("callbridge.systemd")


def notify(message: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd; False when not running under systemd or the
    socket cannot be reached."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    # Like sd_notify(3), never the caller's failure: a stale NOTIFY_SOCKET (inherited from a shell that ran
    # under systemd) must not stop a start, or a stop before its last commit.
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        log.warning("systemd notify %r to %s failed: %s", message.split("\n")[0], env["NOTIFY_SOCKET"], exc)
        return False
    return True


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of WatchdogSec), or None when the watchdog is off."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000 / 2
