"""The reverse proxy: with `[proxy] upstream` set, every request the gateway does not own goes to
the upstream app with its method, path, query, headers and body, streamed both ways in chunks.

Owned paths (cors.is_owned) are never proxied, so they keep their own 404/405 JSON.
WebSocket handshakes on proxied paths are forwarded, and only once the upstream has answered
a valid 101 are the two sockets spliced (gateway/wsbridge.py), so the upstream does the
WebSocket protocol itself; any other answer is relayed as a normal response.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from flask import Flask, Response, request
from requests.adapters import HTTPAdapter
from urllib3.util import SKIP_HEADER

from gateway import wsbridge
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
            return _bridge_websocket(upstream, cfg.timeout_s, cfg.websocket_idle_s)
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


class _ClientBodyError(Exception):
    """The client's body could not be read (bad chunked encoding, cut off): the client's fault."""


def _read_client(stream: Any, size: int) -> bytes:
    try:
        return stream.read(size)
    except (OSError, ValueError) as exc:  # pywsgi's chunked decoder refused it, or the client left
        raise _ClientBodyError(type(exc).__name__) from None


class _Body:
    """The request body as a file-like object with a known length, so requests streams it in
    blocks with the client's Content-Length instead of reading it into memory."""

    def __init__(self, stream: Any, length: int) -> None:
        self._stream = stream
        self.len = length

    def read(self, size: int = CHUNK) -> bytes:
        return _read_client(self._stream, min(size if size and size > 0 else CHUNK, CHUNK))


def _chunks(stream: Any) -> Iterator[bytes]:
    while chunk := _read_client(stream, CHUNK):
        yield chunk


def _bad_body() -> Response:
    response = error_response(
        400, "invalid_body", "the request body is malformed (bad chunked encoding) or was cut off"
    )
    response.headers["Connection"] = "close"  # what follows a broken body cannot be framed
    return response


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
    except _ClientBodyError:
        return _bad_body()
    except requests.Timeout:
        return error_response(504, "upstream_timeout", f"the upstream app did not answer within {timeout_s:g} s")
    except requests.RequestException as exc:
        if _caused_by_client(exc):
            return _bad_body()
        log.warning("proxy: %s %s failed: %s", request.method, request.path, type(exc).__name__)
        return error_response(502, "upstream_unavailable", "the upstream app refused or dropped the connection")
    except ValueError:  # http.client refused what the client sent (the server lets through only tokens)
        return error_response(400, "bad_request", "the request cannot be forwarded as it is")
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


def _caused_by_client(exc: BaseException) -> bool:
    """requests wraps what our body reader raised; find it in the chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _ClientBodyError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _refused_upgrade(status: int, code: str, detail: str) -> Response:
    response = error_response(status, code, detail)
    response.headers["Connection"] = "close"  # no second request may ride a refused upgrade
    return response


def _bridge_websocket(upstream: str, timeout_s: float, idle_s: float) -> Response:
    """Forward the handshake; splice the sockets only after the upstream's valid 101."""
    problem = wsbridge.client_problem(request.method, request.headers)
    if problem is not None:
        return _refused_upgrade(400, "bad_handshake", problem)
    admission = state().admission
    assert admission is not None
    ticket = admission.admit_tunnel(request.environ)  # 429/503 over the connection limits
    parts = urlsplit(upstream)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if parts.scheme == "https":
        return _refused_upgrade(
            502, "upstream_unavailable", "WebSocket bridging to an https:// upstream is not supported"
        )
    try:
        up = socket.create_connection((parts.hostname, port), timeout=timeout_s)
    except TimeoutError:
        return _refused_upgrade(504, "upstream_timeout", f"the upstream app did not answer within {timeout_s:g} s")
    except OSError:
        return _refused_upgrade(502, "upstream_unavailable", "the upstream app refused the WebSocket connection")
    headers = _request_headers(upstream)
    headers["Connection"] = "Upgrade"
    headers["Upgrade"] = "websocket"
    lines = [f"GET {_target('')} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.items() if value is not SKIP_HEADER]
    try:
        up.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        answer = wsbridge.read_answer(up, timeout_s)
    except TimeoutError:
        up.close()
        return _refused_upgrade(504, "upstream_timeout", f"the upstream app did not answer within {timeout_s:g} s")
    except (OSError, wsbridge.BadAnswer) as exc:
        up.close()
        log.warning("proxy: WebSocket upgrade of %s failed: %s", request.path, exc)
        return _refused_upgrade(502, "upstream_unavailable", "the upstream app refused or dropped the connection")
    if answer.status != 101:
        return _relay_answer(answer, up, timeout_s)
    problem = wsbridge.answer_problem(answer, request.headers["Sec-WebSocket-Key"])
    client = _client_socket() if problem is None else None
    if client is None:
        up.close()
        if problem is None:
            return _refused_upgrade(500, "websocket_unsupported", "this server cannot hand over the connection")
        log.warning("proxy: WebSocket upgrade of %s: the upstream's %s", request.path, problem)
        return _refused_upgrade(502, "upstream_bad_handshake", f"the upstream app's {problem}")
    try:
        with ticket:
            client.sendall(answer.raw)  # its 101 as it sent it, and any frames that followed
            wsbridge.splice(client, up, idle_s)
    except OSError:
        pass
    finally:
        up.close()
        client.close()
    return _Handled()


def _relay_answer(answer: wsbridge.Answer, up: socket.socket, timeout_s: float) -> Response:
    """A non-101 answer to an upgrade: relayed like any proxied response, then the connection ends."""
    if 100 <= answer.status < 200:
        up.close()
        return _refused_upgrade(502, "upstream_bad_handshake", f"the upstream app answered {answer.status}")
    connection_named = _tokens(answer.get("Connection"))
    out = Response(wsbridge.body(answer, up, timeout_s), status=answer.status, direct_passthrough=True)
    out.headers.clear()
    for name, value in answer.headers:
        low = name.lower()
        if low in HOP_BY_HOP or low in connection_named or low == "content-length":
            continue
        out.headers.add(name, value)
    out.headers["Connection"] = "close"
    return out


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",")}


def _client_socket() -> socket.socket | None:
    """The client's socket under gevent's pywsgi (as simple-websocket finds it)."""
    stream = request.environ.get("wsgi.input")
    stream = getattr(stream, "rfile", stream)
    raw = getattr(stream, "raw", None)
    sock = getattr(raw, "_sock", None)
    return sock.dup() if sock is not None else None


class _Handled(Response):
    """The connection was taken over: the server must write nothing more on it."""

    def __call__(self, environ: Any, start_response: Any) -> list[bytes]:
        return []
