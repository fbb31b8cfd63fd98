"""``python -m bench [--only api,engine,...] [--full]``: run the sections, print the table, write the JSON."""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import importlib  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import gevent  # noqa: E402

from bench.common import stop_all  # noqa: E402
from bench.report import RESULTS, Report  # noqa: E402

SECTIONS = ("api", "engine", "switches", "scale", "scheduler", "store", "records", "media")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", default="", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--full", action="store_true", help="the issue's biggest sizes everywhere (slower)")
    parser.add_argument("--output", default=str(RESULTS), help="where to write the JSON results")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")

    # SIGTERM ends the run like Ctrl-C does: children are stopped in the finally below.
    main_greenlet = gevent.getcurrent()
    gevent.signal_handler(signal.SIGTERM, lambda: gevent.kill(main_greenlet, KeyboardInterrupt))

    report = Report()
    interrupted = False
    try:
        for name in chosen:
            print(f"== {name}", flush=True)
            started = time.monotonic()
            try:
                importlib.import_module(f"bench.{name}").run(report, args.full)  # type: ignore[attr-defined]
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                traceback.print_exc()
                report.errors[name] = f"{type(exc).__name__}: {exc}"
            finally:
                stop_all()
                report.sections_seconds[name] = round(time.monotonic() - started, 1)
                print(f"   ({report.sections_seconds[name]} s)", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted; stopping child processes", file=sys.stderr)
    finally:
        stop_all()
    print()
    print(report.table())
    total = round(time.time() - report.started, 1)
    print(
        f"\n{'partial run' if interrupted else 'run'} took {total} s; "
        f"sizes: {'--full' if args.full else 'default'}"
    )
    from pathlib import Path

    report.write(Path(args.output), {"only": chosen, "full": args.full, "interrupted": interrupted})
    print(f"results: {args.output}")
    return 130 if interrupted else (1 if report.errors else 0)


if __name__ == "__main__":
    sys.exit(main())
