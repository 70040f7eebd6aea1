"""A held long poll (gateway/transports/heldpoll.py) on real sockets, in-process under gevent,
with the server's own wait (gateway/server.py's _PollWait): the publish answers it without
waking its greenlet, which wakes for the next request; a socket that takes only part of the
answer, a hang-up, a timeout, a wake-up for events it could not be handed."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field

import gevent
import gevent.event
import gevent.socket
import pytest

from gateway.hub import Hub, MemoryStore, WaitAbandoned
from gateway.server import _CoarseDeadlines, _held_timed_out, _PollWait
from gateway.transports.heldpoll import Finisher, HeldPoll

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

    def close(self) -> None:
        self.closes += 1
        if self.yields:
            gevent.sleep(0.05)


@dataclass
class _Setup:
    hub: Hub
    server: gevent.socket.socket
    client: gevent.socket.socket
    held: HeldPoll
    answered: list[tuple[str, int, int, float]] = field(default_factory=list)


@pytest.fixture
def setup():
    hub = Hub(MemoryStore(10_000, 3600), event_class=gevent.event.Event)
    hub.defer = lambda fn, channel: gevent.get_hub().loop.run_callback(fn, channel)
    server, client = gevent.socket.socketpair()
    answered: list[tuple[str, int, int, float]] = []
    wait = _PollWait(server._sock, _CoarseDeadlines(0.1, _held_timed_out), 120.0)
    held = HeldPoll(
        hub,
        wait,
        server._sock,
        lambda body: HEAD + body,
        100,
        Finisher(gevent.spawn_raw),
        lambda *a: answered.append(a),
    )
    held.request = ("GET /longpoll/c HTTP/1.1", 0.0)
    yield _Setup(hub, server, client, held, answered)
    held.close()
    server.close()
    client.close()


def test_the_publish_answers_and_the_greenlet_wakes_only_for_the_next_request(setup):
    ticket = _Ticket({"c": None})
    poll = gevent.spawn(setup.held, ticket, 10.0)
    gevent.sleep(0.05)
    assert setup.hub._pushers["c"]  # held as a pusher, not waiting on a signal
    event = setup.hub.publish("c", "one")
    gevent.sleep(0.05)
    body = json.loads(setup.client.recv(65536)[len(HEAD) :])
    assert body == {"events": [json.loads(event.json)], "cursor": event.id, "gap": False, "more": False}
    assert not poll.ready()  # answered, closed and logged without it
    assert (ticket.closes, ticket.events_sent) == (1, 1) and len(setup.answered) == 1
    assert "c" not in setup.hub._pushers
    setup.client.sendall(b"GET /next")  # the next request wakes it
    assert poll.get(timeout=2) is None and setup.held.readable
    assert setup.held.take_backlog() == b""
    assert ticket.closes == 1 and len(setup.answered) == 1  # once


def test_an_answer_the_socket_takes_only_part_of_is_left_for_the_greenlet(setup):
    setup.server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    setup.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    poll = gevent.spawn(setup.held, _Ticket({"c": None}), 10.0)
    gevent.sleep(0.05)
    event = setup.hub.publish("c", "x" * 500_000)
    assert poll.get(timeout=2) is None  # woken to write the rest, the client having read nothing
    rest = setup.held.take_backlog()
    assert 0 < len(rest) < 500_000
    writer = gevent.spawn(setup.server.sendall, rest)
    data = b""
    with gevent.Timeout(5):
        while not data.endswith(b'"more":false}'):
            data += setup.client.recv(65536)
    writer.get(timeout=5)
    assert json.loads(data[len(HEAD) :])["events"] == [json.loads(event.json)]


def test_a_hang_up_while_held_ends_the_wait(setup):
    ticket = _Ticket({"c": None})
    poll = gevent.spawn(setup.held, ticket, 10.0)
    gevent.sleep(0.05)
    setup.client.shutdown(socket.SHUT_WR)
    with pytest.raises(WaitAbandoned):
        poll.get(timeout=2)
    assert "c" not in setup.hub._pushers


def test_a_timeout_answers_with_no_events_from_the_cursor(setup):
    last = setup.hub.publish("c", "before")
    ticket = _Ticket({"c": last.id})
    started = gevent.get_hub().loop.now()
    body = gevent.spawn(setup.held, ticket, 0.3).get(timeout=3)
    assert 0.28 < gevent.get_hub().loop.now() - started < 1.0
    assert json.loads(body) == {"events": [], "cursor": last.id, "gap": False, "more": False}


def test_events_it_could_not_be_handed_are_read_from_history(setup):
    """A held poll whose cursor is not where a publish begins (here: events appended behind the
    hub's back, as another node's may be) is woken, and reads them all by cursor."""
    first = setup.hub.publish("c", "one")
    poll = gevent.spawn(setup.held, _Ticket({"c": first.id}), 10.0)
    gevent.sleep(0.05)
    missed = setup.hub.store.append("c", "message", "missed")
    latest = setup.hub.publish("c", "two")
    body = json.loads(poll.get(timeout=2))
    assert [e["id"] for e in body["events"]] == [missed.id, latest.id]


def test_a_finisher_that_yields_closes_the_answered_poll_not_the_next(setup):
    """ticket.close() may yield in the Finisher while the connection already holds its next
    poll: that poll stays attached (and is pushed), and the access line is the first request's."""
    setup.held.request = ("GET /longpoll/c?first", 0.0)
    first = gevent.spawn(setup.held, _Ticket({"c": None}, yields=True), 10.0)
    gevent.sleep(0.05)
    setup.hub.publish("c", "one")
    gevent.sleep(0)  # the flush runs and the Finisher starts, then yields in ticket.close()
    setup.client.recv(65536)
    setup.client.sendall(b"GET next")
    assert first.get(timeout=1) is None
    setup.held.request = ("GET /longpoll/c?second", 0.0)
    second = gevent.spawn(setup.held, _Ticket({"c": setup.hub.last_id("c")}), 3.0)
    gevent.sleep(0.2)  # the Finisher has finished
    assert setup.hub._pushers.get("c")  # the second poll is still held as a pusher
    assert [line for line, *_ in setup.answered] == ["GET /longpoll/c?first"]
    setup.hub.publish("c", "two")
    assert second.get(timeout=1) is None  # pushed, not left to its timeout
