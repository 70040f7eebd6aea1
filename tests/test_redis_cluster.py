"""Redis Cluster (redis.cluster = true) against a real three-shard cluster of redis-server
processes: channels on different shards, wake-ups across shards and processes, Idempotency-Key,
leases, two gateways resuming each other's cursors, and a shard restart that is a gap or a 503,
never a silent loss."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gateway.config import RedisConfig, SourceConfig, from_mapping
from gateway.errors import BadRequest, ConfigError
from gateway.hub import Hub
from gateway.hub.redis import RedisStore
from gateway.sources.lease import LeaseStore
from tests.clients import SSEClient, poll
from tests.helpers import TOKEN, Gateway, free_port
from tests.redis_server import RedisClusterServers, redis_cluster  # noqa: F401  (a fixture)

GATEWAY_CONFIG = {
    "redis": {"cluster": True},
    "sse": {"heartbeat_s": 0.5, "retry_ms": 300},
    "poll": {"longpoll_max_timeout_s": 10.0},
}


def _on_each_shard(cluster: RedisClusterServers, prefix: str, tag: str) -> dict[int, str]:
    """One channel name per shard (port -> channel), found by asking the cluster's slot map."""
    found: dict[int, str] = {}
    for i in range(1000):
        name = f"{tag}{i}"
        found.setdefault(cluster.node_for(f"{prefix}c:{{{name}}}"), name)
        if len(found) == len(cluster.ports):
            return found
    raise AssertionError("no channel names found for every shard")


