"""Random (version 4) UUIDs for FreeSWITCH: legs, background jobs and the apps queued on A.

A call takes seven or so (its two legs, its originate's job, each app queued on A). ``uuid.uuid4()`` makes
each from its own ``os.urandom(16)``: a system call that also lets go of the GIL, so on the loop thread it
hands the interpreter to the store's writer thread whenever that one wants it. :func:`new_uuid` gives the
same UUIDs (16 bytes from ``os.urandom``, version and variant bits set as ``uuid4`` sets them: as
unpredictable and as unique) from one ``os.urandom`` per :data:`BATCH` of them.

The batch is a deque (``popleft`` is atomic, so two threads never get the same one) and is emptied in a
forked child, which must not hand out the parent's.
"""

from __future__ import annotations

import collections
import os

BATCH = 64

_ready: collections.deque[str] = collections.deque()


def uuid_text(h: str, version: int) -> str:
    """The UUID of the 32 hex digits ``h`` as ``str(uuid.UUID(...))`` writes it once ``uuid.UUID`` has set
    ``version`` (4: uuid4, 5: uuid5): the version nibble becomes ``version``, the variant's top two bits 10
    (the nibble's low two bits stay). Without building UUID objects."""
    return f"{h[:8]}-{h[8:12]}-{version}{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


def _refill() -> None:
    raw = os.urandom(16 * BATCH).hex()
    _ready.extend(uuid_text(raw[i:i + 32], 4) for i in range(0, len(raw), 32))


def new_uuid() -> str:
    """A fresh random UUID, as ``str(uuid.uuid4())``."""
    while True:
        try:
            return _ready.popleft()
        except IndexError:
            _refill()


os.register_at_fork(after_in_child=_ready.clear)
