"""Sources under faults: an upstream that is down at start-up, killed mid-stream, answers 500 or
HTML, sends malformed SSE or a 10 MB event, or trickles; lazy mode; headers from the env."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from tests.clients import SSEClient, WSClient, poll
from tests.helpers import Gateway
from tests.upstreams import Upstream, wait_for

FAST = {"backoff_initial_s": 0.05, "backoff_max_s": 0.3}


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.stop()


def status(gw: Gateway) -> dict[str, dict[str, Any]]:
    return {s["channel"]: s for s in requests.get(gw.url + "/status", timeout=5).json()["sources"]}


def datas(gw: Gateway, channel: str, since: str = "0-0") -> list[str]:
    events = poll(gw.url, channel, since)["events"]
    return [e["data"] if channel == "s" else json.loads(e["data"])["data"] for e in events]


def all_kinds(up: Upstream, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"kind": "sse", "url": up.url + "/events", "channel": "s", **FAST, **extra},
        {
            "kind": "poll",
            "url": up.url + "/items",
            "channel": "p",
            "interval": 0.1,
            "items": True,
            "id_field": "id",
            **FAST,
            **extra,
        },
        {"kind": "websocket", "url": up.url + "/ws", "channel": "w", "id_field": "id", **FAST, **extra},
    ]


def test_upstream_down_at_start_is_retried_then_bridged(
    start_gateway: Callable[..., Gateway], upstream: Upstream
) -> None:
    upstream.kill()
    gw = start_gateway({"sources": all_kinds(upstream)})
    down = wait_for(lambda: (s := status(gw)) and all(x["reconnects"] >= 2 for x in s.values()) and s)
    for s in down.values():
        assert s["state"] in ("error", "connecting")
        assert s["last_error"]  # e.g. ConnectionError: ... Connection refused
    upstream.restart()
    upstream.emit("after the outage")
    for channel in "spw":
        wait_for(lambda c=channel: datas(gw, c) == ["after the outage"])
    assert all(s["state"] == "connected" for s in status(gw).values())
    assert "retrying in" in gw.log()


def _replaying_upstream_relayed_two(start: Callable[..., Gateway], upstream: Upstream, channels: str) -> Gateway:
    """A gateway relaying `upstream` (which replays everything on a reconnect, ignoring
    Last-Event-ID) once "one" and "two" have reached each of `channels`."""
    upstream.honour_last_event_id = False
    gw = start({"sources": all_kinds(upstream)})
    upstream.emit("one")
    upstream.emit("two")
    for channel in channels:
        wait_for(lambda c=channel: datas(gw, c) == ["one", "two"])
    return gw


def test_an_upstream_that_restarted_afresh_reuses_ids_for_news(
    start_gateway: Callable[..., Gateway], upstream: Upstream
) -> None:
    # It lost its history: its ids start again at 1, for new events. An id alone would make
    # them look like a replay; with their data they are news and must be relayed.
    gw = _replaying_upstream_relayed_two(start_gateway, upstream, "sw")
    upstream.kill()
    upstream.events.clear()
    upstream.restart()
    upstream.emit("fresh one")
    upstream.emit("fresh two")
    for channel in "sw":
        wait_for(lambda c=channel: len(datas(gw, c)) >= 4)
        assert datas(gw, channel) == ["one", "two", "fresh one", "fresh two"], channel


def test_upstream_killed_mid_stream_no_duplicate_no_loss(
    start_gateway: Callable[..., Gateway], upstream: Upstream
) -> None:
    gw = _replaying_upstream_relayed_two(start_gateway, upstream, "spw")  # the gateway must de-dup
    upstream.kill()
    upstream.emit("three")  # while it is down; it replays this after restarting
    wait_for(lambda: all(s["state"] == "error" for s in status(gw).values()))
    upstream.restart()
    upstream.emit("four")
    for channel in "spw":
        wait_for(lambda c=channel: len(datas(gw, c)) >= 4)
    for channel in "spw":
        assert datas(gw, channel) == ["one", "two", "three", "four"], channel
    by_channel = status(gw)
    assert by_channel["s"]["duplicates"] == 2 and by_channel["w"]["duplicates"] == 2
    # The SSE source asked to resume after the last event it had relayed.
    resumed = [r["headers"].get("Last-Event-Id") for r in upstream.seen("/events")]
    assert resumed[0] is None and "2" in resumed[1:]


def test_500_and_html_mean_error_and_backoff_then_recovery(
    start_gateway: Callable[..., Gateway], upstream: Upstream
) -> None:
    upstream.sse_mode = "500"
    gw = start_gateway({"sources": all_kinds(upstream)[:1]})
    s = wait_for(lambda: (x := status(gw)["s"])["reconnects"] >= 2 and x)
    assert s["state"] == "error" and "HTTP 500" in s["last_error"]
    upstream.sse_mode = "html"
    wait_for(lambda: "text/html" in status(gw)["s"]["last_error"])
    upstream.sse_mode = "ok"
    upstream.emit("fine again")
    wait_for(lambda: datas(gw, "s") == ["fine again"])
    assert status(gw)["s"]["state"] == "connected"
    assert "Traceback" not in gw.log()


def test_malformed_sse_is_survived(start_gateway: Callable[..., Gateway], upstream: Upstream) -> None:
    upstream.sse_mode = "malformed"
    upstream.emit("good")
    gw = start_gateway({"sources": all_kinds(upstream)[:1]})
    # The junk yields one empty-data event (a bare "data" line is a valid field); then the real one.
    wait_for(lambda: datas(gw, "s")[-1:] == ["good"])
    assert datas(gw, "s") == ["", "good"]
    s = status(gw)["s"]
    assert s["state"] == "connected" and s["reconnects"] == 0
    assert "Traceback" not in gw.log()


def test_ten_megabyte_event_is_dropped_and_counted(start_gateway: Callable[..., Gateway], upstream: Upstream) -> None:
    upstream.sse_mode = "huge"
    gw = start_gateway({"sources": all_kinds(upstream)[:1]})
    upstream.emit("small one after")
    wait_for(lambda: datas(gw, "s") == ["small one after"])
    s = status(gw)["s"]
    assert s["dropped"] == 1 and s["state"] == "connected" and s["reconnects"] == 0
    assert "dropped an event over max_event_bytes" in gw.log()


def test_trickling_upstreams(start_gateway: Callable[..., Gateway], upstream: Upstream) -> None:
    """SSE one byte at a time is reassembled; a poll body that trickles past timeout_s is an error."""
    upstream.sse_mode = "trickle"
    slow_poll = Upstream()
    slow_poll.poll_mode = "trickle"
    slow_poll.emit("x")
    try:
        gw = start_gateway(
            {
                "sources": [
                    all_kinds(upstream)[0],
                    {"kind": "poll", "url": slow_poll.url + "/items", "channel": "p", "timeout_s": 1.0, **FAST},
                ]
            }
        )
        upstream.emit("multi\nline")
        wait_for(lambda: datas(gw, "s") == ["multi\nline"], timeout=10)
        p = wait_for(lambda: (x := status(gw)["p"])["last_error"] and x)
        assert "timeout_s" in p["last_error"] and p["events_relayed"] == 0
    finally:
        slow_poll.stop()


def test_lazy_source_connects_only_while_someone_listens(
    start_gateway: Callable[..., Gateway], upstream: Upstream
) -> None:
    # A short heartbeat: the gateway notices a departed SSE client when a write to it fails.
    gw = start_gateway({"sources": all_kinds(upstream, mode="lazy", lazy_grace_s=0.3)[:1], "sse": {"heartbeat_s": 0.2}})
    assert status(gw)["s"]["state"] == "idle"
    assert upstream.seen("/events") == []
    with SSEClient(f"{gw.url}/sse/s") as client:
        wait_for(lambda: status(gw)["s"]["state"] == "connected")
        upstream.emit("while listening")
        assert [e["data"] for e in client.events(1)] == ["while listening"]
    wait_for(lambda: status(gw)["s"]["state"] == "idle", timeout=5)
    assert len(upstream.seen("/events")) == 1


def test_headers_expand_environment_variables(start_gateway: Callable[..., Gateway], upstream: Upstream) -> None:
    source = {**all_kinds(upstream)[0], "headers": {"Authorization": "Bearer ${UP_TOKEN}", "X-Plain": "v"}}
    gw = start_gateway({"sources": [source]}, env={"UP_TOKEN": "sekrit"})
    wait_for(lambda: upstream.seen("/events"))
    headers = upstream.seen("/events")[0]["headers"]
    assert headers["Authorization"] == "Bearer sekrit" and headers["X-Plain"] == "v"
    assert "sekrit" not in requests.get(gw.url + "/status", timeout=5).text


def test_missing_header_variable_stops_start_up(start_gateway: Callable[..., Gateway], upstream: Upstream) -> None:
    source = {**all_kinds(upstream)[0], "headers": {"Authorization": "Bearer ${NO_SUCH_VAR_XYZ}"}}
    with pytest.raises(RuntimeError) as info:
        start_gateway({"sources": [source]})
    assert "sources[0].headers.Authorization: environment variable NO_SUCH_VAR_XYZ is not set" in str(info.value)


def test_forwarding_to_a_down_websocket_upstream_is_an_error_frame(
    start_gateway: Callable[..., Gateway], upstream: Upstream
) -> None:
    source = {**all_kinds(upstream)[2], "forward_client_messages": True}
    gw = start_gateway({"sources": [source]})
    wait_for(lambda: status(gw)["w"]["state"] == "connected")
    upstream.kill()
    wait_for(lambda: status(gw)["w"]["state"] == "error")
    with WSClient(f"{gw.ws_url}/ws/w") as client:
        client.send("anyone there?")
        frame = client.next_frame()
    assert frame["event"] == "error" and frame["error"] == "upstream_unavailable"
    upstream.restart()
    wait_for(lambda: status(gw)["w"]["state"] == "connected")
    with WSClient(f"{gw.ws_url}/ws/w") as client:
        client.send("back again")
        wait_for(lambda: "back again" in upstream.received)


def test_sse_retry_hint_is_honoured_after_a_clean_close(
    start_gateway: Callable[..., Gateway], upstream: Upstream
) -> None:
    upstream.retry_ms = 900
    gw = start_gateway({"sources": all_kinds(upstream)[:1]})
    wait_for(lambda: status(gw)["s"]["state"] == "connected")
    upstream.kill()  # ends the open stream cleanly (EOF)...
    upstream.restart()  # ...and is back at once: the source must still wait the upstream's retry:
    wait_for(lambda: len(upstream.seen("/events")) == 2)
    first, second = upstream.seen("/events")
    assert 0.8 < second["time"] - first["time"] < 3.0
    assert status(gw)["s"]["reconnects"] == 1


def test_shutdown_with_connected_sources_is_prompt(start_gateway: Callable[..., Gateway], upstream: Upstream) -> None:
    gw = start_gateway({"sources": all_kinds(upstream)})
    wait_for(lambda: all(s["state"] == "connected" for s in status(gw).values()))
    started = time.monotonic()
    assert gw.stop() == 0
    assert time.monotonic() - started < 5


def test_poll_whole_body_publishes_only_on_change(start_gateway: Callable[..., Gateway], upstream: Upstream) -> None:
    upstream.emit("a")
    source = {
        "kind": "poll",
        "url": upstream.url + "/items",
        "channel": "body",
        "interval": 0.05,
        "event": "doc",
        **FAST,
    }
    gw = start_gateway({"sources": [source]})
    wait_for(lambda: len(upstream.seen("/items")) >= 6)  # many polls of an unchanged body...
    first = poll(gw.url, "body", "0-0")["events"]
    assert [(e["event"], json.loads(e["data"])[-1]["data"]) for e in first] == [("doc", "a")]  # ...one event
    assert any(r["headers"].get("If-None-Match") for r in upstream.seen("/items"))  # answered with 304s
    upstream.emit("b")
    wait_for(lambda: len(poll(gw.url, "body", "0-0")["events"]) == 2)
    upstream.poll_mode = "500"
    p = wait_for(lambda: (x := status(gw)["body"])["state"] == "error" and x)
    assert "HTTP 500" in p["last_error"]
    upstream.poll_mode = "ok"
    wait_for(lambda: status(gw)["body"]["state"] == "connected")
    assert len(poll(gw.url, "body", "0-0")["events"]) == 2  # recovery re-published nothing
