"""Issue 12, High 1 and 2: a WebSocket client that floods frames cannot take the gateway's memory
or its time (frames are read with backpressure and rate-limited per connection), and the probe
channels relay only tiny frames."""

from __future__ import annotations

import json
import threading
import time

import requests
import websocket

from tests.clients import WSClient

FRAME = b"x" * 4096


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _flood(url: str, seconds: float, stop: threading.Event) -> int:
    """Send 4 KB frames as fast as the socket takes them, never reading; the bytes sent."""
    ws = websocket.create_connection(url, timeout=5)
    ws.sock.settimeout(0.5)
    sent = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and not stop.is_set():
            try:
                ws.send(FRAME.decode())
                sent += len(FRAME)
            except TimeoutError:
                continue  # the gateway stopped reading: TCP pushes back, as it should
            except (OSError, websocket.WebSocketException):
                break
    finally:
        try:
            ws.sock.close()
        except OSError:
            pass
    return sent


def test_a_flooding_websocket_neither_grows_memory_nor_stalls_others(start_gateway, channel):
    gw = start_gateway({"websocket": {"client_publish": ["chat.*"]}, "server": {"max_body_bytes": 65536}})
    before = _rss_mb(gw.proc.pid)
    stop = threading.Event()
    sent: list[int] = []
    flooders = [
        threading.Thread(target=lambda: sent.append(_flood(f"{gw.ws_url}/ws/chat.{channel}", 4, stop)))
        for _ in range(2)
    ]
    for t in flooders:
        t.start()
    try:
        slowest = 0.0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            started = time.monotonic()
            assert requests.get(f"{gw.url}/healthz", timeout=5).status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.1)
        grown = _rss_mb(gw.proc.pid) - before
    finally:
        stop.set()
        for t in flooders:
            t.join(10)
    assert slowest < 1.0, f"/healthz took {slowest:.2f} s during the flood"
    assert grown < 60, f"the gateway grew by {grown:.0f} MB while {sum(sent) / 1e6:.0f} MB were offered"
    # Publishing was rate-limited per connection: far fewer events stored than frames offered.
    stored = requests.get(f"{gw.url}/poll/chat.{channel}?since=0-0", timeout=5).json()["events"]
    assert len(stored) < sum(sent) // len(FRAME) // 2 or sum(sent) < 2 * 1024 * 1024


def test_probe_channels_relay_only_tiny_frames(start_gateway, channel):
    gw = start_gateway({})
    probe = f"diag.{channel}"
    with WSClient(f"{gw.ws_url}/ws/{probe}") as sender, WSClient(f"{gw.ws_url}/ws/{probe}") as stranger:
        sender.send(json.dumps({"event": "echo", "data": "nonce-1234"}))
        assert stranger.events(1)[0]["data"] == "nonce-1234"  # the echo probe still works
        sender.send(json.dumps({"data": "y" * 1000}))
        reply = sender.events(2)[-1]
        assert reply["event"] == "error" and reply["error"] == "too_large", reply
    stored = requests.get(f"{gw.url}/poll/{probe}?since=0-0", timeout=5).json()["events"]
    assert [e["data"] for e in stored] == ["nonce-1234"]
