"""Hostile HTTP proxies that /diagnose was never tuned on, for paths nginx and haproxy cannot
imitate: each reads the request head (and, where the mode needs it, the response head) and then
relays bytes both ways. One connection per request (it sends `Connection: close` upstream), like
many old corporate proxies. Threads, not gevent: the test process is not monkey-patched.

Modes (`arg` is the mode's number of seconds):
- "refuse_upgrade": any request with an Upgrade header gets 403 from the proxy itself;
- "fake_101": the proxy answers a WebSocket upgrade with a valid 101 itself, then hangs up;
- "refuse_sse": a text/event-stream response is replaced with the proxy's own 502;
- "cache": GET answers with a Content-Length are cached per URL for `arg` s, Cache-Control ignored;
- "first_byte_delay": every response's first byte is held back `arg` s;
- "lifetime": every connection is closed `arg` s after it opened, busy or not;
- "end_sse": a text/event-stream response is passed on with its headers, then ended at once;
- "sniff": the first `arg` bytes of every response body are held until they are all there (or
  the response ends), like antivirus and content filters that scan a response before passing it.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.proxies import LoopbackRelay, stopped_at_exit

__all__ = ["HostileProxy", "start_hostile", "MODES"]

MODES = ("refuse_upgrade", "fake_101", "refuse_sse", "cache", "first_byte_delay", "lifetime", "sniff", "end_sse")
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _read_head(sock: socket.socket, deadline: float) -> tuple[bytes, bytes]:
    """(head including the blank line, whatever came after it); b"" head when the peer gave up."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except OSError:
            return b"", b""
        if not data or len(buf) > 65536:
            return b"", b""
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head + b"\r\n\r\n", rest


def _headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if value:
            out[name.strip().lower()] = value.strip()
    return out


def _with_close(head: bytes) -> bytes:
    """The request head with Connection/Keep-Alive replaced by `Connection: close`."""
    lines = head.decode("latin-1").split("\r\n")
    kept = [x for x in lines[1:] if x and x.split(":", 1)[0].strip().lower() not in ("connection", "keep-alive")]
    return ("\r\n".join([lines[0], *kept, "Connection: close"]) + "\r\n\r\n").encode("latin-1")


def _answer(status: str, body: bytes, ctype: str = "text/plain") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


class HostileProxy(LoopbackRelay):
    """One hostile proxy on a free loopback port (see the module docstring for the modes)."""

    def __init__(self, upstream_port: int, mode: str, arg: float = 3.0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode, self.arg = mode, arg
        self.cache: dict[bytes, tuple[float, bytes]] = {}
        super().__init__(upstream_port)

    def _handle(self, client: socket.socket) -> None:
        opened = time.monotonic()
        try:
            head, rest = _read_head(client, opened + 10)
            if not head:
                return
            first = head.split(b"\r\n", 1)[0]
            headers = _headers(head)
            upgrade = "upgrade" in headers
            if upgrade and self.mode == "refuse_upgrade":
                client.sendall(_answer("403 Forbidden", b"upgrades are not allowed here\n"))
                return
            if upgrade and self.mode == "fake_101":
                key = headers.get("sec-websocket-key", "")
                accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
                client.sendall(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    + f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
                )
                time.sleep(0.2)
                return
            if self.mode == "cache" and first.startswith(b"GET "):
                hit = self.cache.get(first)
                if hit and time.monotonic() - hit[0] < self.arg:
                    client.sendall(hit[1])
                    return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            self._track(upstream)
            upstream.sendall((head if upgrade else _with_close(head)) + rest)
            if self.mode == "lifetime":
                timer = threading.Timer(max(0.0, opened + self.arg - time.monotonic()), self._cut, (client, upstream))
                timer.daemon = True
                timer.start()
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            self._respond(first, upstream, client)
        except OSError:
            pass
        finally:
            if self.mode != "lifetime":
                self._cut(client)

    def _respond(self, first: bytes, upstream: socket.socket, client: socket.socket) -> None:
        """Relay the response, applying the mode's policy to its head."""
        head, rest = _read_head(upstream, time.monotonic() + 120)
        if not head:
            return
        headers = _headers(head)
        if self.mode == "refuse_sse" and "text/event-stream" in headers.get("content-type", ""):
            client.sendall(_answer("502 Bad Gateway", b"<html>content type not allowed</html>", "text/html"))
            return
        if self.mode == "end_sse" and "text/event-stream" in headers.get("content-type", ""):
            client.sendall(head)
            return
        if self.mode == "first_byte_delay":
            time.sleep(self.arg)
        if self.mode == "cache" and first.startswith(b"GET ") and head.startswith(b"HTTP/1.1 200"):
            length = int(headers.get("content-length", "-1") or -1)
            if length >= 0:
                body = rest
                while len(body) < length:
                    data = upstream.recv(65536)
                    if not data:
                        break
                    body += data
                self.cache[first] = (time.monotonic(), head + body)
                client.sendall(head + body)
                return
        if self.mode == "sniff" and not head.startswith(b"HTTP/1.1 101"):
            upstream.settimeout(None)
            while len(rest) < self.arg:
                data = upstream.recv(65536)
                if not data:
                    break
                rest += data
        client.sendall(head + rest)
        self._pipe(upstream, client)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            src.settimeout(None)
        except OSError:
            return
        while not self._stopping.is_set():
            try:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _cut(self, *socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.fixture
def start_hostile() -> Iterator[Callable[..., HostileProxy]]:
    """start_hostile(upstream_port, mode, arg=3.0) -> a running HostileProxy; all stopped at teardown."""
    with stopped_at_exit(HostileProxy) as start:
        yield start
