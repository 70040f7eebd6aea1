"""A keep-alive connection's long polls, held as hub pushers and answered without its greenlet.

A keep-alive long poll (the lean loop, pollloop.py) on one channel with nothing new for it is
attached to the hub as a Pusher. A publish hands it the answer (the body is encoded once for every
poll it answers, and so are the response bytes) and writes it with one non-blocking send, from
the loop that writes to streams. From then on the connection is a small state machine driven by
what the event loop reports (its socket readable, a wake-up, a deadline):

    HOLDING --push--> PUSHED --its ticket closed--> BETWEEN --next request--> HOLDING ...

With an in-process store and no app to ask about access ("inline"), everything, the next
request's admission and hold included, runs in one Runner greenlet shared by every connection
that has something to do: a thousand pollers woken by one event cost one greenlet switch, not a
thousand pairs. The connection's own greenlet stays parked; it takes the connection back at the
first thing the machine does not answer itself (another kind of request, a pipelined one, an
answer the socket could not take at once), with the bytes read so far. Otherwise (a shared store
whose reads yield, an app that is asked), the greenlet runs the same machine on each report, and
only the closing of pushed polls' tickets is the Runner's.

Nothing is lost or repeated: whatever cannot be pushed (events a poll missed while busy, its
timeout, the hub closing) wakes it to read from history by cursor, as any long poll does.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from gateway.admission import Ticket
from gateway.errors import BadRequest
from gateway.heads import holds_a_head
from gateway.hub import Batch, Event, Hub
from gateway.transports import pollbody

__all__ = [
    "HeldPoll",
    "Runner",
    "PollWatch",
    "KIND",
    "READABLE",
    "WOKEN",
    "TIMED_OUT",
    "FINISH",
    "STAY",
    "CLIENT_CLOSED",
]

log = logging.getLogger(__name__)

KIND = "longpoll-held"  # the hub's wire format for these pushers (counted when their ticket closes)
# What the event loop reports to a held poll:
READABLE = 1  # the socket has bytes or an EOF: the next request, pipelined bytes, or a hang-up
WOKEN = 2  # wake() was called: read from history
TIMED_OUT = 3  # the poll's timeout, or the stall timeout between requests (perhaps a little early)
FINISH = 4  # a push went out: close its ticket (the Runner's, so the publisher's loop never yields)
# States:
IDLE, HOLDING, PUSHED, BETWEEN, CLOSED = range(5)

CLIENT_CLOSED = 499  # the access log's status for a poll whose client left first (nginx's)
# Bytes pipelined behind a held poll are read and kept for after its answer, up to this much;
# past it the hang-up watch stops until the answer (the lean loop hands bigger heads over anyway).
CARRY_MAX = 8192
STAY = object()  # a report's outcome: the machine goes on; the connection's greenlet stays parked
# Any other outcome ends the park: None (the connection is done) or bytes (the greenlet goes on
# from them: read but not answered; first it writes take_backlog()).
Outcome = Any
OnAnswer = Callable[[str, int, int, float], None]  # request line, status, body length, start time
# The next request of an inline connection, answered or handed back (pollloop.py).
ServeNext = Callable[["HeldPoll", bytes], Outcome]
# An error (the store failed while reading for a held poll) -> (the whole response, status, body length).
Refuse = Callable[[BadRequest], tuple[bytes, int, int]]


class PollWatch(Protocol):
    """The event loop's side of a held poll (gevent's is in server.py). Reports go to `report`,
    each from the event loop, never from the caller."""

    report: Callable[[int], None]

    def arm(self, readable: bool, timeout: float | None) -> None:
        """Report READABLE once the socket is readable (if `readable`), TIMED_OUT in `timeout` s
        (perhaps a little early; None: never), whichever comes first, once; re-arming or
        disarm() cancels what was armed."""
        ...

    def disarm(self) -> None: ...

    def soon(self, reason: int) -> None:
        """Report `reason` from the event loop (callable from any greenlet; never blocks)."""
        ...

    def park(self) -> Any:
        """The connection's greenlet waits for unpark(value), and returns that value."""
        ...

    def unpark(self, value: Any) -> None:
        """Resume the parked greenlet with `value` (from the loop; kept if it has not parked yet)."""
        ...

    def close(self) -> None:
        """Nothing more is watched or reported, and `report` is dropped (no cycle is left)."""
        ...


