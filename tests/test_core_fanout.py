"""Many subscribers over mixed transports, and a subscriber that stops reading."""

from __future__ import annotations

import socket
import threading
import time

import requests

from tests.clients import SSEClient, WSClient, longpoll, poll

SUBSCRIBERS = 200
EVENTS = 100


def test_200_mixed_subscribers_each_get_all_100_events_in_order(gateway, channel):
    start = poll(gateway.url, channel)["cursor"]
    results: dict[str, list[str]] = {}
    ready = threading.Barrier(SUBSCRIBERS + 1, timeout=30)

    def sse_reader(name: str) -> None:
        with SSEClient(f"{gateway.url}/sse/{channel}?since={start}", timeout=30) as sse:
            ready.wait()
            results[name] = [e["data"] for e in sse.events(EVENTS, deadline_s=60)]

    def ws_reader(name: str) -> None:
        with WSClient(f"{gateway.ws_url}/ws/{channel}?since={start}", timeout=30) as ws:
            ready.wait()
            results[name] = [f["data"] for f in ws.events(EVENTS)]

    def poller(name: str, long: bool) -> None:
        ready.wait()
        cursor, got = start, []
        deadline = time.monotonic() + 60
        while len(got) < EVENTS and time.monotonic() < deadline:
            body = longpoll(gateway.url, channel, cursor, timeout=5) if long else poll(gateway.url, channel, cursor)
            assert body["gap"] is False
            got += [e["data"] for e in body["events"]]
            cursor = body["cursor"]
            if not long:
                time.sleep(0.2)  # 50 short pollers at 5/s: the test's own threads stay off the critical path
        results[name] = got

    kinds = [sse_reader, ws_reader, lambda n: poller(n, True), lambda n: poller(n, False)]
    threads = [threading.Thread(target=kinds[i % 4], args=(f"{i % 4}-{i}",), daemon=True) for i in range(SUBSCRIBERS)]
    for t in threads:
        t.start()
    ready.wait()
    for i in range(EVENTS):
        gateway.publish(channel, str(i))
    for t in threads:
        t.join(80)
    expected = [str(i) for i in range(EVENTS)]
    assert len(results) == SUBSCRIBERS
    assert all(got == expected for got in results.values()), {k: len(v) for k, v in results.items() if v != expected}


def test_a_subscriber_that_never_reads_does_not_delay_the_others(gateway, channel):
    # A raw SSE client that never reads: its socket buffers fill and its writes block.
    stuck = socket.create_connection(("127.0.0.1", gateway.port))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(f"GET /sse/{channel} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    try:
        with SSEClient(f"{gateway.url}/sse/{channel}") as healthy:
            time.sleep(0.2)
            big = "x" * 3000
            got: list[dict[str, str]] = []
            # The healthy client reads as events come (a real one does; one that stops reading
            # for longer than its kernel buffers and the history hold is told of a gap).
            reader = threading.Thread(target=lambda: got.extend(healthy.events(300, deadline_s=30)))
            reader.start()
            started = time.monotonic()
            for i in range(300):  # ~1 MB: far more than the stuck client's buffers hold
                gateway.publish(channel, f"{i}:{big}")
            publish_time = time.monotonic() - started
            reader.join(35)
            assert [e["data"].split(":")[0] for e in got] == [str(i) for i in range(300)]
            # Publishing never waited on the stuck reader.
            assert publish_time < 10
            fresh = gateway.publish(channel, "fresh")
            assert healthy.next_event()["id"] == fresh
    finally:
        stuck.close()


def test_a_client_that_stops_reading_is_dropped_after_the_stall_timeout(start_gateway, channel):
    gw = start_gateway({"server": {"stall_timeout_s": 1.0}, "history": {"size": 500}})
    stuck = socket.create_connection(("127.0.0.1", gw.port))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(f"GET /sse/{channel} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and requests.get(f"{gw.url}/healthz", timeout=5).json()["subscribers"] < 1:
            time.sleep(0.05)
        for i in range(150):  # ~9 MB: more than the kernel's socket buffers hold
            gw.publish(channel, f"{i}:" + "x" * 60000)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and requests.get(f"{gw.url}/healthz", timeout=5).json()["subscribers"]:
            time.sleep(0.2)
        assert requests.get(f"{gw.url}/healthz", timeout=5).json()["subscribers"] == 0
    finally:
        stuck.close()
