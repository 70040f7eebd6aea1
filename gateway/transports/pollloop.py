"""Keep-alive long polls without the general HTTP server's per-request machinery.

A long-poll client asks the same question over one keep-alive connection after every answer.
pywsgi spends more on each of those requests (a header parser built for e-mail, a WSGI environ
of thirty keys, timeouts, response formatting) than the answer costs. This loop reads each
request head itself, answers plain long polls through FastLongPoll.answer() — the same admission
path, bodies, errors and headers as the WSGI route — and hands the connection, with every byte
it read, back to the general server at the first request that is anything else (another path,
an Origin, a body, an encoded path, HTTP/1.0, anything unusual in the head).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

from gateway.transports.fastpoll import REASONS, FastLongPoll

__all__ = ["LongPollLoop", "parse_head"]

_POLLS = (b"/longpoll/", b"/poll/")  # short polls too: a long poll with no wait
MAX_HEAD = 8192  # bigger heads go to the general server, which has the limits and the errors
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_HANDED_OVER = frozenset({"ORIGIN", "UPGRADE", "CONTENT_LENGTH", "TRANSFER_ENCODING", "EXPECT"})

OnAnswer = Callable[[str, int, int, float], None]  # request line, status, body length, start time


def parse_head(head: bytes, peer: tuple[str, int]) -> tuple[dict[str, Any], bool, str] | None:
    """(environ, keep_alive, request line) for a plain `GET /longpoll/...` HTTP/1.1 head, or
    None for anything this loop leaves to the general server."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1" or not parts[1].startswith(_POLLS):
        return None
    target = parts[1]
    if any(c < 0x21 or c > 0x7E or c in (0x25, 0x23) for c in target):  # no %-encoding, no fragment
        return None
    path, _, query = target.decode("ascii").partition("?")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": peer[0],
        "REMOTE_PORT": str(peer[1]),
    }
    keep_alive = True
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or any(c not in _TOKEN for c in name) or b"_" in name:
            # obs-fold, a malformed line, or an underscore (the general server drops such
            # headers, so X_Forwarded_For cannot pose as X-Forwarded-For): it answers them.
            return None
        if any(c < 0x20 and c != 0x09 or c == 0x7F for c in value):
            return None
        key = name.decode("ascii").upper().replace("-", "_")
        if key in _HANDED_OVER:
            return None
        text = value.strip(b" \t").decode("latin-1")
        if key == "CONNECTION" and "close" in text.lower():
            keep_alive = False
        header = "HTTP_" + key
        environ[header] = environ[header] + "," + text if header in environ else text
    return environ, keep_alive, lines[0].decode("ascii")


class LongPollLoop:
    def __init__(self, fast: FastLongPoll, head_timeout_s: float) -> None:
        self.fast = fast
        self.head_timeout_s = head_timeout_s
        self._date = ("", 0)

    def serve(self, sock: Any, peer: tuple[str, int], on_answer: OnAnswer | None = None) -> bytes | None:
        """Answer long polls while that is all the connection asks. Returns the bytes read but not
        answered (for the general server), or None when the connection is done."""
        buf = b""
        while True:
            end = buf.find(b"\r\n\r\n")
            deadline = None
            while end < 0:
                if len(buf) > MAX_HEAD:
                    return buf
                if buf and deadline is None:
                    deadline = time.monotonic() + self.head_timeout_s
                if deadline is not None and time.monotonic() > deadline:
                    return buf  # a slow head: the general server applies its deadline and answers
                try:
                    chunk = sock.recv(4096)
                except OSError:
                    return None
                if not chunk:
                    return None
                buf += chunk
                end = buf.find(b"\r\n\r\n")
            parsed = parse_head(buf[:end], peer)
            if parsed is None:
                return buf
            environ, keep_alive, request_line = parsed
            started = time.time()
            answer = self.fast.answer(environ)
            if answer is None:
                return buf
            status, headers, body = answer
            head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"]
            head += [f"{k}: {v}\r\n" for k, v in headers]
            head.append(f"Date: {self._now()}\r\n")
            if not keep_alive:
                head.append("Connection: close\r\n")
            try:
                sock.sendall("".join(head).encode("latin-1") + b"\r\n" + body)
            except OSError:
                return None
            if on_answer is not None:
                on_answer(request_line, status, len(body), started)
            if not keep_alive:
                return None
            buf = buf[end + 4 :]

    def _now(self) -> str:
        second = int(time.time())
        if self._date[1] != second:
            self._date = (formatdate(second, usegmt=True), second)
        return self._date[0]
