"""Keep-alive long polls answered by the lean loop (gateway/transports/pollloop.py), and the
hand-over of a connection to the general server at the first request that is anything else."""

from __future__ import annotations

import json
import socket
import time

from gateway.transports.pollloop import parse_head

PEER = ("127.0.0.1", 5555)


def test_only_plain_keep_alive_long_poll_heads_are_taken():
    environ, keep_alive, line = parse_head(b"GET /longpoll/a,b?since=1-0&timeout=5 HTTP/1.1\r\nHost: x\r\nX-A: 1", PEER)
    assert environ["PATH_INFO"] == "/longpoll/a,b" and environ["QUERY_STRING"] == "since=1-0&timeout=5"
    assert environ["HTTP_X_A"] == "1" and environ["REMOTE_ADDR"] == "127.0.0.1" and keep_alive
    assert line.startswith("GET /longpoll/")
    assert parse_head(b"GET /longpoll/a HTTP/1.1\r\nConnection: close", PEER)[1] is False
    for head in (
        b"GET /sse/a HTTP/1.1",
        b"POST /longpoll/a HTTP/1.1",
        b"GET /longpoll/a HTTP/1.0",
        b"GET /longpoll/%61 HTTP/1.1",
        b"GET /longpoll/a HTTP/1.1\r\nOrigin: http://x",
        b"GET /longpoll/a HTTP/1.1\r\nContent-Length: 3",
        b"GET /longpoll/a HTTP/1.1\r\nTransfer-Encoding: chunked",
        b"GET /longpoll/a HTTP/1.1\r\nUpgrade: websocket",
        b"GET /longpoll/a HTTP/1.1\r\n folded: line",
        b"GET /longpoll/a HTTP/1.1\r\nBad Name: x",
        b"GET /longpoll/a HTTP/1.1\r\nX: a\x00b",
        b"GET /longpoll/a HTTP/1.1\r\nX_Forwarded_For: 6.6.6.6",  # the general server drops such names
        b"GET  /longpoll/a HTTP/1.1",
    ):
        assert parse_head(head, PEER) is None, head


class _Conn:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        status = int(self.file.readline().split()[1])
        headers = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        return status, headers, self.file.read(int(headers.get("content-length", 0)))

    def close(self) -> None:
        self.sock.close()


def _get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


def test_a_keep_alive_connection_answers_polls_then_hands_over(start_gateway, channel):
    gw = start_gateway({"server": {"access_log": True}})
    conn = _Conn(gw.port)
    try:
        conn.send(_get(f"/longpoll/{channel}?timeout=0"))
        status, headers, body = conn.answer()
        assert status == 200 and headers["cache-control"] == "no-store" and "date" in headers
        cursor = json.loads(body)["cursor"]
        event_id = gw.publish(channel, "hello")
        # Two requests pipelined in one write: both answered in order.
        conn.send(_get(f"/longpoll/{channel}?since={cursor}&timeout=5") + _get("/longpoll/bad!name?timeout=0"))
        status, _, body = conn.answer()
        assert status == 200 and json.loads(body)["events"][0]["id"] == event_id
        status, _, body = conn.answer()
        assert status == 400 and json.loads(body)["error"] == "invalid_channel"
        # Anything else goes to the general server on the same connection, which keeps it.
        conn.send(_get("/healthz"))
        status, _, body = conn.answer()
        assert status == 200 and json.loads(body)["status"] == "ok"
        conn.send(_get(f"/longpoll/{channel}?since={event_id}&timeout=0", "Origin: http://elsewhere.example\r\n"))
        status, _, body = conn.answer()
        assert status == 403 and json.loads(body)["error"] == "origin_not_allowed"
        conn.send(_get(f"/longpoll/{channel}?since={event_id}&timeout=0"))
        assert conn.answer()[0] == 200
    finally:
        conn.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "bad!name" not in gw.log():
        time.sleep(0.05)
    assert f'"GET /longpoll/{channel}?timeout=0 HTTP/1.1" 200' in gw.log()  # the access log still sees them


def test_connection_close_is_honoured_and_a_refused_long_poll_keeps_its_headers(start_gateway, channel):
    gw = start_gateway({"auth": {"secret": "s" * 32}})
    conn = _Conn(gw.port)
    try:
        conn.send(_get(f"/longpoll/{channel}?timeout=0", "Connection: close\r\n"))
        status, headers, body = conn.answer()
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert json.loads(body)["error"] == "unauthorized"
        assert headers.get("connection") == "close"
        assert conn.file.read() == b""  # the gateway closed the connection
    finally:
        conn.close()
