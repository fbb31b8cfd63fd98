"""`make test` runs the suite in parts side by side (tests/shards.py): every test in exactly one part, a
the tests sharing a module-scoped fixture together in one part, and a failure in any part fails the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.shards import SHARD_VARIABLE

ROOT = Path(__file__).resolve().parent.parent
# A slice of the suite with tests that share a module-scoped fixture (test_validation, test_tts).
SLICE = ["tests/test_validation.py", "tests/test_tts.py", "tests/test_config.py"]


def collected(shard: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != SHARD_VARIABLE}
    if shard is not None:
        env[SHARD_VARIABLE] = shard
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             *SLICE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_the_parts_hold_every_test_once_and_keep_a_module_fixtures_tests_together() -> None:
    whole = collected(None)
    parts = [collected(f"{index}/3") for index in range(3)]
    assert all(parts), "a part with no tests"
    assert sorted(sum(parts, [])) == sorted(whole)
    # The tests that share a module-scoped fixture (`conf`, `spoken`) are in one part: it is built once.
    for sharing in (("test_validation.py::test_call_date", "test_validation.py::test_msg_and_lang"),
                    ("test_tts.py::test_every_language_speaks_a_sentence", "test_tts.py::test_languages_sound_")):
        holding = {n for n, part in enumerate(parts) for test in part if test.startswith(tuple(
            f"tests/{prefix}" for prefix in sharing))}
        assert len(holding) == 1, f"{sharing} split over parts {holding}"
    # The other tests are dealt one by one, not module by module.
    config_parts = {n for n, part in enumerate(parts) for test in part if test.startswith("tests/test_config.py")}
    assert len(config_parts) > 1


def test_a_failure_in_one_part_fails_the_run_and_its_output_is_shown(tmp_path: Path) -> None:
    (tmp_path / "test_passes.py").write_text("def test_passes():\n    assert True\n")
    (tmp_path / "test_fails.py").write_text("def test_fails():\n    assert 'the answer' == 42\n")
    result = subprocess.run([sys.executable, "-m", "tests.shards", "2", "-q", "-p", "no:cacheprovider",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout
    assert result.stdout.count("===== part ") == 2
    assert "assert 'the answer' == 42" in result.stdout


def test_against_a_real_switch_the_suite_runs_as_one_process(tmp_path: Path) -> None:
    """CALLBRIDGE_TEST_ESL: one real FreeSWITCH is shared, so the parts are not run side by side."""
    (tmp_path / "test_passes.py").write_text("def test_passes():\n    assert True\n")
    env = {**os.environ, "CALLBRIDGE_TEST_ESL": "127.0.0.1:1:unused"}
    result = subprocess.run([sys.executable, "-m", "tests.shards", "3", "-q", "-p", "no:cacheprovider",
                             str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("===== part ") == 1 and "part 1 of 1" in result.stdout, result.stdout
