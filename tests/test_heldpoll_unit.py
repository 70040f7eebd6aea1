"""A held long poll (gateway/transports/heldpoll.py) on real sockets, in-process under gevent,
with the server's own watch (gateway/server.py's _PollWatch) and a real Runner: the publish
answers it without waking its greenlet, which wakes only for what the machine does not answer
itself; a socket that takes only part of the answer, a hang-up, a pipelined request, a timeout,
a wake-up for events it could not be handed, a ticket close that yields, the next request
answered inline, the stall timeout between requests."""

from __future__ import annotations

import inspect
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import gevent.socket
import pytest

from gateway.errors import BadRequest
from gateway.hub import Hub, MemoryStore
from gateway.server import _CoarseDeadlines, _PollWatch
from gateway.transports.heldpoll import FINISH, STAY, TIMED_OUT, HeldPoll, Runner

HEAD = b"HTTP/1.1 200 OK\r\n\r\n"


@dataclass
class _Ticket:
    """What a held poll uses of an admission ticket."""

    starts: dict[str, str | None]
    events_sent: int = 0
    bytes_sent: int = 0
    closes: int = 0
    multi: bool = False
    yields: bool = False  # as a lazy source's listener may (a thread started under gevent)
    fails: bool = False  # a bug in what closing it runs

    def close(self) -> None:
        self.closes += 1
        if self.yields:
            gevent.sleep(0.05)
        if self.fails:
            raise RuntimeError("a bug in a ticket's close")


@dataclass
class _Setup:
    hub: Hub
    server: gevent.socket.socket
    client: gevent.socket.socket
    held: HeldPoll
    answered: list[tuple[str, int, int, float]] = field(default_factory=list)
    served: list[bytes] = field(default_factory=list)  # next requests the machine read inline

    def poll(self, ticket: _Ticket, timeout: float = 10.0) -> gevent.Greenlet:
        """The connection's greenlet, as the lean loop runs it: the answer now, or the machine's
        outcome once it hands the connection back."""

        def connection() -> tuple[str, Any]:
            body = self.held(ticket, timeout)
            if body is not None:
                return "answered", body
            return "handed back", self.held.run()

        return gevent.spawn(connection)

    def close(self) -> None:
        self.held.close()
        self.server.close()
        self.client.close()

    def receive(self, until: bytes = b"}", timeout: float = 3.0) -> bytes:
        data = b""
        with gevent.Timeout(timeout):
            while not data.endswith(until):
                chunk = self.client.recv(65536)
                assert chunk, "the server closed the connection"
                data += chunk
        return data


def _make(
    serve_next: Callable[[HeldPoll, bytes], Any] | None = None,
    stall_s: float | None = None,
    runner: Runner | None = None,
):
    hub = Hub(MemoryStore(10_000, 3600), event_class=gevent.event.Event)
    hub.defer = lambda fn, channel: gevent.get_hub().loop.run_callback(fn, channel)
    server, client = gevent.socket.socketpair()
    server._sock.setblocking(False)  # as gevent's sockets are underneath
    answered: list[tuple[str, int, int, float]] = []
    held = HeldPoll(
        hub,
        _PollWatch(server._sock, _CoarseDeadlines(0.1, _PollWatch.slot_expired)),
        server._sock,
        lambda body: HEAD + body,
        lambda exc: (b"HTTP/1.1 %d Refused\r\n\r\n" % exc.status + exc.code.encode(), exc.status, len(exc.code)),
        100,
        runner or Runner(gevent.spawn_raw),
        lambda *a: answered.append(a),
        stall_s,
        serve_next,
    )
    held.request = ("GET /longpoll/c HTTP/1.1", 0.0)
    return _Setup(hub, server, client, held, answered)


@pytest.fixture
def setup():
    made = _make()
    yield made
    made.close()


@pytest.fixture
def inline():
    """A machine that reads and answers the next request itself (the lean loop's inline mode):
    a request for "/again" is answered there, anything else handed back."""
    served: list[bytes] = []

    def serve_next(held: HeldPoll, data: bytes) -> Any:
        served.append(data)
        if data.startswith(b"GET /again"):
            return held.answered(HEAD + b'{"again":true}', 200, 14)
        return data

    made = _make(serve_next)
    made.served = served
    yield made
    made.close()


