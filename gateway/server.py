"""Serving with gevent, and shutting down politely. The one place that knows about gevent."""

from __future__ import annotations

import contextlib
import gc
import http.client
import io
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import gevent
from flask import Flask
from gevent.pywsgi import WSGIHandler, WSGIServer

from gateway.config import ServerConfig, listen_error
from gateway.connlog import AccessLog
from gateway.heads import (
    HeadReader,
    Refused,
    asks_to_close,
    check_framing,
    forget_unread_headers,
    head_too_big,
    origin_form,
    refusal,
)
from gateway.hub import MemoryStore, WaitAbandoned
from gateway.publish import FastPublish
from gateway.redact import redact_text
from gateway.reporting import PublishRefusals
from gateway.sockio import Prefixed
from gateway.state import State, state
from gateway.transports.fastpoll import FastLongPoll
from gateway.transports.heldpoll import READABLE, TIMED_OUT, Runner
from gateway.transports.pollloop import LongPollLoop
from gateway.workers import WORKER_ENV, inherited_socket

__all__ = ["serve"]

READ_BUFFER = 1024  # bytes; pywsgi's default is 8 KB per connection
# gevent's default (128) overflows when thousands of clients (re)connect at once, e.g. after a
# deploy; the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024
GC_THRESHOLDS = (10_000, 20, 20)  # CPython's defaults: (700, 10, 10)


