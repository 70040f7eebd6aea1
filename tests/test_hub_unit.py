"""The hub and memory store as plain Python: ids, history limits, gaps, waiting, freeing."""

from __future__ import annotations

import threading

import pytest

from gateway.errors import BadRequest
from gateway.hub import Hub, MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def make(size: int = 5, age: float = 60.0) -> tuple[Hub, Clock]:
    clock = Clock()
    return Hub(MemoryStore(size, age, clock)), clock


def test_ids_grow_within_one_millisecond_and_across_clock_steps():
    hub, clock = make()
    a = hub.publish("c", "1")
    b = hub.publish("c", "2")
    clock.now += 0.5
    c = hub.publish("c", "3")
    clock.now -= 10  # a clock that steps back never makes ids go backwards
    d = hub.publish("c", "4")
    keys = [e.key for e in (a, b, c, d)]
    assert keys == sorted(keys) and len(set(keys)) == 4
    assert a.prev == "0-0" and b.prev == a.id and d.prev == c.id


def test_history_is_bounded_by_count_and_age():
    hub, clock = make(size=3, age=10)
    ids = [hub.publish("c", str(i)).id for i in range(5)]
    batch = hub.read("c", ids[1], 100)
    assert not batch.gap and [e.data for e in batch.events] == ["2", "3", "4"]
    assert hub.read("c", ids[0], 100).gap
    clock.now += 11
    late = hub.publish("c", "late")
    batch = hub.read("c", ids[4], 100)
    assert not batch.gap and [e.id for e in batch.events] == [late.id]
    assert hub.read("c", ids[3], 100).gap  # "4" expired by age


def test_cursor_rules():
    hub, _ = make()
    assert hub.read("none", None, 10).cursor == "0-0"
    assert not hub.read("none", "0-0", 10).gap
    assert hub.read("none", "5-5", 10).gap
    with pytest.raises(BadRequest):
        hub.read("none", "x", 10)
    e = hub.publish("c", "1")
    assert hub.read("c", None, 10).cursor == e.id
    assert hub.read("c", e.id, 10).events == []


def test_unused_channels_without_history_are_freed():
    hub, clock = make(age=10)
    hub.publish("old", "x")
    with hub.subscription("watched"):
        hub.publish("watched", "y")
        clock.now += 11
        hub._next_sweep = 0
        hub.publish("fresh", "z")
        assert "old" not in hub.store.channels()
        assert "watched" in hub.store.channels()  # someone listens
        assert "fresh" in hub.store.channels()  # still has history


def test_listeners_hear_first_and_last_subscriber():
    hub, _ = make()
    heard = []
    hub.add_listener(lambda channel, n: heard.append((channel, n)))
    with hub.subscription("c"), hub.subscription("c"):
        pass
    assert heard == [("c", 1), ("c", 0)]
    assert hub.subscribers() == 0


def test_wait_wakes_on_publish_and_on_close():
    hub, _ = make()
    results = []
    t = threading.Thread(target=lambda: results.append(hub.wait("c", None, 5, 10)))
    t.start()
    threading.Timer(0.1, hub.publish, ("c", "hi")).start()
    t.join(3)
    assert [e.data for e in results[0].events] == ["hi"]
    t = threading.Thread(target=lambda: results.append(hub.wait("c", results[0].cursor, 5, 10)))
    t.start()
    threading.Timer(0.1, hub.close).start()
    t.join(3)
    assert not t.is_alive() and results[1].events == []


def _counting_reads(hub: Hub) -> list[str | None]:
    """The cursors of every read of hub's store from now on."""
    reads: list[str | None] = []
    store_read = hub.store.read

    def counted(channel: str, since: str | None, limit: int):  # noqa: ANN202
        reads.append(since)
        return store_read(channel, since, limit)

    hub.store.read = counted  # type: ignore[method-assign]
    return reads


def test_long_polls_woken_together_share_one_read_and_a_later_event_is_not_hidden():
    import gevent
    import gevent.event

    hub = Hub(MemoryStore(50, 60.0, Clock()), event_class=gevent.event.Event)
    first = hub.publish("c", "0")
    reads = _counting_reads(hub)
    polls = [gevent.spawn(hub.wait, "c", first.id, 5, 10) for _ in range(5)]
    gevent.sleep(0)  # all five are held now
    reads.clear()
    hub.publish("c", "1")
    gevent.joinall(polls, timeout=3)
    batches = [p.value for p in polls]
    assert all([e.data for e in b.events] == ["1"] for b in batches)
    assert len({id(b) for b in batches}) == 1 and reads == [first.id]  # one read, one encoding
    assert batches[0].poll_body() is batches[1].poll_body()
    hub.publish("c", "2")  # the next event forgets the shared batch
    later = [gevent.spawn(hub.wait, "c", first.id, 5, 10) for _ in range(2)]
    gevent.joinall(later, timeout=3)
    assert all([e.data for e in p.value.events] == ["1", "2"] for p in later)