def test_the_publish_answers_and_the_greenlet_wakes_only_for_the_next_request(setup):
    ticket = _Ticket({"c": None})
    poll = setup.poll(ticket)
    gevent.sleep(0.05)
    assert setup.hub._pushers["c"]  # held as a pusher, not waiting on a signal
    event = setup.hub.publish("c", "one")
    raw = setup.receive()[len(HEAD) :]
    body = json.loads(raw)
    assert body == {"events": [json.loads(event.json)], "cursor": event.id, "gap": False, "more": False}
    gevent.sleep(0.05)
    assert not poll.ready()  # answered, closed and logged without it
    assert (ticket.closes, ticket.events_sent, ticket.bytes_sent) == (1, 1, len(raw))
    assert [(status, length) for _, status, length, _ in setup.answered] == [(200, len(raw))]  # the body's
    assert "c" not in setup.hub._pushers
    setup.client.sendall(b"GET /next")  # the next request wakes it
    assert poll.get(timeout=2) == ("handed back", b"") and setup.held.readable
    assert setup.held.take_backlog() == b""
    assert ticket.closes == 1 and len(setup.answered) == 1  # once


def test_an_answer_the_socket_takes_only_part_of_is_left_for_the_greenlet(setup):
    setup.server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    setup.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    poll = setup.poll(_Ticket({"c": None}))
    gevent.sleep(0.05)
    event = setup.hub.publish("c", "x" * 500_000)
    assert poll.get(timeout=2) == ("handed back", b"")  # to write the rest, the client having read nothing
    rest = setup.held.take_backlog()
    assert 0 < len(rest) < 500_000
    writer = gevent.spawn(setup.server.sendall, rest)
    data = setup.receive(b'"more":false}', timeout=5)
    writer.get(timeout=5)
    assert json.loads(data[len(HEAD) :])["events"] == [json.loads(event.json)]


def test_a_hang_up_while_held_closes_the_poll_and_logs_499(setup):
    ticket = _Ticket({"c": None})
    poll = setup.poll(ticket)
    gevent.sleep(0.05)
    setup.client.shutdown(socket.SHUT_WR)
    assert poll.get(timeout=2) == ("handed back", None)  # the connection is done
    assert "c" not in setup.hub._pushers
    assert ticket.closes == 1
    assert [status for _, status, *_ in setup.answered] == [499]
    setup.hub.publish("c", "after")  # nothing is pushed to it any more
    gevent.sleep(0.05)
    assert ticket.closes == 1 and len(setup.answered) == 1


def test_a_request_pipelined_behind_a_held_poll_is_read_after_its_answer(setup):
    poll = setup.poll(_Ticket({"c": None}))
    gevent.sleep(0.05)
    setup.client.sendall(b"GET /pipelined HTTP/1.1\r\n\r\n")
    gevent.sleep(0.05)
    assert not poll.ready() and setup.hub._pushers["c"]  # bytes, not a hang-up: still held
    event = setup.hub.publish("c", "one")
    assert json.loads(setup.receive()[len(HEAD) :])["cursor"] == event.id
    assert poll.get(timeout=2) == ("handed back", b"GET /pipelined HTTP/1.1\r\n\r\n")  # read while held


def test_a_client_that_pipelines_then_half_closes_is_answered_all_it_asked(setup):
    poll = setup.poll(_Ticket({"c": None}))
    gevent.sleep(0.05)
    setup.client.sendall(b"GET /pipelined HTTP/1.1\r\n\r\n")
    setup.client.shutdown(socket.SHUT_WR)  # it sent all it will (as `nc -N` does)
    gevent.sleep(0.1)
    assert not poll.ready() and setup.hub._pushers["c"]  # still held: the EOF is not a hang-up here
    event = setup.hub.publish("c", "one")
    assert json.loads(setup.receive()[len(HEAD) :])["cursor"] == event.id
    assert poll.get(timeout=2) == ("handed back", b"GET /pipelined HTTP/1.1\r\n\r\n")


def test_a_timeout_answers_with_no_events_from_the_cursor(setup):
    last = setup.hub.publish("c", "before")
    ticket = _Ticket({"c": last.id})
    started = gevent.get_hub().loop.now()
    poll = setup.poll(ticket, 0.3)
    data = setup.receive()
    assert 0.28 < gevent.get_hub().loop.now() - started < 1.0
    assert json.loads(data[len(HEAD) :]) == {"events": [], "cursor": last.id, "gap": False, "more": False}
    assert ticket.closes == 1 and [status for _, status, *_ in setup.answered] == [200]
    assert not poll.ready()  # the machine waits for the next request


