"""``make demo``: one real call bridge, end to end, on this machine only.

Starts the FreeSWITCH stand-in (real Event Socket over TCP, real-time number plan) and the daemon
(SQLite in a fresh demo state folder), creates an endpoint with the operator command, serves a
prompt and a dialtone file from a local web server, then places a call through the HTTP API
exactly as the seed's PHP client does (form-encoded POST), follows it through GET /v1/calls/<callid>,
hangs it up after a few seconds of conversation with the operator command, and prints the call's
timeline and what A's phone heard according to the stand-in. Nothing is faked: every status printed
comes from the daemon's API, every sound from the stand-in's record of the legs.

It ends by printing the web pages' address and a demo sign-in (an account that owns the endpoint). Run
in a terminal, it then keeps the daemon and the stand-in running until Ctrl-C, so the call can be looked
at in a browser; run by a script (stdin not a terminal), it stops everything and exits.
"""

from __future__ import annotations

import http.server
import json
import math
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import wave
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".state" / "demo"
PY = sys.executable
PHONE_A = "15550000101"  # answers at once
PHONE_B = "15550001102"  # rings 2 s, answers, plays a 440 Hz tone
DEMO_EMAIL = "demo@example.com"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tone_wav(path: Path, seconds: float, freqs: tuple[float, ...], rate: int = 8000) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        frames = bytearray()
        for i in range(int(seconds * rate)):
            value = sum(math.sin(2 * math.pi * f * i / rate) for f in freqs) / len(freqs)
            frames += struct.pack("<h", int(value * 12000))
        out.writeframes(bytes(frames))


def serve_folder(folder: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(folder), **k)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


