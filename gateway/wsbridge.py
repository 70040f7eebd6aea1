"""WebSocket upgrades on proxied paths: check the client's handshake, read the upstream's answer,
and only after a valid `101 Switching Protocols` splice the two sockets, with an idle limit.

Any other answer of the upstream (a 404, a login redirect) is relayed as a normal HTTP response
and the client connection then closes, so no bytes the client sends after its handshake ever
reach the upstream as a raw request that skipped the proxy's header rules.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import io
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from gateway.sockio import Prefixed

__all__ = ["Answer", "BadAnswer", "client_problem", "read_answer", "answer_problem", "body", "splice"]

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
MAX_ANSWER_HEAD = 65536
CHUNK = 65536


class BadAnswer(Exception):
    """The upstream's answer to the handshake is not HTTP, is too big, or broke off."""


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    raw: bytes = b""  # everything read so far: the head and whatever followed it

    def get(self, name: str) -> str:
        low = name.lower()
        return ", ".join(v for n, v in self.headers if n.lower() == low)

    @property
    def head_end(self) -> int:
        return self.raw.index(b"\r\n\r\n") + 4


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",")}


def client_problem(method: str, headers: Mapping[str, str]) -> str | None:
    """Why the client's upgrade request is not a valid WebSocket handshake (RFC 6455 4.2.1)."""
    if method != "GET":
        return "a WebSocket handshake must be a GET"
    if "upgrade" not in _tokens(headers.get("Connection", "")):
        return "a WebSocket handshake needs 'Connection: Upgrade'"
    if headers.get("Sec-WebSocket-Version", "").strip() != "13":
        return "a WebSocket handshake needs 'Sec-WebSocket-Version: 13'"
    try:
        key = base64.b64decode(headers.get("Sec-WebSocket-Key", "").strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 16:
        return "a WebSocket handshake needs a Sec-WebSocket-Key of 16 bytes in base64"
    return None


def read_answer(up: socket.socket, timeout_s: float) -> Answer:
    """The upstream's status line and headers (and any bytes after them), within timeout_s.
    Raises TimeoutError when it says nothing in time, BadAnswer when what it says is not HTTP."""
    deadline = time.monotonic() + timeout_s
    raw = b""
    while b"\r\n\r\n" not in raw:
        if len(raw) > MAX_ANSWER_HEAD:
            raise BadAnswer("the upstream's answer head is over 64 KB")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        up.settimeout(remaining)
        chunk = up.recv(CHUNK)
        if not chunk:
            raise BadAnswer("the upstream closed the connection before answering")
        raw += chunk
    head = raw[: raw.index(b"\r\n\r\n")].decode("latin-1")
    status_line, *lines = head.split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit() or len(rest) > 3 and rest[3] != " ":
        raise BadAnswer("the upstream's answer is not HTTP/1.x")
    answer = Answer(int(code), raw=raw)
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[:1] in (" ", "\t"):
            raise BadAnswer("the upstream's answer has a malformed header line")
        answer.headers.append((name, value.strip()))
    return answer


def answer_problem(answer: Answer, key: str) -> str | None:
    """Why a 101 answer does not complete the client's handshake (RFC 6455 4.2.2)."""
    if "websocket" not in _tokens(answer.get("Upgrade")):
        return "its 101 answer lacks 'Upgrade: websocket'"
    if "upgrade" not in _tokens(answer.get("Connection")):
        return "its 101 answer lacks 'Connection: Upgrade'"
    expected = base64.b64encode(hashlib.sha1((key.strip() + GUID).encode()).digest()).decode()
    if answer.get("Sec-WebSocket-Accept").strip() != expected:
        return "its 101 answer has a wrong Sec-WebSocket-Accept"
    return None


class _AnsweredSocket:
    def __init__(self, answer: Answer, sock: socket.socket) -> None:
        self._reader = io.BufferedReader(Prefixed(answer.raw, sock), CHUNK)

    def makefile(self, mode: str) -> io.BufferedReader:
        return self._reader


def body(answer: Answer, up: socket.socket, timeout_s: float) -> Iterator[bytes]:
    """The body of a non-101 answer, decoded from its framing (length, chunked or close) by
    http.client; the upstream socket is closed at the end. A body that breaks off resets the
    client's connection, so it sees a truncated response rather than a complete-looking one."""
    up.settimeout(timeout_s)
    resp = http.client.HTTPResponse(_AnsweredSocket(answer, up), method="GET")  # type: ignore[arg-type]
    try:
        resp.begin()
        while True:
            try:
                chunk = resp.read1(CHUNK)
            except (OSError, http.client.HTTPException):
                raise ConnectionResetError(104, "upstream body broke off") from None
            if not chunk:
                return
            yield chunk
    finally:
        resp.close()
        up.close()


def splice(client: socket.socket, up: socket.socket, idle_s: float) -> None:
    """Copy bytes both ways until either side closes, stops reading, or both are quiet idle_s."""
    last = [time.monotonic()]
    tick = min(idle_s, client.gettimeout() or idle_s)
    for sock in (client, up):
        sock.settimeout(tick)
    done = threading.Event()  # (green threads under the server's monkey-patching)
    pipes = [
        threading.Thread(target=_pipe, args=(client, up, last, idle_s, done), daemon=True),
        threading.Thread(target=_pipe, args=(up, client, last, idle_s, done), daemon=True),
    ]
    for pipe in pipes:
        pipe.start()
    done.wait()  # one side is done: close both
    for sock in (client, up):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    for pipe in pipes:
        pipe.join(2)


def _pipe(src: socket.socket, dst: socket.socket, last: list[float], idle_s: float, done: threading.Event) -> None:
    """Copy one direction. A quiet side is fine (push-only sockets are) until neither side has
    moved a byte for idle_s; a side that stops reading makes sendall time out, which ends it."""
    try:
        while True:
            try:
                data = src.recv(CHUNK)
            except TimeoutError:
                if time.monotonic() - last[0] >= idle_s:
                    return
                continue
            except OSError:
                return
            if not data:
                return
            last[0] = time.monotonic()
            try:
                dst.sendall(data)
            except OSError:
                return
    finally:
        done.set()
