"""Damp clients that keep presenting bad tokens: per client address, a budget of failed authentications.

Only failures are counted and only failures are refused: a valid token is always served, even from an
address over its limit, so one misbehaving client behind a shared NAT or proxy cannot lock the others
out. (Tokens are 256-bit: guessing is hopeless anyway; the limit keeps a broken or hostile client from
costing database look-ups and log lines without end.)

The budget is a generic cell rate (GCRA): ``per_window`` failures at once, then one more every
``window / per_window`` seconds. Each address costs one float, whatever its rate, and the table keeps
at most ``max_addresses`` of them, forgetting the least recently failing first. IPv6 clients are
counted per /64, the block one subscriber usually holds.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable


def client_key(address: str) -> str:
    """The unit a limit applies to: the IPv4 address, or the /64 of an IPv6 address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AuthFailureLimiter:
    """Failed authentications per client address: a burst of ``per_window``, then the window's rate."""

    def __init__(self, per_window: int, window: float = 60.0, *, max_addresses: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_window = per_window
        self.window = window
        self.max_addresses = max_addresses
        self.clock = clock
        self.interval = window / per_window if per_window > 0 else 0.0
        # Per address: when its whole budget is back. Each failure pushes it one interval later; the
        # budget is spent while it lies more than (window - interval) ahead of now.
        self._whole_at: OrderedDict[str, float] = OrderedDict()

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may fail again, or None if it may now. 0 per window = no limit."""
        if self.per_window <= 0:
            return None
        key = client_key(address)
        whole_at = self._whole_at.get(key)
        if whole_at is None:
            return None
        now = self.clock()
        if whole_at <= now:
            del self._whole_at[key]
            return None
        wait = whole_at - now - (self.window - self.interval)
        return max(1, math.ceil(wait)) if wait > 1e-6 else None  # (float sums of interval)

    def fail(self, address: str) -> None:
        """Record one failed authentication from ``address``."""
        if self.per_window <= 0:
            return
        key = client_key(address)
        now = self.clock()
        whole_at = max(self._whole_at.pop(key, now), now) + self.interval
        self._whole_at[key] = whole_at  # re-inserted last: the least recently failing go first
        while len(self._whole_at) > self.max_addresses:
            self._whole_at.popitem(last=False)

    def refund(self, address: str) -> None:
        """Take back one failure recorded in advance for ``address`` (the attempt succeeded after all)."""
        key = client_key(address)
        whole_at = self._whole_at.get(key)
        if whole_at is None:
            return
        whole_at -= self.interval
        if whole_at <= self.clock():
            del self._whole_at[key]
        else:
            self._whole_at[key] = whole_at

    def forget(self, address: str) -> None:
        """Drop the failures recorded for ``address`` (a key: an address, or an account after a success)."""
        self._whole_at.pop(client_key(address), None)

    def __len__(self) -> int:
        return len(self._whole_at)
