"""``python -m daemon``: the service and its operator commands (see daemon/cli.py)."""

from gevent import monkey

monkey.patch_all()

from daemon.cli import main  # noqa: E402

raise SystemExit(main())