class _Handler(WSGIHandler):
    """Drops a connection whose socket makes no progress for server.stall_timeout_s (a client
    that stopped reading, a half-open socket); otherwise it would hold its greenlet forever.
    A request head must arrive whole within server.head_timeout_s (a client trickling header
    bytes makes progress, so the stall timeout alone would never end it) and be at most
    server.max_head_bytes long."""

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
        self._head_timeout_s, self._max_head_bytes = _head_limits(server)
        self._head_timer: gevent.Timeout | None = None
        self._head_started: float | None = None  # monotonic time a head in progress began
        self._requests = 0
        self._detached = False

    def handle(self) -> None:
        # Keep-alive long polls first (see transports/pollloop.py): it hands the connection back,
        # with whatever it read, at the first request that is anything else.
        loop = getattr(self.server, "longpoll_loop", None)
        if loop is not None:  # serve() set it up, with the rest the loop uses
            guarded = _HeadDeadline(self.socket, self._head_timeout_s, self.server.idle_between_polls)
            logged = self.server.access_log_on  # pywsgi's stand-in for no log still formats each line
            with self.server.coarse_waits.watching(self.socket):
                rest = loop.serve(guarded, self.client_address, self._log_long_poll if logged else None)
            if rest is None:
                # The connection is done. The server closes the socket, but a socket closes for
                # real only once its file objects have: the read buffer's, now.
                self.rfile.close()
                return
            # A head the loop started reading keeps its deadline here.
            self._requests, self._head_started = guarded.answered, guarded.head_started
            if rest:
                self.rfile = io.BufferedReader(Prefixed(rest, self.socket), READ_BUFFER)
        super().handle()

    def _log_long_poll(self, request_line: str, status: int, length: int, started: float) -> None:
        self.requestline, self.status, self._orig_status = request_line, str(status), str(status)
        self.response_length, self.time_start, self.time_finish = length, started, time.time()
        self.log_request()

    def handle_one_request(self):  # noqa: ANN201 (gevent's protocol: None, True or (status, raw response))
        # The deadline runs from the connection's start for its first request, and from the first
        # byte of each later one (an idle keep-alive connection is the stall timeout's business).
        first = not self._requests
        self._requests += 1
        timeout, self._head_started = _remaining(self._head_timeout_s, self._head_started), None
        if timeout < self._head_timeout_s:  # a head already under way (begun in the long-poll loop)
            first = False
        elif not first and not self._next_request_started():
            return None
        timer = self._head_timer = gevent.Timeout(timeout)
        timer.start()
        started = not first
        try:
            if first and not self._next_request_started():
                return None
            started = True
            result = super().handle_one_request()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            # A connection that never sent a byte (a browser's spare one) is closed without a word.
            return self._refuse("408", refusal("408")) if started else None
        finally:
            self._end_head()
        if isinstance(result, tuple):  # refused before the app saw it
            status, body = result
            return self._refuse(status, body if b'"error"' in body else refusal(status))
        return result

    def process_result(self) -> None:
        # A streaming answer (SSE, a proxied stream) lives as long as its client: the request's
        # head is needed only while the app decided what to answer, not for the stream's life.
        if not isinstance(self.result, (list, tuple)):
            self._forget_head()
        super().process_result()

    def _forget_head(self) -> None:
        """Drop the parsed head and every header the gateway never reads from the environ: up
        to server.max_head_bytes of it would otherwise stay with each stream (issue 12, hole 7)."""
        self.headers = None  # pywsgi reads it again only for the next request, which parses anew
        forget_unread_headers(self.environ)

    def _refuse(self, status: str, response: bytes) -> None:
        """Answer a refused head and end the connection, as pywsgi's handle() would, except that
        a client already gone is no error worth a traceback."""
        self.status = self._orig_status = status
        try:
            self.socket.sendall(response)
        except OSError:
            pass
        self.time_finish = time.time()
        self.log_request()
        return None

    def log_error(self, msg: str, *args: Any) -> None:
        # pywsgi quotes the client's malformed request line here: it may carry ?token=.
        try:
            message = msg % args if args else msg
        except (TypeError, ValueError):
            message = f"{msg!r} {args!r}"
        super().log_error(redact_text(message))

    def _next_request_started(self) -> bool:
        """Wait (up to the stall timeout) for the first byte of another request on this connection."""
        try:
            return bool(self.rfile.peek(1))
        except (OSError, ValueError):  # timed out, reset, or closed
            return False

    def _end_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.close()
            self._head_timer = None

    def read_request(self, raw_requestline: str) -> bool:
        budget = self._max_head_bytes - len(raw_requestline)
        if budget < 0:
            raise head_too_big()
        rfile = self.rfile
        self.rfile = HeadReader(rfile, budget)
        try:
            ok = super().read_request(raw_requestline)
        finally:
            self.rfile = rfile
        if ok:
            self.path = origin_form(self.path)
            # pywsgi compares the first Connection header whole; "keep-alive, close" closes too.
            if not self.close_connection and asks_to_close(self.headers.get_all("Connection") or ()):
                self.close_connection = True
        return ok

    def MessageClass(self, *args: Any) -> Any:  # noqa: N802 (pywsgi's name)
        # The headers as parsed, checked before pywsgi reads Content-Length or Transfer-Encoding.
        headers = super().MessageClass(*args)
        if not headers.status:
            check_framing(self.command, self.request_version, headers)
        return headers

    def _handle_client_error(self, ex: Exception):  # noqa: ANN202 (gevent's protocol)
        if isinstance(ex, Refused):
            return (ex.status, refusal(ex.status, ex.code, ex.detail))
        if isinstance(ex, http.client.HTTPException):  # Python's parser: 100 header lines or more
            detail = "the request has more header lines than the gateway reads (99); send fewer"
            return ("431", refusal("431", "too_many_headers", detail))
        return super()._handle_client_error(ex)

    def get_environ(self) -> dict:
        # The head is in: the app's time is its own (the stall timeout still guards the socket).
        self._end_head()
        # Streams take the fast path (gateway/transports/push.py): the publisher writes encoded
        # events straight to this socket. pywsgi hides the socket of plain HTTP responses, and
        # whether it frames the body as chunks, so hand both over.
        env = super().get_environ()
        env["gateway.socket"] = self.socket
        env["gateway.chunked"] = lambda: self.response_use_chunked
        env["gateway.detach"] = self._detach
        # The parsed headers are copied into environ; a stream would otherwise keep both for its life.
        self.headers = None
        return env

    def _detach(self) -> Callable[[int], None]:
        """A stream takes this connection over (gateway/readwatch.py's park): pywsgi neither ends
        its response nor closes its socket, and this greenlet goes, with its saved stack and
        the request's objects, while the stream waits for events. Returns what the stream calls
        once it has closed the socket, with the bytes it sent: the access line is written then,
        with the stream's real length and duration."""
        self._detached = True
        self.close_connection = True
        self.response_use_chunked = False  # the stream writes the body's last chunk itself
        # pywsgi would read a request body the app left unread (a GET with Content-Length), here,
        # after the stream took the socket: a greenlet waiting on the client, racing a WebSocket's
        # frame reader. The connection closes with the stream, so there is nothing to keep in step.
        self.wsgi_input = _NO_BODY_LEFT
        sock, streams = self.socket, self.server.detached_streams
        streams.add(sock)
        log = self.server.log if self.server.access_log_on else None
        if log is None:
            return lambda _sent: streams.discard(sock)
        # Only what the line needs: holding the handler would hold the request. (The log,
        # AccessLog, masks tokens in the request line as it writes it.)
        client = self.client_address[0] if isinstance(self.client_address, tuple) else self.client_address
        request_line, started, head_bytes = self.requestline or "", self.time_start, self.response_length
        # No status for this response: a WebSocket, which wrote its own 101 (_orig_status may be
        # a previous request's on a kept-alive connection; pywsgi resets only status).
        status = str(self._orig_status).split()[0] if self.status else "101"

        def release(sent: int) -> None:
            streams.discard(sock)
            when = datetime.now().replace(microsecond=0)
            length, duration = head_bytes + sent, time.time() - started
            log.write(f'{client or "-"} - - [{when}] "{request_line}" {status} {length or "-"} {duration:.6f}\n')

        return release

    def log_request(self) -> None:
        if not self._detached:  # a stream that took the connection over logs when it closes
            super().log_request()

    def format_request(self) -> str:
        # The access log line: a request line may carry ?token= (browsers' EventSource and
        # WebSocket cannot send headers), which must never reach a log.
        line = self.requestline
        self.requestline = redact_text(line or "")
        try:
            return super().format_request()
        finally:
            self.requestline = line

    def handle_one_response(self) -> None:
        super().handle_one_response()
        if self._detached:
            self.socket = None  # pywsgi's handle() closes the socket it still has: not ours now
            return
        # A WebSocket wrote its own 101 (pywsgi never saw it): once it has ended, the connection
        # is done. Otherwise pywsgi would wait on it for another HTTP request, and read the
        # client's closing frame as one.
        if self.environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            self.close_connection = True


