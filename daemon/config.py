"""Settings: one TOML file, overridden by ``CALLBRIDGE_*`` environment variables, validated at start.

Every setting has a default that is safe on a single host (FreeSWITCH and callbridge side by side,
everything on loopback). ``python -m daemon check-config`` prints the effective values with secrets
masked. The README lists every setting; keep that table and ``FIELDS`` in step.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import shutil
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

LANGUAGES = ("en-GB", "en-US", "fr-FR", "de-DE", "it-IT", "pt-BR", "ru-RU", "es-ES", "es-US")

# eSpeak NG voice per msg_lang; an operator may override any of them ([tts] voices in the file).
DEFAULT_VOICES = {
    "en-GB": "en-gb",
    "en-US": "en-us",
    "fr-FR": "fr-fr",
    "de-DE": "de",
    "it-IT": "it",
    "pt-BR": "pt-br",
    "ru-RU": "ru",
    "es-ES": "es",
    "es-US": "es-419",
}

SECRET_FIELDS = {"esl_password", "portal_invite_code"}
LOOPBACK = ("127.0.0.0/8", "::1/128")
TTS_ENGINES = ("bundled", "espeak-ng")


class ConfigError(ValueError):
    """A setting has a wrong value; the message names the setting and the rule."""


@dataclass(frozen=True)
class SwitchAddress:
    """One FreeSWITCH's Event Socket. ``name`` (host:port) labels it in logs, metrics, /readyz and on the
    calls sent to it; the password is never shown."""

    host: str
    port: int
    password: str = field(repr=False)

    @property
    def name(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class _Named(Protocol):
    @property
    def name(self) -> str: ...


S = TypeVar("S", bound=_Named)


def switch_sent_to(switches: Sequence[S], name: str | None) -> S | None:
    """The switch a claimed call was sent to, among ``switches`` (addresses or links): the one its
    ``switch`` column names or, for a call claimed before the column existed (by a daemon with one
    switch), the first. None: that switch is no longer in the settings."""
    if not name:
        return switches[0]
    return next((switch for switch in switches if switch.name == name), None)


@dataclass
class Settings:
    # FreeSWITCH Event Socket
    esl_host: str = "127.0.0.1"
    esl_port: int = 8021
    esl_password: str = "ClueCon"
    esl_command_timeout: float = 5.0
    esl_heartbeat_timeout: float = 45.0  # FreeSWITCH sends HEARTBEAT every 20 s by default
    esl_reconnect_max_delay: float = 30.0
    # Several switches: each one's Event Socket; [] = the one switch at esl_host:esl_port.
    switches: list[SwitchAddress] = field(default_factory=list)
    # Store and files
    state_dir: str = ""  # default: $STATE_DIRECTORY (systemd) or ./state
    database_url: str = ""  # default: sqlite:///<state_dir>/callbridge.db
    # HTTP API
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    trust_proxy: bool = False  # take the client address from X-Forwarded-For (behind a local proxy)
    auth_failures_per_minute: int = 20  # per client address, then 429
    http_header_timeout: float = 10.0  # request line and headers, from the accept or the first byte
    http_body_timeout: float = 30.0  # the whole body; also each write of an answer
    http_idle_timeout: float = 15.0  # a kept-alive connection waiting for its next request
    http_max_connections: int = 1000  # open at once; at the cap the longest-receiving one is closed
    # Calls
    originate_timeout: int = 45  # seconds each leg may ring
    max_in_flight: int = 200  # calls in progress across all endpoints
    calls_per_second: float = 0.0  # an operator's own cap on new calls per second (0: none beyond the switch's)
    # The switch's session limits (read from it) are kept this fraction below; `status` is read this often.
    switch_session_margin: float = 0.1
    switch_status_interval: float = 5.0
    # Seconds a switch may stay unreachable before its calls in progress end (failed); 0: wait for ever.
    switch_lost_after: float = 300.0
    # Several daemons on one PostgreSQL: this daemon's name in the calls it owns ("" = host-pid-random, made
    # at start), and the lease it holds on them (renewed every third of it; past it, another takes over).
    instance_id: str = ""
    lease_seconds: float = 30.0
    schedule_grace: int = 300  # seconds a missed scheduled call may still start late
    schedule_max_days: int = 366  # how far ahead call_date may be
    past_grace: int = 120  # seconds call_date may lie in the past and still be taken as "now"
    shutdown_grace: float = 10.0
    # Seconds a greenlet may hold the event loop before it is logged (loop.blocked) and counted; 0: not watched.
    loop_block_warning: float = 0.1
    # Media
    media_mode: str = "local"  # local: FreeSWITCH reads our files; http: it fetches from media_base_url
    media_base_url: str = ""
    sample_rate: int = 8000
    media_max_bytes: int = 50 * 1024 * 1024
    media_max_play_seconds: int = 600
    media_max_dialtone_seconds: int = 120
    media_connect_timeout: float = 5.0
    media_read_timeout: float = 15.0
    media_total_timeout: float = 60.0  # one whole fetch, redirects included
    media_max_redirects: int = 3
    media_allow_private: list[str] = field(default_factory=list)  # hosts or CIDRs allowed although private
    media_cache_bytes: int = 2 * 1024 * 1024 * 1024
    # Decoding and speech run in worker processes (daemon.media.pool), bounded in number, CPU and time.
    media_workers: int = 2
    media_queue_timeout: float = 10.0  # seconds a request waits for a free worker, then 503
    media_decode_timeout: float = 30.0  # wall seconds for one file's decoding, then the worker is killed
    media_cpu_seconds: int = 10  # CPU seconds one job may use (RLIMIT_CPU in the worker)
    media_memory_mb: int = 1024  # address space one worker may use, MB (RLIMIT_AS); 0 = no limit
    media_max_channels: int = 8
    media_max_sample_rate: int = 192_000
    media_max_decoded_samples: int = 60_000_000  # frames x channels; ~10 minutes of 48 kHz stereo
    # Who may GET /media/<name>.wav (media_mode = "http" only): addresses or CIDRs; [] = loopback and
    # esl_host when it is an address (FreeSWITCH). See media_route_addresses.
    media_route_allow: list[str] = field(default_factory=list)
    msg_max_chars: int = 500
    tts_engine: str = "bundled"  # bundled: libespeak-ng from the espeakng-loader wheel; espeak-ng: the command
    tts_voices: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_VOICES))
    tts_timeout: float = 30.0  # wall seconds for one message's speech
    # Recordings
    recordings_retention_days: int = 90
    # Webhooks
    webhook_timeout: float = 5.0
    webhook_retry_for: int = 24 * 3600
    # Logs
    log_format: str = "kv"  # kv or json
    log_level: str = "INFO"
    # Web pages (sign-in, endpoints, calls)
    portal_registration: bool = False  # anyone who reaches the pages may create an account at /register
    portal_invite_code: str = ""  # when set, /register asks for it
    portal_session_hours: float = 12.0  # a sign-in lasts this long
    portal_secret_key_file: str = ""  # signs cookies; default <state_dir>/portal-secret.key, made at start
    portal_login_failures_per_account: int = 5  # failed sign-ins per account in 15 minutes, then refused
    portal_login_failures_per_address: int = 20  # failed sign-ins per client address in 15 minutes
    portal_secure_cookies: bool = False  # mark cookies Secure (HTTPS only); on by itself for HTTPS requests

    # Derived paths --------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def media_dir(self) -> Path:
        return self.state_path / "media"

    @property
    def recordings_dir(self) -> Path:
        return self.state_path / "recordings"

    @property
    def portal_secret_key_path(self) -> Path:
        return Path(self.portal_secret_key_file) if self.portal_secret_key_file else (
            self.state_path / "portal-secret.key")

    @property
    def media_route_addresses(self) -> list[str]:
        """Who may fetch /media/: ``media_route_allow``, or by default loopback and FreeSWITCH's host."""
        if self.media_route_allow:
            return list(self.media_route_allow)
        return [*LOOPBACK, *(switch.host for switch in self.switch_addresses if _is_address(switch.host))]

    @property
    def switch_addresses(self) -> list[SwitchAddress]:
        """Every switch the daemon uses: ``switches``, or the one at ``esl_host:esl_port``."""
        return list(self.switches) or [SwitchAddress(self.esl_host, self.esl_port, self.esl_password)]

    def masked(self) -> dict[str, Any]:
        """The effective settings with secrets masked, for ``check-config`` and logs."""
        out = dataclasses.asdict(self)
        for name in SECRET_FIELDS:
            out[name] = "****" if out[name] else ""
        out["database_url"] = mask_url(out["database_url"])
        out["media_base_url"] = mask_url(out["media_base_url"])
        out["switches"] = [{"host": sw.host, "port": sw.port, "password": "****"} for sw in self.switches]
        return out


