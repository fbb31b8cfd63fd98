"""The switch's session limits: sessions per second and max sessions, as FreeSWITCH 1.10.12 counts them.

Every session the core creates (an originate's leg, the bridge app's B leg) first asks for admission,
in ``switch_core_session_request_uuid`` (switch_core_session.c)::

    sps = --runtime.sps;                               /* the budget drops before the check */
    if (sps <= 0) -> refused ("Throttle Error!")
    if (session_count + 1 > session_limit) -> refused ("Over Session Limit!")

so a limit of N admits N - 1 sessions per tick, and a refused request spends budget too (it only
matters until the next tick). Once a second the soft timer (switch_time.c) refills the budget:
``sps_last = sps_total - sps; sps = sps_total``. ``fsctl sps N`` sets ``sps_total`` only, so a new
rate applies from the next tick; ``fsctl max_sessions N`` applies at once. Session ids (``N
session(s) since startup`` is the next id minus one) count admitted sessions only.

sofia (``sofia_outgoing_channel``) asks for the session before it even looks at the gateway, and
answers a refusal with DESTINATION_OUT_OF_ORDER: nothing is created, no CHANNEL_CREATE is fired.

The tick is one *real* second whatever the stand-in's time scale: the daemon reads "30 sessions
per second" and paces in real time, so the stand-in enforces exactly what it announces.

The peaks `status` prints are kept per tick, the "last 5min" ones started over every 300 ticks (the
code that updates them was not among the sources read; they inform, nothing depends on them).
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_SPS = 30  # switch.conf.xml sessions-per-second
DEFAULT_MAX_SESSIONS = 1000  # switch.conf.xml max-sessions
TICK = 1.0  # real seconds between refills
FIVE_MINUTES = 300  # ticks over which the "last 5min" peaks are kept


def int32(value: int) -> int:
    """A C uint32 printed with %d, as FreeSWITCH prints the session limit."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


class SessionLimits:
    """Admission of new sessions, the once-a-second refill, and the figures `status` prints."""

    def __init__(self, sps: int = DEFAULT_SPS, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sps_total = sps
        self.budget = sps  # runtime.sps: what is left of this tick
        self.session_limit = max_sessions & 0xFFFFFFFF
        self.count = 0  # sessions that exist now
        self.next_id = 1
        self.sps_last = 0
        self.sps_peak = 0
        self.sps_peak_fivemin = 0
        self.sessions_peak = 0
        self.sessions_peak_fivemin = 0
        self.ticks = 0
        self.throttled = 0  # refusals over the per-second budget ("Throttle Error!")
        self.over_limit = 0  # refusals over max sessions ("Over Session Limit!")
        self._clock = clock
        self._next_tick = clock() + TICK

    # ----- admission -------------------------------------------------------------------------
    def admit(self) -> int | None:
        """A new session's id, or None when the switch refuses it."""
        self.catch_up()
        self.budget -= 1
        if self.budget <= 0:
            self.throttled += 1
            return None
        if self.count + 1 > self.session_limit:
            self.over_limit += 1
            return None
        self.count += 1
        self.sessions_peak = max(self.sessions_peak, self.count)
        self.sessions_peak_fivemin = max(self.sessions_peak_fivemin, self.count)
        session_id = self.next_id
        self.next_id += 1
        return session_id

    def release(self) -> None:
        """A session was destroyed."""
        self.count = max(0, self.count - 1)

    # ----- fsctl -------------------------------------------------------------------------------
    def set_sps(self, value: int) -> int:
        """``fsctl sps [N]``: N > 0 becomes the rate from the next tick; returns the rate."""
        if value > 0:
            self.sps_total = value
        return self.sps_total

    def set_max_sessions(self, value: int) -> int:
        """``fsctl max_sessions [N]``: any N but 0 (taken as a C uint32) is the new limit at once."""
        if value:
            self.session_limit = value & 0xFFFFFFFF
        return int32(self.session_limit)

    # ----- the clock -----------------------------------------------------------------------------
    def catch_up(self) -> None:
        """Apply every tick that has come since the last look."""
        now = self._clock()
        while now >= self._next_tick:
            self._refill()
            self._next_tick += TICK

    def _refill(self) -> None:
        if self.ticks % FIVE_MINUTES == 0 and self.ticks:
            self.sps_peak_fivemin = 0
            self.sessions_peak_fivemin = self.count
        self.ticks += 1
        self.sps_last = self.sps_total - self.budget
        self.sps_peak = max(self.sps_peak, self.sps_last)
        self.sps_peak_fivemin = max(self.sps_peak_fivemin, self.sps_last)
        self.budget = self.sps_total

    # ----- what `status` and HEARTBEAT say ---------------------------------------------------------
    def status_lines(self) -> str:
        """The four session lines of ``api status`` (trailing spaces as FreeSWITCH writes them)."""
        self.catch_up()
        return (
            f"{self.next_id - 1} session(s) since startup\n"
            f"{self.count} session(s) - peak {self.sessions_peak}, last 5min {self.sessions_peak_fivemin} \n"
            f"{self.sps_last} session(s) per Sec out of max {self.sps_total}, peak {self.sps_peak}, "
            f"last 5min {self.sps_peak_fivemin} \n"
            f"{int32(self.session_limit)} session(s) max\n"
        )

    def heartbeat_headers(self) -> list[tuple[str, int]]:
        """The session headers of a HEARTBEAT event, printed ``%u`` (Session-Per-Sec is what is left of
        this tick's budget)."""
        self.catch_up()
        values = [
            ("Session-Count", self.count), ("Max-Sessions", self.session_limit),
            ("Session-Per-Sec", self.budget), ("Session-Per-Sec-Last", self.sps_last),
            ("Session-Per-Sec-Max", self.sps_peak), ("Session-Per-Sec-FiveMin", self.sps_peak_fivemin),
            ("Session-Since-Startup", self.next_id - 1), ("Session-Peak-Max", self.sessions_peak),
            ("Session-Peak-FiveMin", self.sessions_peak_fivemin),
        ]
        return [(name, value & 0xFFFFFFFF) for name, value in values]

    def describe(self) -> dict[str, int]:
        """The counters, for ``api standin limits`` (refusals since start included)."""
        self.catch_up()
        return {"sps": self.sps_total, "max_sessions": int32(self.session_limit), "budget": self.budget,
                "sessions": self.count, "throttled": self.throttled, "over_limit": self.over_limit,
                "ticks": self.ticks}
