"""Run the suite as several pytest processes at once (``make test``): ``python -m tests.shards N [args]``.

Most of the suite waits (on the stand-in's clock, on sockets, on subprocesses), so a few processes side by
side finish it in a fraction of the time one takes. Each process runs one part (tests/conftest.py deals
them out); its output is kept and printed whole when it ends, and the exit status is the worst of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

SHARD_VARIABLE = "CALLBRIDGE_TEST_SHARD"  # "i/n": run the i-th of n parts


def main(argv: list[str]) -> int:
    count = int(argv[0]) if argv else 1
    pytest_args = argv[1:]
    if count > 1 and os.environ.get("CALLBRIDGE_TEST_ESL"):
        # One real FreeSWITCH: its sessions per second and its channels are shared by whatever runs on it,
        # so parts side by side would see each other's calls.
        print("CALLBRIDGE_TEST_ESL is set: the suite runs as one process against the real switch", flush=True)
        count = 1
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="callbridge-shards-") as folder:
        runs = []
        for index in range(count):
            log = open(os.path.join(folder, f"shard-{index}.log"), "w+b")  # noqa: SIM115 (closed below)
            env = {**os.environ, SHARD_VARIABLE: f"{index}/{count}"}
            process = subprocess.Popen([sys.executable, "-m", "pytest", *pytest_args], env=env,
                                       stdout=log, stderr=subprocess.STDOUT)
            runs.append((index, process, log))
        worst = 0
        # Printed in order of finishing: a failing part shows as soon as it ends.
        while runs:
            for run in list(runs):
                index, process, log = run
                if process.poll() is None:
                    continue
                runs.remove(run)
                log.seek(0)
                sys.stdout.write(f"\n===== part {index + 1} of {count}: exit {process.returncode} "
                                 f"after {time.monotonic() - started:.0f}s =====\n")
                sys.stdout.flush()
                sys.stdout.buffer.write(log.read())
                sys.stdout.flush()
                log.close()
                worst = max(worst, process.returncode)
            time.sleep(0.5)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