class _NoBodyLeft:
    """A detached stream's request input, for pywsgi's clean-up: nothing to discard."""

    def _discard(self) -> None:
        return None


_NO_BODY_LEFT = _NoBodyLeft()


class _Server(WSGIServer):
    """pywsgi's server, except that it leaves open the connections streams took over."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.detached_streams: set[Any] = set()  # their sockets, until each stream has closed its own

    def do_close(self, sock: Any, *args: Any) -> None:
        if sock not in self.detached_streams:
            super().do_close(sock, *args)

    def drain(self, deadline: float, held_polls: Callable[[], int]) -> None:
        """Shutting down: what the loop holds, with no greenlet the server (no pool) could wait
        for, finishes on its own: streams say goodbye, held long polls answer the hub's close (a
        loop turn or two later, from the Runner or a parked greenlet). Wait for both until the
        deadline, then cut the streams left."""
        while (self.detached_streams or held_polls()) and time.monotonic() < deadline:
            gevent.sleep(0.02)
        for sock in list(self.detached_streams):
            _hang_up(sock)


def _remaining(timeout_s: float, started: float | None) -> float:
    if started is None:
        return timeout_s
    return max(0.001, timeout_s - (time.monotonic() - started))


class _CoarseDeadlines:
    """Deadlines kept in slots of `resolution_s`, all served by one repeating timer: a gevent
    timeout per wait cost 3-12 µs, a large part of a whole long-poll cycle. What is still
    registered when its slot has passed is handed to `expire` (from the event loop; it must
    not block). A deadline added with early=False ends up to two slots late, never early; one
    added with early=True ends up to one slot early or late (its owner waits out the rest)."""

    def __init__(self, resolution_s: float, expire: Callable[[Any], None]) -> None:
        self.resolution_s = resolution_s
        self._expire_one = expire
        self._slots: dict[int, dict[Any, None]] = {}
        self._next = 0  # the first slot not yet expired
        self._timer: Any = None

    def add(self, what: Any, timeout_s: float, early: bool = False) -> int:
        if self._timer is None:
            self._next = int(time.monotonic() / self.resolution_s)
            # ref=False: a wheel alone does not keep the loop alive (an embedder's gevent.wait() returns).
            self._timer = gevent.get_hub().loop.timer(self.resolution_s, self.resolution_s, ref=False)
            self._timer.start(self._expire)
        slot = self.slot_of(timeout_s) + (not early)
        if slot < self._next:
            slot = self._next
        waiting = self._slots.get(slot)
        if waiting is None:
            waiting = self._slots[slot] = {}
        waiting[what] = None
        return slot

    def slot_of(self, timeout_s: float) -> int:
        """The slot a deadline `timeout_s` from now falls in (added with early=True, it is woken there)."""
        return int((time.monotonic() + timeout_s) / self.resolution_s)

    def remove(self, what: Any, slot: int) -> None:
        waiting = self._slots.get(slot)
        if waiting is not None:
            waiting.pop(what, None)
            if not waiting:
                del self._slots[slot]

    def _expire(self) -> None:
        now = int(time.monotonic() / self.resolution_s)
        while self._next <= now:
            slot = self._next
            self._next += 1  # first: an add() made by an expiry lands in a slot still to be visited
            for what in list(self._slots.pop(slot, ())):
                try:
                    self._expire_one(what)
                except Exception:  # one failure must not leave the rest of the slot unexpired
                    log.exception("expiring a deadline")


def _hang_up(sock: socket.socket) -> None:
    """An idle keep-alive connection at its stall timeout: its wait ends as at a hang-up."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _WaitExpired(Exception):
    """Thrown into a long poll whose wait reached its timeout (see _CoarseWaits)."""


