"""The Redis backend against a real redis-server: the memory store's cursor rules, wake-ups
across processes, two gateways sharing channels over every transport, and a Redis outage."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
import websocket

from gateway.config import from_mapping
from gateway.errors import BadRequest, ConfigError
from gateway.hub import Batch, Hub, MemoryStore
from gateway.hub.redis import RedisStore
from gateway.hub.redis import listener as redis_listener
from tests.clients import SSEClient, WSClient, longpoll, poll
from tests.helpers import TOKEN, Gateway
from tests.redis_server import RedisServer, redis_server  # noqa: F401  (a fixture)
from tests.upstreams import Upstream, wait_for

GATEWAY_CONFIG = {
    "history": {"size": 150},
    "sse": {"heartbeat_s": 0.5, "retry_ms": 500},
    "websocket": {"ping_s": 5.0},
    "poll": {"longpoll_max_timeout_s": 10.0},
}


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisStore]:  # noqa: F811
    """A store on its own key prefix, so tests sharing the server never see each other's keys."""
    s = RedisStore(redis_server.url, 5, 3600, prefix=f"t{uuid.uuid4().hex[:8]}:")
    yield s
    s.close()


def _attached(url: str, prefix: str, size: int = 20) -> tuple[RedisStore, Hub]:
    s = RedisStore(url, size, 3600, prefix=prefix)
    hub = Hub(s)
    s.attach(hub)
    _until(lambda: s.connected, "the listener subscribed")
    return s, hub