def mask_url(url: str) -> str:
    """``url`` with its password (``user:password@`` or a ``password=`` parameter) shown as ****."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, after = rest.rpartition("@")
    if sep and at and ":" in userinfo and not userinfo.startswith("/"):
        # Everything up to the last '@' is the user's: a password holding '#', '/' or '?' unencoded is
        # not one to urlsplit (it ends the host there, and no password is found to mask).
        url = f"{scheme}://{userinfo.split(':', 1)[0]}:****@{after}"
    parts = urlsplit(url)
    query = "&".join(f"{name}=****" if name.lower() == "password" else item
                     for item in parts.query.split("&") if item
                     for name in [item.split("=", 1)[0]])
    if query == parts.query:
        return url  # nothing more to mask (and sqlite:////abs/path stays as written)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def database_url_problem(url: str) -> str | None:
    """What is wrong with a ``database_url``, or None."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if not url.startswith("sqlite:///") or url == "sqlite:///":
            return ("a SQLite store is sqlite:////absolute/path/file.db (four slashes), or sqlite:///relative/file.db "
                    "from the working directory")
        return None
    if parts.scheme in ("postgresql", "postgres"):
        if not parts.path.strip("/"):
            return "a PostgreSQL store is postgresql://user:password@host:port/dbname (the database name is missing)"
        try:
            parts.port  # noqa: B018 (raises on a port that is not a number)
        except ValueError:
            return "the port must be a number"
        return _pool_option_problem(parse_qs(parts.query))
    return "must be sqlite:///path/to/file.db or postgresql://user:password@host:port/dbname"


