"""An event never lands on the wrong call, whatever text its other headers carry.

tests/test_esl_parsing.py proves the framer and header parsing (splits anywhere, encoded newlines, bad
UTF-8, huge bodies). This goes one step further, to the engine's routing: events for one call whose
variables (a caller ID name, a SIP header, anything a far end controls) hold ``%0AUnique-ID: <another
call's leg>``, ``Job-UUID: ...`` or ``Event-Name: ...``, fed to the real framer in random pieces, are
delivered to that call's sequence only.
"""

from __future__ import annotations

import uuid
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.calls.records import CallRecords
from daemon.config import load_settings
from daemon.ops.metrics import Metrics
from daemon.switch.engine import Engine
from daemon.switch.esl import EslFramer
from tests.fake_esl_server import event_plain
from tests.robustness.helpers import FIGURES

MINE_A, MINE_B, MINE_JOB = (str(uuid.UUID(int=n)) for n in (1, 2, 3))
THEIRS_A, THEIRS_B, THEIRS_JOB = (str(uuid.UUID(int=n)) for n in (4, 5, 6))


class Inbox:
    def __init__(self) -> None:
        self.got: list[Any] = []

    def deliver(self, item: Any) -> None:
        self.got.append(item)


FORGERIES = [f"\nUnique-ID: {THEIRS_A}", f"%0AUnique-ID: {THEIRS_B}", f"\nJob-UUID: {THEIRS_JOB}\n",
             "\nEvent-Name: BACKGROUND_JOB", f"\r\nUnique-ID: {THEIRS_A}\r\n\r\n", "\n\nContent-Length: 5\n\n",
             f"Unique-ID: {THEIRS_A}", "%", "é☎", "\x00"]
VALUES = st.lists(st.one_of(st.sampled_from(FORGERIES), st.text(max_size=8)), max_size=6).map("".join)
NAMES = st.sampled_from(["variable_sip_from_display", "Caller-Caller-ID-Name", "variable_x", "Other-Leg-Unique-ID",
                         "variable_sip_h_X-Evil", "Application-Data"])


@settings(max_examples=300, deadline=None, database=None)
@given(kind=st.sampled_from(["CHANNEL_ANSWER", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_EXECUTE_COMPLETE",
                             "BACKGROUND_JOB"]),
       leg=st.sampled_from([MINE_A, MINE_B]), extra=st.dictionaries(NAMES, VALUES, max_size=4),
       body=st.sampled_from([b"", f"+OK {THEIRS_A}\nUnique-ID: {THEIRS_A}\n".encode()]),
       cuts=st.lists(st.integers(0, 4000), max_size=10))
def test_forged_headers_in_values_never_reroute_an_event(tmp_path_factory: Any, kind: str, leg: str,
                                                         extra: dict[str, str], body: bytes, cuts: list[int]) -> None:
    settings_ = load_settings(environ={}, state_dir=str(tmp_path_factory.getbasetemp() / "routing"))
    engine = Engine(settings_, CallRecords(Metrics())).links[0]
    mine, theirs = Inbox(), Inbox()
    for key in (MINE_A, MINE_B, MINE_JOB):
        engine.route(key, mine)  # type: ignore[arg-type]
    for key in (THEIRS_A, THEIRS_B, THEIRS_JOB):
        engine.route(key, theirs)  # type: ignore[arg-type]
    headers = {"Event-Name": kind, **({"Job-UUID": MINE_JOB} if kind == "BACKGROUND_JOB" else {"Unique-ID": leg}),
               **extra}
    stream = event_plain(headers, body if kind == "BACKGROUND_JOB" else b"") + event_plain({"Event-Name": "HEARTBEAT"})
    framer = EslFramer()
    start = 0
    for cut in sorted({c for c in cuts if c < len(stream)}) + [len(stream)]:
        for event in framer.feed(stream[start:cut]):
            engine._on_event(event)
        start = cut
    FIGURES["forged-header events routed"] += 1
    assert theirs.got == []
    assert len(mine.got) == 1
    event = mine.got[0]
    assert event.name == kind
    assert (event.get("Job-UUID") if kind == "BACKGROUND_JOB" else event.uuid) == (
        MINE_JOB if kind == "BACKGROUND_JOB" else leg)
    for name, value in extra.items():
        assert event.get(name) == value  # the forged text stays inside its own value
