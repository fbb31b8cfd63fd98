"""``python -m daemon``: the service and its operator commands (see daemon/cli.py)."""

import gevent
from gevent import monkey

# Nothing reads the greenlet tree; recording it cost every greenlet (one per call) ~11 objects and a walk
# of the stack at spawn.
gevent.config.track_greenlet_tree = False
monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402

from daemon.cli import main  # noqa: E402

try:
    code = main()
    sys.stdout.flush()
except BrokenPipeError:  # `python -m daemon check-config | head`: the reader left, nothing is wrong
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the flush at exit would raise again)
    code = 0
raise SystemExit(code)
