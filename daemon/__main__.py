"""``python -m daemon``: the service and its operator commands (see daemon/cli.py)."""

import gevent
from gevent import monkey

# Nothing reads the greenlet tree; recording it cost every greenlet (one per call) ~11 objects and a walk
# of the stack at spawn.
gevent.config.track_greenlet_tree = False
monkey.patch_all()

from daemon.cli import main  # noqa: E402

raise SystemExit(main())
