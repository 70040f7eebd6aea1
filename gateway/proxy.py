"""The reverse proxy: with `[proxy] upstream` set, every request the gateway does not own goes to
the upstream app with its method, path, query, headers and body, streamed both ways in chunks.

Owned paths (cors.is_owned) are never proxied, so they keep their own 404/405 JSON.
WebSocket handshakes on proxied paths are spliced to the upstream as raw bytes after the
gateway forwards the handshake, so the upstream does the WebSocket protocol itself.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import gevent
import requests
from flask import Flask, Response, request
from requests.adapters import HTTPAdapter
from urllib3.util import SKIP_HEADER

from gateway.cors import is_owned
from gateway.errors import error_response
from gateway.state import state

__all__ = ["init_app"]

log = logging.getLogger(__name__)

CHUNK = 65536
# RFC 9110 section 7.6.1: these describe one connection, not the message; never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def init_app(app: Flask) -> None:
    cfg = state(app).config.proxy
    if not cfg.upstream:
        return
    http = requests.Session()
    http.trust_env = False  # the upstream is named in config, never reached through env proxies
    http.headers.clear()  # forward the client's headers, not requests' defaults
    http.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=64))
    http.mount("https://", HTTPAdapter(pool_connections=4, pool_maxsize=64))
    upstream = cfg.upstream.rstrip("/")

    @app.before_request
    def forward() -> Response | None:
        # Only requests no route of ours matched, on paths we do not own.
        if request.routing_exception is None or is_owned(request.path):
            return None
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return _bridge_websocket(upstream, cfg.timeout_s)
        return _forward(http, upstream, cfg.timeout_s)


def _target(upstream: str) -> str:
    path = quote(request.path, safe="/:@!$&'()*+,;=~")
    query = request.query_string.decode("latin-1")
    return f"{upstream}{path}?{query}" if query else f"{upstream}{path}"


def _request_headers(upstream: str) -> dict[str, str]:
    """The client's headers minus hop-by-hop ones, plus the X-Forwarded-* trio."""
    connection_named = {h.strip().lower() for h in request.headers.get("Connection", "").split(",")}
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        low = name.lower()
        if low in HOP_BY_HOP or low in connection_named or low in ("host", "content-length", "expect"):
            continue
        headers[name] = value
    client = request.environ.get("REMOTE_ADDR", "")
    prior = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {client}" if prior else client
    # Behind another proxy (Heroku's router) keep what it said; otherwise say what we saw.
    headers["X-Forwarded-Proto"] = request.headers.get("X-Forwarded-Proto") or request.scheme
    headers["X-Forwarded-Host"] = request.headers.get("X-Forwarded-Host") or request.host
    headers["Host"] = urlsplit(upstream).netloc
    headers.setdefault("User-Agent", SKIP_HEADER)  # no "python-urllib3/x" the client never sent
    headers.setdefault("Accept-Encoding", SKIP_HEADER)
    return headers


class _Body:
    """The request body as a file-like object with a known length, so requests streams it in
    blocks with the client's Content-Length instead of reading it into memory."""

    def __init__(self, stream: Any, length: int) -> None:
        self._stream = stream
        self.len = length

    def read(self, size: int = CHUNK) -> bytes:
        return self._stream.read(min(size if size and size > 0 else CHUNK, CHUNK))


def _chunks(stream: Any) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK):
        yield chunk


def _forward(http: requests.Session, upstream: str, timeout_s: float) -> Response:
    headers = _request_headers(upstream)
    stream = request.environ["wsgi.input"]
    length = request.content_length
    body: Any = None
    if length:
        body = _Body(stream, length)
    elif request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = _chunks(stream)  # sent on chunked as well
    try:
        resp = http.request(
            request.method,
            _target(upstream),
            headers=headers,
            data=body,
            stream=True,
            allow_redirects=False,
            timeout=timeout_s,
        )
    except requests.Timeout:
        return error_response(504, "upstream_timeout", f"the upstream app did not answer within {timeout_s:g} s")
    except requests.RequestException as exc:
        log.warning("proxy: %s %s failed: %s", request.method, request.path, type(exc).__name__)
        return error_response(502, "upstream_unavailable", "the upstream app refused or dropped the connection")
    connection_named = {h.strip().lower() for h in resp.headers.get("Connection", "").split(",")}
    out = Response(_relay(resp, request.path), status=resp.status_code, direct_passthrough=True)
    out.headers.clear()
    for name, value in resp.raw.headers.items():
        low = name.lower()
        if low in HOP_BY_HOP or low in connection_named:
            continue
        out.headers.add(name, value)
    if request.method == "HEAD":
        resp.close()
    return out


def _relay(resp: requests.Response, path: str) -> Iterator[bytes]:
    """The upstream body as it arrives: read1 returns whatever is there, so a stream (SSE,
    chunked) goes out event by event, and a large body never sits in memory whole."""
    try:
        while True:
            try:
                chunk = resp.raw.read1(CHUNK, decode_content=False)
            except Exception as exc:
                log.warning("proxy: upstream body of %s broke off: %s", path, type(exc).__name__)
                # Reset, so the client sees a truncated response rather than a complete-looking one.
                raise ConnectionResetError(104, "upstream body broke off") from None
            if not chunk:
                return
            yield chunk
    finally:
        resp.close()


def _bridge_websocket(upstream: str, timeout_s: float) -> Response:
    """Forward the handshake, then copy bytes both ways until either side closes."""
    client = _client_socket()
    if client is None:
        return error_response(500, "websocket_unsupported", "this server cannot hand over the connection")
    parts = urlsplit(upstream)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if parts.scheme == "https":
        return error_response(
            502, "upstream_unavailable", "WebSocket bridging to an https:// upstream is not supported"
        )
    try:
        up = socket.create_connection((parts.hostname, port), timeout=timeout_s)
    except TimeoutError:
        return error_response(504, "upstream_timeout", f"the upstream app did not answer within {timeout_s:g} s")
    except OSError:
        return error_response(502, "upstream_unavailable", "the upstream app refused the WebSocket connection")
    up.settimeout(client.gettimeout())  # the server's stall timeout, if it sets one
    headers = _request_headers(upstream)
    headers["Connection"] = "Upgrade"
    headers["Upgrade"] = request.headers.get("Upgrade", "websocket")
    lines = [f"GET {_target('')} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.items() if value is not SKIP_HEADER]
    up.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    pipes = [gevent.spawn(_pipe, client, up), gevent.spawn(_pipe, up, client)]
    gevent.joinall(pipes, count=1)  # one side is done: close both
    for sock in (client, up):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    gevent.joinall(pipes, timeout=2)
    up.close()
    client.close()
    return _Handled()


def _client_socket() -> socket.socket | None:
    """The client's socket under gevent's pywsgi (as simple-websocket finds it)."""
    stream = request.environ.get("wsgi.input")
    stream = getattr(stream, "rfile", stream)
    raw = getattr(stream, "raw", None)
    sock = getattr(raw, "_sock", None)
    return sock.dup() if sock is not None else None


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy one direction. A quiet side is fine (push-only sockets are); a side that stops
    reading makes sendall time out after the server's stall timeout, which ends the bridge."""
    while True:
        try:
            data = src.recv(CHUNK)
        except TimeoutError:
            continue
        except OSError:
            return
        if not data:
            return
        try:
            dst.sendall(data)
        except OSError:
            return


class _Handled(Response):
    """The connection was taken over: the server must write nothing more on it."""

    def __call__(self, environ: Any, start_response: Any) -> list[bytes]:
        return []
