"""/metrics on a real gateway: it parses with prometheus_client's parser, its counters move by
exactly what the test did, it needs the operator token when one is set, and the access log
redacts tokens."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.clients import SSEClient, WSClient, longpoll
from tests.helpers import Gateway, free_port, wait_for
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


def test_polls_count_the_events_they_answer_with(gw: Gateway, channel: str) -> None:
    """Short and long polls, on the lean keep-alive path and through Flask (an Origin), one
    channel and several: each answer's events and bytes are counted as delivered."""
    other = channel + "-b"
    first = [gw.publish(channel, f"event {i}") for i in range(3)]
    gw.publish(other, "on the other channel")
    before = scrape(gw)
    answers = [
        requests.get(f"{gw.url}/poll/{channel}", params={"since": "0-0"}, timeout=10),
        requests.get(f"{gw.url}/longpoll/{channel}", params={"since": first[0]}, timeout=10),
        requests.get(
            f"{gw.url}/longpoll/{channel}", params={"since": first[1]}, headers={"Origin": gw.url}, timeout=10
        ),
        requests.get(f"{gw.url}/poll/{channel},{other}", timeout=10),  # no cursor: no events, counted as 0
    ]
    for r in answers:
        assert r.status_code == 200, r.text
    assert [len(r.json()["events"]) for r in answers] == [3, 2, 1, 0]
    held = {"since": answers[3].json()["cursor"], "timeout": "0.5"}
    multi = requests.get(f"{gw.url}/longpoll/{channel},{other}", params=held, timeout=10)
    assert multi.status_code == 200 and multi.json()["events"] == []  # held, then timed out empty
    with requests.Session() as keep_alive:  # the lean loop's second request on one connection
        for since in (first[0], first[1]):
            r = keep_alive.get(f"{gw.url}/longpoll/{channel}", params={"since": since}, timeout=10)
            assert r.status_code == 200
    after = scrape(gw)

    def moved(name: str, transport: str) -> float:
        return value(after, name, transport=transport) - value(before, name, transport=transport)

    assert moved("gateway_events_delivered_total", "poll") == 3
    assert moved("gateway_events_delivered_total", "longpoll") == 2 + 1 + 2 + 1
    assert moved("gateway_bytes_written_total", "poll") == len(answers[0].content) + len(answers[3].content)
    assert moved("gateway_bytes_written_total", "longpoll") >= len(answers[1].content) + len(answers[2].content)


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
    assert metrics_line["path"] == "/metrics?x=1&token=***"
    assert metrics_line["status"] == 200 and metrics_line["method"] == "GET"
    assert isinstance(metrics_line["duration_s"], float)


def test_a_stream_is_logged_once_when_it_closes(start_gateway: Callable[..., Gateway], channel: str) -> None:
    # Streams are handed over to the event loop while idle (readwatch.park): their access line
    # is written when they close, with how long they lasted and what they sent, not at connect.
    gw = start_gateway({"server": {"log_format": "json", "access_log": True}, "sse": {"heartbeat_s": 0.2}})

    def access(prefix: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in gw.log().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("logger") == "gateway.access" and line["path"].startswith(prefix)]

    with SSEClient(f"{gw.url}/sse/{channel}") as sse, WSClient(f"{gw.ws_url}/ws/{channel}") as ws:
        gw.publish(channel, "one")
        assert len(sse.events(1)) == 1 and ws.next_frame()["data"] == "one"
        time.sleep(0.6)
        assert access("/sse/") == [] and access("/ws/") == []  # still open
    wait_for(lambda: access("/sse/") and access("/ws/"), "the streams' access lines")
    time.sleep(0.3)
    (sse_line,), (ws_line,) = access("/sse/"), access("/ws/")
    assert sse_line["status"] == 200 and ws_line["status"] == 101
    assert sse_line["duration_s"] >= 0.6 and ws_line["duration_s"] >= 0.6
    assert sse_line["length"] > len("retry: ") and ws_line["length"] >= len('"data":"one"')