class _CoarseWaits:
    """The hub's wait for a signal (hub.wait_on), with the timeout kept by _CoarseDeadlines: the
    waiting greenlet is woken by an exception at its deadline (up to 0.1 s late) instead of
    carrying a timer of its own. The hub re-reads the channel after every wake-up, and waits out
    what is left of the hold (then with a precise timer) when woken a little early.

    A connection of the lean request loop registers its socket (watching()): while its poll is
    held, the socket is watched, and a hang-up (EOF or reset; a client sends nothing while it
    waits) ends the wait at once with WaitAbandoned, so the poll stops counting against the
    connection limits instead of lasting until its timeout."""

    def __init__(self) -> None:
        self._deadlines = _CoarseDeadlines(0.1, _expire_wait)
        # A wait's hang-up watch is armed within 0.5 s of its start (a socket that
        # hung up before then is readable at once): most waits end sooner, and arming costs syscalls.
        self._arming = _CoarseDeadlines(0.25, _HangupWatch.arm)
        self._hangups: dict[Any, _HangupWatch] = {}  # greenlet -> its connection's watch

    @contextlib.contextmanager
    def watching(self, sock: Any) -> Iterator[None]:
        """Waits of the current greenlet end when this socket's client hangs up."""
        raw = getattr(sock, "_sock", None)
        if raw is None:
            yield
            return
        me = gevent.getcurrent()
        watch = self._hangups[me] = _HangupWatch(raw, me)
        try:
            yield
        finally:
            del self._hangups[me]
            watch.close()

    def wait_on(self, signal: Any, timeout: float) -> None:
        if timeout < self._deadlines.resolution_s:
            signal.wait(timeout)  # short waits keep their precision
            return
        me = gevent.getcurrent()
        hangup = self._hangups.get(me)
        slot = arming = -1
        try:
            # Woken at the slot before its deadline (or just after): the hub waits out the rest.
            slot = self._deadlines.add(me, timeout, early=True)
            if hangup is not None:
                arming = self._arming.add(hangup, 0.0)
            signal.wait()
        except _WaitExpired:
            pass
        finally:
            self._deadlines.remove(me, slot)
            if hangup is not None:
                self._arming.remove(hangup, arming)
                hangup.disarm()
        if hangup is not None and hangup.gone:
            raise WaitAbandoned()


def _expire_wait(glet: Any) -> None:
    glet.throw(_WaitExpired())  # from the loop: the greenlet is in its wait


class _HangupWatch:
    """Watches a held poll's socket from the event loop, while armed (only inside its wait):
    readable with no bytes means the client is gone (bytes mean a pipelined request: the watch
    stops, the poll goes on)."""

    __slots__ = ("_raw", "_glet", "_watcher", "gone")

    def __init__(self, raw: socket.socket, glet: Any) -> None:
        self._raw = raw
        self._glet = glet
        self._watcher = gevent.get_hub().loop.io(raw.fileno(), 1)  # 1: readable
        self.gone = False

    def arm(self) -> None:
        if not self.gone and not self._watcher.active:
            self._watcher.start(self._readable)

    def disarm(self) -> None:
        if self._watcher.active:
            self._watcher.stop()

    def _readable(self) -> None:
        self._watcher.stop()
        try:
            data = self._raw.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            self._watcher.start(self._readable)
            return
        except OSError:
            data = b""
        if data:
            return
        self.gone = True
        _expire_wait(self._glet)  # a stopped (disarmed) watcher never gets here

    def close(self) -> None:
        self._watcher.stop()
        self._watcher.close()


