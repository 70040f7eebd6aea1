"""The reverse proxy: paths the gateway does not own reach the upstream app unchanged (methods,
query, headers, streamed bodies, SSE, WebSocket); owned paths never do; upstream failures
become 502/504 JSON."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import websocket

from tests.clients import SSEClient, poll
from tests.helpers import Gateway, free_port
from tests.upstreams import Upstream

MB = 1 << 20


@pytest.fixture(scope="module")
def app_upstream() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def gw(app_upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway({"proxy": {"upstream": app_upstream.url, "timeout_s": 1.0}}, tmp_path_factory.mktemp("proxy"))
    yield gateway
    gateway.stop()


def peak_rss_kb(pid: int) -> int:
    """The process's peak resident memory (a buffered-then-freed body would still show here)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_methods_query_and_body_pass_through(gw: Gateway, method: str) -> None:
    r = requests.request(method, gw.url + "/echo/a%20b/c?x=1&y=%2F&x=2", data=b"payload" * 3, timeout=5)
    assert r.status_code == (201 if method == "POST" else 200)
    seen = r.json()
    assert seen["method"] == method
    assert seen["path"] == "/echo/a b/c"
    assert seen["raw_query"] == "x=1&y=%2F&x=2"
    assert seen["size"] == 21 and seen["sha256"] == hashlib.sha256(b"payload" * 3).hexdigest()


def test_head_has_no_body(gw: Gateway) -> None:
    r = requests.head(gw.url + "/echo", timeout=5)
    assert r.status_code == 200 and r.content == b""


