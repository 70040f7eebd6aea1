"""The streams' fast path: a subscriber whose socket the publisher writes to directly.

The hub hands every attached Pusher the encoded bytes of newly published events (one encoding
per wire format per batch, shared by all subscribers). When the subscriber is idle and up to
date, those bytes go out with one non-blocking send from the publishing side: no greenlet
switch, no queue. Everything else (a full socket, a backlog, a gap, a heartbeat, an event from
another node) falls back to the subscriber's own greenlet, which catches up from the channel's
history by cursor, so no event is lost or reordered, and a slow client never slows the others.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from gateway.hub import Event, Hub, gap_event

__all__ = [
    "Pusher",
    "Rounds",
    "SocketStream",
    "SlowConsumer",
    "chunk",
    "run_blocking",
    "sse_encoder",
    "ws_encode",
    "DEFAULT_SLOW_BYTES",
]

Encode = Callable[[list[Event]], bytes]
T = TypeVar("T")
# A stream's life as rounds: between two rounds it yields (the event that wakes it, how long to
# wait for it at most, None for ever) and is sent whether it was woken (False: the wait ran out).
# Its return value is the stream's last words. Driven by run_blocking() here, or without a
# greenlet between rounds by gateway/readwatch.py's park().
Rounds = Generator[tuple[Any, "float | None"], bool, T]
DEFAULT_SLOW_BYTES = 1 << 20
WRITE_SLICE = 64 * 1024  # a catch-up writes at most this much per write, so memory per subscriber stays small


class SlowConsumer(Exception):
    """The subscriber fell further behind than limits.slow_consumer_bytes: it is disconnected
    (it can resume from history with its last id)."""


def event_cost(events: list[Event]) -> int:
    """Roughly what these events add to a subscriber's unsent backlog."""
    return sum(len(e.data) for e in events) + 64 * len(events)


def published_in(events: list[Event]) -> int:
    """How many of these are published events (not the gateway's own `gap`, a reserved name)."""
    return sum(1 for e in events if e.event != "gap")


def slices(events: list[Event]) -> list[list[Event]]:
    """Events in groups of at most ~WRITE_SLICE bytes (at least one event each)."""
    groups: list[list[Event]] = []
    group: list[Event] = []
    size = 0
    for e in events:
        cost = len(e.data) + 64
        if group and size + cost > WRITE_SLICE:
            groups.append(group)
            group, size = [], 0
        group.append(e)
        size += cost
    if group:
        groups.append(group)
    return groups


def _sse_raw(events: list[Event]) -> bytes:
    return b"".join([e.sse for e in events])


def chunk(body: bytes) -> bytes:
    """One chunk of an HTTP/1.1 chunked body."""
    return b"%x\r\n%s\r\n" % (len(body), body)


def _sse_chunked(events: list[Event]) -> bytes:
    return chunk(b"".join([e.sse for e in events]))


def sse_encoder(chunked: bool) -> tuple[str, Encode]:
    """(kind, encode) for an SSE body: HTTP/1.1 responses are framed as chunks, 1.0 ones not."""
    return ("sse-chunked", _sse_chunked) if chunked else ("sse", _sse_raw)


def ws_encode(events: list[Event]) -> bytes:
    """Each event its own text frame; several frames go out in one write."""
    return b"".join([e.ws for e in events])


class SocketStream:
    """What a stream's pushers share (Pusher here, MultiPusher for several channels): the client
    socket the publisher writes to without blocking, the unsent backlog of such a write, the
    slow-consumer cut, and the blocking writes of the stream's own greenlet. A subclass gives
    `hold` (an attribute, or a property it mirrors elsewhere) and wake()."""

    __slots__ = (
        "dead",
        "_sock",
        "_raw",
        "_backlog",
        "_wakeup",
        "_lock",
        "behind",
        "slow_bytes",
        "slow",
        "bytes_sent",
        "events_sent",
        "_writing",
    )
    hold: int
    kind: str

    def __init__(self, sock: Any, event_class: Callable[[], Any], lock_class: Callable[[], Any]) -> None:
        self.dead = False
        self._sock = sock  # blocking API (gevent: waits by yielding)
        # Under gevent the OS socket below is non-blocking: a send there never switches greenlets.
        self._raw = getattr(sock, "_sock", None)
        self._backlog = b""  # the unsent tail of a pushed write
        self._wakeup = event_class()
        self._lock = lock_class()  # one blocking writer at a time (e.g. a ping and a catch-up)
        self.behind = 0  # bytes of events published since this subscriber was last up to date
        self.slow_bytes = DEFAULT_SLOW_BYTES
        self.slow = False
        self.bytes_sent = 0
        self.events_sent = 0
        self._writing = False

    def wake(self) -> None:
        raise NotImplementedError

    # -- from the publishing side; never blocks ----------------------------------------------
    def _send_now(self, data: bytes) -> None:
        """One non-blocking send; what the socket cannot take is left for the greenlet."""
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:  # the client is gone
            self.dead = True
            self.hold += 1
            self.wake()
            return
        self.bytes_sent += sent
        if sent < len(data):
            self._backlog = data[sent:]
            self.hold += 1  # released once the greenlet has written the backlog
            self.wake()

    def lag(self, nbytes: int) -> None:
        """The hub could not push `nbytes` of events to this subscriber (it was busy or behind)."""
        self.behind += nbytes
        if self.behind > self.slow_bytes and not self.slow:
            self.slow = True
            self.wake()
            if self._writing:  # stuck in a write to a client that stopped reading: cut it
                _cut(self._sock)

    # -- from the subscriber's own greenlet ----------------------------------------------------
    @property
    def wakeup(self) -> threading.Event:
        """The event this subscriber's greenlet waits on; setting it runs one more round."""
        return self._wakeup

    def write(self, data: bytes) -> None:
        """A blocking write that the publisher will not interleave with."""
        self.hold += 1
        try:
            with self._lock:
                self._writing = True
                try:
                    self._sock.sendall(data)
                finally:
                    self._writing = False
            self.bytes_sent += len(data)
        finally:
            self.hold -= 1

    def _write_backlog(self) -> None:
        """Out with what a pushed write left unsent (under the hold _send_now took for it)."""
        if self._backlog:
            data, self._backlog = self._backlog, b""
            try:
                self.write(data)
            finally:
                self.hold -= 1  # the backlog's hold

    def _idle(self, on_idle: Callable[[], None]) -> None:
        """A wait ran out: on_idle() (a heartbeat, a ping) writes, and the publisher must not."""
        self.hold += 1
        try:
            on_idle()
        finally:
            self.hold -= 1

    def _write_history(self, hub: Hub, group: list[Event], data: bytes) -> None:
        """Write `data`, these events read back from history, and count them."""
        self.write(data)
        published = published_in(group)
        self.events_sent += published
        hub.observer.caught_up(self.kind, published, len(data))
        self.behind = max(0, self.behind - event_cost(group))  # written: no longer owed
        if self.slow:
            raise SlowConsumer()