class _PollWatch:
    """The event loop's side of a held long poll (transports/heldpoll.py's PollWatch): its
    socket's read watcher, its deadline, and the park of the connection's greenlet.

    A keep-alive poller arms a deadline twice per event (its poll's timeout, then the stall
    timeout between requests), so the deadline is kept by _CoarseDeadlines in one registration
    that is moved only when it must fire sooner: it may fire long before a later deadline (the
    poll then re-arms for the rest). Shorter than a slot, a timer of its own keeps it precisely."""

    __slots__ = ("_raw", "_watcher", "_glet", "_deadlines", "_slot", "_timer", "_kept", "report")

    def __init__(self, raw: socket.socket, deadlines: _CoarseDeadlines) -> None:
        self._raw = raw
        self._watcher: Any = None  # made at the first arm: most connections never hold a poll
        self._glet: Any = None
        self._deadlines = deadlines
        self._slot = -1  # where it is registered in the deadlines (-1: not)
        self._timer: Any = None
        self._kept: Any = _NOTHING  # an unpark() that came before the park
        self.report: Callable[[int], None] = _ignore  # its poll's, from then until close()

    def arm(self, readable: bool, timeout: float | None) -> None:
        if self.report is _ignore:  # closed (a step yielded while its connection closed): the fd may be reused
            return
        watcher = self._watcher
        if readable:
            if watcher is None:
                watcher = self._watcher = gevent.get_hub().loop.io(self._raw.fileno(), 1)  # 1: readable
            watcher.start(self._readable)
        elif watcher is not None:
            watcher.stop()
        self._stop_timer()
        if timeout is None:
            return
        deadlines = self._deadlines
        if timeout < deadlines.resolution_s:
            self._timer = gevent.get_hub().loop.timer(max(timeout, 0.0))
            self._timer.start(self._timed_out)
        elif self._slot < 0 or self._slot > deadlines.slot_of(timeout):
            if self._slot >= 0:
                deadlines.remove(self, self._slot)
            self._slot = deadlines.add(self, timeout, early=True)

    def disarm(self) -> None:
        """Nothing is reported until the next arm(), but for the deadline kept registered (the
        poll takes a TIMED_OUT for a step already done as nothing to do)."""
        if self._watcher is not None:
            self._watcher.stop()
        self._stop_timer()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None

    def _readable(self) -> None:
        self._watcher.stop()
        self.report(READABLE)

    def slot_expired(self) -> None:
        """From the event loop: the deadlines' expiry."""
        self._slot = -1  # no longer in the deadlines
        self._timed_out()

    def _timed_out(self) -> None:
        """From the event loop: the deadlines' expiry, or the short timer's."""
        self.disarm()
        self.report(TIMED_OUT)

    def soon(self, reason: int) -> None:
        gevent.get_hub().loop.run_callback(self.report, reason)

    def park(self) -> Any:
        kept, self._kept = self._kept, _NOTHING
        if kept is not _NOTHING:
            return kept
        self._glet = gevent.getcurrent()
        try:
            return gevent.get_hub().switch()
        finally:
            self._glet = None

    def unpark(self, value: Any) -> None:
        gevent.get_hub().loop.run_callback(self._resume, value)

    def _resume(self, value: Any) -> None:
        glet = self._glet
        if glet is None:
            self._kept = value
        else:
            self._glet = None
            glet.switch(value)

    def close(self) -> None:
        self.report = _ignore  # closed: nothing more is armed, and no cycle is left with its poll
        self.disarm()
        if self._slot >= 0:
            self._deadlines.remove(self, self._slot)
            self._slot = -1
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None


_NOTHING = object()


def _ignore(reason: int) -> None:
    pass