def test_metrics_port_serves_on_loopback_only(start_gateway: Callable[..., Gateway], channel: str) -> None:
    port = free_port()
    gw = start_gateway({"server": {"metrics_port": port}})
    gw.publish(channel, "one")
    # The metrics listener is a service started just after the public port answers /healthz.
    deadline = time.monotonic() + 10
    while True:
        try:
            r = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
            break
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert families["gateway_events_published"].samples[0].value == 1
    public = requests.get(gw.url + "/metrics", timeout=10)  # no longer on the public port
    assert public.status_code == 404 and public.json()["error"] == "not_found"
    bound = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10)
    if bound.returncode == 0:  # ss (iproute2) is there: the listener is on loopback only
        local = [line.split()[3] for line in bound.stdout.splitlines()]
        assert local == [f"127.0.0.1:{port}"], bound.stdout


def test_metrics_port_config_errors() -> None:
    from gateway.config import ConfigError, from_mapping

    with pytest.raises(ConfigError, match="server.metrics_port: must differ"):
        from_mapping({"server": {"port": 5000, "metrics_port": 5000}})
    with pytest.raises(ConfigError, match="server.metrics_port: 70000 is out of range"):
        from_mapping({"server": {"metrics_port": 70000}})


def test_server_workers_are_covered_by_one_scrape(
    start_gateway: Callable[..., Gateway],
    redis_server: RedisServer,  # noqa: F811
    channel: str,
) -> None:
    """server.workers = 2 (gateway/workers.py): /metrics, answered by either worker, counts both."""
    gw = start_gateway({"server": {"workers": 2}}, env={"REDIS_URL": redis_server.url})

    # Each scrape is a new connection (requests.get pools nothing): either worker may answer.
    wait_for(lambda: value(scrape(gw), "gateway_workers") == 2, "both workers in one scrape", timeout=60)
    before = value(scrape(gw), "gateway_events_published_total")
    for i in range(10):  # each on its own connection: the kernel spreads them over the workers
        gw.publish(channel, f"e{i}")
    for _ in range(8):  # whichever worker answers, the sum is the same
        wait_for(lambda: value(scrape(gw), "gateway_events_published_total") - before == 10, "10 publishes")
    pids = {dict(labels)["pid"] for (name, labels) in scrape(gw) if name == "process_open_fds"}
    assert len(pids) == 2 and str(gw.proc.pid) not in pids  # the two workers, not their parent


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
    # Each scrape asks the other process for a fresh snapshot: the sum is right at once.
    wait_for(lambda: value(scrape(a), "gateway_events_published_total") - before == 5, "5 publishes on a")
    wait_for(lambda: value(scrape(b), "gateway_events_published_total") - before == 5, "5 publishes on b")
    samples = scrape(a)
    pids = {dict(labels).get("pid") for (name, labels) in samples if name == "process_open_fds"}
    assert pids == {str(a.proc.pid), str(b.proc.pid)}
    assert value(samples, "gateway_redis_up") == 1
    b.stop()
    wait_for(lambda: workers(a) == 1, "the stopped worker to drop out")