# Options of a PostgreSQL URL's query string (daemon.postgres) that must be numbers: whole ones with their
# least value (libpq reads connect_timeout as an integer), and seconds.
URL_WHOLE_NUMBERS = {"max_connections": 1, "connect_timeout": 0}
URL_SECONDS = ("timeout", "stale_timeout", "idle_in_transaction_timeout")


def _pool_option_problem(query: dict[str, list[str]]) -> str | None:
    for name, least in URL_WHOLE_NUMBERS.items():
        for value in query.get(name, []):
            if not (value.strip().isdecimal() and value.strip().isascii()) or int(value) < least:
                return f"{name} must be a whole number of at least {least}"
    for name in URL_SECONDS:
        for value in query.get(name, []):
            try:
                seconds = float(value)
            except ValueError:
                seconds = math.nan
            if not math.isfinite(seconds) or seconds < 0:
                return f"{name} must be a number of seconds, 0 or more"
    return None


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}

# TOML sections map onto flat names: [esl] host -> esl_host, [http] port -> http_port ...
SECTION_PREFIX = {"esl": "esl_", "http": "http_", "media": "media_", "webhook": "webhook_", "log": "log_",
                  "tts": "tts_", "portal": "portal_"}


def _flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in FIELDS:  # a section; a table-valued setting stays whole
            prefix = SECTION_PREFIX.get(key, key + "_")
            for sub, subvalue in value.items():
                name = sub if sub in FIELDS else prefix + sub
                flat[name] = subvalue
        else:
            flat[key] = value
    return flat


# How a value of each kind is written, for the error that names it (where Python's type name says it badly).
KIND_WORDS = {"list[str]": "a list of text (in a variable: comma-separated)",
              "dict[str, str]": "lang = voice pairs (in a variable: comma-separated lang=voice)",
              "bool": "true or false"}