class Runner:
    """Runs the held polls' reports one after another in one greenlet: a poll's work never runs
    twice at once, and a greenlet switch is paid per batch of ready connections, not per each."""

    def __init__(self, spawn: Callable[[Callable[[], None]], object]) -> None:
        self._spawn = spawn
        self._due: deque[tuple[HeldPoll, int]] = deque()
        self._running = False

    def add(self, poll: HeldPoll, reason: int) -> None:
        self._due.append((poll, reason))
        if not self._running:
            self._running = True
            self._spawn(self._run)

    def _run(self) -> None:
        due = self._due
        try:
            while due:  # what is added meanwhile (a report while this one yields) is run here too
                poll, reason = due.popleft()
                poll.run_report(reason)  # never raises: a poll that fails is closed there
        finally:
            self._running = False
            if due:  # killed mid-run (GreenletExit): what is due still runs
                self._running = True
                self._spawn(self._run)


class _Pushed(bytes):
    """A pushed answer's whole response, with its body's length for the access line of every
    poll it answers (the hub hands pushers bytes only)."""

    body_len: int


class HeldPoll:
    """One keep-alive connection's held long polls (see the module doc)."""

    __slots__ = (
        "kind",
        "cursor",
        "hold",
        "request",
        "peer",
        "readable",
        "answered_at",
        "_hub",
        "_watch",
        "_raw",
        "_respond",
        "_refuse",
        "_limit",
        "_runner",
        "_on_answer",
        "_serve_next",
        "_stall_s",
        "_state",
        "_ticket",
        "_channel",
        "_since",
        "_deadline",
        "_woken",
        "_carry",
        "_sent_all",
        "_backlog",
        "_count",
        "_body_len",
    )

    def __init__(
        self,
        hub: Hub,
        watch: PollWatch,
        raw: Any,
        respond: Callable[[bytes], bytes],
        refuse: Refuse,
        limit: int,
        runner: Runner,
        on_answer: OnAnswer | None,
        stall_s: float | None,
        serve_next: ServeNext | None = None,
    ) -> None:
        self.kind = KIND
        self.cursor = ""
        self.hold = 1  # the publisher may push only while the poll is held (0)
        self.request = ("", 0.0)  # the request line and start time, for the access line
        self.peer: tuple[str, int] = ("", 0)
        self.readable = False  # handed back with the next request known to be readable
        self.answered_at = 0.0  # monotonic time of the last answer
        self._hub = hub
        self._watch = watch
        watch.report = self._report
        self._raw = raw  # the OS socket, non-blocking under gevent
        self._respond = respond  # body -> the whole response, as the lean loop writes it
        self._refuse = refuse
        self._limit = limit
        self._runner = runner
        self._on_answer = on_answer
        self._serve_next = serve_next  # None: the greenlet reads the next request itself
        self._stall_s = stall_s  # an idle connection's life between requests (None: unlimited)
        self._state = IDLE
        self._ticket: Ticket | None = None
        self._channel = ""
        self._since: str | None = None
        self._deadline = 0.0
        self._woken = False
        self._carry = b""  # what the client pipelined behind the held poll (see CARRY_MAX)
        self._sent_all = False  # it half-closed after pipelining: no hang-up watch, answer it all
        self._backlog = b""
        self._count = self._body_len = 0

    # -- from the connection's greenlet (or, inline, the Runner): a poll admitted -------------
    def __call__(self, ticket: Ticket, timeout: float) -> bytes | None:
        """The poll's answer body now, or None: the poll is taken (held; its ticket is ours to
        close, and the connection's greenlet is to call run())."""
        ((channel, since),) = ticket.starts.items()
        self._ticket, self._channel, self._since = ticket, channel, since
        self.readable = self._sent_all = False
        self.cursor = ""  # not the last poll's: while reading, no publish may take it for ours
        self._deadline = time.monotonic() + timeout
        self._hub.attach(channel, self)  # before the read: a publish during it (a shared store yields) wakes us
        try:
            body = self._read()
        except BaseException:
            self._release()
            raise
        if body is not None:
            self._release()
            self._ticket = None  # the caller closes it
            return body
        self._state = HOLDING
        self._watch.arm(True, self._deadline - time.monotonic())
        return None

    def run(self) -> bytes | None:
        """The connection's greenlet, while the machine has its connection: parked until it is
        handed back. Returns the bytes to go on from (take_backlog() first), or None: done."""
        while True:
            value = self._watch.park()
            if type(value) is not int:
                return value  # an outcome
            outcome = self._act(value)
            if outcome is not STAY:
                return outcome

    def take_backlog(self) -> bytes:
        data, self._backlog = self._backlog, b""
        return data

    def close(self) -> None:
        """The connection ends (its greenlet is done, or was killed): nothing more is held."""
        if self._state != CLOSED:
            pushed = self._state == PUSHED
            self._state = CLOSED
            self._watch.disarm()
            self._release()
            ticket = self._ticket  # None while the Runner finishes it (its close may yield)
            if ticket is not None:
                if pushed:
                    self._finish()  # its answer went out: counted and logged as the Runner would have
                else:
                    self._ticket = None
                    ticket.close()
        self._watch.close()

    # -- the hub's Pusher protocol, from the publishing side; never blocks ---------------------
    def encode(self, events: list[Event]) -> bytes:
        """The whole answer (head and body) to these new events, made once for every poll they
        answer: the held polls of one server share their limit and their response's shape."""
        shown = events[: self._limit]
        body = Batch(shown, cursor=shown[-1].id, more=len(events) > len(shown)).poll_body()
        answer = _Pushed(self._respond(body))
        answer.body_len = len(body)
        return answer

    def push(self, data: bytes, cursor: str, events: int = 1) -> None:
        self.hold = 1
        self.cursor = cursor
        self._state = PUSHED
        self._watch.disarm()
        self._hub.detach(self._channel, self)
        self._count = min(events, self._limit)
        self._body_len = data.body_len  # type: ignore[attr-defined]  # made by encode(), once per event
        self._send(data)
        self._runner.add(self, FINISH)

    def lag(self, nbytes: int) -> None:
        """A poll has no backlog to cut: it reads what it missed on its next request."""

    def wake(self) -> None:
        if self._state == HOLDING and not self.hold:
            self._watch.soon(WOKEN)
        else:
            self._woken = True  # reading: it reads again

    # -- reports ------------------------------------------------------------------------------
    def _report(self, reason: int) -> None:
        """From the event loop: inline, the Runner acts; otherwise the greenlet does."""
        if self._serve_next is not None:
            self._runner.add(self, reason)
        else:
            self._watch.unpark(reason)

    def run_report(self, reason: int) -> None:
        """The Runner's part: act, and hand the connection back to its greenlet if it is done."""
        outcome = self._act(reason)
        if outcome is not STAY:
            self._watch.unpark(outcome)

    def _act(self, reason: int) -> Outcome:
        try:
            return self._step(reason)
        except Exception:  # a bug met while acting for this connection: it closes, its ticket with it
            log.exception("a held long poll failed")
            try:
                self.close()
            except Exception:
                log.exception("closing a failed held long poll failed")
            return None

    def _step(self, reason: int) -> Outcome:
        state = self._state
        if state == HOLDING:
            if reason == READABLE:
                return self._readable_while_held()
            if reason in (WOKEN, TIMED_OUT):
                self.hold = 1
                try:
                    body = self._read()
                except BadRequest as exc:  # the store failed (503): answered as the hub's wait would be
                    self._release()
                    return self.answered(*self._refuse(exc), close_ticket=True)
                if body is None:
                    self._watch.arm(self._watching(), self._deadline - time.monotonic())
                    return STAY
                self._release()
                return self.answered(self._respond(body), 200, len(body), close_ticket=True)
        elif state == PUSHED:
            if reason == FINISH:
                self._finish()
                return self._after_answer()
        elif state == BETWEEN:
            if reason == READABLE:
                return self._next_request()
            if reason == TIMED_OUT:
                stall = self._stall_s
                if not stall or self.answered_at + stall > time.monotonic():
                    self._wait_between()  # early, or the last poll's deadline (kept registered)
                    return STAY
                self._state = CLOSED
                return None  # idle through the stall timeout: the connection closes
        return STAY  # a late report for a step already taken: nothing to do

    def _read(self) -> bytes | None:
        """The answer body if there is one to give now, else None (held from batch.cursor)."""
        hub, channel = self._hub, self._channel
        while True:
            self._woken = False
            batch = hub.read_shared(channel, self._since, self._limit)
            if batch.events or batch.gap or hub.closing or self._deadline <= time.monotonic():
                assert self._ticket is not None
                return pollbody.counted(self._ticket, batch)
            if self._since is None:
                self._since = batch.cursor  # from now: from the channel's last event at the first read
            if self._woken:
                continue
            self.cursor, self.hold = batch.cursor, 0
            return None

    def _readable_while_held(self) -> Outcome:
        """Readable while held: a reset, or an EOF, is a hang-up; bytes are a request pipelined
        behind this poll, read and kept for after its answer while the watch goes on (a reset
        still frees the poll at once). An EOF after a whole pipelined head may be a client that
        sent all it will (a half-close, which cannot be told from a close): the poll stays, to
        be answered, and so is what it pipelined if that can be answered at once."""
        if not self._watching():  # a late report: nothing more is read (see CARRY_MAX)
            self._watch.arm(False, self._deadline - time.monotonic())
            return STAY
        try:
            data = self._raw.recv(CARRY_MAX + 1 - len(self._carry))
            # Half a head can never be answered: an EOF after it is a hang-up like any other.
            gone = not data and not holds_a_head(self._carry)
            self._sent_all = not data
        except BlockingIOError:  # nothing after all
            data, gone = b"", False
        except OSError:
            data, gone = b"", True
        if not gone:
            self._carry += data
            self._watch.arm(self._watching(), self._deadline - time.monotonic())
            return STAY
        ticket, self._ticket = self._ticket, None
        self._state = CLOSED
        self._release()
        self._end(ticket, CLIENT_CLOSED, 0)  # as nginx logs it
        return None

    def _finish(self) -> None:
        """A pushed poll's ticket closed and its access line written."""
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            ticket.events_sent, ticket.bytes_sent = self._count, self._body_len
        self._end(ticket, 200, self._body_len)

    def answered(self, response: bytes, status: int, length: int, close_ticket: bool = False) -> Outcome:
        """An answer not pushed (read from history, or a request the lean loop answered inline)
        goes out: sent, logged, and the connection waits for its next request."""
        ticket = self._ticket if close_ticket else None
        self._ticket = None
        self._send(response)
        self._end(ticket, status, length)
        return self._after_answer()

    def _end(self, ticket: Ticket | None, status: int, length: int) -> None:
        """A poll's ticket closed (if it is this step's to close) and its access line written."""
        request_line, started = self.request
        if ticket is not None:
            ticket.close()  # may yield (a lazy source's listener): nothing else acts on us meanwhile
        if self._on_answer is not None:
            self._on_answer(request_line, status, length, started)

    def _after_answer(self) -> Outcome:
        if self._state == CLOSED:  # closed while the answer's ticket close yielded
            return None
        carry, self._carry = self._carry, b""
        if self._backlog:
            self._state = IDLE
            return carry  # the greenlet writes the rest, then goes on from what was pipelined
        if carry:  # read while the poll was held: served now (it is read once: no recursion)
            self._state = IDLE
            return self._serve_next(self, carry) if self._serve_next is not None else carry
        # A request pipelined after this answer is readable at once: the watcher reports it from
        # the event loop (no recursion here, however many requests a client pipelines).
        self._wait_between()
        return STAY

    def _watching(self) -> bool:
        """Is a held poll's socket watched (for a hang-up, or more pipelined bytes)?"""
        return not self._sent_all and len(self._carry) <= CARRY_MAX

    def _wait_between(self) -> None:
        """For the next request, up to the stall timeout from the last answer."""
        self._state = BETWEEN
        stall = self._stall_s
        self._watch.arm(True, None if not stall else self.answered_at + stall - time.monotonic())

    def _next_request(self) -> Outcome:
        """Between requests, the socket readable: inline, the next request is read and answered
        here (serve_next); otherwise the greenlet reads it."""
        self._watch.disarm()
        self._state = IDLE
        if self._serve_next is None:
            self.readable = True
            return b""
        try:
            data = self._raw.recv(4096)
        except BlockingIOError:
            self._wait_between()
            return STAY
        except OSError:
            data = b""
        if not data:
            self._state = CLOSED
            return None
        self.readable = False
        return self._serve_next(self, data)

    def _send(self, response: bytes) -> None:
        self.answered_at = time.monotonic()
        try:
            sent = self._raw.send(response)
        except BlockingIOError:
            sent = 0
        except OSError:  # the client is gone: its socket's EOF is seen next
            sent = len(response)
        if sent < len(response):
            self._backlog = response[sent:]

    def _release(self) -> None:
        self.hold = 1
        self._hub.detach(self._channel, self)
