"""The fan-out fast path on real sockets (gevent, in-process): pushed bytes, one write per
burst, a client that stops reading, resuming with a gap. No timing is asserted beyond
"publishing never waits on a subscriber"."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable

import gevent
import gevent.event
import gevent.lock
import gevent.socket
import pytest

from gateway.hub import Hub, MemoryStore
from gateway.transports.push import Pusher, run_blocking, sse_encoder

DATA = re.compile(rb"^data: (.*)$", re.M)


class _CountingRaw:
    """The non-blocking socket under a gevent socket, counting the publisher's writes."""

    def __init__(self, raw: socket.socket) -> None:
        self.raw = raw
        self.sends = 0

    def send(self, data: bytes) -> int:
        self.sends += 1
        return self.raw.send(data)


class _Sock:
    """What the pusher sees: gevent's blocking sendall, and the raw socket below it."""

    def __init__(self, sock: gevent.socket.socket) -> None:
        self.sock = sock
        self._sock = _CountingRaw(sock._sock)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)


@pytest.fixture
def setup():
    hub = Hub(MemoryStore(10_000, 3600), event_class=gevent.event.Event)
    hub.defer = lambda fn, channel: gevent.get_hub().loop.run_callback(fn, channel)
    server, client = gevent.socket.socketpair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    started: list[gevent.Greenlet] = []

    def start(cursor: str | None = None, alive: Callable[[], bool] = lambda: True) -> tuple[Pusher, _Sock]:
        sock = _Sock(server)
        kind, encode = sse_encoder(False)
        pusher = Pusher(sock, kind, encode, cursor or hub.last_id("c"), gevent.event.Event, gevent.lock.Semaphore)
        started.append(gevent.spawn(run_blocking, pusher.rounds(hub, "c", 100, 30.0, lambda: None, alive)))
        gevent.sleep(0)  # attached
        return pusher, sock

    yield hub, client, start
    gevent.killall(started, timeout=5)
    server.close()
    client.close()


def _read(client: gevent.socket.socket, count: int, deadline_s: float = 10.0) -> list[bytes]:
    buf = b""
    deadline = time.monotonic() + deadline_s
    while buf.count(b"\n\n") < count and time.monotonic() < deadline:
        with gevent.Timeout(max(0.01, deadline - time.monotonic()), False):
            buf += client.recv(65536)
    return DATA.findall(buf)


def test_idle_subscriber_gets_each_burst_in_one_write_straight_from_the_publisher(setup):
    hub, client, start = setup
    pusher, sock = start()
    for i in range(5):  # one burst: published without yielding, flushed once
        hub.publish("c", f"e{i}")
    gevent.sleep(0.01)
    assert sock._sock.sends == 1
    assert _read(client, 5) == [f"e{i}".encode() for i in range(5)]
    hub.publish("c", "next")
    gevent.sleep(0.01)
    assert sock._sock.sends == 2 and _read(client, 1) == [b"next"]
    assert pusher.hold == 0 and pusher.cursor == hub.last_id("c")


def test_a_client_that_stops_reading_never_blocks_the_publisher_and_loses_nothing(setup):
    hub, client, start = setup
    pusher, sock = start()
    big = "x" * 3000
    started = time.monotonic()
    for i in range(200):  # ~600 KB, far beyond both socket buffers
        hub.publish("c", f"{i}:{big}")
        gevent.sleep(0)  # a flush per event: most of them find the socket full
    assert time.monotonic() - started < 5
    assert pusher.hold > 0  # it fell back to its own greenlet
    got = _read(client, 200, deadline_s=20)
    assert [g.split(b":")[0] for g in got] == [str(i).encode() for i in range(200)]
    gevent.sleep(0.05)
    assert pusher.hold == 0  # caught up: back on the fast path
    sends = sock._sock.sends
    hub.publish("c", "after")
    gevent.sleep(0.01)
    assert sock._sock.sends == sends + 1 and _read(client, 1) == [b"after"]


def test_a_stream_that_ends_still_sends_what_a_push_left_unsent(setup):
    # The stream ends (its token expired, a WebSocket became multi-channel) just after a push
    # the socket took only part of: the rest goes out first, or the client's stream is cut short.
    hub, client, start = setup
    ending = False
    start(alive=lambda: not ending)
    hub.publish("c", "x" * 100_000)  # far beyond both socket buffers
    ending = True
    gevent.sleep(0.01)  # the push, then the stream's last round
    assert _read(client, 1) == [b"x" * 100_000]


def test_resuming_from_history_no_longer_held_starts_with_a_gap(setup):
    hub, client, start = setup
    hub.store = MemoryStore(1, 3600)  # history of one event
    first = hub.publish("c", "old").id
    hub.publish("c", "lost")
    hub.publish("c", "new")
    start(cursor=first)
    got = _read(client, 2)
    assert len(got) == 2 and got[0].startswith(b'{"requested"') and got[1] == b"new"