def _coerce(name: str, raw: Any) -> Any:
    kind = FIELDS[name].type
    if kind == "list[SwitchAddress]":
        return parse_switches(raw)
    if kind in ("int", "float") and _not_finite(raw):
        raise ConfigError(f"{name}: expected a finite number, got {raw!r}")
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if kind == "float":
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if kind == "list[str]":
            if isinstance(raw, str):
                return [part.strip() for part in raw.split(",") if part.strip()]
            if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
                return raw
            raise ValueError
        if kind == "dict[str, str]":
            if isinstance(raw, str):
                pairs = [p.split("=", 1) for p in raw.split(",") if p.strip()]
                raw = {k.strip(): v.strip() for k, v in pairs}  # (a pair without "=" raises ValueError)
            if isinstance(raw, dict):
                merged = dict(DEFAULT_VOICES)
                merged.update({str(k): str(v) for k, v in raw.items()})
                return merged
            raise ValueError
        if not isinstance(raw, str | int | float):
            raise ValueError
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {KIND_WORDS.get(str(kind), kind)}, got {raw!r}") from None


def _not_finite(raw: Any) -> bool:
    # inf and nan parse as floats (TOML has them, float("inf") reads them) but no setting means them:
    # later an int() or a timedelta of them overflows at start.
    try:
        return not math.isfinite(float(raw))
    except OverflowError:
        return True  # an integer past what a float holds (10**400): no setting means it either
    except (TypeError, ValueError):
        return False  # not a number at all: _coerce says so


def parse_switches(raw: Any) -> list[SwitchAddress]:
    """``"host:port:password,host:port:password"`` (an IPv6 host in brackets: ``[::1]:8021:pw``) or a
    TOML list of tables ``{host = ..., port = ..., password = ...}``. Errors name the entry and never
    repeat a password."""
    if isinstance(raw, str):
        return [_switch_from_text(n, part.strip()) for n, part in enumerate(raw.split(","), start=1)
                if part.strip()]
    if isinstance(raw, list):
        return [_switch_from_table(n, entry) for n, entry in enumerate(raw, start=1)]
    raise ConfigError("switches: expected \"host:port:password,...\" or a list of "
                      "{host = ..., port = ..., password = ...}")


def _switch_from_text(n: int, text: str) -> SwitchAddress:
    where = f"switches: entry {n}"
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or not rest.startswith(":"):
            raise ConfigError(f"{where}: an IPv6 host is written in brackets, [::1]:8021:password")
        rest = rest[1:]
    else:
        host, _, rest = text.partition(":")
    port, colon, password = rest.partition(":")
    if not colon:
        raise ConfigError(f"{where}: must be host:port:password (host {host!r})")
    return SwitchAddress(host.strip(), _switch_port(where, port.strip()), password)


