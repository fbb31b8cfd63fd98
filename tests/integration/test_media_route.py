"""What FreeSWITCH is told to play, end to end: the media route in ``http`` mode, and files stored before
media names were keyed (an upgrade with calls pending)."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
from collections.abc import Callable
from pathlib import Path

from tests.integration.conftest import Harness, needs_standin, tone_wav


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str, source: str = "127.0.0.1") -> tuple[int, bytes]:
    """GET over real TCP from the ``source`` address (another loopback address stands for a stranger)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@needs_standin()
def test_freeswitch_fetches_prompts_from_the_route_and_nobody_else_can(make_harness: Callable[..., Harness]
                                                                        ) -> None:
    port = free_port()
    harness = make_harness(http_port=port, media_mode="http", media_base_url=f"http://127.0.0.1:{port}",
                           media_route_allow=["127.0.0.1/32"])  # "FreeSWITCH" (the stand-in) is 127.0.0.1
    call = harness.wait_final(harness.place(harness.endpoint(), "15550000411", "15550001411"), timeout=30)
    assert call.status == "completed", harness.timeline(call)
    played = [s["source"] for s in harness.switch.heard(call.a_uuid) if s["kind"] == "file"]
    names = [Path(harness.prompt).name, Path(harness.message).name]
    assert played[:2] == [f"http_cache://http://127.0.0.1:{port}/media/{name}" for name in names], played
    status, body = get(port, f"/media/{names[0]}")
    assert status == 200 and body == Path(harness.prompt).read_bytes()
    status, body = get(port, f"/media/{names[0]}", source="127.0.0.2")  # not in media_route_allow
    assert status == 404
    assert json.loads(body)["data"]["code_desc"] == "media: no such file"


@needs_standin()
def test_local_mode_serves_no_media_over_http(make_harness: Callable[..., Harness]) -> None:
    port = free_port()
    harness = make_harness(http_port=port)  # media_mode = "local": FreeSWITCH reads the files
    status, _ = get(port, f"/media/{Path(harness.prompt).name}")
    assert status == 404


@needs_standin()
def test_a_call_stored_before_the_upgrade_plays_the_renamed_file(tmp_path: Path,
                                                                 make_harness: Callable[..., Harness]) -> None:
    # A media folder as the previous version left it: files named by the SHA-256 of their content.
    old_media = tmp_path / "state0" / "media"
    old_prompt = tone_wav(old_media, 1.0, 440.0)
    content = Path(old_prompt).read_bytes()
    assert Path(old_prompt).name == hashlib.sha256(content).hexdigest() + ".wav"
    harness = make_harness()  # first start of the new version: the key is made, the files renamed
    assert not Path(old_prompt).exists()
    renamed = [p for p in old_media.glob("*.wav") if p.read_bytes() == content]
    assert len(renamed) == 1 and renamed[0].name != Path(old_prompt).name
    harness.prompt = old_prompt  # the pending call still holds the old path
    call = harness.wait_final(harness.place(harness.endpoint(), "15550000412", "15550001412"), timeout=30)
    assert call.status == "completed", harness.timeline(call)
    played = [s["source"] for s in harness.switch.heard(call.a_uuid) if s["kind"] == "file"]
    assert played[0] == str(renamed[0]), played
