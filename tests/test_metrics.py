"""/metrics on a real gateway: it parses with prometheus_client's parser, its counters move by
exactly what the test did, it needs the operator token when one is set, and the access log
redacts tokens."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.clients import SSEClient, WSClient
from tests.helpers import Gateway
from tests.redis_server import RedisServer, redis_server  # noqa: F401  (a fixture)

OPERATOR = "operator-secret-1234"
# Heartbeats and pings far apart: a subscriber busy with one takes the next event from history,
# which the fast path's exact count does not see (see docs/operations.md).
QUIET = {"sse": {"heartbeat_s": 60.0}, "websocket": {"ping_s": 60.0}}


def scrape(gw: Gateway, **kwargs: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    r = requests.get(gw.url + "/metrics", timeout=10, **kwargs)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def gw(start_gateway: Callable[..., Gateway]) -> Gateway:
    return start_gateway(QUIET)


def test_metrics_parse_and_name_the_contracts_families(gw: Gateway) -> None:
    r = requests.get(gw.url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["Cache-Control"] == "no-store"
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert families["gateway_connections"].type == "gauge"
    assert {s.labels["transport"] for s in families["gateway_connections"].samples} == {"poll", "longpoll", "sse", "ws"}
    assert families["gateway_events_published"].type == "counter"
    assert families["gateway_events_delivered"].type == "counter"
    assert families["gateway_delivery_latency_seconds"].type == "histogram"
    # The library's process collector: CPU, memory, open files.
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds"):
        assert name in families, name
    # OpenMetrics when the scraper asks for it.
    om = requests.get(gw.url + "/metrics", headers={"Accept": "application/openmetrics-text"}, timeout=10)
    assert om.headers["Content-Type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")


def _received(clients: list[Any], n: int) -> list[list[str]]:
    """The ids the next n events carry, per client (SSE or WebSocket)."""
    out = []
    for client in clients:
        if isinstance(client, SSEClient):
            out.append([e["id"] for e in client.events(n, deadline_s=15)])
        else:
            out.append([f["id"] for f in client.events(n)])
    return out


def test_published_and_delivered_move_by_exactly_what_was_sent(gw: Gateway, channel: str) -> None:
    k, n = 3, 12
    sse = [SSEClient(f"{gw.url}/sse/{channel}") for _ in range(k)]
    ws = [WSClient(f"{gw.ws_url}/ws/{channel}") for _ in range(k)]
    clients: list[Any] = [*sse, *ws]
    try:
        # A first event that every subscriber receives: from then on each is attached to the
        # fast path and idle, so the next events are counted there.
        warm = gw.publish(channel, "warm-up")
        assert _received(clients, 1) == [[warm]] * (2 * k)
        before = scrape(gw)
        ids = []
        for i in range(n):  # one at a time, each read by everyone before the next
            ids.append(gw.publish(channel, f"event {i}"))
            assert _received(clients, 1) == [[ids[-1]]] * (2 * k)

        def delivered() -> dict:
            now = scrape(gw)
            moved = {t: value(now, "gateway_events_delivered_total", transport=t) for t in ("sse", "ws")}
            base = {t: value(before, "gateway_events_delivered_total", transport=t) for t in ("sse", "ws")}
            return {t: moved[t] - base[t] for t in moved}

        wait_for(lambda: delivered() == {"sse": n * k, "ws": n * k}, f"{n * k} deliveries per transport")
        time.sleep(0.5)
        after = scrape(gw)
        assert delivered() == {"sse": n * k, "ws": n * k}  # and not more
        published = value(after, "gateway_events_published_total") - value(before, "gateway_events_published_total")
        assert published == n
        for t in ("sse", "ws"):
            wrote = value(after, "gateway_bytes_written_total", transport=t)
            assert wrote - value(before, "gateway_bytes_written_total", transport=t) >= n * k * len("event 0")
        count = "gateway_delivery_latency_seconds_count"
        assert value(after, count) > value(before, count)
        assert value(after, "gateway_delivery_latency_seconds_bucket", le="+Inf") == value(after, count)
    finally:
        for client in clients:
            client.close()


def test_operator_token_guards_metrics_and_channels(start_gateway: Callable[..., Gateway], channel: str) -> None:
    gw = start_gateway({"server": {"operator_token": OPERATOR}})
    for path in ("/metrics", "/channels", f"/channels/{channel}"):
        for headers, params in (({}, {}), ({"Authorization": "Bearer wrong"}, {}), ({}, {"token": "wrong"})):
            r = requests.get(gw.url + path, headers=headers, params=params, timeout=10)
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"] == "unauthorized"
            assert OPERATOR not in r.text
        r = requests.get(gw.url + path, headers={"Authorization": f"Bearer {OPERATOR}"}, timeout=10)
        assert r.status_code == 200, (path, r.text)
        r = requests.get(gw.url + path, params={"token": OPERATOR}, timeout=10)
        assert r.status_code == 200, (path, r.text)
    assert scrape(gw, params={"token": OPERATOR})  # and it parses


def test_json_access_log_redacts_the_token(start_gateway: Callable[..., Gateway], channel: str) -> None:
    # Frequent heartbeats: the server notices at once that the SSE client left, and logs it.
    server = {"operator_token": OPERATOR, "log_format": "json", "access_log": True}
    gw = start_gateway({"server": server, "sse": {"heartbeat_s": 0.2}})
    assert requests.get(f"{gw.url}/metrics?x=1&token={OPERATOR}", timeout=10).status_code == 200
    with SSEClient(f"{gw.url}/sse/{channel}?token=not-a-real-token-but-secret") as client:
        gw.publish(channel, "one")
        assert len(client.events(1)) == 1

    def lines() -> list[dict[str, Any]]:
        out = []
        for line in gw.log().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    wait_for(lambda: any(line.get("path", "").startswith("/sse/") for line in lines()), "the SSE access line")
    text = gw.log()
    assert OPERATOR not in text and "not-a-real-token-but-secret" not in text
    access = [line for line in lines() if line.get("logger") == "gateway.access"]
    metrics_line = next(line for line in access if line["path"].startswith("/metrics"))
    assert metrics_line["path"] == "/metrics?x=1&token=[redacted]"
    assert metrics_line["status"] == 200 and metrics_line["method"] == "GET"
    assert isinstance(metrics_line["duration_s"], float)


def test_workers_sharing_a_metrics_dir_are_summed(
    start_gateway: Callable[..., Gateway],
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
    channel: str,
) -> None:
    """Two processes on one Redis and one server.metrics_dir: /metrics on either covers both."""
    shared = {"redis": {"url": redis_server.url}, "server": {"metrics_dir": str(tmp_path / "metrics")}, **QUIET}
    a = start_gateway(shared)
    b = start_gateway(shared)

    def workers(gw: Gateway) -> float:
        return value(scrape(gw), "gateway_workers")

    wait_for(lambda: workers(a) == 2 and workers(b) == 2, "both snapshots")
    before = value(scrape(a), "gateway_events_published_total")
    for i in range(3):
        a.publish(channel, f"a{i}")
    for i in range(2):
        b.publish(channel, f"b{i}")
    # Each scrape writes its own process's snapshot fresh; the other's is at most a few s old.
    wait_for(lambda: value(scrape(a), "gateway_events_published_total") - before == 5, "5 publishes on a")
    wait_for(lambda: value(scrape(b), "gateway_events_published_total") - before == 5, "5 publishes on b")
    samples = scrape(a)
    pids = {dict(labels).get("pid") for (name, labels) in samples if name == "process_open_fds"}
    assert pids == {str(a.proc.pid), str(b.proc.pid)}
    assert value(samples, "gateway_redis_up") == 1
    b.stop()
    wait_for(lambda: workers(a) == 1, "the stopped worker to drop out")