def test_multi_channel_connections_with_equal_cursors_share_one_encoding(monkeypatch):
    """Up-to-date connections on the same channels compose each flush once between them; one
    whose cursor differs (another channel order) gets bytes of its own, with its own cursor."""
    from gateway import cursor as cursors
    from gateway.transports.multipush import MultiPusher

    hub = Hub(MemoryStore(10_000, 3600), event_class=gevent.event.Event)
    hub.defer = lambda fn, channel: gevent.get_hub().loop.run_callback(fn, channel)
    composed: list[str] = []
    real_compose = MultiPusher._compose

    def compose(self: MultiPusher, channel: str, parts: list) -> bytes:
        composed.append(channel)
        return real_compose(self, channel, parts)

    monkeypatch.setattr(MultiPusher, "_compose", compose)
    pairs = [gevent.socket.socketpair() for _ in range(3)]
    orders = [("a", "b"), ("a", "b"), ("b", "a")]
    pushers, started = [], []
    for (server, _), order in zip(pairs, orders, strict=True):
        pusher = MultiPusher(
            _Sock(server), "sse", {c: hub.last_id(c) for c in order}, False, gevent.event.Event, gevent.lock.Semaphore
        )
        pushers.append(pusher)
        started.append(gevent.spawn(run_blocking, pusher.rounds(hub, 100, lambda: 30.0, lambda: None)))
    try:
        gevent.sleep(0.01)  # attached and caught up (nothing to read)
        composed.clear()
        hub.publish("a", "one")
        hub.publish("b", "two")
        gevent.sleep(0.01)
        assert sorted(composed) == ["a", "a", "b", "b"]  # per flush: one per distinct cursor, not per connection
        assert pushers[0].cursor() is pushers[1].cursor()  # the same cursor object, shared
        ids = {"a": hub.last_id("a"), "b": hub.last_id("b")}
        for (_, client), pusher in zip(pairs, pushers, strict=True):
            buf = b""
            with gevent.Timeout(5, False):
                while buf.count(b"\n\n") < 2:
                    buf += client.recv(65536)
            last = re.findall(rb"^id: (.*)$", buf, re.M)[-1].decode()
            assert last == pusher.cursor()
            assert cursors.decode(last, ["a", "b"]) == ids
    finally:
        gevent.killall(started, timeout=5)
        for server, client in pairs:
            server.close()
            client.close()


def test_a_connection_that_shared_pushed_bytes_keeps_every_channel_position_for_what_follows():
    """A push that reuses another connection's bytes only moves the joined cursor; the
    connection's own next composition, on another channel, and a channel added or removed
    afterwards, still start from every channel's true position."""
    from gateway import cursor as cursors
    from gateway.transports.multipush import MultiPusher

    hub = Hub(MemoryStore(10_000, 3600), event_class=gevent.event.Event)
    hub.defer = lambda fn, channel: gevent.get_hub().loop.run_callback(fn, channel)
    for channel in ("a", "b", "c"):
        hub.publish(channel, "before")
    pairs = [gevent.socket.socketpair() for _ in range(2)]
    pushers = [
        MultiPusher(
            _Sock(server),
            "sse",
            {c: hub.last_id(c) for c in ("a", "b")},
            False,
            gevent.event.Event,
            gevent.lock.Semaphore,
        )
        for server, _ in pairs
    ]
    started = [gevent.spawn(run_blocking, p.rounds(hub, 100, lambda: 30.0, lambda: None)) for p in pushers]
    _, client = pairs[1]

    def ids(n: int) -> list[str]:
        buf = b""
        with gevent.Timeout(5, False):
            while buf.count(b"\n\n") < n:
                buf += client.recv(65536)
        return [i.decode() for i in re.findall(rb"^id: (.*)$", buf, re.M)]

    try:
        gevent.sleep(0.01)
        hub.publish("a", "shared")  # the first connection composes, the second reuses its bytes
        gevent.sleep(0.01)
        assert pushers[0].cursor() is pushers[1].cursor()
        assert len(ids(1)) == 1
        for channel, view in pushers[0].views.items():  # the first goes: the second composes its own bytes
            hub.detach(channel, view)
        hub.publish("b", "own")
        gevent.sleep(0.01)
        want = {"a": hub.last_id("a"), "b": hub.last_id("b")}
        (own,) = ids(1)
        assert cursors.decode(own, ["a", "b"]) == want
        pushers[1].add("c", hub.last_id("c"))
        want["c"] = hub.last_id("c")
        assert cursors.decode(pushers[1].cursor(), ["a", "b", "c"]) == want
        pushers[1].remove("b")
        assert cursors.decode(pushers[1].cursor(), ["a", "c"]) == {"a": want["a"], "c": want["c"]}
    finally:
        gevent.killall(started, timeout=5)
        for server, client in pairs:
            server.close()
            client.close()
