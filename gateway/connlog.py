"""Connection and access log lines: text, or one JSON object per line (server.log_format).

One line per connection end (ConnectionLog.log_connection_end, called by the admission path),
and the per-request access log (AccessLog, the object pywsgi writes its lines to). Neither ever
holds a token: connection lines name the token's `sub` only, and secret-looking query values
(`token=`, ...) are masked in request lines.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

from flask import Flask

from gateway.redact import redact_text
from gateway.state import state

__all__ = ["ConnectionLog", "AccessLog", "init_app"]

log = logging.getLogger("gateway.connections")

# pywsgi's line: '%s - - [%s] "%s" %s %s %.6f' (client, time, request line, status, length, seconds)
_PYWSGI_LINE = re.compile(
    r'^(?P<client>\S+) - - \[(?P<time>[^\]]*)\] "(?P<request>.*)" (?P<status>\S+) (?P<length>\S+) (?P<duration>\S+)$'
)
_NEEDS_QUOTES = re.compile(r'[\s"=]')  # a value with these is written as a JSON string
MAX_CHANNELS_LOGGED = 50  # a connection may name many channels; the line stays bounded


def _iso_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class ConnectionLog:
    """Writes one line per connection end; JSON lines go straight to `stream` (stderr), so a
    log pipeline reads each line as one object; text lines go through the `gateway.connections`
    logger like the rest of the gateway's log."""

    def __init__(self, log_format: str = "text", stream: IO[str] | None = None, enabled: bool = True) -> None:
        self.json = log_format == "json"
        self.stream = stream
        self.enabled = enabled  # server.connection_log

    def log_connection_end(
        self,
        *,
        transport: str,
        channels: Sequence[str],
        client: str,
        duration_s: float,
        events: int,
        nbytes: int,
        reason: str,
        sub: str | None = None,
        status: int | None = None,
    ) -> None:
        """One connection ended. `sub` is the token's subject (who), never the token."""
        if not self.enabled or not (self.json or log.isEnabledFor(logging.INFO)):
            return
        fields: dict[str, Any] = {
            "msg": "connection_end",
            "transport": transport,
            "channels": list(channels[:MAX_CHANNELS_LOGGED]),
            "client": client,
            "duration_s": round(duration_s, 3),
            "events": events,
            "bytes": nbytes,
            "reason": reason,
        }
        if len(channels) > MAX_CHANNELS_LOGGED:
            fields["channels_total"] = len(channels)
        if sub is not None:
            fields["sub"] = sub
        if status is not None:
            fields["status"] = status
        if self.json:
            self._write_json(fields)
        else:
            log.info("%s", _text(fields))

    def _write_json(self, fields: dict[str, Any]) -> None:
        line = json.dumps({"ts": _iso_now(), "logger": "gateway.connections", **fields}, ensure_ascii=False)
        stream = self.stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()


def _text(fields: dict[str, Any]) -> str:
    parts = [fields["msg"]]
    for key, value in fields.items():
        if key == "msg":
            continue
        if isinstance(value, list):
            value = ",".join(value) or "-"
        text = str(value)
        if not text or _NEEDS_QUOTES.search(text):
            text = json.dumps(text, ensure_ascii=False)
        parts.append(f"{key}={text}")
    return " ".join(parts)


class AccessLog:
    """The object pywsgi writes its access lines to (server.py passes it as `log=`): redacts
    tokens and, with log_format "json", turns each line into a JSON object."""

    def __init__(self, log_format: str = "text", stream: IO[str] | None = None) -> None:
        self.json = log_format == "json"
        self.stream = stream

    def write(self, line: str) -> None:
        stream = self.stream or sys.stderr
        line = redact_text(line.rstrip("\n"))
        if self.json:
            line = json.dumps(_access_fields(line), ensure_ascii=False)
        stream.write(line + "\n")
        stream.flush()

    def flush(self) -> None:
        (self.stream or sys.stderr).flush()


def _access_fields(line: str) -> dict[str, Any]:
    match = _PYWSGI_LINE.match(line)
    if match is None:
        return {"ts": _iso_now(), "logger": "gateway.access", "msg": line}
    method, _, rest = match["request"].partition(" ")
    path, _, protocol = rest.rpartition(" ")
    fields: dict[str, Any] = {
        "ts": _iso_now(),
        "logger": "gateway.access",
        "msg": "request",
        "client": match["client"],
        "method": method,
        "path": path or rest,
        "protocol": protocol,
    }
    for key in ("status", "length"):
        value = match[key]
        fields[key] = int(value) if value.isdigit() else value
    try:
        fields["duration_s"] = round(float(match["duration"]), 6)
    except ValueError:
        fields["duration_s"] = match["duration"]
    return fields


def init_app(app: Flask) -> ConnectionLog:
    st = state(app)
    connlog = ConnectionLog(st.config.server.log_format, enabled=st.config.server.connection_log)
    st.parts[ConnectionLog] = connlog
    return connlog
