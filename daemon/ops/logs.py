"""Structured logs to stderr (journald picks them up): one line per event, key=value or JSON.

Use ``log_event(logger, "call.answered", callid=..., leg="a")``: the message is an event name and
everything else is a field, so every line of a call carries its callid.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

RESERVED = set(vars(logging.makeLogRecord({})))


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in RESERVED and not k.startswith("_")}


def _printable(dumped: str) -> str:
    """JSON text with the characters ``json.dumps`` leaves raw but a terminal or a line reader acts on (DEL,
    C1 controls such as NEL, U+2028, bidi overrides) written as ``\\u`` escapes: a value a client or
    FreeSWITCH sent cannot start a line, rewrite one on the screen or hide what follows."""
    if dumped.isprintable():
        return dumped
    return "".join(ch if ch.isprintable() else json.dumps(ch)[1:-1] for ch in dumped)


def _kv(value: Any) -> str:
    text = str(value)
    if text and text.isprintable() and not any(ch in text for ch in ' "='):
        return text
    return _printable(json.dumps(text, ensure_ascii=False))


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [f"level={record.levelname.lower()}", f"logger={record.name}", f"event={_kv(record.getMessage())}"]
        parts += [f"{k}={_kv(v)}" for k, v in _fields(record).items()]
        if record.exc_info:
            parts.append("exc=" + _kv(self.formatException(record.exc_info)))
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
                               "logger": record.name, "event": record.getMessage()}
        out.update({k: v if isinstance(v, int | float | bool | type(None)) else str(v)
                    for k, v in _fields(record).items()})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _printable(json.dumps(out, ensure_ascii=False))


def configure(fmt: str = "kv", level: str = "INFO") -> None:
    """Send every callbridge log line to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def one_line(error: BaseException, limit: int = 300) -> str:
    """An error's text as one log field: its lines joined (PostgreSQL's messages run over several), cut."""
    return " ".join(str(error).split())[:limit]


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with its fields (never pass a whole token)."""
    logger.log(level, event, extra=fields)