def request(method: str, url: str, data: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_ready(base: str, proc: subprocess.Popen[bytes], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the daemon exited during start; see its log above")
        try:
            status, _ = request("GET", base + "/readyz")
            if status == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise SystemExit("the daemon did not become ready in time")


def esl_api(port: int, command: str) -> str:
    """One api command to the stand-in over a raw Event Socket connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        stream = sock.makefile("rb")

        def read_message() -> tuple[dict[str, str], bytes]:
            headers: dict[str, str] = {}
            while (line := stream.readline().decode().rstrip("\n")):
                key, _, value = line.partition(": ")
                headers[key] = value
            body = stream.read(int(headers.get("Content-Length", "0")))
            return headers, body

        read_message()
        sock.sendall(b"auth ClueCon\n\n")
        read_message()
        sock.sendall(f"api {command}\n\n".encode())
        return read_message()[1].decode()


def main() -> int:
    shutil.rmtree(STATE, ignore_errors=True)
    (STATE / "www").mkdir(parents=True)
    tone_wav(STATE / "www" / "welcome.wav", 2.0, (523.0, 659.0))
    tone_wav(STATE / "www" / "dialtone.wav", 1.5, (700.0,))
    www, www_port = serve_folder(STATE / "www")
    esl_port, http_port = free_port(), free_port()
    env = dict(os.environ, CALLBRIDGE_STATE_DIR=str(STATE), CALLBRIDGE_ESL_PORT=str(esl_port),
               CALLBRIDGE_HTTP_PORT=str(http_port), CALLBRIDGE_MEDIA_ALLOW_PRIVATE="127.0.0.1",
               PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        print(f"==> FreeSWITCH stand-in on 127.0.0.1:{esl_port} (real time)")
        switch = subprocess.Popen([PY, "-m", "freeswitch.standin", "--port", str(esl_port), "--time-scale", "1.0"],
                                  cwd=ROOT, stdout=subprocess.PIPE)
        procs.append(switch)
        assert switch.stdout is not None
        print("    " + switch.stdout.readline().decode().strip())

        print(f"==> web account: python -m daemon user add --email {DEMO_EMAIL} --password-stdin --admin")
        demo_password = secrets.token_urlsafe(9)
        subprocess.run([PY, "-m", "daemon", "user", "add", "--email", DEMO_EMAIL, "--password-stdin", "--admin"],
                       cwd=ROOT, env=env, check=True, capture_output=True, text=True, input=demo_password + "\n")

        print(f"==> endpoint: python -m daemon endpoint add --name demo ... --owner {DEMO_EMAIL} --json")
        added = subprocess.run([PY, "-m", "daemon", "endpoint", "add", "--name", "demo", "--caller-id", "15551230000",
                                "--caller-id-name", "Callbridge Demo", "--dial-string",
                                "sofia/gateway/carrier/{number}", "--record", "--owner", DEMO_EMAIL, "--json"],
                               cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        endpoint = json.loads(added.stdout)
        token = endpoint["token"]
        # Shown in full: the CLI shows a token once, and this one is the demo's own (try the API with it).
        print(f"    endpoint {endpoint['name']!r}, token {token} (shown once: the store keeps only its hash)")

        print(f"==> daemon: python -m daemon run (HTTP 127.0.0.1:{http_port}, state {STATE})")
        log = open(STATE / "daemon.log", "wb")  # noqa: SIM115
        daemon = subprocess.Popen([PY, "-m", "daemon", "run"], cwd=ROOT, env=env, stdout=log, stderr=log)
        procs.append(daemon)
        base = f"http://127.0.0.1:{http_port}"
        wait_ready(base, daemon)

        fields = {"token": token, "phone_a": PHONE_A, "phone_b": PHONE_B,
                  "play_url": f"http://127.0.0.1:{www_port}/welcome.wav",
                  "msg": "Good morning, please wait a moment to connect your call.", "msg_lang": "en-US",
                  "dialtone_url": f"http://127.0.0.1:{www_port}/dialtone.wav"}
        print("==> POST /v1/calls (form-encoded, like the seed's PHP client)")
        status, answer = request("POST", base + "/v1/calls", fields)
        seed_fields = ("token", "phone_a", "phone_b", "play_url", "msg", "msg_lang", "code", "code_desc", "callid")
        shown = {k: answer["data"].get(k) for k in seed_fields} | {"token": endpoint["token_hint"]}
        print(f"    HTTP {status} {json.dumps({'data': shown})}")
        if status != 200:
            return 1
        callid = answer["data"]["callid"]

        seen = ""
        hung_up = False
        deadline = time.monotonic() + 90
        call: dict[str, Any] = {}
        while time.monotonic() < deadline:
            _, got = request("GET", f"{base}/v1/calls/{callid}?token={urllib.parse.quote(token)}")
            call = got["data"]
            if call["status"] != seen:
                seen = call["status"]
                print(f"    status: {seen}")
            if seen == "bridged" and not hung_up and call.get("bridged_at"):
                time.sleep(3)
                print("==> after 3 s of conversation: python -m daemon calls hangup", callid)
                subprocess.run([PY, "-m", "daemon", "calls", "hangup", callid], cwd=ROOT, env=env, check=True,
                               capture_output=True)
                hung_up = True
            if seen in ("completed", "failed", "canceled", "missed"):
                break
            time.sleep(0.25)

        print("==> the call, as GET /v1/calls/<callid> reports it")
        for key in ("status", "failed_leg", "a_cause", "b_cause", "reason", "ring_seconds", "talk_seconds",
                    "recording"):
            print(f"    {key}: {call.get(key)}")
        print("    timeline:")
        for step in call.get("timeline", []):
            detail = {k: v for k, v in step.items() if k not in ("at", "kind")}
            print(f"      {step['at']}  {step['kind']}  {json.dumps(detail.get('detail', detail))}")

        a_uuid = next((s.get("detail", {}).get("a_uuid") for s in call.get("timeline", [])
                       if s["kind"] == "claimed"), None)
        # The daemon stores media under content hashes; name them after what the request asked for.
        prompts = [s["detail"]["file"] for s in call.get("timeline", []) if s["kind"] == "prompt_started"]
        names = dict(zip(prompts, ["play_url (welcome.wav)", "msg (spoken by espeak-ng)"], strict=False))
        if a_uuid:
            print("==> what A's phone heard (from the stand-in: api standin heard <A>)")
            for seg in json.loads(esl_api(esl_port, f"standin heard {a_uuid}")):
                if seg.get("end") is not None and seg["end"] - seg["start"] < 0.05:
                    continue  # a moment between two sounds (the ring before the answer, a wait B cut short)
                end = f"{seg['end']:.1f}" if seg.get("end") is not None else "…"
                source = os.path.basename(str(seg["source"]))
                if seg["kind"] == "ringback":
                    source = "dialtone_url (dialtone.wav), looped"
                elif seg["kind"] == "bridge":
                    source = f"B ({PHONE_B})"
                elif seg["kind"] == "file" and source not in names:
                    # A's wait for B: the dialtone looped until the switch has room for B's session.
                    source = "dialtone_url (dialtone.wav), A's wait until B is dialed"
                print(f"    {seg['start']:6.1f}–{end:>6} s  {seg['kind']:<10} {names.get(source, source)}")
        result = 0 if call.get("status") == "completed" else 1

        print("==> the web pages")
        print(f"    {base}/login   email {DEMO_EMAIL}   password {demo_password}")
        print(f"    this call: {base}/calls/{callid}")
        if sys.stdin.isatty():
            print("    the daemon and the stand-in keep running; press Ctrl-C to stop them")
            # Ctrl-C ends the wait even when this process was started with SIGINT ignored (from `cmd &`).
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            try:
                while daemon.poll() is None and switch.poll() is None:
                    time.sleep(0.5)
                print("    the daemon or the stand-in stopped; see", STATE / "daemon.log")
            except KeyboardInterrupt:
                print()
        else:
            print("    (stdin is not a terminal, so the demo stops now; run `make demo` in a terminal to keep it up)")
        return result
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        www.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
