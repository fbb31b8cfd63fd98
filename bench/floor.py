"""The floor of the stack: a bare Flask app under gevent's WSGI server, no database.

``python -m bench.floor --port P`` serves ``POST /v1/calls``: it parses the same form or JSON body, checks
the token and both numbers as cheaply as possible, and answers the same envelope (``{"data": {...}}``
with a new callid) the daemon answers. Anything the daemon does beyond this is our cost.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import signal  # noqa: E402

import gevent  # noqa: E402
from flask import Flask, Response, request  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

PHONE = re.compile(r"^\+?[0-9]{7,15}$")
FIELDS = ("token", "phone_a", "phone_b", "play_url", "msg", "msg_lang", "dialtone_url", "call_date")


def create_app() -> Flask:
    app = Flask(__name__, static_folder=None)

    def envelope(data: dict[str, object], status: int = 200, desc: str = "") -> Response:
        body = dict(data)
        body["code"] = status
        body["code_desc"] = desc
        return Response(json.dumps({"data": body}) + "\n", status=status, mimetype="application/json")

    @app.route("/v1/calls", methods=["POST"])
    def create_call() -> Response:
        if request.mimetype == "application/json":
            values = json.loads(request.get_data() or b"{}")
        else:
            values = request.form.to_dict(flat=True)
        if not values.get("token"):
            return envelope({}, 401, "token: missing")
        for name in ("phone_a", "phone_b"):
            if not PHONE.match(str(values.get(name, ""))):
                return envelope({}, 400, f"{name}: must be 7 to 15 digits with an optional leading +")
        data = {name: values.get(name, "") for name in FIELDS}
        data["callid"] = secrets.token_hex(14)
        data["status"] = "scheduled" if values.get("call_date") else "queued"
        return envelope(data)

    return app


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = WSGIServer(("127.0.0.1", args.port), create_app(), log=None)
    server.start()
    print(f"floor listening on 127.0.0.1:{server.server_port}", flush=True)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    gevent.signal_handler(signal.SIGINT, server.stop)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
