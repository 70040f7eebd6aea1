"""GET /channels and /channels/<name> against a real gateway, with the memory store and Redis:
what they say matches what was published and who is connected."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.clients import SSEClient, WSClient
from tests.helpers import Gateway, wait_for
from tests.redis_server import RedisServer, redis_server  # noqa: F401  (a fixture)


def info(gw: Gateway, channel: str) -> dict[str, Any]:
    r = requests.get(f"{gw.url}/channels/{channel}", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["Cache-Control"] == "no-store"
    return r.json()


def redis_up(gw: Gateway) -> float:
    text = requests.get(f"{gw.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "gateway_redis_up":
            return family.samples[0].value
    raise AssertionError("no gateway_redis_up")


def test_channel_matches_what_was_published(start_gateway: Callable[..., Gateway], channel: str) -> None:
    gw = start_gateway({"history": {"size": 5}})
    empty = info(gw, channel)
    assert empty["last_id"] == "0-0"
    assert empty["history"]["count"] == 0 and empty["history"]["bytes"] == 0
    assert empty["subscribers"] == {"sse": 0, "ws": 0, "longpoll": 0}
    datas = [f"event number {i} é" for i in range(8)]
    ids = [gw.publish(channel, data) for data in datas]
    body = info(gw, channel)
    assert set(body) >= {"channel", "last_id", "history", "subscribers"}
    assert body["channel"] == channel
    assert body["last_id"] == ids[-1]
    held = datas[-5:]  # history.size = 5
    assert body["history"]["count"] == 5
    assert body["history"]["bytes"] == sum(len(d.encode()) for d in held)
    assert body["history"]["oldest_id"] == ids[3]
    assert body["publish_rate"]["events"] == 5  # all within the last minute
    assert body["publish_rate"]["per_s"] > 0


def test_subscribers_are_counted_while_connected(start_gateway: Callable[..., Gateway], channel: str) -> None:
    gw = start_gateway({"sse": {"heartbeat_s": 0.3}})  # the server notices a client that left at its next write
    sse = SSEClient(f"{gw.url}/sse/{channel}")
    ws = [WSClient(f"{gw.ws_url}/ws/{channel}") for _ in range(2)]
    try:
        gw.publish(channel, "hello")  # all read it: all are subscribed
        assert sse.events(1)[0]["data"] == "hello"
        assert [w.next_frame()["data"] for w in ws] == ["hello", "hello"]
        body = info(gw, channel)
        assert body["subscribers"] == {"sse": 1, "ws": 2, "longpoll": 0}
        assert body["subscribers_total"] == 3
        listed = requests.get(f"{gw.url}/channels", timeout=10).json()
        entry = next(c for c in listed["channels"] if c["channel"] == channel)
        assert entry["subscribers"] == {"sse": 1, "ws": 2, "longpoll": 0}
        assert listed["count"] >= 1 and listed["truncated"] is False
        for w in ws:
            w.close()
        wait_for(lambda: info(gw, channel)["subscribers"]["ws"] == 0, "the WebSocket subscribers to be gone")
    finally:
        sse.close()
        for w in ws:
            w.close()


def test_sse_subscriber_is_released_on_close(start_gateway: Callable[..., Gateway], channel: str) -> None:
    gw = start_gateway({"sse": {"heartbeat_s": 0.3}})
    with SSEClient(f"{gw.url}/sse/{channel}") as sse:
        gw.publish(channel, "hello")
        assert sse.events(1)[0]["data"] == "hello"
        assert info(gw, channel)["subscribers"]["sse"] == 1
    wait_for(lambda: info(gw, channel)["subscribers"]["sse"] == 0, "the SSE subscriber to be gone", timeout=10)
    assert info(gw, channel)["subscribers_total"] == 0


def test_bad_requests_get_the_json_error_shape(start_gateway: Callable[..., Gateway]) -> None:
    gw = start_gateway({})
    for path in ("/channels/bad name", "/channels/", "/channels/a,b", "/channels?limit=0", "/channels?limit=x"):
        r = requests.get(gw.url + path, timeout=10)
        assert r.status_code == 400, (path, r.text)
        assert set(r.json()) == {"error", "detail"}


def test_with_redis_any_process_sees_the_channel(
    start_gateway: Callable[..., Gateway],
    redis_server: RedisServer,  # noqa: F811
    channel: str,
) -> None:
    config = {"redis": {"url": redis_server.url}, "history": {"size": 4}}
    a = start_gateway(config)
    b = start_gateway(config)
    datas = ["one", "two", "three", "four", "five"]
    ids = [a.publish(channel, d) for d in datas]
    for gw in (a, b):
        body = info(gw, channel)
        assert body["last_id"] == ids[-1]
        assert body["history"]["count"] == 4
        assert body["history"]["bytes"] == sum(len(d) for d in datas[-4:])
        assert body["history"]["oldest_id"] == ids[1]
    listed = requests.get(f"{b.url}/channels", timeout=10).json()
    assert channel in [c["channel"] for c in listed["channels"]]

    assert redis_up(b) == 1
    redis_server.stop()  # an outage: a clear 503, never a traceback; /metrics says Redis is down
    try:
        r = requests.get(f"{b.url}/channels/{channel}", timeout=30)
        assert r.status_code == 503, r.text
        assert set(r.json()) == {"error", "detail"}
        wait_for(lambda: redis_up(b) == 0, "gateway_redis_up to be 0")
    finally:
        redis_server.start()
    wait_for(lambda: redis_up(b) == 1, "gateway_redis_up to be 1 again")
    assert "Traceback" not in a.log() + b.log()


@pytest.mark.parametrize("limit", [1])
def test_channel_list_is_bounded(start_gateway: Callable[..., Gateway], limit: int) -> None:
    gw = start_gateway({})
    for name in ("list.a", "list.b", "list.c"):
        gw.publish(name, "x")
    listed = requests.get(f"{gw.url}/channels", params={"limit": limit}, timeout=10).json()
    assert len(listed["channels"]) == limit
    assert listed["count"] == 3 and listed["truncated"] is True
