"""Serving with gevent, and shutting down politely. The one place that knows about gevent."""

from __future__ import annotations

import gc
import io
import json
import logging
import signal
import socket
import sys
import time

import gevent
from flask import Flask
from gevent.pywsgi import WSGIHandler, WSGIServer

from gateway.errors import ConfigError
from gateway.state import state
from gateway.transports.fastpoll import FastLongPoll
from gateway.transports.pollloop import LongPollLoop

__all__ = ["serve"]

READ_BUFFER = 1024  # bytes; pywsgi's default is 8 KB per connection
# gevent's default (128) overflows when thousands of clients (re)connect at once, e.g. after a
# deploy; the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024
GC_THRESHOLDS = (10_000, 20, 20)  # CPython's defaults: (700, 10, 10)
HEAD_TIMEOUT_S = 10.0


class _Handler(WSGIHandler):
    """Drops a connection whose socket makes no progress for server.stall_timeout_s (a client
    that stopped reading, a half-open socket); otherwise it would hold its greenlet forever."""

    def __init__(self, sock, address, server, rfile=None):  # noqa: ANN001 (gevent's signature)
        sock.settimeout(server.stall_timeout_s)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # pywsgi sends a response's headers and body in two writes; with Nagle on, the body
            # then waits for the client's delayed ACK: +40 ms on every keep-alive request.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if rfile is None:
            # A small read buffer: a streaming connection keeps it for its whole life, and
            # requests are small (bodies are read past the buffer anyway).
            rfile = sock.makefile("rb", READ_BUFFER)
        super().__init__(sock, address, server, rfile)

    def handle(self) -> None:
        # Keep-alive long polls first (see transports/pollloop.py): it hands the connection back,
        # with whatever it read, at the first request that is anything else.
        loop = getattr(self.server, "longpoll_loop", None)
        if loop is not None:
            rest = loop.serve(self.socket, self.client_address, self._log_long_poll)
            if rest is None:
                return  # the connection is done; the server closes it
            if rest:
                self.rfile = io.BufferedReader(_Prefixed(rest, self.socket), READ_BUFFER)
        super().handle()

    def _log_long_poll(self, request_line: str, status: int, length: int, started: float) -> None:
        if self.server.log is None:
            return
        self.requestline, self.status, self._orig_status = request_line, str(status), str(status)
        self.response_length, self.time_start, self.time_finish = length, started, time.time()
        self.log_request()

    def get_environ(self) -> dict:
        # Streams take the fast path (gateway/transports/push.py): the publisher writes encoded
        # events straight to this socket. pywsgi hides the socket of plain HTTP responses, and
        # whether it frames the body as chunks, so hand both over.
        env = super().get_environ()
        env["gateway.socket"] = self.socket
        env["gateway.chunked"] = lambda: self.response_use_chunked
        return env

    def handle_one_request(self):  # noqa: ANN201 (gevent's protocol: None, True or (status, raw response))
        result = super().handle_one_request()
        if isinstance(result, tuple):  # pywsgi refused the request before the app saw it
            result = (result[0], _refusal(result[0]))
        return result

    def handle_one_response(self) -> None:
        super().handle_one_response()
        # A WebSocket wrote its own 101 (pywsgi never saw it): once it has ended, the connection
        # is done. Otherwise pywsgi would wait on it for another HTTP request, and read the
        # client's closing frame as one.
        if self.environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            self.close_connection = True


class _Prefixed(io.RawIOBase):
    """A connection's bytes for pywsgi: those already read by the long-poll loop, then the socket."""

    def __init__(self, prefix: bytes, sock: socket.socket) -> None:
        self._prefix = memoryview(prefix)
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._sock.recv_into(buffer)


def _refusal(status: str) -> bytes:
    """pywsgi's own answers (a request line over 8 KB, malformed or oversized headers) have empty
    bodies; ours carry the contract's JSON error shape like every other error."""
    if status == "414":
        reason, code, detail = "Request URI Too Long", "uri_too_long", "the request line is over 8 KB; shorten the URL"
    else:
        reason, code, detail = "Bad Request", "bad_request", "the request line or headers are malformed or too big"
    body = json.dumps({"error": code, "detail": detail}).encode()
    head = f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


log = logging.getLogger("gateway")


def _tune_gc() -> None:
    """Full (generation 2) collections walk every object of every open connection: 30-120 ms
    measured with 1,000 WebSocket clients, a stall for every stream at once. Everything built
    at start-up is frozen out of them, and the young generations are collected less eagerly, so
    that full collections come far less often (memory is still freed by reference counting)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLDS[0], GC_THRESHOLDS[1], GC_THRESHOLDS[2])


def serve(app: Flask) -> None:
    """Serve until SIGTERM/SIGINT, then: stop accepting, tell every stream to come back later
    (SSE: a retry hint, WebSocket: close 1012, long poll: answer now), and exit within the
    grace period (well inside Heroku's 30 s)."""
    st = state(app)
    config, hub, services = st.config, st.hub, st.services
    server = WSGIServer(
        (config.server.host, config.server.port),
        app,
        handler_class=_Handler,
        backlog=LISTEN_BACKLOG,
        log=sys.stderr if config.server.access_log else None,
        error_log=sys.stderr,
    )
    server.stall_timeout_s = config.server.stall_timeout_s
    fast = st.parts.get(FastLongPoll)
    server.longpoll_loop = LongPollLoop(fast, HEAD_TIMEOUT_S) if fast is not None else None
    _tune_gc()
    # gevent records each greenlet's spawning stack and parent (for debugging): ~2 KB per
    # connection's greenlets, for nothing in production.
    gevent.config.track_greenlet_tree = False
    # Flush pushed events once the publishing greenlet yields: a burst shares one write.
    hub.defer = gevent.get_hub().loop.run_callback
    try:
        server.start()
    except OSError as exc:  # e.g. the port is taken: a config problem, said in one line
        raise ConfigError(
            f"server.port: cannot listen on {config.server.host}:{config.server.port} ({exc.strerror}); "
            "set PORT to a free port or stop what holds it"
        ) from None
    log.info("gateway listening on http://%s:%d", config.server.host, server.server_port)
    for service in services:
        service.start()

    stopping = gevent.event.Event()

    def on_signal() -> None:
        stopping.set()

    gevent.signal_handler(signal.SIGTERM, on_signal)
    gevent.signal_handler(signal.SIGINT, on_signal)
    stopping.wait()

    log.info("shutting down: closing streams")
    started = time.monotonic()
    server.close()  # stop accepting; open connections keep going for now
    hub.close()
    for service in services:
        service.stop()
    # Give streams a moment to write their goodbye, then cut what is left.
    server.stop(timeout=config.server.shutdown_grace_s)
    hub.store.close()
    log.info("stopped in %.1f s", time.monotonic() - started)
