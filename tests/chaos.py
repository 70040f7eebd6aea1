"""Chaos helpers: publishers that retry like the README advises (same Idempotency-Key) and can hold
one publish in flight for a fault to cut, subscribers that resume like real clients on SSE /
WebSocket / long poll, an exactly-once ledger that checks what each subscriber got against what
was acknowledged, and a relay that resets connections."""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import threading
import time
import uuid
from pathlib import Path
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
    `acked` lists the data of every acknowledged event, in acknowledgement order. hold_next()
    leaves one publish in flight on a connection of its own, for a fault to cut."""

    def __init__(self, base: str, channel: str, prefix: str, every_s: float = 0.02, timeout_s: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.base, self.channel, self.prefix, self.every_s, self.timeout_s = base, channel, prefix, every_s, timeout_s
        self.acked: list[str] = []
        self.retries = 0
        self.refused: list[str] = []  # unexpected 4xx answers: a test failure
        self.ready = threading.Event()
        self.held: list[str] = []  # data of each publish held in flight (hold_next)
        self.cut_in_flight = 0  # held publishes whose connection broke without an answer
        self.held_not_cut: list[str] = []  # a held publish answered, or never cut: a test failure
        self._halt = threading.Event()
        self._session = requests.Session()  # keep-alive: a fault can hit a connection mid-publish
        self._hold_wanted = threading.Event()
        self._holding = threading.Event()
        self._held_sock: socket.socket | None = None
        self._held_pid: int | None = None

    def stop(self) -> None:
        self._halt.set()
        if self._held_sock is not None:  # a held publish nobody cut: wake its thread
            try:
                self._held_sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.join(60)
        self._session.close()

    def hold_next(self, timeout_s: float = 10.0) -> int:
        """Start the next publish on a keep-alive connection of its own with only part of its
        body sent, and return the pid of the worker that holds it (its /healthz answer on that
        connection) once that worker has read every byte sent: a request in flight until the
        connection breaks. Then it is retried with the same Idempotency-Key like any other."""
        self._holding.clear()
        self._hold_wanted.set()
        assert self._holding.wait(timeout_s), "the publisher did not start a held publish"
        assert self._held_pid is not None, "the held publish could not be started"
        return self._held_pid

    def run(self) -> None:
        self.ready.set()
        n = 0
        while not self._halt.is_set():
            data = f"{self.prefix}{n}"
            key = uuid.uuid4().hex
            if self._hold_wanted.is_set():
                self._hold_wanted.clear()
                self._hold(data, key)
            if self._publish(data, key, time.monotonic() + 40):
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

    def _hold(self, data: str, key: str) -> None:
        """The first attempt of a held publish; it returns once its connection has broken."""
        body = data.encode()
        try:
            sock = socket.create_connection(_host_port(self.base), timeout=self.timeout_s)
        except OSError:
            self._holding.set()
            return
        self._held_sock = sock
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            self._held_pid = json.loads(_read_response(sock)).get("pid")
            head = (
                f"POST /publish/{self.channel} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: text/plain\r\nIdempotency-Key: {key}\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + body[:-1])  # the worker waits for the last byte
            self.held.append(data)
            inode = _wait_read_by_peer(sock, timeout_s=5.0)
            if inode is not None and not _holds(self._held_pid, inode):
                raise ValueError(f"pid {self._held_pid} does not hold the held connection")
        except (OSError, ValueError, TypeError):
            self._held_pid = None
        self._holding.set()
        if self._held_pid is None:
            sock.close()
            return
        sock.settimeout(30.0)  # a kill is the test's next step; stop() ends a wait for none
        try:
            answer = sock.recv(65536)
        except TimeoutError:
            answer = b"(neither answered nor cut within 30 s)"
        except OSError:  # reset
            answer = b""
        finally:
            self._held_sock = None
            sock.close()
        if answer:
            self.held_not_cut.append(answer[:200].decode(errors="replace"))
        elif self._halt.is_set():
            self.held_not_cut.append("(still in flight at stop())")
        else:  # cut: the retry below, with the same key, is the publish's second attempt
            self.cut_in_flight += 1
            self.retries += 1


def _host_port(base: str) -> tuple[str, int]:
    host, _, port = base.rpartition("//")[2].partition(":")
    return host, int(port)


def _read_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response with a Content-Length, read off `sock`; its body (the connection
    stays usable for the next request)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ValueError("the connection closed before an answer")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
    fields = {k.strip().lower(): v.strip().lower() for k, v in fields.items()}
    if fields.get(b"connection") == b"close":
        raise ValueError("the gateway would not keep the connection alive")
    length = int(fields[b"content-length"])
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ValueError("the connection closed mid-answer")
        body += chunk
    return body


def _wait_read_by_peer(sock: socket.socket, timeout_s: float) -> int | None:
    """Wait until the process at the other end of this loopback connection has read every byte
    sent on it (its receive queue in /proc/net/tcp is empty): the request is in its hands, not
    in the kernel's. The inode of that end's socket; without /proc, a short pause and None."""
    table = Path("/proc/net/tcp")
    if not table.exists():
        time.sleep(0.3)
        return None
    ours = _proc_address(sock.getsockname())
    theirs = _proc_address(sock.getpeername())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == theirs and fields[2] == ours and int(fields[4].split(":")[1], 16) == 0:
                return int(fields[9])
        time.sleep(0.02)
    raise ValueError("the gateway did not read the held request")


def _holds(pid: int, inode: int) -> bool:
    """Whether process `pid` has the socket with this inode open."""
    fds = Path(f"/proc/{pid}/fd")
    target = f"socket:[{inode}]"
    for fd in fds.iterdir():
        try:
            if os.readlink(fd) == target:
                return True
        except OSError:  # closed meanwhile
            pass
    return False


def _proc_address(address: tuple[str, int]) -> str:
    """An IPv4 (host, port) as /proc/net/tcp spells it: little-endian hex, then the port."""
    host, port = address
    return f"{struct.unpack('<I', socket.inet_aton(host))[0]:08X}:{port:04X}"


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
        upstream = self._open_upstream(client)
        if upstream is None:
            return
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
