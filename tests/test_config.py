"""Settings: file, environment over file, clear errors naming the setting, secrets masked."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import ConfigError, load_settings, mask_url, unknown_variables


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "callbridge.toml"
    path.write_text(text)
    return path


def test_defaults_are_loopback_and_sqlite_in_the_state_folder(tmp_path: Path) -> None:
    s = load_settings(environ={"CALLBRIDGE_STATE_DIR": str(tmp_path)})
    assert (s.esl_host, s.esl_port, s.esl_password) == ("127.0.0.1", 8021, "ClueCon")
    assert s.http_host == "127.0.0.1"
    assert s.database_url == f"sqlite:///{tmp_path}/callbridge.db"
    assert s.media_dir == tmp_path / "media"


def test_a_media_worker_is_bounded_in_memory_unless_told_not_to_be(tmp_path: Path) -> None:
    assert load_settings(environ={"CALLBRIDGE_STATE_DIR": str(tmp_path)}).media_memory_mb == 1024
    s = load_settings(environ={"CALLBRIDGE_STATE_DIR": str(tmp_path), "CALLBRIDGE_MEDIA_MEMORY_MB": "0"})
    assert s.media_memory_mb == 0  # no limit


def test_systemd_state_directory_is_the_default_state_dir(tmp_path: Path) -> None:
    s = load_settings(environ={"STATE_DIRECTORY": str(tmp_path)})
    assert s.state_dir == str(tmp_path)


def test_file_sections_then_environment_override(tmp_path: Path) -> None:
    path = write(tmp_path, '[esl]\nhost = "10.0.0.5"\nport = 8022\npassword = "s3cret"\n'
                           '[http]\nport = 9000\n[media]\nallow_private = ["10.0.0.0/8", "media.lan"]\n'
                           '[tts.voices]\n"en-US" = "en-us+f3"\n')
    s = load_settings(path, environ={"CALLBRIDGE_ESL_PORT": "8023", "CALLBRIDGE_STATE_DIR": str(tmp_path)})
    assert (s.esl_host, s.esl_port, s.esl_password, s.http_port) == ("10.0.0.5", 8023, "s3cret", 9000)
    assert s.media_allow_private == ["10.0.0.0/8", "media.lan"]
    assert s.tts_voices["en-US"] == "en-us+f3" and s.tts_voices["fr-FR"] == "fr-fr"
    assert s.masked()["esl_password"] == "****"


@pytest.mark.parametrize(("text", "env", "message"), [
    ("", {"CALLBRIDGE_ESL_PORT": "eighty"}, "esl_port: expected int"),
    ("", {"CALLBRIDGE_ESL_PORT": "70000"}, "esl_port: must be 1..65535"),
    ("[esl]\nport = true\n", {}, "esl_port: expected int"),
    ("nonsense = 1\n", {}, "unknown setting 'nonsense'"),
    ("[media]\nmode = \"ftp\"\n", {}, "media_mode: must be 'local' or 'http'"),
    ("", {"CALLBRIDGE_MEDIA_MODE": "http"}, "media_base_url: must be an http(s) URL"),
    ("", {"CALLBRIDGE_CALLS_PER_SECOND": "-1"}, "calls_per_second: must be 0 (no cap) or more"),
    ("[switch]\nsession_margin = 1.0\n", {}, "switch_session_margin: must be at least 0 and less than 1"),
    ("", {"CALLBRIDGE_SWITCH_STATUS_INTERVAL": "0"}, "switch_status_interval: must be greater than 0"),
    ("", {"CALLBRIDGE_LOG_FORMAT": "xml"}, "log_format: must be 'kv' or 'json'"),
    ("", {"CALLBRIDGE_ESL_PASSWORD": "a b"}, "esl_password: must be non-empty"),
    ("[tts.voices]\n\"xx-XX\" = \"en\"\n", {}, "tts_voices: unknown language"),
    ("[esl\n", {}, "config file"),
    ("lease_seconds = 2\n", {}, "lease_seconds: must be at least 3"),
    # the monitor thread would wake every millisecond, and a block that short is no news
    ("", {"CALLBRIDGE_LOOP_BLOCK_WARNING": "0.001"}, "loop_block_warning: must be 0 (not watched) or 0.01 to 60"),
    ("", {"CALLBRIDGE_INSTANCE_ID": "node 1"}, "instance_id: at most 100 letters, digits and . _ : -"),
    ("", {"CALLBRIDGE_INSTANCE_ID": "n" * 101}, "instance_id: at most 100"),
    # inf would overflow at start (an int(), a timedelta of the lease): refused here instead
    ("originate_timeout = inf\n", {}, "originate_timeout: expected a finite number, got inf"),
    ("", {"CALLBRIDGE_LEASE_SECONDS": "inf"}, "lease_seconds: expected a finite number, got 'inf'"),
    ("[http]\nheader_timeout = inf\n", {}, "http_header_timeout: expected a finite number, got inf"),
    ("originate_timeout = 1" + "0" * 400 + "\n", {}, "originate_timeout: expected a finite number, got 1000"),
    # 0 would redial a refusing switch in a busy loop; a negative grace would drop the writes queued at SIGTERM
    ("[esl]\nreconnect_max_delay = 0\n", {}, "esl_reconnect_max_delay: must be greater than 0"),
    ("", {"CALLBRIDGE_ESL_RECONNECT_MAX_DELAY": "-5"}, "esl_reconnect_max_delay: must be greater than 0"),
    ("shutdown_grace = -1\n", {}, "shutdown_grace: must be greater than 0"),
    # a negative cache would evict every file at each sweep; a negative retry time, give up at once
    ("", {"CALLBRIDGE_MEDIA_CACHE_BYTES": "-1"}, "media_cache_bytes: must be 0 or more"),
    ("", {"CALLBRIDGE_WEBHOOK_RETRY_FOR": "-60"}, "webhook_retry_for: must be 0 or more"),
    # a worker cannot even start in less (the interpreter, numpy and the codecs): every job would fail
    ("[media]\nmemory_mb = 64\n", {}, "media_memory_mb: must be 0 (no limit) or at least 128"),
    ("", {"CALLBRIDGE_MEDIA_MEMORY_MB": "-1"}, "media_memory_mb: must be 0 (no limit) or at least 128"),
    # a whole number is wanted: 45.5 is not silently cut to 45 (the environment's "45.5" is refused too)
    ("originate_timeout = 45.5\n", {}, "originate_timeout: expected int, got 45.5"),
    # an empty host binds every address of the machine: an empty variable must not open the API to all
    ("", {"CALLBRIDGE_HTTP_HOST": ""}, "http_host: must not be empty"),
    ("[http]\nhost = \" \"\n", {}, "http_host: must not be empty"),
])
def test_wrong_values_name_the_setting_and_the_rule(tmp_path: Path, text: str, env: dict[str, str],
                                                    message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(path, environ={"CALLBRIDGE_STATE_DIR": str(tmp_path), **env})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_a_file_that_cannot_be_read_as_toml_text_is_a_clear_error(tmp_path: Path) -> None:
    """A folder, or a file that is not UTF-8 text, names the file and why; never a traceback."""
    with pytest.raises(ConfigError, match=f"^config file {tmp_path}: cannot be read: "):
        load_settings(tmp_path, environ={})
    binary = tmp_path / "callbridge.toml"
    binary.write_bytes(b'esl_host = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match=f"^config file {binary}: not UTF-8 text"):
        load_settings(binary, environ={})


def test_database_password_is_masked() -> None:
    s = load_settings(environ={"CALLBRIDGE_DATABASE_URL": "postgresql://cb:hunter2@db.local/cb",
                               "CALLBRIDGE_STATE_DIR": "/tmp"})
    assert "hunter2" not in str(s.masked())


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://cb:hunter2@db.local/cb", "postgresql://cb:****@db.local/cb"),
    ("postgresql://cb:hun%40ter2@db.local:5433/cb?sslmode=require", "postgresql://cb:****@db.local:5433/cb?sslmode=require"),
    ("postgresql://cb@db.local/cb?password=hunter2&application_name=x", "postgresql://cb@db.local/cb?password=****&application_name=x"),
    ("postgresql://cb@db.local/cb", "postgresql://cb@db.local/cb"),
    ("sqlite:////var/lib/callbridge/callbridge.db", "sqlite:////var/lib/callbridge/callbridge.db"),
])
def test_database_url_is_shown_with_its_password_masked(url: str, shown: str) -> None:
    s = load_settings(environ={"CALLBRIDGE_DATABASE_URL": url, "CALLBRIDGE_STATE_DIR": "/tmp"})
    assert s.masked()["database_url"] == shown


@pytest.mark.parametrize(("url", "shown"), [
    # A generated password often holds '#', '/' or '?' unencoded: urlsplit then sees no user part at all.
    ("postgresql://cb:s3cr#t@db.local/cb", "postgresql://cb:****@db.local/cb"),
    ("postgresql://cb:ab/cd@db.local/cb", "postgresql://cb:****@db.local/cb"),
    ("postgresql://cb:ab?cd@db.local:5433/cb?sslmode=require", "postgresql://cb:****@db.local:5433/cb?sslmode=require"),
    ("postgresql://cb:a@b@db.local/cb", "postgresql://cb:****@db.local/cb"),
    ("http://media:s3cr#t@10.0.0.5:8080", "http://media:****@10.0.0.5:8080"),
])
def test_a_password_with_unencoded_url_characters_is_masked_whole(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_a_malformed_database_url_never_shows_its_password() -> None:
    with pytest.raises(ConfigError, match="^database_url: ") as caught:
        load_settings(environ={"CALLBRIDGE_DATABASE_URL": "postgresql://cb:s3cr#t@db.local/cb",
                               "CALLBRIDGE_STATE_DIR": "/tmp"})
    assert "s3cr" not in str(caught.value)


def test_the_media_base_url_is_shown_with_its_password_masked() -> None:
    """FreeSWITCH may fetch prompts through a proxy that asks for credentials in the URL."""
    s = load_settings(environ={"CALLBRIDGE_MEDIA_MODE": "http", "CALLBRIDGE_STATE_DIR": "/tmp",
                               "CALLBRIDGE_MEDIA_BASE_URL": "http://media:hunter2@10.0.0.5:8080"})
    assert s.masked()["media_base_url"] == "http://media:****@10.0.0.5:8080"
    assert "hunter2" not in str(s.masked())


@pytest.mark.parametrize("url", ["mysql://u:p@h/db", "postgresql://u:p@h/", "postgresql://u:p@h:port/db",
                                 "sqlite://relative.db", "callbridge.db"])
def test_a_database_url_neither_sqlite_nor_postgresql_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="^database_url: ") as caught:
        load_settings(environ={"CALLBRIDGE_DATABASE_URL": url, "CALLBRIDGE_STATE_DIR": "/tmp"})
    assert ":p@" not in str(caught.value)


def test_one_switch_by_default_from_the_esl_settings(tmp_path: Path) -> None:
    s = load_settings(environ={"CALLBRIDGE_STATE_DIR": str(tmp_path), "CALLBRIDGE_ESL_PORT": "8022"})
    assert s.switches == []
    assert [(sw.host, sw.port, sw.password, sw.name) for sw in s.switch_addresses] == [
        ("127.0.0.1", 8022, "ClueCon", "127.0.0.1:8022")]


def test_several_switches_from_the_environment(tmp_path: Path) -> None:
    s = load_settings(environ={"CALLBRIDGE_STATE_DIR": str(tmp_path),
                               "CALLBRIDGE_SWITCHES": "10.0.0.11:8021:pw:with:colons, [fd00::12]:8022:other"})
    assert [(sw.host, sw.port, sw.password) for sw in s.switch_addresses] == [
        ("10.0.0.11", 8021, "pw:with:colons"), ("fd00::12", 8022, "other")]
    assert [sw.name for sw in s.switches] == ["10.0.0.11:8021", "[fd00::12]:8022"]
    shown = str(s.masked())
    assert "pw:with:colons" not in shown and "other" not in shown and "10.0.0.11" in shown
    assert "pw:with" not in repr(s.switches)
    # media_route_allow's default lets every switch fetch prompts
    assert {"10.0.0.11", "fd00::12"} <= set(s.media_route_addresses)


def test_several_switches_from_the_file_and_the_environment_wins(tmp_path: Path) -> None:
    path = write(tmp_path, 'switches = [{host = "fs1.lan", port = 8021, password = "one"},\n'
                           '            {host = "fs2.lan", port = 8021, password = "two"}]\n'
                           '[switch]\nlost_after = 60\n')
    s = load_settings(path, environ={"CALLBRIDGE_STATE_DIR": str(tmp_path)})
    assert [sw.name for sw in s.switch_addresses] == ["fs1.lan:8021", "fs2.lan:8021"]
    assert s.switch_lost_after == 60.0
    s = load_settings(path, environ={"CALLBRIDGE_STATE_DIR": str(tmp_path), "CALLBRIDGE_SWITCHES": "fs3:1:x"})
    assert [sw.name for sw in s.switch_addresses] == ["fs3:1"]


@pytest.mark.parametrize(("query", "message"), [
    ("max_connections=abc", "max_connections must be a whole number of at least 1"),
    ("max_connections=0", "max_connections must be a whole number of at least 1"),
    ("connect_timeout=2.5", "connect_timeout must be a whole number of at least 0"),
    ("timeout=-1", "timeout must be a number of seconds, 0 or more"),
    ("stale_timeout=nan", "stale_timeout must be a number of seconds, 0 or more"),
    ("sslmode=require&idle_in_transaction_timeout=ten", "idle_in_transaction_timeout must be a number of seconds"),
])
def test_a_postgresql_urls_pool_options_are_numbers_named_when_not(tmp_path: Path, query: str, message: str) -> None:
    # Found at start, in one line: not a traceback from deep in the driver when the store is first opened.
    url = f"postgresql://callbridge:s3cret@db.lan:5432/callbridge?{query}"
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"CALLBRIDGE_STATE_DIR": str(tmp_path), "CALLBRIDGE_DATABASE_URL": url})
    assert f"database_url: {message}" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_a_postgresql_urls_usual_pool_options_pass(tmp_path: Path) -> None:
    url = ("postgresql://callbridge:s3cret@db.lan:5432/callbridge?max_connections=20&timeout=2.5&connect_timeout=0"
           "&idle_in_transaction_timeout=0&sslmode=require")
    assert load_settings(environ={"CALLBRIDGE_STATE_DIR": str(tmp_path), "CALLBRIDGE_DATABASE_URL": url}).database_url


@pytest.mark.parametrize(("text", "env", "message"), [
    ("", {"CALLBRIDGE_SWITCHES": "fs1:8021"}, "switches: entry 1: must be host:port:password"),
    ("", {"CALLBRIDGE_SWITCHES": "fs1:8021:pw,fs2:http:pw"}, "switches: entry 2: the port must be a number"),
    ("", {"CALLBRIDGE_SWITCHES": "fs1:0:pw"}, "switches: entry 1 (fs1:0): the port must be 1..65535"),
    ("", {"CALLBRIDGE_SWITCHES": "fs1:8021:"}, "switches: entry 1 (fs1:8021): the password must be non-empty"),
    ("", {"CALLBRIDGE_SWITCHES": ":8021:pw"}, "switches: entry 1: the host must be a name or an address"),
    ("", {"CALLBRIDGE_SWITCHES": "[::1:8021:pw"}, "switches: entry 1: an IPv6 host is written in brackets"),
    ("", {"CALLBRIDGE_SWITCHES": "fs1:8021:a,fs1:8021:b"}, "switches: entry 2 (fs1:8021): listed twice"),
    ('switches = [{host = "fs1", port = 8021}]\n', {}, "switches: entry 1: password missing"),
    ('switches = [{host = "fs1", port = 8021, password = "x", pasword = "y"}]\n', {},
     "switches: entry 1: unknown key(s) ['pasword']"),
    ('switches = ["fs1:8021:pw"]\n', {}, "switches: entry 1: must be a table"),
    ('switches = [{host = "fs1", port = true, password = "x"}]\n', {}, "switches: entry 1: port must be a number"),
    ('switches = 3\n', {}, "switches: expected"),
    ("[switch]\nlost_after = -1\n", {}, "switch_lost_after: must be 0 (wait for ever) or more seconds"),
])
def test_wrong_switches_name_the_entry_and_the_rule_never_the_password(
        tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={"CALLBRIDGE_STATE_DIR": str(tmp_path), **env})
    assert message in str(caught.value)
    assert "pw" not in str(caught.value).replace("password", "")


def test_the_espeak_ng_engine_needs_its_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH where no espeak-ng lives
    with pytest.raises(ConfigError, match="^tts_engine: espeak-ng: the espeak-ng command is not installed"):
        load_settings(environ={"CALLBRIDGE_STATE_DIR": str(tmp_path), "CALLBRIDGE_TTS_ENGINE": "espeak-ng"})
    assert load_settings(environ={"CALLBRIDGE_STATE_DIR": str(tmp_path)}).tts_engine == "bundled"  # needs none


def test_a_misspelled_variable_is_named_with_the_setting_it_resembles() -> None:
    environ = {"CALLBRIDGE_ESL_PASS": "secret", "CALLBRIDGE_HTTP_PROT": "1", "CALLBRIDGE_ZZZ": "1",
               "CALLBRIDGE_ESL_PASSWORD": "ok", "CALLBRIDGE_CONFIG": "/etc/cb.toml", "CALLBRIDGE_TEST_SHARD": "0/3",
               "PATH": "/usr/bin"}
    assert unknown_variables(environ) == [
        "CALLBRIDGE_ESL_PASS is not a setting, and is ignored (did you mean CALLBRIDGE_ESL_PASSWORD?)",
        "CALLBRIDGE_HTTP_PROT is not a setting, and is ignored (did you mean CALLBRIDGE_HTTP_PORT?)",
        "CALLBRIDGE_ZZZ is not a setting, and is ignored",
    ]


@pytest.mark.parametrize("text", ['tts_voices = {"fr-FR" = "fr+f3"}\n', '[tts_voices]\n"fr-FR" = "fr+f3"\n',
                                  '[tts.voices]\n"fr-FR" = "fr+f3"\n', '[tts]\nvoices = {"fr-FR" = "fr+f3"}\n'])
def test_tts_voices_is_written_under_its_own_name_or_in_its_section(tmp_path: Path, text: str) -> None:
    voices = load_settings(write(tmp_path, text), environ={"CALLBRIDGE_STATE_DIR": str(tmp_path)}).tts_voices
    assert voices["fr-FR"] == "fr+f3" and voices["en-US"] == "en-us"  # merged over the defaults


def test_a_wrong_table_or_list_says_how_it_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^tts_voices: expected lang = voice pairs \(in a variable: "
                                          r"comma-separated lang=voice\), got 'fr-FR'$"):
        load_settings(environ={"CALLBRIDGE_STATE_DIR": str(tmp_path), "CALLBRIDGE_TTS_VOICES": "fr-FR"})
    with pytest.raises(ConfigError, match=r"^media_allow_private: expected a list of text"):
        load_settings(write(tmp_path, "[media]\nallow_private = 5\n"), environ={"CALLBRIDGE_STATE_DIR": str(tmp_path)})
