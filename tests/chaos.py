"""Chaos helpers: publishers that retry like the README advises (same Idempotency-Key), subscribers
that resume like real clients on SSE / WebSocket / long poll, an exactly-once ledger that checks
what each subscriber got against what was acknowledged, and a relay that resets connections."""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import time
import uuid
from typing import Any

import requests
import websocket

from tests.clients import SSEClient
from tests.helpers import TOKEN
from tests.proxies import LoopbackRelay

GAP = object()  # what a subscriber's log holds where a `gap` was announced


class Publisher(threading.Thread):
    """Publishes "<prefix><n>" to one channel, one at a time, until stop(); a 5xx, timeout or
    broken connection is retried with the same Idempotency-Key until acknowledged (202 + id).
    `acked` lists the data of every acknowledged event, in acknowledgement order."""

    def __init__(self, base: str, channel: str, prefix: str, every_s: float = 0.02, timeout_s: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.base, self.channel, self.prefix, self.every_s, self.timeout_s = base, channel, prefix, every_s, timeout_s
        self.acked: list[str] = []
        self.retries = 0
        self.refused: list[str] = []  # unexpected 4xx answers: a test failure
        self.pid: int | None = None
        self.ready = threading.Event()
        self._halt = threading.Event()
        self._session = requests.Session()  # keep-alive: a fault can hit a connection mid-publish

    def stop(self) -> None:
        self._halt.set()
        self.join(60)
        self._session.close()

    def run(self) -> None:
        try:  # which process this publisher's connection reached (several workers: a target)
            self.pid = self._session.get(f"{self.base}/healthz", timeout=self.timeout_s).json().get("pid")
        except (requests.RequestException, ValueError):
            pass
        self.ready.set()
        n = 0
        while not self._halt.is_set():
            data = f"{self.prefix}{n}"
            if self._publish(data, uuid.uuid4().hex, time.monotonic() + 40):
                self.acked.append(data)
            n += 1
            time.sleep(self.every_s)

    def _publish(self, data: str, key: str, deadline: float) -> bool:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/plain", "Idempotency-Key": key}
        while time.monotonic() < deadline:
            try:
                r = self._session.post(
                    f"{self.base}/publish/{self.channel}", data=data, headers=headers, timeout=self.timeout_s
                )
                if r.status_code == 202 and r.json().get("id"):
                    return True
                if r.status_code < 500 and r.status_code != 429:
                    self.refused.append(f"{r.status_code} {r.text[:200]}")
                    return False
            except (requests.RequestException, ValueError):
                pass
            self.retries += 1
            time.sleep(0.1)
        return False  # never acknowledged: it may or may not be delivered, both are right


class Subscriber(threading.Thread):
    """Reads one channel on one transport until stop(); on any disconnect it comes back with its
    last id (SSE: Last-Event-ID, WebSocket and long poll: ?since=). `log` holds each real event's
    data, and GAP where a gap was announced."""

    def __init__(self, base: str, channel: str, transport: str, since: str) -> None:
        super().__init__(daemon=True)
        self.base, self.channel, self.transport, self.last = base, channel, transport, since
        self.ws_base = "ws" + base[len("http") :]
        self.log: list[Any] = []
        self.connects = 0
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(30)

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.connects += 1
                getattr(self, "_" + self.transport)()
            except (requests.RequestException, websocket.WebSocketException, OSError, ValueError):
                pass
            if not self._halt.is_set():
                time.sleep(0.05 + random.random() * 0.1)

    def _take(self, event: dict[str, Any]) -> None:
        self.log.append(GAP if event.get("event") == "gap" else event["data"])
        if event.get("id"):
            self.last = event["id"]

    def _sse(self) -> None:
        with SSEClient(f"{self.base}/sse/{self.channel}", {"Last-Event-ID": self.last}, timeout=3) as sse:
            if sse.status != 200:
                raise ValueError(sse.status)
            while not self._halt.is_set():
                event = sse.next_event(time.monotonic() + 0.5)
                if event is None and sse.closed:
                    return
                if event is not None:
                    self._take(event)

    def _websocket(self) -> None:
        ws = websocket.create_connection(f"{self.ws_base}/ws/{self.channel}?since={self.last}", timeout=3)
        try:
            ws.settimeout(0.5)
            while not self._halt.is_set():
                try:
                    frame = ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                if not frame:
                    return
                self._take(json.loads(frame))
        finally:
            ws.close()

    def _longpoll(self) -> None:
        r = requests.get(f"{self.base}/longpoll/{self.channel}", params={"since": self.last, "timeout": 1}, timeout=4)
        if r.status_code != 200:
            raise ValueError(r.status_code)
        body = r.json()
        if body.get("gap"):
            self.log.append(GAP)
        for event in body["events"]:
            self._take(event)
        self.last = body["cursor"]


def subscribe(base: str, channel: str, since: str, transports: tuple[str, ...], each: int = 1) -> list[Subscriber]:
    subs = [Subscriber(base, channel, t, since) for t in transports for _ in range(each)]
    for s in subs:
        s.start()
    return subs


def settle(subs: list[Subscriber], produced: list[str], timeout: float = 20) -> None:
    """Wait until every subscriber holds the last produced event (or has a gap after its last
    delivered one), then stop them."""
    deadline = time.monotonic() + timeout
    for s in subs:
        while produced and time.monotonic() < deadline and produced[-1] not in s.log:
            time.sleep(0.05)
    for s in subs:
        s.stop()


def exactly_once_or_gap(sub: Subscriber, produced: list[str], allow_gap: bool) -> dict[str, int]:
    """The ledger: every produced (acknowledged) event reached `sub` exactly once and in order,
    or a GAP was announced between its neighbours that did arrive. Extra events (stored but
    never acknowledged) are allowed once each. Returns counts for the report."""
    who = f"{sub.transport} subscriber on {sub.channel} ({sub.connects} connects)"
    real = [x for x in sub.log if x is not GAP]
    dupes = sorted({x for x in real if real.count(x) > 1})
    assert not dupes, f"{who} got duplicates: {dupes[:10]}"
    position = {x: i for i, x in enumerate(sub.log) if x is not GAP}
    delivered = [x for x in produced if x in position]
    positions = [position[x] for x in delivered]
    assert positions == sorted(positions), f"{who} got events out of order"
    gaps = [i for i, x in enumerate(sub.log) if x is GAP]
    missing = 0
    before = -1  # log position of the last delivered produced event
    for x in produced:
        if x in position:
            before = position[x]
            continue
        missing += 1
        after = next((position[y] for y in produced[produced.index(x) :] if y in position), len(sub.log))
        covered = any(before < g < after for g in gaps) or (after == len(sub.log) and any(g > before for g in gaps))
        assert allow_gap and covered, f"{who}: acknowledged {x!r} lost without a gap ({len(gaps)} gaps)"
    assert not gaps or allow_gap, f"{who}: a gap was announced where nothing may be lost"
    return {"delivered": len(delivered), "missing": missing, "gaps": len(gaps), "connects": sub.connects}


class ResettingRelay(LoopbackRelay):
    """Relays TCP to the gateway and kills each connection with an RST (SO_LINGER 0) after a
    random lifetime of `min_s`..`max_s` seconds, mid-stream, mid-request or mid-response."""

    def __init__(self, upstream_port: int, min_s: float = 0.1, max_s: float = 1.0) -> None:
        self.min_s, self.max_s = min_s, max_s
        self.resets = 0
        super().__init__(upstream_port)

    def _handle(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:
            client.close()
            return
        self._track(upstream)
        # Both directions poll, so the deadline is noticed even while a stream sits idle (a
        # close() from another thread would not interrupt a blocked recv()).
        deadline = time.monotonic() + random.uniform(self.min_s, self.max_s)
        threading.Thread(target=_pipe, args=(client, upstream, deadline), daemon=True).start()
        if _pipe(upstream, client, deadline):
            self.resets += 1
            for s in (client, upstream):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.close()  # an RST, both ways
                except OSError:
                    pass


def _pipe(src: socket.socket, dst: socket.socket, deadline: float) -> bool:
    """Copy src to dst until either ends (False) or the deadline passes (True)."""
    src.settimeout(0.05)
    while time.monotonic() < deadline:
        try:
            data = src.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return False
        if not data:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return False
        try:
            dst.sendall(data)
        except OSError:
            return False
    return True
