"""A held long poll that the publisher answers, so that its greenlet wakes once per event.

A keep-alive long poll (the lean loop, pollloop.py) on one channel with nothing new for it is
attached to the hub as a Pusher while it is held. A publish hands it the answer (the body is
encoded once for every poll it answers, and so are the response bytes) and writes it with one
non-blocking send, from the same loop that writes to streams. The poll's greenlet sleeps
through that: it waits on its socket, and wakes when the client's next request arrives. Whatever
cannot be pushed (events it missed while busy, the timeout, the hub closing) wakes it to answer
from history by cursor, as any long poll does, so nothing is lost or repeated; an answer the
socket could not take at once wakes it to write the rest. The tickets of the polls one publish
answered are closed, and their access lines written, right after the publisher's loop, by one
greenlet for all of them.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from gateway.admission import Ticket
from gateway.hub import Batch, Event, Hub, WaitAbandoned
from gateway.transports import pollbody

__all__ = ["HeldPoll", "Finisher", "PollWait", "KIND", "READABLE", "WOKEN", "TIMED_OUT"]

log = logging.getLogger(__name__)

KIND = "longpoll-held"  # the hub's wire format for these pushers (counted when their ticket closes)
# What a held poll's wait ends with:
READABLE = 1  # the socket has bytes or an EOF: the next request, pipelined bytes, or a hang-up
WOKEN = 2  # wake() was called: read from history
TIMED_OUT = 3

OnAnswer = Callable[[str, int, int, float], None]  # request line, status, body length, start time


class PollWait(Protocol):
    """How a held poll's greenlet waits (gevent's side of it is in server.py)."""

    def wait(self, timeout: float, readable: bool) -> int:
        """Until the socket is readable (if `readable`), wake() or the timeout: which one. It
        may end sooner with TIMED_OUT (the poll then reads again, and waits out the rest)."""
        ...

    def wake(self) -> None:
        """End the current wait with WOKEN (from any greenlet; never blocks)."""
        ...

    def close(self) -> None: ...


class Finisher:
    """Closes the tickets of the polls a publish answered, in one greenlet that runs after the
    publisher's loop: the sends go out first, back to back, and the bookkeeping (which may
    start or stop a lazy upstream source) never runs in the event loop itself."""

    def __init__(self, spawn: Callable[[Callable[[], None]], object]) -> None:
        self._spawn = spawn
        self._due: list[HeldPoll] = []

    def add(self, poll: HeldPoll) -> None:
        if not self._due:
            self._spawn(self._run)
        self._due.append(poll)

    def _run(self) -> None:
        due, self._due = self._due, []
        for poll in due:
            try:
                poll.finish()
            except Exception:  # one poll's failure must not leave the others' tickets open
                log.exception("closing an answered long poll")


class HeldPoll:
    """One keep-alive connection's long polls, each held as a hub Pusher (see the module doc)."""

    __slots__ = (
        "kind",
        "cursor",
        "hold",
        "request",
        "readable",
        "answered_at",
        "_hub",
        "_wait",
        "_raw",
        "_respond",
        "_limit",
        "_finisher",
        "_on_answer",
        "_ticket",
        "_channel",
        "_answered",
        "_finished",
        "_woken",
        "_pipelined",
        "_backlog",
        "_count",
        "_body_len",
    )

    def __init__(
        self,
        hub: Hub,
        wait: PollWait,
        raw: Any,
        respond: Callable[[bytes], bytes],
        limit: int,
        finisher: Finisher,
        on_answer: OnAnswer | None,
    ) -> None:
        self.kind = KIND
        self.cursor = ""
        self.hold = 1  # the publisher may push only while the poll waits (0)
        self.request = ("", 0.0)  # the request line and start time, for the access line
        self.readable = False  # the last wait ended with the next request readable
        self.answered_at = 0.0  # monotonic time of the last pushed answer
        self._hub = hub
        self._wait = wait
        self._raw = raw  # the OS socket, non-blocking under gevent
        self._respond = respond  # body -> the whole response, as the lean loop writes it
        self._limit = limit
        self._finisher = finisher
        self._on_answer = on_answer
        self._ticket: Ticket | None = None
        self._channel = ""
        self._answered = self._finished = self._woken = self._pipelined = False
        self._backlog = b""
        self._count = self._body_len = 0

    def __call__(self, ticket: Ticket, timeout: float) -> bytes | None:
        """The poll's answer body, or None once the publisher has written it (then
        take_backlog() is what the socket could not take at once)."""
        hub = self._hub
        ((channel, since),) = ticket.starts.items()
        self._ticket, self._channel = ticket, channel
        self._answered = self._finished = self._pipelined = False
        self.readable = False
        self.hold = 1
        self.cursor = ""  # not the last poll's: while reading, no publish may take it for ours
        deadline = time.monotonic() + timeout
        hub.attach(channel, self)  # before the read: a publish during it (a shared store yields) wakes us
        try:
            while True:
                self._woken = False
                batch = hub.read_shared(channel, since, self._limit)
                remaining = deadline - time.monotonic()
                if batch.events or batch.gap or hub.closing or remaining <= 0:
                    return pollbody.counted(ticket, batch)
                if since is None:
                    since = batch.cursor  # from now: from the channel's last event at the first read
                if self._woken:
                    continue
                self.cursor, self.hold = batch.cursor, 0
                reason = self._wait.wait(remaining, not self._pipelined)
                self.hold = 1
                if self._answered:  # on the wire: whatever happens now, nothing more is answered
                    self.readable = reason == READABLE
                    try:
                        self.finish()
                    except Exception:
                        log.exception("closing an answered long poll")
                    return None
                if reason == READABLE and self._hung_up():
                    raise WaitAbandoned()
        finally:
            hub.detach(channel, self)

    def take_backlog(self) -> bytes:
        data, self._backlog = self._backlog, b""
        return data

    def close(self) -> None:
        self._wait.close()

    def _hung_up(self) -> bool:
        """Readable while held: an EOF is a hang-up; bytes are a request pipelined behind this
        poll, left for after its answer (and no more watching for a hang-up until then)."""
        try:
            data = self._raw.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if not data:
            return True
        self._pipelined = True
        return False

    # -- the hub's Pusher protocol, from the publishing side; never blocks ---------------------
    def encode(self, events: list[Event]) -> bytes:
        """The answer's body for these new events (shared by every poll they answer)."""
        shown = events[: self._limit]
        return Batch(shown, cursor=shown[-1].id, more=len(events) > len(shown)).poll_body()

    def push(self, data: bytes, cursor: str, events: int = 1) -> None:
        self.hold = 1
        self.cursor = cursor
        self._answered = True
        self.answered_at = time.monotonic()
        self._count, self._body_len = min(events, self._limit), len(data)
        response = self._respond(data)
        try:
            sent = self._raw.send(response)
        except BlockingIOError:
            sent = 0
        except OSError:  # the client is gone: its socket's EOF ends the wait
            sent = len(response)
        if sent < len(response):
            self._backlog = response[sent:]
            self._wait.wake()  # the greenlet writes the rest
        elif self._pipelined:
            self._wait.wake()  # the next request is already here
        self._finisher.add(self)

    def lag(self, nbytes: int) -> None:
        """A poll has no backlog to cut: it reads what it missed on its next request."""

    def wake(self) -> None:
        if not self._answered:
            self._woken = True
            self._wait.wake()

    def finish(self) -> None:
        """An answered poll's ticket closed and its access line written (once)."""
        ticket = self._ticket
        if self._finished or not self._answered or ticket is None:
            return
        self._finished = True
        # All read first: ticket.close() may yield (a lazy source's listener), and meanwhile this
        # connection's next poll may reset every field here.
        channel, (request_line, started), length = self._channel, self.request, self._body_len
        ticket.events_sent, ticket.bytes_sent = self._count, length
        self._hub.detach(channel, self)
        ticket.close()
        if self._on_answer is not None:
            self._on_answer(request_line, 200, length, started)