def test_events_it_could_not_be_handed_are_read_from_history(setup):
    """A held poll whose cursor is not where a publish begins (here: events appended behind the
    hub's back, as another node's may be) is woken, and reads them all by cursor."""
    first = setup.hub.publish("c", "one")
    setup.poll(_Ticket({"c": first.id}))
    gevent.sleep(0.05)
    missed = setup.hub.store.append("c", "message", "missed")
    latest = setup.hub.publish("c", "two")
    body = json.loads(setup.receive()[len(HEAD) :])
    assert [e["id"] for e in body["events"]] == [missed.id, latest.id]


def test_a_poll_with_events_waiting_is_answered_at_once(setup):
    first = setup.hub.publish("c", "one")
    second = setup.hub.publish("c", "two")
    kind, body = setup.poll(_Ticket({"c": first.id})).get(timeout=2)
    assert kind == "answered" and [e["id"] for e in json.loads(body)["events"]] == [second.id]
    assert "c" not in setup.hub._pushers


def test_a_ticket_close_that_yields_closes_the_answered_poll_not_the_next(setup):
    """ticket.close() may yield in the Runner; the next request waits for it, the access line is
    the first request's, and the next poll is held and pushed as the first was."""
    setup.held.request = ("GET /longpoll/c?first", 0.0)
    first_ticket = _Ticket({"c": None}, yields=True)
    first = setup.poll(first_ticket)
    gevent.sleep(0.05)
    setup.hub.publish("c", "one")
    setup.receive()
    setup.client.sendall(b"GET next")  # while the Runner is in ticket.close()
    assert first.get(timeout=1) == ("handed back", b"")
    assert first_ticket.closes == 1
    assert [line for line, *_ in setup.answered] == ["GET /longpoll/c?first"]
    assert setup.server.recv(100) == b"GET next"  # the greenlet reads the next request
    setup.held.request = ("GET /longpoll/c?second", 0.0)
    second = setup.poll(_Ticket({"c": setup.hub.last_id("c")}), 3.0)
    gevent.sleep(0.1)
    assert setup.hub._pushers.get("c")  # the second poll is held as a pusher
    event = setup.hub.publish("c", "two")
    assert json.loads(setup.receive()[len(HEAD) :])["cursor"] == event.id  # pushed, not left to its timeout
    gevent.sleep(0.1)
    assert [line for line, *_ in setup.answered] == ["GET /longpoll/c?first", "GET /longpoll/c?second"]
    assert not second.ready()


def test_inline_the_next_request_is_answered_without_the_greenlet(inline):
    poll = inline.poll(_Ticket({"c": None}))
    gevent.sleep(0.05)
    inline.hub.publish("c", "one")
    inline.receive()
    inline.client.sendall(b"GET /again HTTP/1.1\r\n\r\n")
    assert inline.receive() == HEAD + b'{"again":true}'
    gevent.sleep(0.05)
    assert inline.served == [b"GET /again HTTP/1.1\r\n\r\n"] and not poll.ready()
    assert [status for _, status, *_ in inline.answered] == [200, 200]
    inline.client.sendall(b"POST /publish/c HTTP/1.1\r\n\r\n")  # not its to answer
    assert poll.get(timeout=2) == ("handed back", b"POST /publish/c HTTP/1.1\r\n\r\n")


def test_inline_a_hang_up_between_requests_ends_the_connection(inline):
    poll = inline.poll(_Ticket({"c": None}))
    gevent.sleep(0.05)
    inline.hub.publish("c", "one")
    inline.receive()
    inline.client.shutdown(socket.SHUT_WR)
    assert poll.get(timeout=2) == ("handed back", None)
    assert inline.served == []


def test_a_connection_idle_through_the_stall_timeout_is_closed():
    made = _make(stall_s=0.3)
    try:
        poll = made.poll(_Ticket({"c": None}))
        gevent.sleep(0.05)
        made.hub.publish("c", "one")
        made.receive()
        answered_at = gevent.get_hub().loop.now()
        assert poll.get(timeout=3) == ("handed back", None)
        assert 0.28 < gevent.get_hub().loop.now() - answered_at < 1.0
    finally:
        made.close()


def test_a_report_for_a_step_already_taken_is_nothing_to_do(setup):
    poll = setup.poll(_Ticket({"c": None}))
    gevent.sleep(0.05)
    setup.hub.publish("c", "one")
    setup.receive()
    gevent.sleep(0.05)
    # The answered poll's deadline, kept registered, fires between requests: with no stall
    # timeout (None: unlimited) the connection stays, waiting for its next request.
    assert setup.held._step(TIMED_OUT) is STAY
    assert setup.held._step(FINISH) is STAY  # a second FINISH for the same push
    assert len(setup.answered) == 1
    setup.client.sendall(b"GET /next")
    assert poll.get(timeout=2) == ("handed back", b"")