def _until(check, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def test_stores_on_a_cluster_share_channels_on_every_shard(redis_cluster):  # noqa: F811
    prefix = f"k{uuid.uuid4().hex[:6]}:"
    channels = _on_each_shard(redis_cluster, prefix, "s")
    a = RedisStore(redis_cluster.url, 10, 3600, prefix=prefix, cluster=True)
    b = RedisStore(redis_cluster.url, 10, 3600, prefix=prefix, cluster=True)  # another process
    hub_b = Hub(b)
    b.attach(hub_b)
    try:
        _until(lambda: b.connected, "b's listener subscribed")
        for channel in channels.values():
            cursor = hub_b.last_id(channel)
            out: dict = {}
            with hub_b.subscription(channel):
                waiter = threading.Thread(
                    target=lambda c=channel, s=cursor, o=out: o.update(batch=hub_b.wait(c, s, 10, 100))
                )
                waiter.start()
                time.sleep(0.2)
                sent = a.append(channel, "message", f"on {channel}", idempotency_key="once")
                waiter.join(12)
            assert [e.id for e in out["batch"].events] == [sent.id]  # woken across processes and shards
            repeat = b.append(channel, "message", f"on {channel}", idempotency_key="once")
            assert repeat.repeat and repeat.id == sent.id
            assert [e.data for e in b.read(channel, "0-0", 10).events] == [f"on {channel}"]
        assert sorted(b.channels()) == sorted(channels.values())
    finally:
        a.close()
        b.close()


def test_history_trims_by_count_and_bytes_on_a_cluster(redis_cluster):  # noqa: F811
    s = RedisStore(redis_cluster.url, 3, 3600, prefix=f"t{uuid.uuid4().hex[:6]}:", cluster=True, max_bytes=2500)
    try:
        ids = [s.append("trim", "message", str(i)).id for i in range(5)]
        assert [e.id for e in s.read("trim", ids[0], 10).events] == ids[2:]
        big = [s.append("trim", "message", "x" * 900).id for _ in range(3)]  # 900 + 7 + 200 bytes each: 2 fit in 2500
        batch = s.read("trim", ids[-1], 10)
        assert [e.id for e in batch.events] == big[1:] and batch.gap
    finally:
        s.close()


def test_leases_work_on_a_cluster(redis_cluster):  # noqa: F811
    cfg = RedisConfig(url=redis_cluster.url, prefix=f"l{uuid.uuid4().hex[:6]}:", cluster=True)
    source = SourceConfig(kind="sse", url="http://127.0.0.1:1/events", channel="c", lease_ttl_s=2.0)
    a, b = LeaseStore(cfg, 1.0).lease(source), LeaseStore(cfg, 1.0).lease(source)
    assert a.acquire() and not b.acquire()
    assert a.save({"last_id": "7"}, ["7"]) and a.renew()  # three keys in one script: one shard
    a.release()
    assert b.acquire() and b.resumed == ({"last_id": "7"}, ["7"])
    b.release()


def test_config_takes_a_cluster_url_and_refuses_a_unix_socket():
    assert from_mapping({"redis": {"url": "redis://10.0.0.1:7000", "cluster": True}}).redis.cluster is True
    with pytest.raises(ConfigError, match=r"^redis\.cluster: "):
        from_mapping({"redis": {"url": "unix:///tmp/redis.sock", "cluster": True}})


# -- two gateway processes on the cluster ----------------------------------------------------------
@pytest.fixture(scope="module")
def pair(redis_cluster: RedisClusterServers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("cluster-pair")
    env = {"REDIS_URL": redis_cluster.url}
    a = Gateway(GATEWAY_CONFIG, tmp, env)
    try:
        b = Gateway(GATEWAY_CONFIG, tmp, env)
    except Exception:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


def test_two_gateways_on_a_cluster_stream_and_resume_channels_on_every_shard(pair, redis_cluster):  # noqa: F811
    a, b = pair
    channels = _on_each_shard(redis_cluster, "gw:", f"g{uuid.uuid4().hex[:4]}.")
    for channel in channels.values():
        with SSEClient(f"{b.url}/sse/{channel}") as sse:
            first = a.publish(channel, "one")
            second = a.publish(channel, "two")
            assert [e["id"] for e in sse.events(2)] == [first, second]
        third = b.publish(channel, "three")
        assert [e["id"] for e in poll(b.url, channel, first)["events"]] == [second, third]  # A's id, on B
        assert [e["data"] for e in poll(a.url, channel, second)["events"]] == ["three"]


def test_a_shard_restart_is_a_gap_or_a_503_never_a_silent_loss(pair, redis_cluster):  # noqa: F811
    a, b = pair
    channels = _on_each_shard(redis_cluster, "gw:", f"r{uuid.uuid4().hex[:4]}.")
    port, lost = next(iter(channels.items()))
    before = a.publish(lost, "before the restart")
    with SSEClient(f"{b.url}/sse/{lost}", {"Last-Event-ID": before}) as sse:
        redis_cluster.stop_node(port)
        try:
            r = requests.post(
                f"{a.url}/publish/{lost}",
                data=b"during",
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/plain"},
                timeout=30,
            )
            assert r.status_code == 503 and r.json()["error"] == "backend_unavailable", r.text
        finally:
            redis_cluster.start_node(port)  # it comes back empty: the channel's history is gone
        redis_cluster.wait_ok()

        def publish_after() -> str | None:
            try:
                return a.publish(lost, "after the restart")
            except AssertionError:  # a 503 while the cluster settles
                return None

        after = _until(publish_after, "a publish succeeds again", timeout=30)
        events = sse.events(2, deadline_s=30)
    # The stream that held `before` is told its history was lost, then gets the new event.
    assert events[0]["event"] == "gap" and json.loads(events[0]["data"])["requested"] == before
    assert events[1] == {"id": after, "event": "message", "data": "after the restart"}
    batch = poll(b.url, lost, before)
    assert batch["gap"] is True and [e["id"] for e in batch["events"]] == [after]


def test_a_store_on_a_down_cluster_answers_503(tmp_path: Path):
    cluster = RedisClusterServers(tmp_path)
    s = RedisStore(cluster.url, 10, 3600, cluster=True)
    try:
        s.append("x", "message", "up")
        cluster.stop()
        with pytest.raises(BadRequest) as refused:
            s.append("x", "message", "down")
        assert refused.value.status == 503
    finally:
        s.close()
        cluster.stop()


def test_a_cluster_that_is_down_at_start_up_is_a_503_not_a_crash():
    s = RedisStore(f"redis://127.0.0.1:{free_port()}", 10, 3600, cluster=True)  # nothing listens there
    try:
        with pytest.raises(BadRequest) as refused:
            s.append("x", "message", "nobody home")
        assert refused.value.status == 503 and "was not stored" in refused.value.detail
        assert s.ping() is False
    finally:
        s.close()