class _HeadDeadline:
    """The client socket as the long-poll loop (transports/pollloop.py) reads it: recv() holds
    a request head to server.head_timeout_s, from the connection's start for its first head and
    from the first byte for later ones. Between requests a connection waits for the next one up
    to the stall timeout (kept by _CoarseDeadlines). At a head's deadline it answers 408 (silence, if
    the client never sent a byte) and raises."""

    def __init__(self, sock: socket.socket, timeout_s: float, idle: _CoarseDeadlines) -> None:
        self._sock = sock
        self._timeout_s = timeout_s
        self._idle_connections = idle
        self._idle = sock.gettimeout()
        self.head_started: float | None = time.monotonic()
        self._silent = True  # no byte from the client yet
        self.answered = 0
        self.raw = getattr(sock, "_sock", None)  # the OS socket, non-blocking under gevent
        self._readable = False  # the next request is known to be readable (see pushed())
        self._idle_since: float | None = None  # when a pushed answer went out (see pushed())

    def recv(self, size: int) -> bytes:
        if self.head_started is None:
            data = self._next_request(size)
            if data:
                self.head_started = time.monotonic()
            return data
        remaining = self.head_started + self._timeout_s - time.monotonic()
        if remaining <= 0:
            self._expired()
        self._sock.settimeout(min(remaining, self._idle) if self._idle else remaining)
        try:
            data = self._sock.recv(size)
        except TimeoutError:
            self._expired()
        finally:
            self._sock.settimeout(self._idle)
        self._silent = self._silent and not data
        return data

    def sendall(self, data: bytes) -> None:
        # An answer nearly always fits the socket's buffer: one non-blocking send, and gevent's
        # sendall (which asks the kernel for the buffer size each time) only for what is left.
        raw = self.raw
        try:
            sent = raw.send(data) if raw is not None else 0
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self._sock.sendall(data[sent:])
        self.head_started, self._silent = None, False
        self.answered += 1
        self._idle_since = None

    def pushed(self, readable: bool, at: float) -> None:
        """An answer the publisher wrote (transports/heldpoll.py) at monotonic time `at`, as
        sendall() would have; `readable`: the next request is known to be in already."""
        self.head_started, self._silent = None, False
        self.answered += 1
        self._readable = readable
        self._idle_since = at

    def start_head_deadline(self) -> None:
        """Bytes of the next request are already in hand (pipelined, read before the last
        answer): its head deadline runs from now, not from a first byte still to come."""
        if self.head_started is None:
            self.head_started = time.monotonic()

    def _next_request(self, size: int) -> bytes:
        """Between requests: the next one is rarely there yet, so wait before reading (an
        attempt first would only fail), with the stall timeout kept by _CoarseDeadlines rather
        than a timer per wait; then read the raw socket, as it is readable."""
        sock, raw = self._sock, self.raw
        idle, since = self._idle, self._idle_since
        self._idle_since = None  # for this wait only: later requests are timed from their own answer
        if self._readable and raw is not None:
            self._readable = False
            try:
                return raw.recv(size)
            except BlockingIOError:
                pass
        watcher = getattr(sock, "_read_event", None)
        if raw is None or watcher is None or not self._idle:
            return sock.recv(size)  # not a gevent socket, or no stall timeout: as the socket does
        if since is not None:  # the stall timeout runs from the pushed answer, not from now
            idle = max(0.0, idle - (time.monotonic() - since))
        slot = self._idle_connections.add(sock, idle)
        try:
            sock.hub.wait(watcher)
        finally:
            self._idle_connections.remove(sock, slot)
        try:
            return raw.recv(size)
        except BlockingIOError:  # woken with nothing to read after all: the socket's own wait
            return sock.recv(size)

    def _expired(self) -> None:
        if not self._silent:
            try:
                self._sock.sendall(refusal("408"))
            except OSError:
                pass
        raise TimeoutError("the request head did not arrive within server.head_timeout_s")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _head_limits(server: Any) -> tuple[float, int]:
    """server.head_timeout_s and server.max_head_bytes of the app this server serves."""
    try:
        cfg = state(server.application).config.server
    except (AttributeError, KeyError, TypeError):  # not our app (a test's bare WSGI callable)
        cfg = ServerConfig()
    return cfg.head_timeout_s, cfg.max_head_bytes


log = logging.getLogger("gateway")


