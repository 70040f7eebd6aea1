"""Request heads before the app sees them: the framing rules two HTTP parsers must agree on
(RFC 9112 sections 5 and 6), the cap on a head's total size, and the JSON refusals the server
writes itself. Plain Python; gateway/server.py wires them into pywsgi."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

__all__ = [
    "Refused",
    "HeadReader",
    "asks_to_close",
    "check_framing",
    "forget_unread_headers",
    "head_too_big",
    "holds_a_head",
    "refusal",
]


# The request headers a stream may still read once it has begun (access log, CORS, resume,
# forwarding); forget_unread_headers drops the rest of its head.
KEPT_HEADERS = frozenset(
    "HTTP_" + name.upper().replace("-", "_")
    for name in (
        "Host",
        "Origin",
        "Authorization",
        "Cookie",
        "Last-Event-ID",
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "Forwarded",
        "Via",
        "User-Agent",
        "Referer",
        "Accept",
        "Connection",
        "Upgrade",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Extensions",
        "Sec-Fetch-Site",
        "If-None-Match",
        "If-Modified-Since",
        "Cache-Control",
        "Idempotency-Key",
    )
)


def forget_unread_headers(environ: dict[str, Any]) -> None:
    """Drop from a WSGI environ every header the gateway never reads: a stream (SSE, WebSocket)
    keeps its environ for its whole life, and with it up to server.max_head_bytes of head
    (issue 12, hole 7). Call once the stream has begun."""
    for key in [k for k in environ if k.startswith("HTTP_") and k not in KEPT_HEADERS]:
        del environ[key]


class Refused(ValueError):
    """A request head we answer with an error of our own, before the app sees it."""

    def __init__(self, status: str, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def head_too_big() -> Refused:
    return Refused(
        "431",
        "head_too_large",
        "the request line and headers are over server.max_head_bytes; send fewer or shorter headers",
    )


# RFC 9110 section 5.6.2: a method and a field name are tokens.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DIGITS = re.compile(r"[0-9]+")
# In a field value: CR, LF (obs-fold, once parsed) and NUL must be refused (RFC 9110 section 5.5).
_BAD_VALUE = re.compile(r"[\r\n\x00]")


def origin_form(target: str) -> str:
    """A request target as a path: the absolute form (`GET http://host/poll/a`), which a server
    must accept (RFC 9112 section 3.2.2), names the same resource as its path and query."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or "/" in scheme:
        return target
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    path = rest[cut:]
    return path if path.startswith("/") else "/" + path


def check_framing(method: str, version: str, headers: Any) -> None:
    """Refuse a head whose meaning two parsers could disagree on (RFC 9112 sections 5 and 6):
    the gateway, and the upstream app behind [proxy], must see the same message."""
    if not _TOKEN.fullmatch(method):
        raise Refused("400", "bad_method", "the request method is not a valid token")
    if getattr(headers, "defects", None) or (hasattr(headers, "get_payload") and headers.get_payload()):
        # A line that is not `name: value` (e.g. a space in the name): Python's parser would
        # stop there and silently drop every header after it.
        raise Refused("400", "bad_header", "a header line is not 'name: value' with a valid token as its name")
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            raise Refused("400", "bad_header", "a header field name is not a valid token")
        if _BAD_VALUE.search(value):
            raise Refused("400", "bad_header", f"the {name} header holds a line break (obs-fold) or NUL")
    if version == "HTTP/1.1" and len(headers.get_all("Host") or ()) != 1:
        # RFC 9112 section 3.2: exactly one. Two could name one site to the gateway and another
        # to the app behind [proxy] (or to a cache between).
        raise Refused("400", "bad_host", "the request needs exactly one Host header (RFC 9112, section 3.2)")
    lengths = headers.get_all("Content-Length") or []
    codings = headers.get_all("Transfer-Encoding") or []
    values = {v.strip() for length in lengths for v in length.split(",")}
    if lengths and (len(values) != 1 or not _DIGITS.fullmatch(next(iter(values)))):
        raise Refused("400", "bad_content_length", "Content-Length must be one whole number of bytes")
    if codings:
        if version == "HTTP/1.0":
            raise Refused("400", "bad_transfer_encoding", "HTTP/1.0 requests cannot use Transfer-Encoding")
        if lengths:
            raise Refused("400", "bad_framing", "a request may have Content-Length or Transfer-Encoding, not both")
        if len(codings) != 1 or codings[0].strip().lower() != "chunked":
            raise Refused("501", "unsupported_transfer_encoding", 'the only Transfer-Encoding accepted is "chunked"')
        headers.replace_header("Transfer-Encoding", "chunked")  # pywsgi compares it exactly
    elif lengths:
        # One plain value, as pywsgi (int()) and the upstream behind [proxy] will both read it.
        del headers["Content-Length"]
        headers["Content-Length"] = next(iter(values))


class HeadReader:
    """What pywsgi parses the headers from: the connection's reader, but refusing to hand out
    more than `budget` bytes, so a head over the cap is refused before it is all in memory."""

    def __init__(self, rfile: Any, budget: int) -> None:
        self._rfile = rfile
        self._budget = budget

    def readline(self, limit: int = -1) -> bytes:
        want = self._budget + 1 if limit is None or limit < 0 else min(limit, self._budget + 1)
        line = self._rfile.readline(want)
        self._budget -= len(line)
        if self._budget < 0:
            raise head_too_big()
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rfile, name)


_REASONS = {
    "400": "Bad Request",
    "408": "Request Timeout",
    "414": "Request URI Too Long",
    "431": "Request Header Fields Too Large",
    "501": "Not Implemented",
}


def refusal(status: str, code: str = "", detail: str = "") -> bytes:
    """Our answer to a request refused before the app saw it, in the contract's JSON error shape
    (pywsgi's own answers, to a request line over 8 KB or malformed headers, have empty bodies).
    The connection is closed after it: what follows such a head cannot be trusted."""
    if not code:
        if status == "414":
            code, detail = "uri_too_long", "the request line is over 8 KB; shorten the URL"
        elif status == "408":
            code, detail = "head_timeout", "the request line and headers did not arrive within server.head_timeout_s"
        else:
            code, detail = "bad_request", "the request line or headers are malformed or too big"
    body = json.dumps({"error": code, "detail": detail}).encode()
    reason = _REASONS.get(status, "Bad Request")
    head = f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


def asks_to_close(connection_headers: Iterable[str]) -> bool:
    """Does any Connection header list the `close` option (RFC 9110 section 7.6.1)?"""
    return any(token.strip(" \t").lower() == "close" for value in connection_headers for token in value.split(","))


def holds_a_head(data: bytes) -> bool:
    """Does `data` hold a whole request head, ended by CRLFCRLF or by bare LFs (RFC 9112 section
    2.2 lets a server accept those; pywsgi does)?"""
    return b"\n\r\n" in data or b"\n\n" in data