class Pusher(SocketStream):
    __slots__ = ("kind", "cursor", "hold", "encode", "_dirty")

    def __init__(
        self,
        sock: Any,
        kind: str,
        encode: Encode,
        cursor: str,
        event_class: Callable[[], Any] = threading.Event,
        lock_class: Callable[[], Any] = threading.Lock,
    ) -> None:
        super().__init__(sock, event_class, lock_class)
        self.kind = kind
        self.encode = encode
        self.cursor = cursor
        # Above 0 while the publisher must not write: a catch-up, a blocking write (ours or a
        # protocol library's ping), an unsent backlog, or no non-blocking socket at all.
        self.hold = 0 if self._raw is not None else 1
        self._dirty = False  # woken while busy: read history once more before going idle

    # -- called by the hub, from the publishing side; never blocks -------------------------
    def push(self, data: bytes, cursor: str, events: int = 1) -> None:
        """Called only when hold is 0 and the cursor is where these bytes start."""
        self.events_sent += events
        self.cursor = cursor  # these bytes are committed to this stream, sent now or from the backlog
        self._send_now(data)

    def wake(self) -> None:
        self._dirty = True
        self._wakeup.set()

    # -- called from the subscriber's own greenlet (or a parked stream's round) --------------
    def rounds(
        self,
        hub: Hub,
        channel: str,
        limit: int,
        idle_s: float | Callable[[], float],
        on_idle: Callable[[], None],
        alive: Callable[[], bool] = lambda: True,
        on_wake: Callable[[], None] | None = None,
    ) -> Rounds[None]:
        """This subscriber's life until the client goes, the hub closes or alive() turns false,
        as Rounds (run_blocking() or readwatch.park() drives them). Each round catches up from
        history, then runs on_wake(); on_idle() runs after idle_s without a wake-up (a
        heartbeat); idle_s may be a function, asked each round (it shrinks as a token's expiry
        nears). Socket errors propagate."""
        hub.attach(channel, self)
        try:
            while not hub.closing and not self.dead and alive():
                self._wakeup.clear()
                self._catch_up(hub, channel, limit)
                if hub.closing or self.dead:
                    break
                if on_wake is not None:
                    on_wake()
                woken = yield self._wakeup, idle_s() if callable(idle_s) else idle_s
                if not woken and alive():
                    self._idle(on_idle)
        finally:
            hub.detach(channel, self)
        if not self.dead:
            self._write_backlog()  # a push's unsent rest goes before the stream's last words

    def _catch_up(self, hub: Hub, channel: str, limit: int) -> None:
        self.hold += 1
        try:
            while not self.dead:
                if self.slow:
                    raise SlowConsumer()
                self._dirty = False
                self._write_backlog()
                cursor = self.cursor
                batch = hub.read(channel, cursor, limit)
                events = [gap_event(batch, cursor), *batch.events] if batch.gap else batch.events
                for group in slices(events):
                    self._write_history(hub, group, self.encode(group))
                if not events and not self._dirty:
                    self.behind = 0  # up to date
                    return
                self.cursor = batch.cursor
        finally:
            self.hold -= 1


def run_blocking(rounds: Rounds[T]) -> T:
    """Drive a stream's rounds in the calling greenlet (or thread): it waits between them."""
    try:
        event, idle = next(rounds)
        while True:
            event, idle = rounds.send(event.wait(idle))
    except StopIteration as stop:
        return stop.value


STREAM_SEND_BUFFER = 256 * 1024


def bound_send_buffer(sock: Any, slow_bytes: int) -> None:
    """A stream's kernel send buffer, fixed rather than autotuned (up to 4 MB on Linux): what a
    client that stopped reading leaves unsent then shows up as its backlog here, and it is cut
    as a slow consumer instead of quietly holding megabytes of kernel memory."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, min(slow_bytes, STREAM_SEND_BUFFER))
    except (OSError, AttributeError):
        pass


def _cut(sock: Any) -> None:
    """End a connection from another greenlet: its blocked write then fails at once."""
    try:
        sock.shutdown(2)  # SHUT_RDWR
    except OSError:
        pass