def _tune_gc() -> None:
    """Full (generation 2) collections walk every object of every open connection: 30-120 ms
    measured with 1,000 WebSocket clients, a stall for every stream at once. Everything built
    at start-up is frozen out of them, and the young generations are collected less eagerly, so
    that full collections come far less often (memory is still freed by reference counting)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLDS[0], GC_THRESHOLDS[1], GC_THRESHOLDS[2])


def _lean_publish(st: State) -> Callable[[dict[str, Any], bytes], tuple[int, list[tuple[str, str]], bytes]] | None:
    """How the lean loop answers a keep-alive publish: FastPublish.answer(), its refusals
    counted exactly as the WSGI stack's PublishRefusals counts them."""
    fast, refusals = st.parts.get(FastPublish), st.parts.get(PublishRefusals)
    if fast is None:
        return None

    def publish(environ: dict[str, Any], body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        status, headers, out, code = fast.answer_read(environ, body)
        if status >= 400 and refusals is not None:
            refusals.count(status, code or "error")
        return status, headers, out

    return publish


def serve(app: Flask) -> None:
    """Serve until SIGTERM/SIGINT, then: stop accepting, tell every stream to come back later
    (SSE: a retry hint, WebSocket: close 1012, long poll: answer now), and exit within the
    grace period (well inside Heroku's 30 s)."""
    st = state(app)
    config, hub, services = st.config, st.hub, st.services
    # A worker (gateway/workers.py) serves on the socket its parent bound; a lone process binds.
    inherited = inherited_socket()
    server = _Server(
        inherited if inherited is not None else (config.server.host, config.server.port),
        app,
        handler_class=_Handler,
        backlog=None if inherited is not None else LISTEN_BACKLOG,  # the parent set its own
        log=AccessLog(config.server.log_format) if config.server.access_log else None,
        error_log=sys.stderr,
    )
    server.stall_timeout_s = config.server.stall_timeout_s
    server.access_log_on = config.server.access_log
    # Idle connections close up to two slots after the stall timeout: a slot of 1 s, finer for
    # short stall timeouts.
    server.idle_between_polls = _CoarseDeadlines(min(1.0, config.server.stall_timeout_s / 10), _hang_up)
    server.coarse_waits = _CoarseWaits()
    fast = st.parts.get(FastLongPoll)
    held_deadlines = _CoarseDeadlines(0.1, _PollWatch.slot_expired)
    held = (lambda sock: _PollWatch(sock.raw, held_deadlines)), Runner(gevent.spawn_raw)
    server.longpoll_loop = (
        LongPollLoop(
            fast,
            config.server.head_timeout_s,
            _lean_publish(st),
            config.server.max_head_bytes,
            held,
            # The held polls' Runner answers next requests itself only where nothing it does
            # waits: the in-process store's reads, no app asked about access. (A lazy upstream
            # source's listener, run when a channel's last subscriber leaves, may yield for a
            # thread's start: a turn's pause for the connections queued behind it, no more.)
            inline=isinstance(hub.store, MemoryStore) and not config.auth.upstream_url,
            stall_s=config.server.stall_timeout_s or None,
        )
        if fast is not None
        else None
    )
    _tune_gc()
    # gevent records each greenlet's spawning stack and parent (for debugging): ~2 KB per
    # connection's greenlets, for nothing in production.
    gevent.config.track_greenlet_tree = False
    # Flush pushed events once the publishing greenlet yields: a burst shares one write.
    hub.defer = gevent.get_hub().loop.run_callback
    hub.spawn = gevent.spawn  # other nodes' events pushed in a greenlet of their own (Hub.notified)
    hub.wait_on = server.coarse_waits.wait_on
    # Signals are ours before the port opens: a SIGTERM (or ^C) that comes while the services
    # start is a drain like any other, not the default abrupt exit (or a KeyboardInterrupt).
    stopping = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    gevent.signal_handler(signal.SIGINT, stopping.set)
    try:
        server.start()
    except OSError as exc:  # e.g. the port is taken: a config problem, said in one line
        raise listen_error(config.server.host, config.server.port, exc) from None
    if inherited is None:
        log.info("gateway listening on http://%s:%d", config.server.host, server.server_port)
    else:
        log.info("worker %s (pid %d) serving", os.environ.get(WORKER_ENV, "?"), os.getpid())
    for service in services:
        service.start()

    stopping.wait()

    log.info("shutting down: closing streams")
    started = time.monotonic()
    server.close()  # stop accepting; open connections keep going for now
    hub.close()
    for service in services:
        service.stop()
    # Give streams a moment to write their goodbye, then cut what is left.
    server.stop(timeout=config.server.shutdown_grace_s)
    assert st.admission is not None  # create_app made it
    server.drain(started + config.server.shutdown_grace_s, st.admission.held_polls)
    hub.store.close()
    log.info("stopped in %.1f s", time.monotonic() - started)
