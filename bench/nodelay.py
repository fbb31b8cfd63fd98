"""Run a module with TCP_NODELAY on the sockets gevent's WSGI server accepts: ``-m bench.nodelay daemon run``.

The floor runs this way so it compares fairly with the daemon, whose server sets TCP_NODELAY itself
(daemon/service.py): gevent.pywsgi sends a response's headers and its body in two ``sendall`` calls; with
Nagle's algorithm on, the body waits for the client's delayed ACK of the headers (up to 40 ms).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import runpy  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

from gevent import pywsgi  # noqa: E402

_handle = pywsgi.WSGIServer.handle


def _handle_nodelay(self: pywsgi.WSGIServer, sock: Any, address: Any) -> Any:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return _handle(self, sock, address)


pywsgi.WSGIServer.handle = _handle_nodelay  # type: ignore[method-assign]

if __name__ == "__main__":
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