def test_polls_between_two_requests_share_a_read_with_none_held_and_the_sweep_drops_it(monkeypatch):
    """On a busy channel every poller may be between two requests at once (none held): the
    ones that come back still share one read until the next event; stale reads are swept."""
    import gateway.hub.hub as hub_module

    clock = [100.0]
    monkeypatch.setattr(hub_module.time, "monotonic", lambda: clock[0])
    hub = Hub(MemoryStore(50, 600.0, Clock()))
    first = hub.publish("c", "0")
    hub.publish("c", "1")
    reads = _counting_reads(hub)
    batches = [hub.read_shared("c", first.id, 10) for _ in range(3)]
    assert len({id(b) for b in batches}) == 1 and reads == [first.id]
    hub.publish("c", "2")  # a new event: read again, and see it
    assert [e.data for e in hub.read_shared("c", first.id, 10).events] == ["1", "2"]
    assert len(reads) == 2
    clock[0] += hub_module.SHARED_READ_S + hub_module.SWEEP_EVERY_S + 1
    hub.publish("d", "x")  # a publish runs the sweep, which drops the stale read of "c"
    assert "c" not in hub._shared


def test_event_encodings_are_computed_once():
    hub, _ = make()
    e = hub.publish("c", "a\r\nb", "x")
    assert e.sse == f"id: {e.id}\nevent: x\ndata: a\ndata: b\n\n".encode()
    assert e.sse is e.sse and e.json is e.json


class _FakePusher:
    kind = "sse"

    def __init__(self, cursor: str, hold: int = 0) -> None:
        self.cursor, self.hold = cursor, hold
        self.pushed: list[tuple[bytes, str, int]] = []
        self.woken = 0
        self.encodes = 0

    def encode(self, events):  # noqa: ANN001, ANN201
        self.encodes += 1
        return b"".join(e.data.encode() + b";" for e in events)

    def push(self, data: bytes, cursor: str, events: int) -> None:
        self.pushed.append((data, cursor, events))
        self.cursor = cursor

    def lag(self, nbytes: int) -> None:
        pass

    def wake(self) -> None:
        self.woken += 1


def test_another_nodes_events_are_read_once_and_pushed_to_the_streams_up_to_date():
    store = MemoryStore(50, 60.0, Clock())
    here, there = Hub(store), Hub(store)  # two nodes on one shared store
    later: list = []
    here.spawn = later.append  # run apart from the listener: here, when the test says
    start = there.publish("c", "0").id
    idle = [_FakePusher(start) for _ in range(3)]
    busy, behind = _FakePusher(start, hold=1), _FakePusher("0-0")
    for p in [*idle, busy, behind]:
        here.attach("c", p)
    reads: list[str | None] = []
    store_read = store.read

    def counted(channel: str, since: str | None, limit: int):  # noqa: ANN202
        reads.append(since)
        return store_read(channel, since, limit)

    store.read = counted  # type: ignore[method-assign]
    there.publish("c", "1")
    here.notified("c")  # what the shared store's listener calls, once per publish
    two = there.publish("c", "2")
    here.notified("c")
    assert len(later) == 1 and reads == []  # the listener only marked the channel
    later.pop()()
    assert reads == [start]  # one read for both notifications and every stream
    for p in idle:
        assert p.pushed == [(b"1;2;", two.id, 2)] and p.woken == 0
    assert sum(p.encodes for p in idle) == 1  # encoded once for every stream of that format
    assert busy.pushed == [] and busy.woken == 1  # it reads by cursor itself
    assert behind.pushed == [] and behind.woken == 1
    here.notified("c")  # a repeat, nothing new: the streams up to date are left alone
    later.pop()()
    assert all(len(p.pushed) == 1 and p.woken == 0 for p in idle)
    assert busy.woken == 2 and behind.woken == 2


def test_a_store_in_trouble_or_a_gap_only_wakes_the_streams():
    store = MemoryStore(2, 60.0, Clock())
    here, there = Hub(store), Hub(store)
    here.spawn = lambda fn: fn()
    start = there.publish("c", "0").id
    p = _FakePusher(start)
    here.attach("c", p)
    for i in range(3):  # beyond the history of two: a gap from `start`
        there.publish("c", str(i))
    here.notified("c")
    assert p.pushed == [] and p.woken == 1

    def broken(channel: str, since: str | None, limit: int):  # noqa: ANN202
        raise BadRequest("backend_unavailable", "redis is down", 503)

    store.read = broken  # type: ignore[method-assign]
    here.notified("c")
    assert p.woken == 2

    def buggy(channel: str, since: str | None, limit: int):  # noqa: ANN202
        raise KeyError("e")

    store.read = buggy  # type: ignore[method-assign]
    here.notified("c")  # logged, and the streams catch up for themselves
    assert p.woken == 3


def test_without_spawn_another_nodes_events_only_wake_the_streams():
    store = MemoryStore(50, 60.0, Clock())
    here, there = Hub(store), Hub(store)
    start = there.publish("c", "0").id
    p = _FakePusher(start)
    here.attach("c", p)
    there.publish("c", "1")
    here.notified("c")
    assert p.pushed == [] and p.woken == 1
