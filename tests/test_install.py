"""The operator's files: install.sh (syntax, dry run) and the example config (loads, names every setting)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from daemon.config import FIELDS, _flatten, load_settings

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "scripts" / "install.sh"
EXAMPLE = ROOT / "scripts" / "callbridge.toml.example"


def test_install_script_parses() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
def test_install_script_is_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(INSTALL)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_dry_run_shows_every_step_and_changes_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "opt" / "callbridge"
    result = subprocess.run(["bash", str(INSTALL), "--dry-run", "--prefix", str(prefix)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("dry run: nothing is changed",
                     "user and group callbridge",
                     f"venv in {prefix}/.venv",
                     f"-m pip install --quiet {prefix}",
                     "/var/lib/callbridge/recordings",
                     "/etc/callbridge/callbridge.toml",
                     "FreeSWITCH access",
                     "/etc/systemd/system/callbridge.service",
                     "done."):
        assert expected in out, f"{expected!r} missing from:\n{out}"
    if Path("/etc/callbridge/callbridge.toml").exists():
        assert "kept as it is" in out  # an operator's file is never overwritten
    else:
        assert "mode 0640" in out
    if shutil.which("systemctl"):
        assert "systemctl daemon-reload" in out and "systemctl enable callbridge" in out
    assert not prefix.exists() and not list(tmp_path.iterdir())


def test_bad_options_are_refused(tmp_path: Path) -> None:
    for args in (["--bogus"], ["--prefix", "relative/path"]):
        result = subprocess.run(["bash", str(INSTALL), "--dry-run", *args], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 2, result.stdout + result.stderr


def test_the_installed_config_points_operator_commands_at_the_services_store(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``sudo -u callbridge python -m daemon --config /etc/callbridge/callbridge.toml endpoint add`` runs
    outside the unit (no $STATE_DIRECTORY): the config install.sh writes must still name the service's store."""
    result = subprocess.run(["bash", str(INSTALL), "--print-config"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    config = tmp_path / "callbridge.toml"
    config.write_text(result.stdout)
    monkeypatch.chdir(tmp_path)  # wherever the operator happens to be
    settings = load_settings(config, environ={})
    assert settings.state_dir == "/var/lib/callbridge"
    assert settings.database_url == "sqlite:////var/lib/callbridge/callbridge.db"
    under_systemd = load_settings(config, environ={"STATE_DIRECTORY": "/var/lib/callbridge"})
    assert dataclasses.asdict(under_systemd) == dataclasses.asdict(settings)


@pytest.mark.parametrize(("fs_password", "warned"), [
    ("s3cret-9f2c", False), ("ClueCon", True), ("CHANGE_ME_esl_password", True)])
def test_the_installed_config_takes_freeswitchs_password_and_warns_of_a_default_one(
        tmp_path: Path, fs_password: str, warned: bool) -> None:
    """The config install.sh writes carries FreeSWITCH's own Event Socket password; FreeSWITCH's default
    or our placeholder in freeswitch/conf is copied too (so the daemon connects) but called out."""
    fs_conf = tmp_path / "event_socket.conf.xml"
    fs_conf.write_text(f'<configuration><settings><param name="password" value="{fs_password}"/>'
                       "</settings></configuration>\n")
    result = subprocess.run(["bash", str(INSTALL), "--print-config"], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "FS_CONF": str(fs_conf)})
    assert result.returncode == 0, result.stderr
    config = tmp_path / "callbridge.toml"
    config.write_text(result.stdout)
    assert load_settings(config, environ={}).esl_password == fs_password
    assert ("warning: FreeSWITCH's Event Socket password" in result.stderr) is warned, result.stderr


def test_example_config_loads_with_the_defaults() -> None:
    from_file = load_settings(EXAMPLE, environ={})
    defaults = load_settings(None, environ={})
    assert dataclasses.asdict(from_file) == dataclasses.asdict(defaults)


def test_example_config_names_every_setting() -> None:
    with EXAMPLE.open("rb") as fh:
        named = set(_flatten(tomllib.load(fh)))
    missing = sorted(set(FIELDS) - named)
    assert not missing, f"scripts/callbridge.toml.example lacks {missing}"


def test_every_example_setting_has_a_comment() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "=" in line and not line.startswith(("#", "[")):
            above = lines[number - 1]
            in_voices = any(lines[i] == "[tts.voices]" for i in range(number - 1, -1, -1)
                            if lines[i].startswith("["))
            if in_voices or "=" in above and not above.startswith("#"):
                continue  # a group under one comment (the voices; host and port of one address)
            assert above.startswith("#"), f"line {number + 1} has no comment: {line}"