def test_a_connection_closed_while_its_pushed_ticket_closes_is_logged_once_and_not_rearmed(setup):
    """The connection's greenlet is killed (the shutdown grace's end) while the Runner yields in
    the pushed poll's ticket close: the answer that went out is logged once, the ticket closed
    once, and nothing is armed on the closed socket."""
    ticket = _Ticket({"c": None}, yields=True)
    poll = setup.poll(ticket)
    gevent.sleep(0.05)
    setup.hub.publish("c", "one")
    setup.receive()
    setup.held.close()  # while the Runner is in ticket.close()
    assert poll.get(timeout=2) == ("handed back", None)
    assert ticket.closes == 1 and ticket.events_sent == 1
    assert [status for _, status, *_ in setup.answered] == [200]
    assert setup.held._watch._watcher is None and setup.held._watch._slot < 0


def test_a_bug_while_acting_closes_that_connection_and_the_runner_goes_on(setup):
    other = _make(runner=setup.held._runner)  # one Runner for both, as in the server
    try:
        broken = setup.poll(_Ticket({"c": None}, fails=True))
        fine = other.poll(_Ticket({"c": None}))
        gevent.sleep(0.05)
        setup.hub.publish("c", "one")
        other.hub.publish("c", "one")
        assert broken.get(timeout=2) == ("handed back", None)  # closed, not left parked
        other.receive()
        other.client.sendall(b"GET /next")
        assert fine.get(timeout=2) == ("handed back", b"")  # the shared Runner still runs
    finally:
        other.close()


def test_inline_a_request_pipelined_behind_a_held_poll_is_answered_after_it(inline):
    poll = inline.poll(_Ticket({"c": None}))
    gevent.sleep(0.05)
    inline.client.sendall(b"GET /again HTTP/1.1\r\n\r\n")
    gevent.sleep(0.05)
    event = inline.hub.publish("c", "one")
    data = inline.receive(b'{"again":true}')
    first = data[: -len(HEAD + b'{"again":true}')]
    assert json.loads(first[len(HEAD) :])["cursor"] == event.id  # in order: the poll, then the next
    gevent.sleep(0.05)
    assert inline.served == [b"GET /again HTTP/1.1\r\n\r\n"] and not poll.ready()


def test_inline_requests_that_keep_coming_are_answered_one_turn_each_not_by_recursion():
    """A client whose next request is always in by the time its answer is written (here it is
    sent from within the answer) is served from the Runner's loop, one turn per request: the
    stack does not grow with the number of requests, and other connections get their turns."""
    depths: list[int] = []

    def serve_next(held: HeldPoll, data: bytes) -> Any:
        depths.append(len(inspect.stack(0)))
        if len(depths) < 6:
            made.client.sendall(b"GET /again HTTP/1.1\r\n\r\n")  # the next one, before this answer
        return held.answered(HEAD + b'{"again":true}', 200, 14)

    made = _make(serve_next)
    try:
        made.poll(_Ticket({"c": None}))
        gevent.sleep(0.05)
        made.client.sendall(b"GET /again HTTP/1.1\r\n\r\n")  # pipelined behind the held poll
        gevent.sleep(0.05)
        made.hub.publish("c", "one")
        made.receive((HEAD + b'{"again":true}') * 6, timeout=3)
        assert len(depths) == 6 and len(set(depths)) == 1, depths
    finally:
        made.close()


def test_a_store_failing_while_a_poll_is_held_answers_503_as_the_hub_wait_would(setup):
    ticket = _Ticket({"c": None})
    connection = setup.poll(ticket, timeout=10)
    gevent.sleep(0.05)  # held

    def store_down(*_: Any, **__: Any) -> Any:
        raise BadRequest("backend_unavailable", "redis is down", 503, {"Retry-After": "1"})

    setup.hub.read_shared = store_down
    setup.hub.notify("c")  # a wake-up: the machine reads again, and the read fails
    assert setup.receive(until=b"backend_unavailable") == b"HTTP/1.1 503 Refused\r\n\r\nbackend_unavailable"
    assert ticket.closes == 1
    assert [a[1] for a in setup.answered] == [503]
    assert setup.held not in setup.hub._pushers.get("c", {})  # no longer held: no publish can push to it
    assert not connection.ready()  # the connection waits for its next request
