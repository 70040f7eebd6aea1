"""Issue 12, Medium 6 and Lows, through [proxy]: WebSocket upgrades splice only after a valid 101,
refused upgrades close the connection, tunnels have an idle limit, and ambiguous framing, a bad
method or a bad chunked body is a clean 4xx/501 before anything reaches the upstream."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import websocket

from tests.helpers import Gateway
from tests.upstreams import Upstream

KEY = base64.b64encode(os.urandom(16)).decode()


def handshake(path: str, key: str = KEY, extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n{extra}\r\n"
    ).encode()


def exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, read until the gateway closes the connection (or timeout)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    out = b""
    try:
        sock.sendall(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
    finally:
        sock.close()
    return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> dict:
    body = answer.partition(b"\r\n\r\n")[2]
    start = body.find(b"{")
    return json.loads(body[start : body.rfind(b"}") + 1])


@pytest.fixture(scope="module")
def app_upstream() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def gw(app_upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = {"proxy": {"upstream": app_upstream.url, "timeout_s": 2.0, "websocket_idle_s": 1.0}}
    gateway = Gateway(config, tmp_path_factory.mktemp("proxy"))
    yield gateway
    gateway.stop()


# -- WebSocket upgrades ----------------------------------------------------------------------


def test_an_invalid_client_handshake_is_400(gw: Gateway, app_upstream: Upstream) -> None:
    before = len(app_upstream.seen("/socket"))
    for bad in (handshake("/socket", key="short"), handshake("/socket").replace(b"Version: 13", b"Version: 8")):
        answer = exchange(gw.port, bad)
        assert status_of(answer) == 400 and body_of(answer)["error"] == "bad_handshake"
    assert len(app_upstream.seen("/socket")) == before


def test_a_valid_upgrade_still_bridges(gw: Gateway) -> None:
    ws = websocket.create_connection(gw.ws_url + "/socket", timeout=5)
    try:
        assert json.loads(ws.recv())["hello"] == "127.0.0.1"  # the upstream's first frame, sent with its 101
        ws.send("ping")
        assert ws.recv() == "echo:ping"
    finally:
        ws.close()


def test_an_idle_tunnel_is_closed_after_websocket_idle_s(gw: Gateway) -> None:
    ws = websocket.create_connection(gw.ws_url + "/socket", timeout=10)
    try:
        ws.recv()  # hello
        started = time.monotonic()
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError, OSError)):
            while time.monotonic() - started < 8:
                if ws.recv() in ("", None):  # closed
                    raise websocket.WebSocketConnectionClosedException("closed")
        assert time.monotonic() - started < 8
    finally:
        ws.close()


class FakeUpstream:
    """Answers every connection with fixed bytes, and records what it received."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.received = b""
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                self.received += conn.recv(65536)
                conn.sendall(self.answer)
                while chunk := conn.recv(65536):
                    self.received += chunk
            except OSError:
                pass
            finally:
                conn.close()

    def stop(self) -> None:
        self.listener.close()


