"""A subscriber that stops reading is cut once it falls limits.slow_consumer_bytes behind, and
can resume from history; the others never wait for it."""

from __future__ import annotations

import socket
import threading
import time

import requests

from tests.clients import SSEClient, WSClient

SLOW = 64 * 1024
CONFIG = {"limits": {"slow_consumer_bytes": SLOW}, "history": {"size": 1000}, "server": {"max_body_bytes": 65536}}


def _stuck_client(port: int, path: str, ws: bool = False) -> socket.socket:
    """A raw client with a tiny receive buffer that never reads after its request."""
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", port))
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\n"
    if ws:
        head += "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        head += "Sec-WebSocket-Version: 13\r\n"
    stuck.sendall((head + "\r\n").encode())
    return stuck


def _subscribers(url: str) -> int:
    return requests.get(f"{url}/healthz", timeout=5).json()["subscribers"]


def _wait(predicate, timeout: float = 15) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_a_stuck_sse_and_websocket_subscriber_are_cut_while_others_get_everything(start_gateway, channel):
    gw = start_gateway(CONFIG)
    stuck = [_stuck_client(gw.port, f"/sse/{channel}"), _stuck_client(gw.port, f"/ws/{channel}", ws=True)]
    try:
        start = requests.get(f"{gw.url}/poll/{channel}", timeout=5).json()["cursor"]
        with (
            SSEClient(f"{gw.url}/sse/{channel}?since={start}", timeout=20) as healthy,
            WSClient(f"{gw.ws_url}/ws/{channel}?since={start}", timeout=20) as ws_healthy,
        ):
            assert _wait(lambda: _subscribers(gw.url) == 4)
            got_ws: list[str] = []
            got_sse: list[str] = []
            readers = [
                threading.Thread(target=lambda: got_ws.extend(f["data"][:4] for f in ws_healthy.events(120))),
                threading.Thread(target=lambda: got_sse.extend(e["data"][:4] for e in healthy.events(120, 30))),
            ]
            for reader in readers:
                reader.start()
            for i in range(120):  # ~1.2 MB: far beyond the stuck clients' buffers and the limit
                gw.publish(channel, f"{i:04d}" + "x" * 10_000)
                time.sleep(0.005)  # a steady stream the healthy readers keep up with
            for reader in readers:
                reader.join(30)
            assert got_sse == [f"{i:04d}" for i in range(120)]
            assert got_ws == [f"{i:04d}" for i in range(120)]
            # Both stuck clients were dropped long before the stall timeout (120 s).
            assert _wait(lambda: _subscribers(gw.url) == 2), _subscribers(gw.url)
    finally:
        for s in stuck:
            s.close()
    log = gw.log()
    assert "Traceback" not in log


def test_a_dropped_slow_consumer_resumes_from_history(start_gateway, channel):
    gw = start_gateway(CONFIG)
    stuck = _stuck_client(gw.port, f"/sse/{channel}?since=0-0")
    try:
        assert _wait(lambda: _subscribers(gw.url) == 1)
        ids = [gw.publish(channel, f"{i:04d}" + "y" * 8000) for i in range(40)]
        assert _wait(lambda: _subscribers(gw.url) == 0)
        # What the stuck client had received is a prefix of the stream, ending with a reason or
        # cut; resuming from its last complete id gives the rest, exactly once.
        stuck.settimeout(5)
        received = b""
        while True:
            try:
                part = stuck.recv(65536)
            except TimeoutError:
                break
            if not part:
                break
            received += part
    finally:
        stuck.close()
    text = received.decode(errors="replace")
    seen = [line[4:] for line in text.split("\n") if line.startswith("id: ")]
    assert len(seen) < len(ids)
    assert seen == ids[: len(seen)]
    last = seen[-1] if seen else "0-0"
    with SSEClient(f"{gw.url}/sse/{channel}?since={last}", timeout=10) as resumed:
        rest = resumed.events(len(ids) - len(seen), deadline_s=10)
    assert [e["id"] for e in rest] == ids[len(seen) :]