def _until(check, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def _wait_in_thread(hub: Hub, channel: str, since: str, timeout: float) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        started = time.monotonic()
        out["batch"] = hub.wait(channel, since, timeout, 100)
        out["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# -- the store: the same rules as memory ------------------------------------------------------
def test_store_answers_every_cursor_like_the_memory_store(store):
    """Same publishes into both stores (history 5, 12 events), then every cursor either gave out
    must read the same events (by position), gap, more and next cursor."""
    memory = MemoryStore(5, 3600)
    mem_ids, red_ids = ["0-0"], ["0-0"]
    for i in range(12):
        mem_ids.append(memory.append("c", "tick", f"d{i}").id)
        red_ids.append(store.append("c", "tick", f"d{i}").id)
    assert red_ids[1:] == sorted(red_ids[1:], key=lambda s: tuple(map(int, s.split("-"))))
    assert len(set(red_ids)) == 13

    def shape(batch: Batch, ids: list[str]) -> tuple:
        return (
            [ids.index(e.id) for e in batch.events],
            [e.data for e in batch.events],
            ids.index(batch.cursor),
            batch.gap,
            batch.more,
        )

    for n in range(13):
        for limit in (2, 100):
            expected = shape(memory.read("c", mem_ids[n], limit), mem_ids)
            assert shape(store.read("c", red_ids[n], limit), red_ids) == expected, (n, limit)
    assert store.read("c", None, 10) == Batch([], red_ids[-1])
    assert store.last_id("c") == red_ids[-1]


def test_resume_in_batches_gets_every_event_once_in_order(store):
    ids = [store.append("r", "message", str(i)).id for i in range(5)]
    cursor, seen = "0-0", []
    for _ in range(10):
        batch = store.read("r", cursor, 2)
        assert not batch.gap
        seen += [e.id for e in batch.events]
        cursor = batch.cursor
        if not batch.more:
            break
    assert seen == ids
    assert store.read("r", cursor, 2) == Batch([], ids[-1])


def test_events_keep_name_data_and_predecessor(store):
    first = store.append("e", "greeting", "héllo\nwörld 🙂")
    second = store.append("e", "message", '{"a": 1}')
    (event,) = store.read("e", first.id, 10).events
    assert event.to_dict() == {"id": second.id, "event": "message", "data": '{"a": 1}'}
    assert event.prev == first.id and first.prev == "0-0"
    assert store.read("e", "0-0", 10).events[0].data == "héllo\nwörld 🙂"
    assert abs(event.time - time.time()) < 5


def test_gaps_unknown_cursors_and_empty_channels(store):
    assert store.read("none", "0-0", 10) == Batch([], "0-0")
    assert store.read("none", None, 10) == Batch([], "0-0")
    assert store.read("none", "123-4", 10).gap is True
    ids = [store.append("g", "message", str(i)).id for i in range(8)]  # history holds the last 5
    trimmed = store.read("g", ids[1], 10)
    assert trimmed.gap and [e.id for e in trimmed.events] == ids[3:]
    assert trimmed.resync_id() == ids[2]
    assert store.read("g", ids[2], 10).gap is False  # the oldest retained event's predecessor
    ms, seq = ids[5].split("-")
    unknown = store.read("g", f"{ms}-{int(seq) + 1000}", 10)  # in range, never issued
    assert unknown.gap is True
    assert store.read("g", "99999999999999-0", 10).gap is True
    assert store.read("g", "0001-0", 10).gap is True
    with pytest.raises(BadRequest) as bad:
        store.read("g", "not-an-id", 10)
    assert bad.value.status == 400


def test_history_expires_by_age(redis_server):  # noqa: F811
    s = RedisStore(redis_server.url, 100, 0.3, prefix=f"t{uuid.uuid4().hex[:8]}:")
    try:
        old = s.append("a", "message", "old").id
        time.sleep(0.4)
        assert s.read("a", "0-0", 10) == Batch([], old, gap=True)
        assert s.read("a", old, 10) == Batch([], old)  # the tail is still known
        new = s.append("a", "message", "new")
        assert new.prev == old
        assert [e.data for e in s.read("a", "0-0", 10).events] == ["new"]
        assert s.read("a", old, 10).gap is False
    finally:
        s.close()


def test_channels_lists_this_prefix_only(redis_server):  # noqa: F811
    base = f"t{uuid.uuid4().hex[:8]}"
    # Prefixes that would glob-match each other's keys still keep their channels apart.
    stores = [RedisStore(redis_server.url, 5, 3600, prefix=p) for p in (f"{base}*:", f"{base}x:", f"{base}[x]:")]
    try:
        stores[0].append("one", "message", "x")
        stores[0].append("two.b:c", "message", "x")
        stores[1].append("three", "message", "x")
        assert sorted(stores[0].channels()) == ["one", "two.b:c"]
        assert stores[1].channels() == ["three"]
        assert stores[2].channels() == []
    finally:
        for s in stores:
            s.close()


def test_streams_still_read_when_only_the_subscription_is_refused(redis_server):  # noqa: F811
    """A listener refused by Redis (here: an ACL without SUBSCRIBE) must not make streaming
    reads skip a Redis that answers them; heartbeats then still deliver."""
    admin = redis.Redis.from_url(redis_server.url)
    admin.acl_setuser(
        "nosub", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=["+@all", "-subscribe"]
    )
    url = redis_server.url.replace("redis://", "redis://nosub:pw@")
    s = RedisStore(url, 5, 3600, prefix=f"n{uuid.uuid4().hex[:8]}:")
    hub = Hub(s)
    s.attach(hub)
    try:
        time.sleep(0.3)  # the listener has tried and been refused
        assert s.connected is False
        with hub.subscription("n"):
            cursor = hub.last_id("n")
            sent = hub.publish("n", "still here")
            assert [e.id for e in hub.read("n", cursor, 10).events] == [sent.id]
    finally:
        s.close()
        admin.acl_deluser("nosub")
        admin.close()


def test_a_silently_dead_subscription_is_noticed_and_renewed(redis_server, monkeypatch):  # noqa: F811
    monkeypatch.setattr(redis_listener, "KEEPALIVE_S", 0.1)
    monkeypatch.setattr(redis_listener, "ECHO_TIMEOUT_S", 0.6)
    s, hub = _attached(redis_server.url, f"d{uuid.uuid4().hex[:8]}:")
    try:
        first = s._listener.pubsub
        time.sleep(1.5)
        assert s._listener.pubsub is first  # echoes keep coming back: no reconnect
        first.unsubscribe()  # from now on nothing arrives, and nothing fails either
        _until(lambda: s._listener.pubsub is not first and s.connected, "the listener subscribed afresh", timeout=5)
    finally:
        s.close()


def test_hundreds_of_simultaneous_readers_queue_for_a_bounded_pool_instead_of_failing(tmp_path: Path):
    server = RedisServer(tmp_path)
    store = RedisStore(server.url, 5, 3600, max_connections=4)
    probe = redis.Redis.from_url(server.url)
    try:
        first = store.append("busy", "message", "x").id
        store.append("busy", "message", "y")
        start = threading.Barrier(200, timeout=10)
        failures: list[Exception] = []
        got: list[int] = []

        def reader() -> None:
            start.wait()
            try:
                got.append(len(store.read("busy", first, 10).events))
            except Exception as exc:  # a pool that refuses when full would land here
                failures.append(exc)

        threads = [threading.Thread(target=reader, daemon=True) for _ in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert failures == [] and got == [1] * 200
        assert probe.info("clients")["connected_clients"] <= 4 + 1  # the store's, and the probe
    finally:
        probe.close()
        store.close()
        server.stop()


def test_readers_woken_together_share_one_read_but_never_a_stale_one(store):
    """Readers of a channel streamed here share an in-flight read (and its Event objects), unless
    a publish came after it began: then they read afresh, so sharing never delays an event."""
    hub = Hub(store)
    store.attach(hub)
    # The listener's first connect wakes every streamed channel (as after any reconnect): let it
    # happen before the reads below, or it would count as a publish after the first one began.
    _until(lambda: store.connected, "the listener is connected")
    cursor = store.append("s", "message", "old").id
    gate, calls = threading.Event(), []
    real = store._fetch_now

    def slow(*args):
        result = real(*args)  # what Redis held when the call ran
        calls.append(args)
        gate.wait(5)
        return result

    store._fetch_now = slow
    with hub.subscription("s"):
        fresh = store.append("s", "message", "fresh")
        leader, out = _wait_in_thread(hub, "s", cursor, 5.0)
        _until(lambda: len(calls) == 1, "the first read ran")
        follower, out2 = _wait_in_thread(hub, "s", cursor, 5.0)
        time.sleep(0.2)
        assert len(calls) == 1  # the follower waits for the leader's read instead of making its own
        newer = hub.publish("s", "newer")
        late, out3 = _wait_in_thread(hub, "s", cursor, 5.0)
        _until(lambda: len(calls) == 2, "the late reader ran its own read")
        gate.set()
        for t in (leader, follower, late):
            t.join(6)
    assert [e.id for e in out["batch"].events] == [fresh.id]
    assert out2["batch"].events[0] is out["batch"].events[0]  # shared: encoded once
    assert [e.id for e in out3["batch"].events] == [fresh.id, newer.id]


# -- wake-ups across processes (two stores = two nodes) ----------------------------------------
def test_a_publish_on_one_node_wakes_readers_on_another(redis_server):  # noqa: F811
    prefix = f"w{uuid.uuid4().hex[:8]}:"
    (a, hub_a), (b, hub_b) = _attached(redis_server.url, prefix), _attached(redis_server.url, prefix)
    try:
        cursor = hub_b.last_id("x")
        thread, out = _wait_in_thread(hub_b, "x", cursor, 5.0)
        time.sleep(0.2)  # let it block first
        sent = hub_a.publish("x", "across")
        thread.join(6)
        assert [e.id for e in out["batch"].events] == [sent.id]
        assert out["elapsed"] < 2.0
    finally:
        a.close()
        b.close()


def test_outage_maps_to_503_keeps_streams_waiting_and_recovers(tmp_path: Path):
    server = RedisServer(tmp_path)
    s, hub = _attached(server.url, "o:")
    try:
        last = hub.publish("o", "before").id
        with hub.subscription("o"):
            server.stop()
            for call in (
                lambda: hub.publish("o", "x"),
                lambda: hub.read("o", None, 10),
                lambda: hub.read("other", last, 10),
                lambda: hub.channels(),
            ):
                with pytest.raises(BadRequest) as down:
                    call()
                assert (down.value.status, down.value.code) == (503, "backend_unavailable")
            assert s.ping() is False
            # A streaming reader with a cursor is told "nothing yet" and keeps waiting.
            assert hub.read("o", last, 10) == Batch([], last)
            thread, out = _wait_in_thread(hub, "o", last, 8.0)
            time.sleep(0.3)
            server.start()  # empty: the history died with the server
            _until(lambda: s.connected, "the listener reconnected")
            sent = hub.publish("o", "after")
            thread.join(9)
        # Woken by the reconnect or by the publish: either way told of the gap, then the event.
        batch = out["batch"]
        assert batch.gap is True and out["elapsed"] < 8.0
        rest = batch.events or hub.read("o", batch.cursor, 10).events
        assert [(e.id, e.data) for e in rest] == [(sent.id, "after")]
    finally:
        s.close()
        server.stop()


# -- two gateway processes on one Redis ----------------------------------------------------------
@pytest.fixture(scope="module")
def pair(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Gateway]]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("pair")
    env = {"REDIS_URL": redis_server.url}
    a = Gateway(GATEWAY_CONFIG, tmp, env)
    try:
        b = Gateway(GATEWAY_CONFIG, tmp, env)
    except Exception:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


def test_two_gateways_share_channels_over_every_transport(pair, channel):
    a, b = pair
    health = requests.get(f"{b.url}/healthz", timeout=5).json()
    assert health["status"] == "ok" and health["backend"] == "RedisStore"
    with SSEClient(f"{b.url}/sse/{channel}") as sse, WSClient(f"{b.ws_url}/ws/{channel}") as ws:
        held: dict = {}
        poller = threading.Thread(target=lambda: held.update(longpoll(b.url, channel, b.cursor(channel), 8)))
        poller.start()
        time.sleep(0.3)  # all three readers are waiting on B
        first = a.publish(channel, "from A", "note")
        second = a.publish(channel, "again")
        expected = [
            {"id": first, "event": "note", "data": "from A"},
            {"id": second, "event": "message", "data": "again"},
        ]
        assert sse.events(2) == expected
        assert ws.events(2) == expected
        poller.join(10)
    assert held["events"][0] == expected[0] and held["gap"] is False
    # Resume on B from an id A issued: the rest, once, in order; and A sees B's publishes.
    third = b.publish(channel, "from B")
    assert [e["id"] for e in poll(b.url, channel, first)["events"]] == [second, third]
    assert poll(a.url, channel, second)["events"] == [{"id": third, "event": "message", "data": "from B"}]
    assert channel in requests.get(f"{a.url}/", timeout=5).text


def test_concurrent_publishers_on_both_gateways_reach_every_reader_once_in_order(pair, channel):
    a, b = pair
    with SSEClient(f"{b.url}/sse/{channel}") as sse, WSClient(f"{a.ws_url}/ws/{channel}") as ws:
        time.sleep(0.2)
        ids: list[str] = []

        def publish_many(gw: Gateway, tag: str) -> None:
            with requests.Session() as session:
                for i in range(60):
                    r = session.post(
                        f"{gw.url}/publish/{channel}",
                        data=f"{tag}{i}".encode(),
                        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/plain"},
                        timeout=10,
                    )
                    ids.append(r.json()["id"])

        publishers = [threading.Thread(target=publish_many, args=(gw, tag)) for gw, tag in ((a, "a"), (b, "b"))]
        for t in publishers:
            t.start()
        for t in publishers:
            t.join(30)
        over_sse, over_ws = sse.events(120), ws.events(120)
    in_order = sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert [e["id"] for e in over_sse] == in_order
    assert [e["id"] for e in over_ws] == in_order
    assert sorted(e["data"] for e in over_ws) == sorted([f"a{i}" for i in range(60)] + [f"b{i}" for i in range(60)])


def test_gateways_report_gap_for_history_trimmed_elsewhere(pair, channel):
    a, b = pair
    first = a.publish(channel, "lost")
    ids = [b.publish(channel, str(i)) for i in range(152)]  # history holds 150
    with SSEClient(f"{a.url}/sse/{channel}", {"Last-Event-ID": first}) as sse:
        events = sse.events(151)
    assert events[0]["event"] == "gap" and json.loads(events[0]["data"])["requested"] == first
    assert [e["id"] for e in events[1:]] == ids[2:]


def test_redis_outage_gives_503_then_recovers_and_streams_continue(start_gateway, tmp_path: Path, channel):
    server = RedisServer(tmp_path)
    try:
        env = {"REDIS_URL": server.url}
        a, b = start_gateway(GATEWAY_CONFIG, env), start_gateway(GATEWAY_CONFIG, env)
        with SSEClient(f"{b.url}/sse/{channel}") as sse:
            before = a.publish(channel, "before")
            assert sse.next_event()["id"] == before
            server.stop()
            r = requests.post(
                f"{a.url}/publish/{channel}",
                data=b"x",
                timeout=10,
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/plain"},
            )
            assert r.status_code == 503 and r.json()["error"] == "backend_unavailable", r.text
            health = requests.get(f"{a.url}/healthz", timeout=10)
            assert health.status_code == 503 and health.json()["error"] == "backend_unavailable"
            down = requests.get(f"{a.url}/poll/{channel}", timeout=10)
            assert down.status_code == 503 and down.json()["error"] == "backend_unavailable"
            # A new WebSocket with no cursor to start from is refused before the upgrade.
            with pytest.raises(websocket.WebSocketBadStatusException) as refused:
                websocket.create_connection(f"{a.ws_url}/ws/{channel}", timeout=10)
            assert refused.value.status_code == 503
            # Readers that hold a cursor wait the outage out: new streams resuming, a long poll.
            resumed = SSEClient(f"{a.url}/sse/{channel}", {"Last-Event-ID": before})
            ws = WSClient(f"{b.ws_url}/ws/{channel}?since={before}")
            assert resumed.status == 200
            assert longpoll(a.url, channel, before, timeout=1) == {
                "events": [], "cursor": before, "gap": False, "more": False
            }  # fmt: skip
            time.sleep(0.5)  # B's stream sits through the outage on heartbeats
            server.start()
            _until(lambda: requests.get(f"{a.url}/healthz", timeout=5).status_code == 200, "A is healthy again")
            after = a.publish(channel, "after")
            streams = [sse.events(2), resumed.events(2), ws.events(2)]
            resumed.close()
            ws.close()
        for gap, event in streams:
            assert gap["event"] == "gap" and json.loads(gap["data"])["requested"] == before
            assert event == {"id": after, "event": "message", "data": "after"}
        assert "Traceback" not in a.log() + b.log()
    finally:
        server.stop()


def test_config_rejects_a_malformed_redis_url_or_prefix():
    with pytest.raises(ConfigError, match=r"^redis\.url \(or REDIS_URL\): Port could not be cast"):
        from_mapping({"redis": {"url": "redis://127.0.0.1:notaport/0"}})
    with pytest.raises(ConfigError, match=r"^redis\.prefix: "):
        from_mapping({"redis": {"url": "redis://127.0.0.1:6379/0", "prefix": ""}})
    assert from_mapping({"redis": {"url": "redis://127.0.0.1:6379/0"}}).redis.prefix == "gw:"


def test_tls_with_a_self_signed_certificate_needs_tls_verify_off(tmp_path: Path, caplog):
    server = RedisServer(tmp_path, tls=True)
    strict = RedisStore(server.url, 5, 60, prefix="tls:")
    relaxed = RedisStore(server.url, 5, 60, prefix="tls:", tls_verify=False)
    try:
        with caplog.at_level("WARNING", logger="gateway.hub.redis"):
            with pytest.raises(BadRequest) as refused:
                strict.append("t", "message", "x")
        assert refused.value.status == 503
        assert "set redis.tls_verify = false" in caplog.text  # the log names the fix
        sent = relaxed.append("t", "message", "over tls")
        assert relaxed.read("t", "0-0", 10).events[0].to_dict() == sent.to_dict()
    finally:
        strict.close()
        relaxed.close()
        server.stop()


# -- Idempotency-Key and the byte budget (contract "Publishing retries (v2)") -----------------------
def test_a_repeated_idempotency_key_returns_the_first_event_and_stores_nothing_across_stores(redis_server):  # noqa: F811
    prefix = f"k{uuid.uuid4().hex[:8]}:"
    a = RedisStore(redis_server.url, 50, 3600, prefix=prefix)
    b = RedisStore(redis_server.url, 50, 3600, prefix=prefix)  # another process
    try:
        first = a.append("k", "note", "once", idempotency_key="order-17")
        assert first.repeat is False
        again = b.append("k", "note", "once", idempotency_key="order-17")
        assert again.repeat is True and again.to_dict() == first.to_dict() and again.prev == first.prev
        other_channel = b.append("k2", "note", "once", idempotency_key="order-17")  # keys are per channel
        assert other_channel.repeat is False
        plain = a.append("k", "message", "no key")
        assert [e.id for e in b.read("k", "0-0", 10).events] == [first.id, plain.id]
        assert b.last_id("k") == plain.id
    finally:
        a.close()
        b.close()


def test_an_idempotency_key_is_forgotten_after_the_history_age(redis_server):  # noqa: F811
    s = RedisStore(redis_server.url, 50, 1, prefix=f"f{uuid.uuid4().hex[:8]}:")
    try:
        first = s.append("f", "message", "x", idempotency_key="k")
        time.sleep(1.3)
        later = s.append("f", "message", "x", idempotency_key="k")
        assert later.repeat is False and later.id != first.id
    finally:
        s.close()


def test_history_is_trimmed_by_bytes_oldest_first_and_keeps_the_newest(redis_server):  # noqa: F811
    s = RedisStore(redis_server.url, 100, 3600, prefix=f"b{uuid.uuid4().hex[:8]}:", max_bytes=2048)
    try:
        ids = [s.append("b", "message", str(i) * 500).id for i in range(10)]  # 500 + 7 + 200 bytes each
        batch = s.read("b", ids[0], 100)
        assert [e.id for e in batch.events] == ids[-2:] and batch.gap is True  # 2 x 707 <= 2048 < 3 x 707
        big = s.append("b", "message", "y" * 5000)  # over the budget alone: still kept
        assert [e.id for e in s.read("b", ids[-1], 100).events] == [big.id]
        small = s.append("b", "message", "z")
        assert [e.id for e in s.read("b", big.id, 100).events] == [small.id]
        assert s.read("b", ids[-1], 100).gap is True  # the big one went to make room
    finally:
        s.close()


def test_config_has_a_byte_budget_and_refuses_braces_in_the_prefix():
    assert from_mapping({}).history.max_bytes == 4_194_304
    with pytest.raises(ConfigError, match=r"^history\.max_bytes: "):
        from_mapping({"history": {"max_bytes": 10}})
    with pytest.raises(ConfigError, match=r"^redis\.prefix: .*braces"):
        from_mapping({"redis": {"url": "redis://127.0.0.1:6379/0", "prefix": "{gw}:"}})


def _publish(gw: Gateway, channel: str, data: str, key: str, timeout: float = 30) -> requests.Response:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/plain", "Idempotency-Key": key}
    return requests.post(f"{gw.url}/publish/{channel}", data=data.encode(), headers=headers, timeout=timeout)


def test_a_retry_on_another_gateway_with_the_same_key_stores_one_event(pair, channel):
    a, b = pair
    first = _publish(a, channel, "pay 10", "retry-1")
    second = _publish(b, channel, "pay 10", "retry-1")
    assert first.status_code == second.status_code == 202
    assert second.json()["id"] == first.json()["id"]
    assert [e["data"] for e in poll(a.url, channel, "0-0")["events"]] == ["pay 10"]


def test_a_publish_503d_while_redis_stalls_and_its_retry_store_one_event(start_gateway, tmp_path: Path, channel):
    """Issue 12 item 8: Redis paused 10 s; the publish times out (503, saying it may have been
    stored) and Redis runs it when it resumes; the retry with the same key must not store it again."""
    server = RedisServer(tmp_path)
    try:
        env = {"REDIS_URL": server.url}
        a, b = start_gateway(GATEWAY_CONFIG, env), start_gateway(GATEWAY_CONFIG, env)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            stalled = _publish(a, channel, "exactly once", "stall-1")
        finally:
            time.sleep(max(0.0, 10 - (time.monotonic() - stopped)))
            os.kill(server.proc.pid, signal.SIGCONT)
        assert stalled.status_code == 503, stalled.text
        assert "may still have been stored" in stalled.json()["detail"]
        assert "Idempotency-Key" in stalled.json()["detail"]
        _until(lambda: requests.get(f"{b.url}/healthz", timeout=5).status_code == 200, "Redis answers again")
        retry = _publish(b, channel, "exactly once", "stall-1")
        assert retry.status_code == 202, retry.text
        events = poll(a.url, channel, "0-0")["events"]
        assert [e["data"] for e in events] == ["exactly once"]
        assert retry.json()["id"] == events[0]["id"]
    finally:
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


def test_a_publish_refused_by_a_stopped_redis_says_it_was_not_stored(start_gateway, tmp_path: Path, channel):
    server = RedisServer(tmp_path)
    try:
        a = start_gateway(GATEWAY_CONFIG, {"REDIS_URL": server.url})
        server.stop()
        refused = _publish(a, channel, "x", "down-1")
        assert refused.status_code == 503 and "was not stored" in refused.json()["detail"], refused.text
    finally:
        server.stop()


def test_a_source_replaying_a_publish_that_redis_stored_late_stores_it_once(start_gateway, tmp_path: Path):
    """The upstream SSE source's own retry: its publish times out on a paused Redis (which runs
    it on resuming), it reconnects and replays the same upstream event: one event, not two."""
    server = RedisServer(tmp_path)
    upstream = Upstream()
    try:
        source = {"kind": "sse", "url": upstream.url + "/events", "channel": "src", "backoff_initial_s": 0.05}
        gw = start_gateway({**GATEWAY_CONFIG, "sources": [source]}, {"REDIS_URL": server.url})
        upstream.emit("one")
        wait_for(lambda: [e["data"] for e in poll(gw.url, "src", "0-0")["events"]] == ["one"], timeout=20)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            upstream.emit("two")
            time.sleep(10)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        upstream.emit("three")
        wait_for(lambda: "three" in [e["data"] for e in poll(gw.url, "src", "0-0")["events"]], timeout=30)
        assert [e["data"] for e in poll(gw.url, "src", "0-0")["events"]] == ["one", "two", "three"]
    finally:
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGCONT)
        upstream.stop()
        server.stop()


def test_a_gateway_on_rediss_with_a_self_signed_certificate_and_a_connection_cap(start_gateway, tmp_path, channel):
    """What Heroku Redis needs: a rediss:// URL, its self-signed certificate accepted with
    redis.tls_verify = false, and few connections per process (small plans cap clients)."""
    server = RedisServer(tmp_path, tls=True)
    try:
        config = {**GATEWAY_CONFIG, "redis": {"tls_verify": False, "max_connections": 4}}
        gw = start_gateway(config, {"REDIS_URL": server.url})
        assert requests.get(f"{gw.url}/healthz", timeout=5).json()["backend"] == "RedisStore"
        with SSEClient(f"{gw.url}/sse/{channel}") as sse, WSClient(f"{gw.ws_url}/ws/{channel}") as ws:
            time.sleep(0.2)
            ids = [gw.publish(channel, f"tls {i}") for i in range(5)]
            assert [e["id"] for e in sse.events(5)] == ids
            assert [e["id"] for e in ws.events(5)] == ids
        repeat = _publish(gw, channel, "tls 0", "tls-key")
        assert _publish(gw, channel, "tls 0", "tls-key").json()["id"] == repeat.json()["id"]
    finally:
        server.stop()


def test_simultaneous_new_readers_share_one_last_id_call(store):
    """A reconnect storm: many new streams "from now" on one channel ask for its last id at once;
    they share a round trip instead of queueing for the pool (which ran out in the bench)."""
    sent = store.append("storm", "message", "x")
    real, calls = store._client.xrevrange, []
    gate = threading.Event()

    def slow(*args, **kwargs):
        calls.append(args)
        gate.wait(5)
        return real(*args, **kwargs)

    store._client.xrevrange = slow
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(store.last_id("storm")), daemon=True) for _ in range(50)]
    for t in threads:
        t.start()
    _until(lambda: len(calls) == 1, "the first call is in Redis")
    time.sleep(0.2)  # the others arrive while it is
    gate.set()
    for t in threads:
        t.join(10)
    assert got == [sent.id] * 50
    assert len(calls) < 5  # nearly all of them shared the first call
    store._client.xrevrange = real
    assert store.last_id("storm") == sent.id  # and nothing is left cached once it is done