def test_headers_forwarded_and_hop_by_hop_removed(gw: Gateway, app_upstream: Upstream) -> None:
    r = requests.get(
        gw.url + "/echo",
        headers={
            "X-Custom": "kept",
            "Authorization": "Bearer abc",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "hop",
            "Keep-Alive": "timeout=5",
            "X-Forwarded-For": "10.0.0.1",
            "Cookie": "s=1",
        },
        timeout=5,
    )
    seen = {k.lower(): v for k, v in r.json()["headers"].items()}
    assert seen["x-custom"] == "kept" and seen["authorization"] == "Bearer abc" and seen["cookie"] == "s=1"
    assert "x-drop-me" not in seen and "keep-alive" not in seen
    assert seen["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == f"127.0.0.1:{gw.port}"
    assert seen["host"] == f"127.0.0.1:{app_upstream.port}"
    assert "python-urllib3" not in seen.get("user-agent", "")
    # Response side: the upstream's headers come back, repeated ones intact, hop-by-hop ones not.
    assert r.headers["X-Upstream"] == "yes"
    assert r.raw.headers.getlist("Set-Cookie") == ["a=1", "b=2"]
    assert "Keep-Alive" not in r.headers


def test_owned_paths_are_never_proxied(gw: Gateway) -> None:
    r = requests.post(gw.url + "/poll/x", timeout=5)
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    r = requests.get(gw.url + "/poll/bad%20name", timeout=5)
    assert r.status_code == 400 and r.json()["error"] == "invalid_channel"
    r = requests.get(gw.url + "/sse/", timeout=5)
    assert r.status_code == 400
    r = requests.get(gw.url + "/healthz", timeout=5)
    assert r.json()["status"] == "ok"
    r = requests.post(gw.url + "/", timeout=5)
    assert r.status_code == 405 and "X-Upstream" not in r.headers
    assert poll(gw.url, "ch")["events"] == []


def test_large_bodies_stream_both_ways_in_bounded_memory(gw: Gateway) -> None:
    size_mb = 64
    before = peak_rss_kb(gw.proc.pid)
    digest = hashlib.sha256()
    block = b"z" * MB

    def upload() -> Iterator[bytes]:
        for _ in range(size_mb):
            digest.update(block)
            yield block

    r = requests.post(gw.url + "/echo", data=upload(), timeout=60)  # chunked upload
    assert r.status_code == 201 and r.json()["size"] == size_mb * MB
    assert r.json()["sha256"] == digest.hexdigest()
    r = requests.put(gw.url + "/echo", data=_Sized(size_mb * MB), timeout=60)  # with Content-Length
    assert r.json()["size"] == size_mb * MB
    with requests.get(gw.url + f"/download?mb={size_mb}", stream=True, timeout=60) as r:
        assert r.headers["Content-Length"] == str(size_mb * MB)
        got = sum(len(c) for c in r.iter_content(MB))
    assert got == size_mb * MB
    grown_mb = (peak_rss_kb(gw.proc.pid) - before) / 1024
    assert grown_mb < 24, f"gateway grew by {grown_mb:.0f} MB moving {size_mb} MB bodies"


class _Sized:
    """A file-like upload body of a known length, produced on the fly."""

    def __init__(self, size: int) -> None:
        self.len = size
        self._left = size

    def read(self, n: int = MB) -> bytes:
        n = min(n if n > 0 else MB, self._left)
        self._left -= n
        return b"q" * n


def test_upstream_sse_passes_through_unbuffered(gw: Gateway) -> None:
    start = time.monotonic()
    with SSEClient(gw.url + "/timed-sse") as client:
        arrivals = []
        for _ in range(3):
            event = client.next_event()
            assert event is not None
            arrivals.append((event["data"], time.monotonic() - start))
    assert [d for d, _ in arrivals] == ["tick 0", "tick 1", "tick 2"]
    assert arrivals[0][1] < 0.35  # the first event did not wait for the rest
    gaps = [b - a for (_, a), (_, b) in zip(arrivals, arrivals[1:], strict=False)]
    assert all(0.25 < g < 0.7 for g in gaps), gaps  # the upstream's 0.4 s spacing is kept


def test_upstream_dying_mid_body_truncates_visibly(gw: Gateway) -> None:
    """The client must not get a short body that looks complete: the connection is cut."""
    with requests.get(gw.url + "/dies-midway", stream=True, timeout=10) as r:
        assert r.status_code == 200
        with pytest.raises(requests.exceptions.RequestException):
            for _ in r.iter_content(65536):
                pass
    assert requests.get(gw.url + "/echo", timeout=5).status_code == 200  # and the proxy carries on
    assert "Traceback" not in gw.log()


def test_websocket_handshake_is_bridged(gw: Gateway) -> None:
    ws = websocket.create_connection(gw.ws_url + "/socket", timeout=5)
    try:
        hello = json.loads(ws.recv())
        assert hello["hello"] == "127.0.0.1"  # the upstream saw X-Forwarded-For
        ws.send("ping 1")
        assert ws.recv() == "echo:ping 1"
        ws.send("ping 2" * 10000)
        assert ws.recv() == "echo:" + "ping 2" * 10000
    finally:
        ws.close()


def test_upstream_timeout_is_504(gw: Gateway) -> None:
    r = requests.get(gw.url + "/slow?s=3", timeout=10)
    assert r.status_code == 504 and r.json()["error"] == "upstream_timeout"


def test_unknown_paths_are_404_without_a_proxy(tmp_path: Path) -> None:
    gateway = Gateway({}, tmp_path)
    try:
        r = requests.get(gateway.url + "/echo", timeout=5)
        assert r.status_code == 404 and r.json()["error"] == "not_found"
    finally:
        gateway.stop()


def test_refused_and_reset_upstreams_are_502(tmp_path: Path) -> None:
    # A port nobody listens on, and one that accepts then resets every connection.
    refused = f"http://127.0.0.1:{free_port()}"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    gateway = Gateway({"proxy": {"upstream": refused, "timeout_s": 2.0}}, tmp_path)
    try:
        r = requests.get(gateway.url + "/anything", timeout=10)
        assert r.status_code == 502 and r.json()["error"] == "upstream_unavailable"
        ws_refused = requests.get(
            gateway.url + "/socket",
            headers={
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
            timeout=10,
        )
        assert ws_refused.status_code == 502
    finally:
        gateway.stop()
    gateway = Gateway({"proxy": {"upstream": f"http://127.0.0.1:{listener.getsockname()[1]}"}}, tmp_path)
    try:

        def reset_all() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.recv(1024)
                conn.close()  # linger 0: an RST, not a FIN

        threading.Thread(target=reset_all, daemon=True).start()
        r = requests.get(gateway.url + "/anything", timeout=10)
        assert r.status_code == 502 and r.json()["error"] == "upstream_unavailable"
        assert "Traceback" not in gateway.log()
    finally:
        gateway.stop()
        listener.close()


def test_bridged_websocket_survives_being_idle_past_the_stall_timeout(app_upstream: Upstream, tmp_path: Path) -> None:
    gateway = Gateway({"proxy": {"upstream": app_upstream.url}, "server": {"stall_timeout_s": 1.0}}, tmp_path)
    try:
        ws = websocket.create_connection(gateway.ws_url + "/socket", timeout=5)
        try:
            ws.recv()  # hello
            time.sleep(2.2)  # both directions quiet for over twice the stall timeout
            ws.send("still there?")
            assert ws.recv() == "echo:still there?"
        finally:
            ws.close()
    finally:
        gateway.stop()