def test_channel_subscribers_count_every_worker_at_once(
    start_gateway: Callable[..., Gateway],
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
    channel: str,
) -> None:
    """Several workers answer as one gateway: /channels/<name> on either process counts the
    subscribers of both, as they are now (the other is asked for a fresh snapshot)."""
    shared = {"redis": {"url": redis_server.url}, "server": {"metrics_dir": str(tmp_path / "metrics")}, **QUIET}
    a, b = start_gateway(shared), start_gateway(shared)
    wait_for(lambda: value(scrape(a), "gateway_workers") == 2, "both snapshots")

    def subscribers(gw: Gateway) -> dict[str, int]:
        r = requests.get(f"{gw.url}/channels/{channel}", timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["subscribers"]

    on_a = [SSEClient(f"{a.url}/sse/{channel}") for _ in range(2)]
    on_b = [SSEClient(f"{b.url}/sse/{channel}"), WSClient(f"{b.ws_url}/ws/{channel}")]
    try:
        assert requests.get(f"{b.url}/healthz", timeout=10).json()["subscribers"] == 2  # both streams are in
        assert subscribers(a) == {"sse": 3, "ws": 1, "longpoll": 0}
        assert subscribers(b) == {"sse": 3, "ws": 1, "longpoll": 0}
        listed = requests.get(f"{a.url}/channels", timeout=10).json()["channels"]
        assert next(c for c in listed if c["channel"] == channel)["subscribers"]["sse"] == 3
        for client in on_b:
            client.close()
        wait_for(lambda: requests.get(f"{b.url}/healthz", timeout=10).json()["subscribers"] == 0, "b's streams gone")
        assert subscribers(a) == {"sse": 2, "ws": 0, "longpoll": 0}
    finally:
        for client in [*on_a, *on_b]:
            client.close()


# -- the module's own logic, in process (fast) ---------------------------------------------------


def _parsed(metrics: Any) -> dict:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_observer_and_admission_hooks_reach_the_exposition() -> None:
    from gateway.hub import Event, Hub, MemoryStore
    from gateway.metrics import SAMPLE_EVERY, Metrics

    hub = Hub(MemoryStore(10, 60))
    metrics = Metrics(hub)
    hub.observer = metrics
    events = [hub.publish("m", f"e{i}") for i in range(3)]
    old = Event("1-0", "message", "x", (1, 0), "0-0", time.time() - 0.2)
    flushes = 2 * SAMPLE_EVERY + 1
    for i in range(flushes):
        metrics.delivered(("sse", "sse-chunked", "ws")[i % 3], 5, [old, *events[:1]], 100)
    metrics.connection_opened("sse")
    metrics.connection_opened("sse")
    metrics.connection_opened("longpoll")
    metrics.connection_closed("sse", "client_closed", 2.5, 10, 1000)
    metrics.polled("longpoll", 4, 400)
    metrics.caught_up("sse-chunked", 6, 600)
    metrics.refused(429, "too_many_connections")
    metrics.limit_hit("max_connections_per_client")
    metrics.slow_consumer_dropped("ws")
    metrics.publish_refused(413, "too_large")
    s = _parsed(metrics)
    assert value(s, "gateway_events_published_total") == 3
    by_kind = {"sse": 0, "ws": 0}
    for i in range(flushes):
        by_kind["ws" if i % 3 == 2 else "sse"] += 5 * 2
    assert value(s, "gateway_events_delivered_total", transport="sse") == by_kind["sse"] + 6
    assert value(s, "gateway_events_delivered_total", transport="ws") == by_kind["ws"]
    assert value(s, "gateway_events_delivered_total", transport="longpoll") == 4
    assert value(s, "gateway_bytes_written_total", transport="longpoll") == 400
    assert value(s, "gateway_delivery_latency_seconds_count") == 3  # flushes 1, 17 and 33
    assert value(s, "gateway_delivery_latency_seconds_bucket", le="0.1") == 0  # the oldest event: 0.2 s
    assert value(s, "gateway_delivery_latency_seconds_bucket", le="0.25") == 3
    assert value(s, "gateway_delivery_latency_seconds_sum") >= 0.6
    assert value(s, "gateway_connections", transport="sse") == 1
    assert value(s, "gateway_connections", transport="longpoll") == 1
    assert value(s, "gateway_longpolls_held") == 1
    assert value(s, "gateway_connections_opened_total", transport="sse") == 2
    assert value(s, "gateway_connections_closed_total", transport="sse", reason="client_closed") == 1
    assert value(s, "gateway_connection_duration_seconds_bucket", transport="sse", le="10.0") == 1
    assert value(s, "gateway_connection_duration_seconds_bucket", transport="sse", le="1.0") == 0
    assert value(s, "gateway_refusals_total", status="429", reason="too_many_connections") == 1
    assert value(s, "gateway_limit_hits_total", limit="max_connections_per_client") == 1
    assert value(s, "gateway_slow_consumer_drops_total", transport="ws") == 1
    assert value(s, "gateway_publish_refusals_total", status="413", reason="too_large") == 1
    assert ("gateway_redis_up", ()) not in s  # the memory store has no Redis to ping


def test_sources_and_a_stalled_redis_at_scrape_time() -> None:
    from gateway.hub import Hub, MemoryStore
    from gateway.metrics import REDIS_PING_TIMEOUT_S, Metrics

    class StalledStore(MemoryStore):
        def ping(self) -> bool:
            time.sleep(5)
            return True

    class FakeSource:  # the status() shape of gateway/sources/base.py
        def status(self) -> dict[str, Any]:
            return {"kind": "sse", "channel": "up.1", "state": "reconnecting", "reconnects": 7, "events_relayed": 3}

    metrics = Metrics(Hub(StalledStore(10, 60)), lambda: [FakeSource()])
    started = time.monotonic()
    s = _parsed(metrics)
    assert time.monotonic() - started < REDIS_PING_TIMEOUT_S + 2  # bounded, not the 5 s stall
    assert value(s, "gateway_redis_up") == 0
    labels = {"channel": "up.1", "kind": "sse"}
    assert value(s, "gateway_source_up", **labels) == 0
    assert value(s, "gateway_source_state", **labels, state="reconnecting") == 1
    assert value(s, "gateway_source_state", **labels, state="connected") == 0
    assert value(s, "gateway_source_reconnects_total", **labels) == 7
    assert value(s, "gateway_source_events_relayed_total", **labels) == 3


def test_connection_log_lines_name_the_subject_never_a_token(caplog: pytest.LogCaptureFixture) -> None:
    import io

    from gateway.connlog import AccessLog, ConnectionLog
    from gateway.redact import redact_text as redact

    stream = io.StringIO()
    ConnectionLog("json", stream).log_connection_end(
        transport="sse", channels=["a", "b"], client="203.0.113.9", duration_s=1.23456,
        events=4, nbytes=512, reason="client_closed", sub="user-42",
    )  # fmt: skip
    line = json.loads(stream.getvalue())
    assert line["msg"] == "connection_end" and line["logger"] == "gateway.connections"
    assert (line["transport"], line["channels"], line["client"]) == ("sse", ["a", "b"], "203.0.113.9")
    assert (line["duration_s"], line["events"], line["bytes"], line["reason"]) == (1.235, 4, 512, "client_closed")
    assert line["sub"] == "user-42"
    assert redact("GET /sse/a?since=1-0&token=abc.def.ghi HTTP/1.1") == "GET /sse/a?since=1-0&token=*** HTTP/1.1"
    assert redact("/ws/a?TOKEN=x&access_token=y") == "/ws/a?TOKEN=***&access_token=***"
    # The gateway decodes parameter names when it reads ?token=, so the log must too.
    assert redact("/sse/a?%74oken=x&tok%65n=y&since=1-0") == "/sse/a?%74oken=***&tok%65n=***&since=1-0"
    assert redact("/sse/a?since=1-0&x=token&%41=1") == "/sse/a?since=1-0&x=token&%41=1"
    access = io.StringIO()
    AccessLog("json", access).write(
        '127.0.0.1 - - [2026-12-02 04:12:41] "GET /metrics?token=s3cret HTTP/1.1" 200 1234 0.002000\n'
    )
    entry = json.loads(access.getvalue())
    assert entry["path"] == "/metrics?token=***" and "s3cret" not in access.getvalue()
    assert (entry["method"], entry["status"], entry["length"], entry["client"]) == ("GET", 200, 1234, "127.0.0.1")
    plain = ConnectionLog("text")
    with caplog.at_level(logging.INFO, logger="gateway.connections"):
        plain.log_connection_end(
            transport="ws", channels=["a"], client="::1", duration_s=2, events=0, nbytes=0, reason="token expired"
        )
    assert caplog.records[-1].getMessage() == (
        'connection_end transport=ws channels=a client=::1 duration_s=2 events=0 bytes=0 reason="token expired"'
    )
    text = io.StringIO()
    AccessLog("text", text).write('1.2.3.4 - - [t] "GET /sse/a?token=zz HTTP/1.1" 200 - 0.1\n')
    assert text.getvalue() == '1.2.3.4 - - [t] "GET /sse/a?token=*** HTTP/1.1" 200 - 0.1\n'


# -- counted by the admission path (gateway/admission.py) -----------------------------------------


def _token(sub: str, secret: str) -> str:
    import jwt

    return jwt.encode({"exp": int(time.time()) + 300, "channels": ["*"], "sub": sub}, secret, algorithm="HS256")


def _log_lines(gw: Gateway, msg: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in gw.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("msg") == msg]


def test_connection_gauges_follow_open_connections(start_gateway: Callable[..., Gateway], channel: str) -> None:
    gw = start_gateway({"sse": {"heartbeat_s": 0.3}, "websocket": {"ping_s": 60.0}})
    base = scrape(gw)
    sse = [SSEClient(f"{gw.url}/sse/{channel}") for _ in range(2)]
    ws = [WSClient(f"{gw.ws_url}/ws/{channel}") for _ in range(3)]
    held = threading.Thread(target=longpoll, args=(gw.url, channel), kwargs={"timeout": 20}, daemon=True)
    held.start()

    def open_now(transport: str) -> float:
        return value(scrape(gw), "gateway_connections", transport=transport)

    try:
        wait_for(lambda: open_now("sse") == 2 and open_now("ws") == 3, "2 SSE and 3 WebSocket connections")
        wait_for(lambda: open_now("longpoll") == 1, "the held long poll")
        assert value(scrape(gw), "gateway_longpolls_held") == 1
        # gateway_greenlets (counted at scrape time): the held long poll waits in a greenlet; the
        # five idle streams hold none (readwatch.park), so they cost a few objects each.
        greenlets = value(scrape(gw), "gateway_greenlets") - value(base, "gateway_greenlets")
        assert 1 <= greenlets < 6, greenlets
        gw.publish(channel, "release")  # answers the long poll
        held.join(15)
        wait_for(lambda: open_now("longpoll") == 0, "the long poll to be answered")
        for client in ws:
            client.close()
        wait_for(lambda: open_now("ws") == 0, "the WebSocket connections to be closed")
    finally:
        for client in [*sse, *ws]:
            client.close()
    now = scrape(gw)
    for transport, n in (("sse", 2), ("ws", 3), ("longpoll", 1)):
        opened = "gateway_connections_opened_total"
        assert value(now, opened, transport=transport) - value(base, opened, transport=transport) == n
    closed = "gateway_connections_closed_total"
    assert value(now, closed, transport="ws", reason="client_closed") == 3
    assert sum(v for (name, labels), v in now.items() if name == closed and ("transport", "longpoll") in labels) == 1
    duration = "gateway_connection_duration_seconds_count"
    assert value(now, duration, transport="ws") == 3
    # Every connection's greenlet ends with it (the SSE ones at their next heartbeat).
    wait_for(lambda: value(scrape(gw), "gateway_greenlets") <= value(base, "gateway_greenlets"), "greenlets to end")


def test_a_websocket_after_a_poll_on_one_connection_is_logged_as_101(start_gateway: Callable[..., Gateway]) -> None:
    gw = start_gateway({"server": {"log_format": "json", "access_log": True}})
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    try:
        sock.sendall(b"GET /poll/kept HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b'"cursor"' not in answer:
            answer += sock.recv(65536)
        handshake = (
            "GET /ws/kept HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        sock.sendall(handshake.encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 101")
    finally:
        sock.close()

    def ws_lines() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in gw.log().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("logger") == "gateway.access" and line["path"] == "/ws/kept"]

    wait_for(ws_lines, "the WebSocket's access line")
    assert [line["status"] for line in ws_lines()] == [101]


def test_a_websocket_whose_handshake_declares_a_body_reads_its_frames(start_gateway: Callable[..., Gateway]) -> None:
    # A handshake that declares a body it never sends: the stream takes the socket over, and
    # nothing waits for that body, which would hold a greenlet until the stall timeout and take
    # the client's first frames for "body".
    gw = start_gateway({"websocket": {"ping_s": 60.0}, "server": {"stall_timeout_s": 120.0}})
    with WSClient(f"{gw.ws_url}/ws/declared-body", header=["Content-Length: 5"]) as ws:
        ws.send(json.dumps({"action": "subscribe", "channel": "declared-other"}))
        assert ws.next_frame().get("event") != "error"  # the frame was read as a frame
        gw.publish("declared-other", "through")
        assert ws.next_frame()["data"] == "through"


def test_refusals_and_limit_hits_are_counted(start_gateway: Callable[..., Gateway], channel: str) -> None:
    gw = start_gateway({"limits": {"max_connections_per_client": 1}, "websocket": {"ping_s": 60.0}})
    with WSClient(f"{gw.ws_url}/ws/{channel}"):
        wait_for(lambda: value(scrape(gw), "gateway_connections", transport="ws") == 1, "the first connection")
        for _ in range(2):
            r = requests.get(f"{gw.url}/longpoll/{channel}", params={"timeout": 1}, timeout=10)
            assert r.status_code == 429, r.text
    r = requests.get(f"{gw.url}/sse/bad name", timeout=10)
    assert r.status_code == 400
    now = scrape(gw)
    assert value(now, "gateway_refusals_total", status="429", reason="too_many_connections_from_client") == 2
    assert value(now, "gateway_limit_hits_total", limit="max_connections_per_client") == 2
    assert value(now, "gateway_refusals_total", status="400", reason="invalid_channel") == 1


def test_json_connection_log_line_on_websocket_close(start_gateway: Callable[..., Gateway], channel: str) -> None:
    secret = "a-test-secret-that-is-long-enough"
    token = _token("tester", secret)
    gw = start_gateway({"server": {"log_format": "json"}, "auth": {"secret": secret}, "websocket": {"ping_s": 60.0}})
    with WSClient(f"{gw.ws_url}/ws/{channel}?token={token}") as client:
        gw.publish(channel, "hello")
        assert client.next_frame()["data"] == "hello"
    wait_for(lambda: bool(_log_lines(gw, "connection_end")), "the connection_end line")
    (line,) = _log_lines(gw, "connection_end")
    assert line["logger"] == "gateway.connections"
    assert line["transport"] == "ws" and line["channels"] == [channel]
    assert line["client"] == "127.0.0.1" and line["sub"] == "tester"
    assert line["reason"] == "client_closed" and line["duration_s"] >= 0
    assert isinstance(line["events"], int) and isinstance(line["bytes"], int)
    assert token not in gw.log()


def test_sse_close_is_counted_and_logged(start_gateway: Callable[..., Gateway], channel: str) -> None:
    secret = "a-test-secret-that-is-long-enough"
    token = _token("tester", secret)
    config = {"server": {"log_format": "json"}, "auth": {"secret": secret}, "sse": {"heartbeat_s": 0.3}}
    gw = start_gateway(config)
    with SSEClient(f"{gw.url}/sse/{channel}?token={token}") as client:
        gw.publish(channel, "hello")
        assert client.events(1)[0]["data"] == "hello"
        assert value(scrape(gw), "gateway_connections", transport="sse") == 1
    wait_for(lambda: bool(_log_lines(gw, "connection_end")), "the connection_end line", timeout=10)
    (line,) = _log_lines(gw, "connection_end")
    assert line["transport"] == "sse" and line["channels"] == [channel]
    assert line["client"] == "127.0.0.1" and line["sub"] == "tester"
    assert line["reason"] == "client_closed" and isinstance(line["events"], int)
    assert token not in gw.log()
    assert value(scrape(gw), "gateway_connections", transport="sse") == 0


def test_connection_log_counts_what_the_stream_sent(start_gateway: Callable[..., Gateway], channel: str) -> None:
    gw = start_gateway({"server": {"log_format": "json"}, "sse": {"heartbeat_s": 0.3}})
    with SSEClient(f"{gw.url}/sse/{channel}") as client:
        for i in range(3):
            gw.publish(channel, f"event {i}")
        assert len(client.events(3)) == 3
    wait_for(lambda: bool(_log_lines(gw, "connection_end")), "the connection_end line", timeout=10)
    (line,) = _log_lines(gw, "connection_end")
    assert line["events"] == 3 and line["bytes"] >= 3 * len("event 0")


def test_connection_log_can_be_turned_off(start_gateway: Callable[..., Gateway], channel: str) -> None:
    """server.connection_log = false: no connection_end lines (a long poller makes one per answer),
    while the metrics still count every connection and how it ended."""
    gw = start_gateway({"server": {"log_format": "json", "connection_log": False}, "sse": {"heartbeat_s": 0.3}})
    with SSEClient(f"{gw.url}/sse/{channel}") as client:
        gw.publish(channel, "one")
        assert client.events(1)[0]["data"] == "one"
    since = gw.publish(channel, "two")
    assert longpoll(gw.url, channel, since="0-0", timeout=5)["events"]
    wait = {"since": since, "timeout": 20}
    held = threading.Thread(target=longpoll, args=(gw.url, channel), kwargs=wait, daemon=True)
    held.start()
    wait_for(lambda: value(scrape(gw), "gateway_connections", transport="longpoll") == 1, "the held long poll")
    gw.publish(channel, "three")
    held.join(10)
    assert not held.is_alive()
    wait_for(lambda: value(scrape(gw), "gateway_connections", transport="sse") == 0, "the stream's end")
    now = scrape(gw)
    assert value(now, "gateway_connections_closed_total", transport="sse", reason="client_closed") == 1
    assert value(now, "gateway_connections_closed_total", transport="longpoll", reason="client_closed") == 2
    assert _log_lines(gw, "connection_end") == []


def test_slow_consumer_drops_are_counted(start_gateway: Callable[..., Gateway], channel: str) -> None:
    gw = start_gateway({"limits": {"slow_consumer_bytes": 65536}, "server": {"max_body_bytes": 65536}})
    stuck = socket.socket()  # a client with a tiny receive buffer that never reads
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", gw.port))
    stuck.sendall(f"GET /sse/{channel} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    try:
        wait_for(lambda: value(scrape(gw), "gateway_connections", transport="sse") == 1, "the stuck stream")
        for i in range(60):  # ~600 KB: far beyond its buffers and the limit
            gw.publish(channel, f"{i:04d}" + "x" * 10_000)
        wait_for(lambda: value(scrape(gw), "gateway_connections", transport="sse") == 0, "the stream to be cut")
    finally:
        stuck.close()
    now = scrape(gw)
    assert value(now, "gateway_slow_consumer_drops_total", transport="sse") == 1
    assert value(now, "gateway_limit_hits_total", limit="slow_consumer_bytes") == 1
    assert value(now, "gateway_connections_closed_total", transport="sse", reason="slow_consumer") == 1


def test_publish_refusals_are_counted(start_gateway: Callable[..., Gateway], channel: str) -> None:
    gw = start_gateway({"limits": {"publish_rate_per_token": 1.0}})  # a burst of 4, then 1 per second
    auth = {"Authorization": "Bearer test-token"}
    statuses = [
        requests.post(f"{gw.url}/publish/{channel}", data=b"x", headers=auth, timeout=10).status_code for _ in range(12)
    ]
    assert statuses[:4] == [202] * 4 and 429 in statuses
    json_type = {**auth, "Content-Type": "application/json"}
    bad = requests.post(f"{gw.url}/publish/{channel}", data=b"{", headers=json_type, timeout=10)
    assert bad.status_code in (400, 429)
    evil = {**auth, "Origin": "http://evil.example"}  # through Flask (CORS), not the fast path
    assert requests.post(f"{gw.url}/publish/{channel}", data=b"x", headers=evil, timeout=10).status_code == 403
    now = scrape(gw)
    refused = "gateway_publish_refusals_total"
    assert value(now, refused, status="403", reason="origin_not_allowed") == 1
    too_fast = statuses.count(429) + (bad.status_code == 429)
    assert value(now, refused, status="429", reason="publishing_too_fast") == too_fast
    assert value(now, "gateway_limit_hits_total", limit="publish_rate_per_token") == too_fast
    assert value(now, refused, status="400", reason="invalid_json") == (bad.status_code == 400)
    assert value(now, "gateway_events_published_total") == statuses.count(202)


def test_upstream_source_state_and_reconnects(start_gateway: Callable[..., Gateway]) -> None:
    from tests.upstreams import Upstream

    up = Upstream()
    try:
        source = {"kind": "sse", "url": up.url + "/events", "channel": "up.s"}
        gw = start_gateway({"sources": [{**source, "backoff_initial_s": 0.05, "backoff_max_s": 0.2}]})
        labels = {"channel": "up.s", "kind": "sse"}
        wait_for(lambda: value(scrape(gw), "gateway_source_up", **labels) == 1, "the source to connect")
        up.emit("one")
        wait_for(lambda: value(scrape(gw), "gateway_source_events_relayed_total", **labels) == 1, "one relayed")
        before = value(scrape(gw), "gateway_source_reconnects_total", **labels)
        up.kill()
        wait_for(lambda: value(scrape(gw), "gateway_source_up", **labels) == 0, "the source to be down")
        up.restart()
        wait_for(lambda: value(scrape(gw), "gateway_source_up", **labels) == 1, "the source to reconnect")
        now = scrape(gw)
        assert value(now, "gateway_source_reconnects_total", **labels) > before
        assert value(now, "gateway_source_state", **labels, state="connected") == 1
    finally:
        up.stop()


def test_snapshot_dir_drops_dead_and_stale_workers(tmp_path: Path) -> None:
    import os

    from gateway.metricsdir import STALE_AFTER_S, SnapshotDir, alive

    snaps = SnapshotDir(tmp_path)
    snaps.write({"pid": os.getpid(), "time": time.time(), "sum": [], "max": []})
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    (tmp_path / f"{dead.pid}.json").write_text(json.dumps({"pid": dead.pid, "time": time.time()}))
    (tmp_path / "1.json").write_text(json.dumps({"pid": 1, "time": time.time() - STALE_AFTER_S - 1}))
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "huge.json").write_text(json.dumps({"pid": 2**40, "time": time.time()}))  # no pid: no OverflowError
    assert [s["pid"] for s in snaps.read()] == [os.getpid()]
    assert not any(alive(pid) for pid in (0, -1, 2**32, 2**40))  # os.kill would raise or signal a group
    assert not (tmp_path / f"{dead.pid}.json").exists()  # removed
    assert (tmp_path / "1.json").exists()  # alive but silent: left out, kept
    snaps.remove()
    assert snaps.read() == []


def test_the_shared_directory_must_be_ours_and_closed_to_others(tmp_path: Path) -> None:
    import os

    from gateway.errors import ConfigError
    from gateway.metricsdir import SnapshotDir, private_dir, read_private, write_private

    made = private_dir(tmp_path / "new" / "dir")
    assert made.is_dir() and made.stat().st_mode & 0o777 == 0o700
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    link = tmp_path / "link"
    link.symlink_to(made)
    for bad in (open_to_all, link):
        with pytest.raises(ConfigError, match=r"^server.metrics_dir: .* others cannot write"):
            private_dir(bad)
    # A file planted as a link is neither written through nor read.
    target = tmp_path / "victim"
    target.write_text("keep")
    (made / f"{os.getpid()}.json").symlink_to(target)
    (made / f".{os.getpid()}.json.{os.getpid()}.tmp").symlink_to(tmp_path / "victim2")
    with pytest.raises(OSError):  # the temporary file's name is a link: not written through
        SnapshotDir(made).write({"pid": os.getpid(), "time": time.time()})
    (made / f".{os.getpid()}.json.{os.getpid()}.tmp").unlink()
    SnapshotDir(made).write({"pid": os.getpid(), "time": time.time()})
    assert target.read_text() == "keep" and not (tmp_path / "victim2").exists()
    assert (made / f"{os.getpid()}.json").stat().st_mode & 0o777 == 0o600  # replaced by our own file
    (made / "planted").symlink_to(target)
    assert read_private(made / "planted") is None
    write_private(made, "x", "y")
    assert read_private(made / "x") == "y"


def test_a_survey_gets_a_fresh_answer_from_another_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other worker is a real process running Survey: each survey gets its counts as they
    are at that moment (not as it first wrote them), concurrent surveys share one ask, and a
    worker gone counts no more."""
    import threading

    from gateway import survey
    from gateway.survey import Survey

    monkeypatch.setattr(survey, "WAIT_S", 20.0)  # a loaded machine may be slow to answer; never wrong
    flag = tmp_path / "flag"
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from gateway.survey import Survey\n"
            "flag = Path(sys.argv[1]) / 'flag'\n"
            "s = Survey(sys.argv[1], lambda: {'c': {'sse': int(flag.read_text() or 0) if flag.exists() else 1}})\n"
            "s.start(); time.sleep(60)",
            str(tmp_path),
        ],
        cwd=Path(__file__).resolve().parents[1],
    )
    (tmp_path / f"{2**32}.counts").write_text('{"answered": {}}\n{"c": {"sse": 9}}')  # no pid: left out
    try:
        wait_for(lambda: (tmp_path / f"{other.pid}.counts").exists(), "the other worker's counts file")
        mine = Survey(tmp_path, lambda: {"c": {"ws": 1}, "d": {"sse": 1}})
        for n in (2, 3):  # changed after the other wrote its first answer: each survey sees it
            flag.write_text(str(n))
            assert mine.everywhere() == {"c": {"sse": n, "ws": 1}, "d": {"sse": 1}}
        flag.write_text("4")
        results: list[dict] = []
        threads = [threading.Thread(target=lambda: results.append(mine.everywhere())) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [{"c": {"sse": 4, "ws": 1}, "d": {"sse": 1}}] * 3
        other.kill()
        other.wait(10)
        assert mine.everywhere() == {"c": {"ws": 1}, "d": {"sse": 1}}  # a worker gone counts no more
        assert not (tmp_path / f"{other.pid}.counts").exists()
    finally:
        other.kill()
        other.wait(10)
