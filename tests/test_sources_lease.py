"""With Redis, each upstream source is relayed by exactly one gateway process: the lease itself
against a real redis-server, then two (or three) real `python app.py` gateways sharing one Redis
and the same [[sources]]: every upstream event once, hand-over on SIGTERM and on SIGKILL without
duplicates or losses, and a Redis outage that makes the leader step back until Redis returns."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway.app import create_app
from gateway.config import RedisConfig, SourceConfig, from_mapping
from gateway.errors import ConfigError
from gateway.sources.lease import LeaseStore
from gateway.state import state
from tests.clients import SSEClient, poll
from tests.helpers import Gateway
from tests.redis_server import RedisServer, redis_server  # noqa: F401  (a fixture)
from tests.upstreams import Upstream, wait_for

pytestmark = pytest.mark.timeout(60)

TTL = 1.0
CHANNELS = ("s1", "s2", "p", "w")
FAST = {"backoff_initial_s": 0.05, "backoff_max_s": 0.3, "lease_ttl_s": TTL}


@pytest.fixture
def ups() -> Iterator[tuple[Upstream, Upstream]]:
    """Two upstreams: the first honours Last-Event-ID, the second replays everything (careless)."""
    honest, careless = Upstream(), Upstream()
    careless.honour_last_event_id = False
    yield honest, careless
    honest.stop()
    careless.stop()


def sources_config(honest: Upstream, careless: Upstream) -> list[dict[str, Any]]:
    return [
        {"kind": "sse", "url": honest.url + "/events", "channel": "s1", **FAST},
        {"kind": "sse", "url": careless.url + "/events", "channel": "s2", **FAST},
        {
            "kind": "poll",
            "url": honest.url + "/items",
            "channel": "p",
            "interval": 0.1,
            "items": True,
            "id_field": "id",
            **FAST,
        },
        # Replays everything on each connection: de-duplicated by id_field with the ids in Redis.
        {"kind": "websocket", "url": honest.url + "/ws", "channel": "w", "id_field": "id", **FAST},
        # A whole body that never changes (and has no ETag): published once, whoever leads.
        {"kind": "poll", "url": honest.url + "/slow?s=0", "channel": "pb", "interval": 0.1, **FAST},
    ]


def start_pair(
    start_gateway: Callable[..., Gateway], url: str, sources: list[dict[str, Any]], n: int = 2
) -> list[Gateway]:
    """n gateways on one Redis (a prefix of their own); the first is the leader of every source."""
    config = {"sources": sources, "redis": {"prefix": f"t{uuid.uuid4().hex[:8]}:"}}
    first = start_gateway(config, env={"REDIS_URL": url})
    wait_for(lambda: all(s["lease"]["leader"] for s in status(first).values()))
    rest = [start_gateway(config, env={"REDIS_URL": url}) for _ in range(n - 1)]
    holder = {s["lease"]["holder"] for s in status(first).values()}
    for gw in rest:
        wait_for(lambda gw=gw: all(s["state"] == "standby" for s in status(gw).values()))
        others = status(gw).values()
        assert {s["lease"]["holder"] for s in others} == holder  # the standby names the leader
        assert not any(s["lease"]["leader"] for s in others)
    return [first, *rest]


def status(gw: Gateway) -> dict[str, dict[str, Any]]:
    return {s["channel"]: s for s in requests.get(gw.url + "/status", timeout=5).json()["sources"]}


def datas(gw: Gateway, channel: str) -> list[str]:
    events = poll(gw.url, channel, "0-0")["events"]
    return [json.loads(e["data"])["data"] if channel in ("p", "w") else e["data"] for e in events]


def leaders(*gws: Gateway) -> dict[str, list[int]]:
    """channel -> the ports of the gateways that lead its source."""
    out: dict[str, list[int]] = {}
    for gw in gws:
        for channel, s in status(gw).items():
            out.setdefault(channel, [])
            if s["lease"]["leader"]:
                out[channel].append(gw.port)
    return out


def emit(ups: tuple[Upstream, Upstream], *texts: str) -> None:
    for text in texts:
        for up in ups:
            up.emit(text)


def all_arrived(gw: Gateway, expected: list[str]) -> bool:
    return all(len(datas(gw, ch)) >= len(expected) for ch in CHANNELS)


def test_lease_acquire_renew_save_release_and_expiry(redis_server: RedisServer) -> None:  # noqa: F811
    cfg = RedisConfig(url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    source = SourceConfig(kind="sse", url="http://127.0.0.1:1/events?token=secret", channel="c", lease_ttl_s=0.5)
    store = LeaseStore(cfg, 0.5)
    a, b = store.lease(source), LeaseStore(cfg, 0.5).lease(source)
    try:
        assert a.key.startswith(cfg.prefix + "source:c:sse:") and "secret" not in a.key
        assert a.acquire() and a.valid() and a.resumed == ({}, [])
        assert not b.acquire() and not b.valid() and b.holder == a.token
        assert a.save({"last_id": "7"}, ["5", "6", "7"]) and a.renew()
        a.release()
        assert not a.valid()
        assert b.acquire() and b.resumed == ({"last_id": "7"}, ["5", "6", "7"])
        assert not a.renew() and not a.save({"last_id": "8"}, ["8"])  # no longer a's: nothing written
        time.sleep(0.6)  # b never renews: Redis lets the lease expire
        assert not b.valid() and a.acquire() and a.resumed[0] == {"last_id": "7"}
        lost: list[str] = []
        a.keep(lost.append)
        time.sleep(0.5)  # renewed every ttl/3
        assert a.valid() and not b.acquire() and lost == []
        store.client.set(a.key, "intruder")  # someone else has it now: the renewer notices
        wait_for(lambda: lost, timeout=2)
        assert not a.valid() and "another process" in lost[0]
    finally:
        a.release()
        b.release()


def test_lease_ttl_config_and_memory_hub_has_no_lease() -> None:
    assert (
        from_mapping({"sources": [{"kind": "sse", "url": "http://x/e", "channel": "c"}]}).sources[0].lease_ttl_s == 10
    )
    with pytest.raises(ConfigError, match=r"sources\[0\]\.lease_ttl_s"):
        from_mapping({"sources": [{"kind": "sse", "url": "http://x/e", "channel": "c", "lease_ttl_s": 0.1}]})
    app = create_app({"sources": [{"kind": "sse", "url": "http://127.0.0.1:1/e", "channel": "c"}]})
    (source,) = state(app).sources
    assert source.lease is None and source._lead() and source._active()  # always the leader
    assert app.test_client().get("/status").json["sources"][0]["lease"] is None


def test_each_event_once_and_sigterm_hand_over(
    start_gateway: Callable[..., Gateway],
    redis_server: RedisServer,  # noqa: F811
    ups: tuple[Upstream, Upstream],
) -> None:
    a, b = start_pair(start_gateway, redis_server.url, sources_config(*ups))
    expected = [f"e{i}" for i in range(5)]
    emit(ups, *expected)
    wait_for(lambda: all_arrived(b, expected))
    time.sleep(0.3)  # a duplicate from the standby would have arrived by now
    for channel in CHANNELS:
        assert datas(b, channel) == expected, channel
        assert datas(a, channel) == expected, channel

    stopped = time.monotonic()
    a.stop(signal.SIGTERM)
    assert "released the lease" in a.log_path.read_text()
    emit(ups, "during1", "during2")  # nobody may be relaying right now: the upstream keeps them
    wait_for(lambda: all(s["lease"]["leader"] for s in status(b).values()), timeout=5)
    took = time.monotonic() - stopped
    assert took < TTL + 1.0, f"took over after {took:.2f} s"
    emit(ups, "after1", "after2")
    expected += ["during1", "during2", "after1", "after2"]
    wait_for(lambda: all_arrived(b, expected))
    time.sleep(0.3)
    for channel in CHANNELS:
        assert datas(b, channel) == expected, channel
    assert datas(b, "pb") == ["late"]  # b had a's body digest: the unchanged body is not published again
    sb = status(b)
    assert sb["s2"]["duplicates"] >= 5  # the careless upstream replayed, the ids a left in Redis dropped it
    assert sb["w"]["duplicates"] >= 5  # so did the WebSocket upstream
    assert ups[0].seen("/events")[-1]["headers"].get("Last-Event-Id") == "5"  # b resumed where a stopped
    assert "leading" in b.log() and "resuming from" in b.log()


def test_killed_leader_is_replaced_within_the_ttl(
    start_gateway: Callable[..., Gateway],
    redis_server: RedisServer,  # noqa: F811
    ups: tuple[Upstream, Upstream],
) -> None:
    a, b, c = start_pair(start_gateway, redis_server.url, sources_config(*ups), n=3)
    emit(ups, "x1", "x2")
    wait_for(lambda: all_arrived(b, ["x1", "x2"]))
    killed = time.monotonic()
    a.stop(signal.SIGKILL)  # no goodbye: the lease must expire
    emit(ups, "y1")
    wait_for(lambda: all(len(gws) == 1 for gws in leaders(b, c).values()), timeout=5)
    took = time.monotonic() - killed
    assert took < 1.5 * TTL + 1.0, f"took over after {took:.2f} s"
    emit(ups, "y2")
    expected = ["x1", "x2", "y1", "y2"]
    wait_for(lambda: all_arrived(c, expected))
    time.sleep(0.3)
    for channel in CHANNELS:
        assert datas(c, channel) == expected, channel
    assert datas(c, "pb") == ["late"]
    assert all(len(gws) == 1 for gws in leaders(b, c).values())  # still exactly one leader each


def test_lazy_source_is_led_by_a_process_with_listeners(
    start_gateway: Callable[..., Gateway],
    redis_server: RedisServer,  # noqa: F811
    ups: tuple[Upstream, Upstream],
) -> None:
    honest = ups[0]
    source = {**sources_config(*ups)[0], "mode": "lazy", "lazy_grace_s": 0.3}
    config = {"sources": [source], "sse": {"heartbeat_s": 0.2}, "redis": {"prefix": f"t{uuid.uuid4().hex[:8]}:"}}
    a, b = (start_gateway(config, env={"REDIS_URL": redis_server.url}) for _ in range(2))
    assert status(a)["s1"]["state"] == status(b)["s1"]["state"] == "idle" and not honest.seen("/events")
    with SSEClient(b.url + "/sse/s1") as on_b:
        wait_for(lambda: status(b)["s1"]["state"] == "connected")
        honest.emit("l1")
        assert [e["data"] for e in on_b.events(1)] == ["l1"]
        with SSEClient(a.url + "/sse/s1") as on_a:
            wait_for(lambda: status(a)["s1"]["state"] == "standby")  # a listener, but b leads
            on_b.close()  # b's last listener leaves: after lazy_grace_s b hands the lease over
            wait_for(lambda: status(a)["s1"]["lease"]["leader"] and status(a)["s1"]["state"] == "connected", timeout=5)
            assert status(b)["s1"]["state"] == "idle"
            honest.emit("l2")
            assert [e["data"] for e in on_a.events(1)] == ["l2"]  # it joined after l1
    assert datas(a, "s1") == ["l1", "l2"]


def test_redis_outage_stops_relaying_until_it_returns(
    start_gateway: Callable[..., Gateway], tmp_path: Path, ups: tuple[Upstream, Upstream]
) -> None:
    server = RedisServer(tmp_path)
    try:
        honest = ups[0]
        (gw,) = start_pair(start_gateway, server.url, [sources_config(*ups)[0]], n=1)
        honest.emit("before")
        wait_for(lambda: datas(gw, "s1") == ["before"])
        server.stop()
        down = wait_for(lambda: (s := status(gw)["s1"])["state"] == "standby" and s, timeout=5)
        assert down["lease"]["leader"] is False
        assert "lost the lease" in gw.log()
        honest.emit("during")  # the upstream keeps it: relayed once Redis is back
        server.start()
        wait_for(lambda: status(gw)["s1"]["lease"]["leader"], timeout=5)
        honest.emit("after")
        # Redis came back empty (no persistence): the channel starts again, the source resumes
        # from its own last id, so only what came after "before" arrives, once.
        wait_for(lambda: datas(gw, "s1") == ["during", "after"])
        assert "leading" in gw.log().split("lost the lease", 1)[1]
    finally:
        server.stop()
