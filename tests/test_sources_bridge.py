"""The bridging matrix: one upstream of each kind (SSE, poll, WebSocket) feeds a channel, and
every client transport (short poll, long poll, SSE, WebSocket) gets its events in order, with
resume. One gateway and one fake upstream serve all twelve cases."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.clients import SSEClient, WSClient, longpoll, poll
from tests.helpers import Gateway
from tests.upstreams import Upstream, wait_for

KINDS = {"s": "sse", "p": "poll", "w": "websocket"}


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Upstream]]:
    up = Upstream()
    fast = {"backoff_initial_s": 0.05, "backoff_max_s": 0.5}
    gw = Gateway(
        {
            "sources": [
                {"kind": "sse", "url": up.url + "/events", "channel": "s", **fast},
                {
                    "kind": "poll",
                    "url": up.url + "/items",
                    "channel": "p",
                    "interval": 0.1,
                    "items": True,
                    "id_field": "id",
                    **fast,
                },
                {
                    "kind": "websocket",
                    "url": up.url.replace("http", "ws") + "/ws",
                    "channel": "w",
                    "forward_client_messages": True,
                    **fast,
                },
            ],
            "sse": {"heartbeat_s": 0.5},
        },
        tmp_path_factory.mktemp("bridge"),
    )
    try:
        yield gw, up
    finally:
        gw.stop()
        up.stop()


def status(gw: Gateway) -> dict[str, dict[str, Any]]:
    r = requests.get(gw.url + "/status", timeout=5)
    assert r.status_code == 200
    return {s["channel"]: s for s in r.json()["sources"]}


def settle(gw: Gateway, up: Upstream) -> None:
    """Every source has relayed everything the upstream has: no stragglers from earlier cases."""
    wait_for(lambda: all(s["events_relayed"] == len(up.events) for s in status(gw).values()))


def payload(channel: str, event: dict[str, Any]) -> str:
    """The upstream's data for each kind: SSE keeps data; poll items and WS frames are JSON."""
    return event["data"] if channel == "s" else json.loads(event["data"])["data"]


def read(gw: Gateway, transport: str, channel: str, since: str, n: int) -> list[dict[str, Any]]:
    if transport in ("poll", "longpoll"):
        out: list[dict[str, Any]] = []
        cursor = since
        for _ in range(50):
            page = poll(gw.url, channel, cursor) if transport == "poll" else longpoll(gw.url, channel, cursor, 2)
            assert page["gap"] is False
            out += page["events"]
            cursor = page["cursor"]
            if len(out) >= n:
                return out
            if transport == "poll":
                time.sleep(0.05)
        raise AssertionError(f"only {len(out)} of {n} events arrived")
    if transport == "sse":
        with SSEClient(f"{gw.url}/sse/{channel}", headers={"Last-Event-ID": since}) as client:
            return client.events(n, deadline_s=10)
    with WSClient(f"{gw.ws_url}/ws/{channel}?since={since}") as client:
        return client.events(n)


@pytest.mark.parametrize("transport", ["poll", "longpoll", "sse", "ws"])
@pytest.mark.parametrize("channel", list(KINDS))
def test_every_upstream_kind_reaches_every_transport_in_order_with_resume(
    bridge: tuple[Gateway, Upstream], channel: str, transport: str
) -> None:
    gw, up = bridge
    settle(gw, up)
    start = gw.cursor(channel)
    tag = f"{channel}-{transport}"
    for i in range(3):
        up.emit(f"{tag}-{i}\nline two" if i == 1 else f"{tag}-{i}")
    first = read(gw, transport, channel, start, 3)
    assert [payload(channel, e) for e in first] == [f"{tag}-0", f"{tag}-1\nline two", f"{tag}-2"]
    assert all(e["event"] == "message" for e in first)
    # Resume from the second event: exactly the third, then a new one, nothing repeated.
    up.emit(f"{tag}-3")
    again = read(gw, transport, channel, first[1]["id"], 2)
    assert [payload(channel, e) for e in again] == [f"{tag}-2", f"{tag}-3"]
    assert again[0]["id"] == first[2]["id"]


def test_status_lists_each_source(bridge: tuple[Gateway, Upstream]) -> None:
    gw, up = bridge
    settle(gw, up)
    by_channel = status(gw)
    assert {c: s["kind"] for c, s in by_channel.items()} == KINDS
    for s in by_channel.values():
        assert s["state"] == "connected"
        assert s["last_error"] == ""
        assert s["dropped"] == 0
        assert s["url"].startswith("http://127.0.0.1:") or s["url"].startswith("ws://127.0.0.1:")
        if up.events:
            assert isinstance(s["last_event_time"], float)


def test_upstream_event_names_are_kept(bridge: tuple[Gateway, Upstream]) -> None:
    gw, up = bridge
    settle(gw, up)
    start = gw.cursor("s")
    up.emit("named", event="price")
    up.emit("reserved", event="gap")  # the gateway's own signal name: renamed, not lost
    events = read(gw, "poll", "s", start, 2)
    assert [(e["event"], e["data"]) for e in events] == [("price", "named"), ("upstream.gap", "reserved")]


def test_websocket_clients_talk_to_the_upstream(bridge: tuple[Gateway, Upstream]) -> None:
    gw, up = bridge
    with WSClient(f"{gw.ws_url}/ws/w") as client:
        client.send("hello upstream")
        wait_for(lambda: "hello upstream" in up.received)
