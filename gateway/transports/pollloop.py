"""Keep-alive long polls without the general HTTP server's per-request machinery.

A long-poll client asks the same question over one keep-alive connection after every answer.
pywsgi spends more on each of those requests (a header parser built for e-mail, a WSGI environ
of thirty keys, timeouts, response formatting) than the answer costs. This loop reads each
request head itself, answers plain long polls through FastLongPoll.answer() — the same admission
path, bodies, errors and headers as the WSGI route — and hands the connection, with every byte
it read, back to the general server at the first request that is anything else (another path,
an Origin, a body, an encoded path, HTTP/1.0, anything unusual in the head).

A back end publishing over one keep-alive connection is the same shape: `POST /publish/<channel>`
with a declared Content-Length (no Origin, no chunking, no Expect) is answered here too, by the
`publish` callable the server passes (FastPublish.answer, the one publish implementation, with
its refusals counted), without pywsgi's cycle or the WSGI layers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

from gateway.errors import BadRequest
from gateway.heads import asks_to_close, holds_a_head
from gateway.hub import WaitAbandoned
from gateway.memo import BoundedMemo
from gateway.transports.fastpoll import REASONS, TAKEN, Answer, FastLongPoll, error_answer, ok
from gateway.transports.heldpoll import CLIENT_CLOSED, STAY, HeldPoll, PollWatch, Runner

__all__ = ["LongPollLoop", "parse_head"]

_POLLS = (b"/longpoll/", b"/poll/")  # short polls too: a long poll with no wait
_PUBLISH = b"/publish/"
MAX_HEAD = 8192  # bigger heads go to the general server, which has the limits and the errors
MAX_BODY = 65536  # bigger publish bodies too (server.max_body_bytes is checked by the app)
# As many header lines too: Python's http.client (under pywsgi) counts the head's closing blank
# line among its 100, so it reads 99 at most and refuses more with the general server's 431.
MAX_HEADER_LINES = 100
_TOKEN = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Byte checks as one C-level scan each (a Python loop per byte cost more than the answer).
_BAD_TARGET = re.compile(rb"[^\x21-\x7e]|[%#]")  # no %-encoding, no fragment, nothing unprintable
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # control bytes but tab
_HANDED_OVER = frozenset({"ORIGIN", "UPGRADE", "CONTENT_LENGTH", "TRANSFER_ENCODING", "EXPECT"})
# Parsed heads are remembered: the pollers of a channel send the very same head (the same cursor,
# the same headers) after each event; and header blocks apart. Short ones only, all forgotten when
# full. A token in a header stays in memory while its client keeps polling, and until 1,024 other
# heads (or header blocks) have come since; the process holds the same secret in its config.
MEMO_HEADS = 1024
MEMO_HEAD_BYTES = 1024

OnAnswer = Callable[[str, int, int, float], None]  # request line, status, body length, start time
# How a connection's held polls are watched (server.py gives gevent's; None: the hub's blocking wait).
PollWatches = Callable[[Any], "PollWatch | None"]
Publish = Callable[[dict[str, Any], bytes], Answer]  # (environ, the body read whole) -> the answer
Parsed = tuple[dict[str, Any], bool, str]  # environ, keep_alive, request line


def parse_head(head: bytes, peer: tuple[str, int]) -> Parsed | None:
    """(environ, keep_alive, request line) for a plain `GET /longpoll/...` or `POST /publish/...`
    (with a Content-Length) HTTP/1.1 head, or None for anything this loop leaves to the general
    server. A publish's environ has CONTENT_LENGTH as an int; its body is the caller's to read."""
    return _with_peer(_parse(head), peer)


class _HeadMemo:
    """parse_head() without the peer, remembered per head (see MEMO_HEADS), and per header
    block: a publisher's requests differ in their request line (the channel), a poller's in its
    cursor, while the headers after it stay the same."""

    def __init__(self) -> None:
        self._known: BoundedMemo[bytes, Parsed | None] = BoundedMemo(MEMO_HEADS, MEMO_HEAD_BYTES)
        self._fields: BoundedMemo[tuple[bytes, bool], Fields | None] = BoundedMemo(MEMO_HEADS, MEMO_HEAD_BYTES)

    def parse(self, head: bytes, peer: tuple[str, int]) -> Parsed | None:
        known = self._known
        try:
            parsed = known[head]
        except KeyError:
            parsed = _parse(head, self._parse_fields)
            known.remember(head, parsed, len(head))
        return _with_peer(parsed, peer)

    def _parse_fields(self, block: bytes, publish: bool) -> Fields | None:
        key = (block, publish)
        try:
            return self._fields[key]
        except KeyError:
            fields = _parse_fields(block, publish)
            self._fields.remember(key, fields, len(block))
            return fields


def _with_peer(parsed: Parsed | None, peer: tuple[str, int]) -> Parsed | None:
    if parsed is None:
        return None
    environ = parsed[0].copy()  # the caller's own: a parsed head may be remembered
    environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = peer[0], str(peer[1])
    return environ, parsed[1], parsed[2]


Fields = tuple[dict[str, Any], bool]  # the headers' environ keys, keep_alive


def _parse(head: bytes, parse_fields: Callable[[bytes, bool], Fields | None] | None = None) -> Parsed | None:
    end = head.find(b"\r\n")
    line, block = (head, b"") if end < 0 else (head[:end], head[end + 2 :])
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1":
        return None
    publish = parts[0] == b"POST" and parts[1].startswith(_PUBLISH)
    if not publish and (parts[0] != b"GET" or not parts[1].startswith(_POLLS)):
        return None
    target = parts[1]
    if _BAD_TARGET.search(target):
        return None
    fields = (parse_fields or _parse_fields)(block, publish)
    if fields is None:
        return None
    path, _, query = target.decode("ascii").partition("?")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST" if publish else "GET",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_PROTOCOL": "HTTP/1.1",
    }
    environ.update(fields[0])
    return environ, fields[1], line.decode("ascii")


def _parse_fields(block: bytes, publish: bool) -> Fields | None:
    """The header lines of a head (after its request line), or None to hand the request over."""
    environ: dict[str, Any] = {}
    keep_alive = True
    lines = block.split(b"\r\n") if block else ()
    if len(lines) >= MAX_HEADER_LINES:
        return None  # the general server's 431
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not name or name.translate(None, _TOKEN) or b"_" in name:
            # obs-fold, a malformed line, or an underscore (the general server drops such
            # headers, so X_Forwarded_For cannot pose as X-Forwarded-For): it answers them.
            return None
        if _BAD_VALUE.search(value):
            return None
        key = name.decode("ascii").upper().replace("-", "_")
        text = value.strip(b" \t").decode("latin-1")
        if publish and key in ("CONTENT_LENGTH", "CONTENT_TYPE"):
            if key in environ or (key == "CONTENT_LENGTH" and not _small_length(text)):
                return None  # repeated, malformed or large: the general server's errors
            environ[key] = int(text) if key == "CONTENT_LENGTH" else text
            continue
        if key in _HANDED_OVER or (key == "HOST" and "HTTP_HOST" in environ):
            return None
        if key == "CONNECTION" and asks_to_close((text,)):
            keep_alive = False
        header = "HTTP_" + key
        if header in environ:  # a repeated header: joined as the general server joins it
            text = environ[header] + ("; " if "COOKIE" in header else ",") + text
        environ[header] = text
    if "HTTP_HOST" not in environ or (publish and "CONTENT_LENGTH" not in environ):
        return None  # no Host (or two, above): the general server's 400
    return environ, keep_alive


def _small_length(text: str) -> bool:
    return text.isdigit() and text.isascii() and len(text) <= 6 and int(text) <= MAX_BODY


class LongPollLoop:
    def __init__(
        self,
        fast: FastLongPoll,
        head_timeout_s: float,
        publish: Publish | None = None,
        max_head: int = MAX_HEAD,
        held: tuple[PollWatches, Runner] | None = None,
        inline: bool = False,
        stall_s: float | None = None,
    ) -> None:
        self.fast = fast
        self.head_timeout_s = head_timeout_s
        # Never above server.max_head_bytes: a bigger head goes to the general server, whose 431 it is.
        self.max_head = min(max_head, MAX_HEAD)
        self.publish = publish  # None hands publishes over to the general server
        self._date = ("", 0)
        self._heads = _HeadMemo()
        self._last: tuple[Any, ...] = (None,) * 6  # the last response (see _response)
        # Long polls held as pushers (transports/heldpoll.py), where the server can watch them;
        # inline: their next requests answered by the held poll's Runner (nothing there may yield
        # for long: an in-process store, no app asked about access).
        self._held = held
        self._inline = inline
        self._stall_s = stall_s

    def _held_poll(self, sock: Any, peer: tuple[str, int], on_answer: OnAnswer | None) -> HeldPoll | None:
        raw = getattr(sock, "raw", None)
        if self._held is None or raw is None:
            return None
        watches, runner = self._held
        watch = watches(sock)
        if watch is None:
            return None
        fast = self.fast
        held = HeldPoll(
            fast.hub,
            watch,
            raw,
            self._ok_response,
            self._refusal,
            fast.poll.max_batch,
            runner,
            on_answer,
            self._stall_s,
            self._serve_next if self._inline else None,
        )
        held.peer = peer
        return held

    def _ok_response(self, body: bytes) -> bytes:
        status, headers, body = ok(body)
        return self._response(status, headers, body, True)

    def _refusal(self, exc: BadRequest) -> tuple[bytes, int, int]:
        status, headers, body = error_answer(exc)
        return self._response(status, headers, body, True), status, len(body)

    def serve(self, sock: Any, peer: tuple[str, int], on_answer: OnAnswer | None = None) -> bytes | None:
        """Answer long polls while that is all the connection asks. Returns the bytes read but not
        answered (for the general server), or None when the connection is done."""
        held = self._held_poll(sock, peer, on_answer)
        try:
            return self._serve(sock, peer, on_answer, held)
        finally:
            if held is not None:
                held.close()

    def _serve(
        self, sock: Any, peer: tuple[str, int], on_answer: OnAnswer | None, held: HeldPoll | None
    ) -> bytes | None:
        buf = b""
        while True:
            end = buf.find(b"\r\n\r\n")
            deadline = None
            while end < 0:
                if len(buf) > self.max_head or holds_a_head(buf):
                    return buf  # the general server's: its 431, or a head ended by bare LFs
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
            if end + 4 > self.max_head:
                return buf  # over the cap, however it arrived: the general server's 431
            parsed = self._heads.parse(buf[:end], peer)
            if parsed is None:
                return buf
            environ, keep_alive, request_line = parsed
            started = time.time()
            consumed = end + 4
            if environ["REQUEST_METHOD"] == "POST":
                if self.publish is None:
                    return buf
                consumed += environ["CONTENT_LENGTH"]
                while len(buf) < consumed:  # the body, under the head's deadline
                    try:
                        chunk = sock.recv(max(4096, consumed - len(buf)))
                    except OSError:
                        return None
                    if not chunk:
                        return None
                    buf += chunk
                answer = self.publish(environ, buf[end + 4 : consumed])
            else:
                # Held by the publisher's push when nothing else is in hand: a pipelined request
                # would wait behind it unseen, so then the hub's own wait holds it.
                holder = held if keep_alive and len(buf) == consumed else None
                if holder is not None:
                    holder.request = (request_line, started)
                try:
                    answer = self.fast.answer(environ, holder)
                except WaitAbandoned:  # the client hung up while its poll was held
                    if on_answer is not None:
                        on_answer(request_line, CLIENT_CLOSED, 0, started)  # as nginx logs it
                    return None
            if answer is None:
                return buf
            if answer is TAKEN:  # the held poll answers it, and perhaps the requests after it
                assert held is not None
                carry = held.run()
                if carry is None:
                    return None
                rest = held.take_backlog()
                try:
                    if rest:
                        sock.sendall(rest)  # what the socket could not take at once
                    else:
                        sock.pushed(held.readable, held.answered_at)
                except OSError:
                    return None
                buf = carry
                if buf:
                    sock.start_head_deadline()  # its first bytes are in: the head deadline runs
                continue
            status, headers, body = answer
            try:
                sock.sendall(self._response(status, headers, body, keep_alive))
            except OSError:
                return None
            if on_answer is not None:
                on_answer(request_line, status, len(body), started)
            if not keep_alive:
                return None
            buf = buf[consumed:]
            if buf:
                # The next request came pipelined, in a read before this answer: its head (or its
                # body) is under the head deadline from now, not the stall timeout of idle time.
                start_deadline = getattr(sock, "start_head_deadline", None)
                if start_deadline is not None:
                    start_deadline()

    def _serve_next(self, held: HeldPoll, data: bytes) -> Any:
        """An inline connection's next request, read by its held poll (in the Runner): answered
        here when it is a plain keep-alive long or short poll on one channel that came alone;
        anything else (a publish, a list of channels, whose poll would wait here; pipelined
        requests, an unfinished head) goes back to the connection's greenlet with these bytes."""
        end = data.find(b"\r\n\r\n")
        if end < 0 or end + 4 != len(data) or len(data) > self.max_head:
            return data
        parsed = self._heads.parse(data[:end], held.peer)
        if parsed is None:
            return data
        environ, keep_alive, request_line = parsed
        if not keep_alive or environ["REQUEST_METHOD"] != "GET" or "," in environ["PATH_INFO"]:
            return data
        held.request = (request_line, time.time())
        answer = self.fast.answer(environ, held)
        if answer is None:
            return data  # for Flask
        if answer is TAKEN:
            return STAY
        status, headers, body = answer
        return held.answered(self._response(status, headers, body, True), status, len(body))

    def _response(self, status: int, headers: list[tuple[str, str]], body: bytes, keep_alive: bool) -> bytes:
        """The answer on the wire. The polls woken by one event answer with the very same body
        (hub's shared batch): the last response is kept and reused while nothing else differs."""
        date, last = self._now(), self._last
        if body is last[0] and date is last[1] and keep_alive is last[2] and status == last[3] and headers == last[4]:
            return last[5]
        head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in headers]
        head.append(f"Date: {date}\r\n")
        if not keep_alive:
            head.append("Connection: close\r\n")
        data = "".join(head).encode("latin-1") + b"\r\n" + body
        self._last = (body, date, keep_alive, status, headers, data)
        return data

    def _now(self) -> str:
        second = int(time.time())
        if self._date[1] != second:
            self._date = (formatdate(second, usegmt=True), second)
        return self._date[0]