def _switch_from_table(n: int, entry: Any) -> SwitchAddress:
    where = f"switches: entry {n}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table {{host = ..., port = ..., password = ...}}")
    unknown = sorted(set(entry) - {"host", "port", "password"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; use host, port and password")
    missing = [key for key in ("host", "port", "password") if key not in entry]
    if missing:
        raise ConfigError(f"{where}: {', '.join(missing)} missing (each switch needs host, port and password)")
    host, port, password = entry["host"], entry["port"], entry["password"]
    if not isinstance(host, str) or not isinstance(password, str):
        raise ConfigError(f"{where}: host and password must be strings")
    if isinstance(port, bool) or not isinstance(port, int | str):
        raise ConfigError(f"{where}: port must be a number")
    return SwitchAddress(host, _switch_port(where, str(port)), password)


def _switch_port(where: str, text: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"{where}: the port must be a number, got {text!r}")
    return int(text)


def _validate_switches(switches: list[SwitchAddress]) -> None:
    seen: set[str] = set()
    for n, switch in enumerate(switches, start=1):
        where = f"switches: entry {n} ({switch.name})"
        if not switch.host or any(c.isspace() or c in ",/[]" for c in switch.host):
            raise ConfigError(f"switches: entry {n}: the host must be a name or an address, got {switch.host!r}")
        if not 1 <= switch.port <= 65535:
            raise ConfigError(f"{where}: the port must be 1..65535")
        if not switch.password or any(c in switch.password for c in "\r\n "):
            raise ConfigError(f"{where}: the password must be non-empty with no spaces or line breaks")
        if switch.name in seen:
            raise ConfigError(f"{where}: listed twice")
        seen.add(switch.name)


def _validate(s: Settings) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(1 <= s.esl_port <= 65535, f"esl_port: must be 1..65535, got {s.esl_port}")
    need(0 <= s.http_port <= 65535, f"http_port: must be 0..65535, got {s.http_port}")
    need(bool(s.esl_host), "esl_host: must not be empty")
    need(bool(s.http_host.strip()), "http_host: must not be empty (it would listen on every address; "
                                    "write 0.0.0.0 or :: to mean that)")
    need(bool(s.esl_password) and not any(c in s.esl_password for c in "\r\n "),
         "esl_password: must be non-empty with no spaces or line breaks")
    _validate_switches(s.switches)
    need(s.switch_lost_after >= 0, "switch_lost_after: must be 0 (wait for ever) or more seconds")
    need(s.calls_per_second >= 0, "calls_per_second: must be 0 (no cap) or more")
    need(s.lease_seconds >= 3, "lease_seconds: must be at least 3 (the lease is renewed every third of it)")
    need(s.loop_block_warning == 0 or 0.01 <= s.loop_block_warning <= 60,
         "loop_block_warning: must be 0 (not watched) or 0.01 to 60 seconds")
    need(len(s.instance_id) <= 100 and all(c.isalnum() or c in "._:-" for c in s.instance_id),
         "instance_id: at most 100 letters, digits and . _ : - (\"\" = made at start)")
    need(0 <= s.switch_session_margin < 1, "switch_session_margin: must be at least 0 and less than 1")
    for name in ("esl_command_timeout", "esl_heartbeat_timeout", "switch_status_interval", "webhook_timeout",
                 "media_connect_timeout", "media_read_timeout", "media_total_timeout", "tts_timeout",
                 "http_header_timeout", "http_body_timeout", "http_idle_timeout",
                 "media_queue_timeout", "media_decode_timeout", "esl_reconnect_max_delay", "shutdown_grace"):
        need(getattr(s, name) > 0, f"{name}: must be greater than 0")
    for name in ("originate_timeout", "max_in_flight", "schedule_max_days", "sample_rate", "msg_max_chars",
                 "media_max_bytes", "media_max_play_seconds", "media_max_dialtone_seconds", "media_workers",
                 "media_cpu_seconds", "media_max_channels", "media_max_sample_rate", "media_max_decoded_samples",
                 "http_max_connections"):
        need(getattr(s, name) >= 1, f"{name}: must be at least 1")
    for name in ("schedule_grace", "past_grace", "media_max_redirects", "recordings_retention_days",
                 "auth_failures_per_minute", "portal_login_failures_per_account",
                 "portal_login_failures_per_address", "media_cache_bytes", "webhook_retry_for"):
        need(getattr(s, name) >= 0, f"{name}: must be 0 or more")
    need(s.sample_rate in (8000, 16000, 32000, 48000), "sample_rate: must be 8000, 16000, 32000 or 48000")
    need(s.media_mode in ("local", "http"), f"media_mode: must be 'local' or 'http', got {s.media_mode!r}")
    need(s.media_mode != "http" or s.media_base_url.startswith(("http://", "https://")),
         "media_base_url: must be an http(s) URL when media_mode is 'http'")
    need(s.log_format in ("kv", "json"), f"log_format: must be 'kv' or 'json', got {s.log_format!r}")
    need(s.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
         "log_level: must be DEBUG, INFO, WARNING or ERROR")
    problem = database_url_problem(s.database_url)
    need(problem is None, f"database_url: {problem} (got {mask_url(s.database_url)!r})")
    need(0 < s.portal_session_hours <= 24 * 366, "portal_session_hours: must be more than 0 and at most 8784 (a year)")
    need(not any(c in s.portal_invite_code for c in "\r\n"), "portal_invite_code: one line, no line breaks")
    need(s.tts_engine in TTS_ENGINES, f"tts_engine: must be one of {', '.join(TTS_ENGINES)}, got {s.tts_engine!r}")
    need(s.tts_engine != "espeak-ng" or shutil.which("espeak-ng") is not None,
         "tts_engine: espeak-ng: the espeak-ng command is not installed (apt-get install espeak-ng), "
         "or use the default, bundled")
    need(s.media_memory_mb == 0 or s.media_memory_mb >= 128,
         "media_memory_mb: must be 0 (no limit) or at least 128 (an idle worker already takes about 115 MB)")
    need(s.media_max_decoded_samples >= s.media_max_play_seconds * 8000,
         "media_max_decoded_samples: must allow at least media_max_play_seconds of 8 kHz mono")
    for entry in s.media_route_allow:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            need(False, f"media_route_allow: {entry!r} is not an address or an address range (CIDR)")
    unknown = set(s.tts_voices) - set(LANGUAGES)
    need(not unknown, f"tts_voices: unknown language(s) {sorted(unknown)}; use {', '.join(LANGUAGES)}")
    for entry in s.media_allow_private:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            need(all(part.isalnum() or part == "-" for part in entry.replace(".", "-").split("-")) and entry != "",
                 f"media_allow_private: {entry!r} is neither a host name nor an address range")


def _read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:  # a folder, or not readable by this user (e.g. not in the callbridge group)
        raise ConfigError(f"config file {path}: cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text (TOML files are UTF-8)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


# CALLBRIDGE_* variables that are not settings: the config file's path, and the test suite's own.
NOT_SETTINGS = ("CALLBRIDGE_CONFIG", "CALLBRIDGE_ESL_TRACES")
NOT_SETTINGS_PREFIXES = ("CALLBRIDGE_TEST_", "CALLBRIDGE_REQUIRE_")


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``CALLBRIDGE_*`` variable that names no setting (a misspelling is otherwise
    silently ignored), with the variable it most resembles when one is close."""
    import difflib

    env = os.environ if environ is None else environ
    known = ["CALLBRIDGE_" + name.upper() for name in FIELDS]
    out = []
    for key in sorted(env):
        if not key.startswith("CALLBRIDGE_") or key in known or key in NOT_SETTINGS \
                or key.startswith(NOT_SETTINGS_PREFIXES):
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        out.append(f"{key} is not a setting, and is ignored" + (f" (did you mean {close[0]}?)" if close else ""))
    return out


def load_settings(path: str | os.PathLike[str] | None = None,
                  environ: Mapping[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Read the file (if any), then ``CALLBRIDGE_*`` variables, then keyword overrides; validate."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = path or env.get("CALLBRIDGE_CONFIG")
    if path:
        data = _read_file(path)
        for name, raw in _flatten(data).items():
            if name not in FIELDS:
                raise ConfigError(f"config file {path}: unknown setting {name!r}")
            values[name] = _coerce(name, raw)
    for name in FIELDS:
        key = "CALLBRIDGE_" + name.upper()
        if key in env:
            values[name] = _coerce(name, env[key])
    for name, raw in overrides.items():
        if name not in FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = raw
    settings = Settings(**values)
    settings.log_level = settings.log_level.upper()
    if not settings.state_dir:
        settings.state_dir = env.get("STATE_DIRECTORY", "").split(":")[0] or "state"
    settings.state_dir = str(Path(settings.state_dir).absolute())
    if not settings.database_url:
        settings.database_url = f"sqlite:///{settings.state_path / 'callbridge.db'}"
    _validate(settings)
    settings.database_url = _absolute_sqlite(settings.database_url)
    return settings


def _absolute_sqlite(url: str) -> str:
    """A SQLite URL with a relative path (``sqlite:///var/lib/x.db`` is ``./var/lib/x.db``: an absolute
    path takes four slashes) made absolute from the working directory, as ``state_dir`` is: every
    command, log line and ``check-config`` then names the one file they all open."""
    if not url.startswith("sqlite:///"):
        return url
    path, mark, query = url[len("sqlite:///"):].partition("?")
    if not path or path == ":memory:" or path.startswith("/"):
        return url
    return f"sqlite:///{Path(path).absolute()}{mark}{query}"


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def zone(name: str) -> ZoneInfo:
    """The named IANA zone, or ConfigError naming it."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # (OSError: a folder of zones, a name too long)
        raise ConfigError(f"timezone: unknown zone {name!r}") from None