def test_a_refused_upgrade_is_relayed_and_no_raw_request_rides_the_connection(tmp_path) -> None:  # noqa: ANN001
    # An upstream that answers 404 to the upgrade and keeps the connection open for more.
    fake = FakeUpstream(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nnot found")
    gateway = Gateway({"proxy": {"upstream": fake.url, "timeout_s": 2.0}}, tmp_path)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: evil.example\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
    answer = b""
    try:
        sock.sendall(handshake("/no-such-socket"))
        while not answer.endswith(b"not found") and not answer.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        try:  # once the upstream said no, a raw request must not reach it through this connection
            sock.sendall(smuggled)
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
        time.sleep(0.3)
    finally:
        sock.close()
        gateway.stop()
        fake.stop()
    assert b"GET /no-such-socket" in fake.received and b"smuggled" not in fake.received
    assert status_of(answer) == 404 and b"not found" in answer, answer[:300]
    assert b"connection: close" in answer.lower()
    assert answer.count(b"HTTP/1.1 ") == 1  # one answer, then closed


def test_a_101_with_a_wrong_accept_is_502_and_not_spliced(tmp_path) -> None:  # noqa: ANN001
    fake = FakeUpstream(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: d3Jvbmc=\r\n\r\n"
    )
    gateway = Gateway({"proxy": {"upstream": fake.url, "timeout_s": 2.0}}, tmp_path)
    try:
        answer = exchange(gateway.port, handshake("/ws") + b"\x81\x85raw-frame-bytes")
        assert status_of(answer) == 502 and body_of(answer)["error"] == "upstream_bad_handshake"
        assert b"raw-frame" not in fake.received
        # A correct accept is spliced.
        accept = base64.b64encode(hashlib.sha1((KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        fake.answer = fake.answer.replace(b"d3Jvbmc=", accept) + b"\x81\x02hi"
        answer = exchange(gateway.port, handshake("/ws"), timeout=3)
        assert status_of(answer) == 101 and answer.endswith(b"\x81\x02hi")
        assert "Traceback" not in gateway.log()
    finally:
        gateway.stop()
        fake.stop()


def test_an_upstream_that_never_answers_the_upgrade_is_504(tmp_path) -> None:  # noqa: ANN001
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never answers
    gateway = Gateway(
        {"proxy": {"upstream": f"http://127.0.0.1:{listener.getsockname()[1]}", "timeout_s": 1.0}}, tmp_path
    )
    try:
        answer = exchange(gateway.port, handshake("/ws"))
        assert status_of(answer) == 504 and body_of(answer)["error"] == "upstream_timeout"
    finally:
        gateway.stop()
        listener.close()


# -- framing and methods ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"POST /echo/f1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
        (b"POST /echo/f2 HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello", 400),
        (
            b"POST /echo/f3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            501,
        ),
        (b"POST /echo/f4 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400),
        (b"POST /echo/f5 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", 400),
        (b"POST /echo/f6 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"G\x00ET /echo/f7 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /echo/f8 HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n", 400),
        # Python's parser stops at a line that is no header and drops the rest: here the framing.
        (b"POST /echo/f9 HTTP/1.1\r\nHost: x\r\nBad Name: x\r\nContent-Length: 5\r\n\r\nhello", 400),
        (b"GET /echo/f10 HTTP/1.1\r\nHost: x\r\nno colon here\r\nConnection: close\r\n\r\n", 400),
    ],
)
def test_ambiguous_framing_is_refused_and_closed(gw: Gateway, app_upstream: Upstream, head: bytes, status: int) -> None:
    path = head.split(b" ")[1].decode()
    answer = exchange(gw.port, head + b"GET /echo/after HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(answer) == status, answer[:300]
    assert body_of(answer)["error"] and b"connection: close" in answer.lower()
    assert answer.count(b"HTTP/1.1 ") == 1
    assert not app_upstream.seen(path) and not app_upstream.seen("/echo/after")
    assert "Traceback" not in gw.log()


@pytest.mark.parametrize(
    "head",
    [
        b"GET /echo/h1 HTTP/1.1\r\nHost: x\r\nHost: evil.example\r\n\r\n",
        b"GET /echo/h2 HTTP/1.1\r\nX-A: 1\r\n\r\n",
        b"GET /poll/h3 HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",  # the lean loop hands these over
        b"GET /longpoll/h4?timeout=0 HTTP/1.1\r\n\r\n",
    ],
)
def test_an_http_1_1_request_needs_exactly_one_host(gw: Gateway, app_upstream: Upstream, head: bytes) -> None:
    """RFC 9112 section 3.2: two Hosts could name one site to the gateway and another to the app."""
    answer = exchange(gw.port, head + b"GET /echo/after HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(answer) == 400 and body_of(answer)["error"] == "bad_host", answer[:300]
    assert b"connection: close" in answer.lower() and answer.count(b"HTTP/1.1 ") == 1
    assert not app_upstream.seen(head.split(b" ")[1].decode()) and not app_upstream.seen("/echo/after")


@pytest.mark.parametrize(
    "head",
    [
        b"POST /echo/n1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked \r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST /echo/n2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
        b"POST /echo/n3 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    ],
)
def test_framing_both_parsers_read_alike_is_normalised_and_forwarded(gw: Gateway, head: bytes) -> None:
    answer = exchange(gw.port, head.replace(b"Host: x", b"Host: x\r\nConnection: close"))
    assert status_of(answer) == 201, answer[:300]  # the upstream's answer to a POST
    assert body_of(answer)["size"] == 5  # the upstream got exactly the body


def test_a_bad_chunked_body_is_400_not_an_upstream_failure(gw: Gateway) -> None:
    head = b"POST /echo/chunky HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = exchange(gw.port, head + b"5\r\nhello\r\nZZZ\r\nnot hex\r\n0\r\n\r\n")
    assert status_of(answer) == 400, answer[:300]
    assert body_of(answer)["error"] == "invalid_body"
    log = gw.log()
    assert "Traceback" not in log and "/echo/chunky failed" not in log


def test_tunnels_count_against_the_connection_limits(app_upstream: Upstream, tmp_path) -> None:  # noqa: ANN001
    config = {"proxy": {"upstream": app_upstream.url}, "limits": {"max_connections_per_client": 1}}
    gateway = Gateway(config, tmp_path)
    try:
        first = websocket.create_connection(gateway.ws_url + "/socket", timeout=5)
        try:
            assert json.loads(first.recv())["hello"]
            answer = exchange(gateway.port, handshake("/socket"), timeout=3)
            assert status_of(answer) == 429 and b"Retry-After" in answer
            assert body_of(answer)["error"] == "too_many_connections_from_client"
        finally:
            first.close()
        # The freed slot is reusable once the first tunnel has ended.
        deadline = time.monotonic() + 5
        while True:
            answer = exchange(gateway.port, handshake("/socket"), timeout=2)
            if status_of(answer) == 101 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status_of(answer) == 101
    finally:
        gateway.stop()
