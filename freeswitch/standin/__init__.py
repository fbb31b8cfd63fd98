"""A FreeSWITCH Event Socket stand-in that follows the callbridge test number plan.

It speaks mod_event_socket's inbound protocol byte for byte as FreeSWITCH 1.10.12 does in the
recordings under ``shared/esl-traces`` (auth, api/bgapi, event plain|json|xml, filters, myevents,
sendmsg) and simulates the far ends of ``sofia/gateway/carrier/<number>`` with the number plan
(the 8th digit of ``1555000Dxxx``; anything else is a 404). Every plan duration, file length and
timeout is multiplied by ``time_scale``.

Embedded (tests)::

    sw = StandIn(host="127.0.0.1", port=0, password="ClueCon", time_scale=0.01).start()
    sw.port, sw.core_uuid, sw.commands, sw.channel(uuid), sw.channels_live(), sw.heard(uuid)
    sw.wait_for(predicate, timeout), sw.far_end_hangup(uuid), sw.send_dtmf(uuid, "12#")
    sw.drop_connections(); sw.hang(seconds); sw.restart(); sw.refuse_connections(True)
    sw.slow_replies(seconds); sw.fault_after(matches, fault); sw.stop()

Standalone: ``python -m freeswitch.standin --host 127.0.0.1 --port 8021 --password ClueCon
--time-scale 1.0 [--sps 30] [--max-sessions 1000] [--far-end-sessions]`` prints ``freeswitch
stand-in listening on HOST:PORT (time scale X, N sessions per second, M max)``.

Over the socket, ``api standin heard <uuid>`` / ``channel <uuid>`` / ``channels`` / ``commands`` /
``limits`` return JSON, and ``api standin far_end_hangup <uuid>`` / ``dtmf <uuid> <digits>`` act as
the far end.

Session limits (limits.py; traces 17/17b): like FreeSWITCH, at most ``sps`` (30) new sessions a second
and ``max_sessions`` (1000) at once; ``fsctl sps [N]``, ``fsctl max_sessions [N]``, ``fsctl last_sps``
and the ``status`` lines read and change them (a restart goes back to the configured values). Every
leg created counts, the originate's and the bridge app's B leg alike; a leg refused a session is
never created: ``-ERR DESTINATION_OUT_OF_ORDER`` and no event for its uuid, or for the bridge app
``originate_disposition`` DESTINATION_OUT_OF_ORDER / ``DIALSTATUS`` INVALIDARGS on A. The per-second
budget is refilled every *real* second whatever the time scale (the clients pace in real time from
what the switch announces). ``far_end_sessions=True`` also counts each far end as a session of the
same switch, as on the host that recorded the traces: a far end refused its session answers 503
and the leg ends NORMAL_TEMPORARY_FAILURE.

What a leg heard (``sw.heard(uuid)``): what the *person on that leg* heard, oldest first, as
``{"start", "end", "kind", "source"}`` with times in plan seconds since the leg was created
(``end`` is None while it lasts). Kinds:

* ``ringing``   their phone is ringing (not answered yet); nothing is sent to them
* ``silence``   answered, nothing played (parked, or between applications)
* ``file``      a played file or URL; source = its path
* ``tone``      a ``tone_stream://`` playback; source = the spec (``silence_stream://`` is heard as ``silence``)
* ``ringback``  ringback played while a bridge rings the other party; source = the ``ringback`` /
  ``transfer_ringback`` value (file looped, or tone)
* ``early_media`` the other party's early media passed through during a bridge (only without
  ``ignore_early_media``); source = that leg's uuid
* ``bridge``    connected to another leg and hearing its person; source = that leg's uuid

So the engine's call reads: A ``ringing`` → ``file`` prompt → ``ringback`` dialtone file from
when B was dialled until B answered → ``bridge`` B. Silent gaps under 2 ms are not recorded.
``Channel.sent`` is the other direction, what the far-end person sends (``silence``, ``tone``
such as plan 1's 440 Hz, ``early_media`` such as plan 7's 523 Hz).

Recordings (``record_session``, ``uuid_record``) are real 8 kHz WAV files rebuilt from those two
timelines (files read from disk, tones synthesised); mono mixes both directions, stereo
(``RECORD_STEREO=true``) puts the far end left and what was played to the leg right.

Not simulated: inbound calls; the PRIVATE_COMMAND/COMMAND events of uuid_broadcast; SDP/RTP
variables; dialplans (an extension target just parks); simultaneous (``,``) dialling (``|``
failover works). ``event plain ALL`` otherwise matches the recording split_08 event for event.
"""

from .server import ReceivedCommand, StandIn

__all__ = ["ReceivedCommand", "StandIn"]
