"""SwitchLink's supervision against a scripted fake FreeSWITCH over real loopback TCP."""

from __future__ import annotations

import pytest
from gevent.event import Event

from daemon.config import Settings, SwitchAddress
from daemon.ops.metrics import Metrics
from daemon.switch.link import SwitchLink
from tests.fake_esl_server import FakeEslServer, FakeSession, api_response, reply

pytestmark = pytest.mark.timeout(20)

STATUS = ("1 session(s) - peak 1, last 5min 1 \n0 session(s) per Sec out of max 30, peak 1, last 5min 1 \n"
          "1000 session(s) max\n")


def test_a_switch_gone_right_after_the_connection_reads_is_not_reported_connected() -> None:
    # FreeSWITCH shutting down as we connect: it answers our last read, then closes. The reader hears
    # the close before the connect goes on; that drop must count as a failed connect (backoff), never as
    # a connection handed to the calls.
    tried_again = Event()

    def script(session: FakeSession) -> None:
        if len(server.sessions) >= 2:
            tried_again.set()
        session.handshake()
        for answer in (reply("+OK event listener enabled plain"), api_response("core-1"),
                       api_response("+OK sessions per second: 30\n"), api_response("+OK max sessions: 1000\n")):
            session.read_command()
            session.send(answer)
        session.read_command()
        session.send(api_response(STATUS))
        session.close()

    server = FakeEslServer(script).start()
    told: list[bool] = []

    def on_connected(link: SwitchLink, _restarted: bool) -> None:
        told.append(link.conn is not None and link.conn.connected)

    link = SwitchLink(SwitchAddress("127.0.0.1", server.port, "ClueCon"), Settings(), Metrics(),
                      on_connected=on_connected, on_lost=lambda _link, _away: None)
    link.start()
    try:
        assert tried_again.wait(10)
        assert False not in told
    finally:
        link.stop()
        server.stop()
