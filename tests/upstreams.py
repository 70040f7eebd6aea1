"""Fake upstreams for the source and proxy tests: a real threaded HTTP server on an ephemeral
port of 127.0.0.1, run inside the test process so a test can drive it directly.

One Upstream serves all three kinds from one event history (ids "1", "2", ...):
  GET /events   SSE; resumes after Last-Event-ID (unless honour_last_event_id is off: then it
                replays everything, as careless upstreams do); `sse_mode` breaks it on purpose
  GET /items    the history as a JSON array, with an ETag; If-None-Match -> 304
  GET /ws       WebSocket: every event as a JSON text frame; client frames are kept in `received`
kill() drops every open connection and stops listening; restart() listens on the same port again.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, request
from flask_sock import Sock
from werkzeug.serving import make_server


class Upstream:
    def __init__(self, port: int = 0) -> None:
        self.events: list[dict[str, str]] = []  # {"id", "event", "data"}
        self.received: list[str] = []  # frames WebSocket clients sent us
        self.requests: list[dict[str, Any]] = []  # (path, headers) of each request
        self.honour_last_event_id = True
        self.sse_mode = "ok"  # "ok" | "500" | "html" | "malformed" | "trickle" | "huge"
        self.poll_mode = "ok"  # "ok" | "500" | "trickle"
        self.retry_ms = 100
        self._cond = threading.Condition()
        self._conns: set[socket.socket] = set()
        self._generation = 0
        self.app = self._build_app()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = port
        self.start()

    # -- driving it ----------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def emit(self, data: str, event: str = "message") -> str:
        with self._cond:
            eid = str(len(self.events) + 1)
            self.events.append({"id": eid, "event": event, "data": data})
            self._cond.notify_all()
        return eid

    def start(self) -> None:
        for _ in range(40):  # the killed server's sockets may hold the port for a moment
            try:
                self._server = make_server("127.0.0.1", self.port, self.app, threaded=True)
                break
            except (OSError, SystemExit):  # werkzeug exits on "Address already in use"
                time.sleep(0.05)
        else:
            raise RuntimeError(f"port {self.port} stayed busy")
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def kill(self) -> None:
        """Stop listening and cut every open connection, as a crashed upstream would."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self._cond:
            self._generation += 1
            for conn in list(self._conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._cond.notify_all()

    def restart(self) -> None:
        self.start()

    def stop(self) -> None:
        self.kill()

    def seen(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == path]

    # -- the app -------------------------------------------------------------------------
    def _build_app(self) -> Flask:
        app = Flask("fake-upstream")
        sock = Sock(app)
        up = self

        @app.before_request
        def record() -> None:
            up.requests.append({"path": request.path, "headers": dict(request.headers), "time": time.monotonic()})

        @app.get("/events")
        def events() -> Response:
            if up.sse_mode == "500":
                return Response("boom", status=500)
            if up.sse_mode == "html":
                return Response("<html><body>login</body></html>", mimetype="text/html")
            since = request.headers.get("Last-Event-ID", "") if up.honour_last_event_id else ""
            start = int(since) if since.isdigit() else 0
            conn = request.environ.get("werkzeug.socket")
            return Response(up._sse(start, conn), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})

        @app.get("/items")
        def items() -> Response:
            if up.poll_mode == "500":
                return Response("boom", status=500)
            body = json.dumps(up.events).encode()
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
            if request.headers.get("If-None-Match") == etag:
                return Response(status=304, headers={"ETag": etag})
            if up.poll_mode == "trickle":
                return Response(_trickle(body, 0.5), mimetype="application/json", headers={"ETag": etag})
            return Response(body, mimetype="application/json", headers={"ETag": etag})

        @sock.route("/ws")
        def ws(ws: Any) -> None:
            conn = ws.sock
            with up._cond:
                up._conns.add(conn)
                generation = up._generation
            sent = 0
            reader = threading.Thread(target=up._ws_reader, args=(ws,), daemon=True)
            reader.start()
            try:
                while ws.connected:
                    with up._cond:
                        if up._generation != generation:
                            return
                        if sent >= len(up.events):
                            up._cond.wait(0.2)
                        batch = up.events[sent:]
                    for event in batch:
                        ws.send(json.dumps(event))
                    sent += len(batch)
            finally:
                with up._cond:
                    up._conns.discard(conn)

        # -- for the reverse-proxy tests ---------------------------------------------------
        methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]

        @app.route("/echo", methods=methods)
        @app.route("/echo/<path:rest>", methods=methods)
        def echo(rest: str = "") -> Response:
            digest = hashlib.sha256()
            size = 0
            while chunk := request.stream.read(65536):  # streamed: the test sends hundreds of MB
                digest.update(chunk)
                size += len(chunk)
            body = {
                "method": request.method,
                "path": request.path,
                "raw_query": request.query_string.decode(),
                "headers": dict(request.headers),
                "size": size,
                "sha256": digest.hexdigest(),
            }
            out = Response(
                json.dumps(body), status=201 if request.method == "POST" else 200, mimetype="application/json"
            )
            out.headers["X-Upstream"] = "yes"
            out.headers.add("Set-Cookie", "a=1")
            out.headers.add("Set-Cookie", "b=2")
            out.headers["Keep-Alive"] = "timeout=5"  # hop-by-hop: the proxy must not pass it on
            return out

        @app.get("/download")
        def download() -> Response:
            mb = int(request.args.get("mb", "1"))
            block = bytes(range(256)) * 4096  # 1 MiB

            def body() -> Iterator[bytes]:
                for _ in range(mb):
                    yield block

            return Response(body(), mimetype="application/octet-stream", headers={"Content-Length": str(mb << 20)})

        @app.get("/dies-midway")
        def dies_midway() -> Response:
            conn = request.environ.get("werkzeug.socket")

            def body() -> Iterator[bytes]:
                yield b"a" * (1 << 20)
                time.sleep(0.1)
                conn.shutdown(socket.SHUT_RDWR)  # a crash: the final chunk never comes

            return Response(body(), mimetype="application/octet-stream")  # chunked: no length to check

        @app.get("/timed-sse")
        def timed_sse() -> Response:
            def body() -> Iterator[bytes]:
                for i in range(3):
                    yield f"id: {i}\ndata: tick {i}\n\n".encode()
                    time.sleep(0.4)

            return Response(body(), mimetype="text/event-stream")

        @app.get("/slow")
        def slow() -> Response:
            time.sleep(float(request.args.get("s", "3")))
            return Response("late")

        @sock.route("/socket")
        def socket_echo(ws: Any) -> None:
            ws.send(json.dumps({"hello": dict(request.headers).get("X-Forwarded-For", "")}))
            while True:
                message = ws.receive(timeout=10)
                if message is None:
                    return
                ws.send("echo:" + message)

        return app

    def _ws_reader(self, ws: Any) -> None:
        while ws.connected:
            try:
                message = ws.receive(timeout=0.5)
            except Exception:
                return
            if message is not None:
                self.received.append(message)

    def _sse(self, start: int, conn: socket.socket | None) -> Iterator[bytes]:
        with self._cond:
            generation = self._generation
            if conn is not None:
                self._conns.add(conn)
        try:
            yield f"retry: {self.retry_ms}\n\n".encode()
            if self.sse_mode == "malformed":
                # Garbage lines, a field with no colon, a NUL id, then one good event.
                yield b"nonsense without colon\n\x00\xff\xfe: ?\nid: a\x00b\n\ndata\n\n"
            if self.sse_mode == "huge":
                yield b"event: big\ndata: " + b"x" * (10 * 1024 * 1024) + b"\n\n"
            sent = start
            while True:
                with self._cond:
                    if self._generation != generation:
                        return
                    if sent >= len(self.events):
                        self._cond.wait(0.5)
                    batch = self.events[sent:]
                if not batch:
                    yield b": keepalive\n\n"
                    continue
                for event in batch:
                    block = f"id: {event['id']}\nevent: {event['event']}\n"
                    block += "".join(f"data: {line}\n" for line in event["data"].split("\n")) + "\n"
                    if self.sse_mode == "trickle":
                        yield from _trickle(block.encode(), 0.05)
                    else:
                        yield block.encode()
                sent += len(batch)
        finally:
            with self._cond:
                self._conns.discard(conn)  # type: ignore[arg-type]


def _trickle(body: bytes, every_s: float) -> Iterator[bytes]:
    for i in range(len(body)):
        yield body[i : i + 1]
        time.sleep(every_s)


def wait_for(predicate: Any, timeout: float = 10, every: float = 0.05) -> Any:
    """Poll predicate() until it returns something truthy; fail the test after `timeout` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")
