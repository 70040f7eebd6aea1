"""The load generator's worker process: thousands of subscribers on one asyncio loop.

Parsing is deliberately lean: every published payload carries a token `~<seq>:<publish µs>~`
that survives SSE framing, WebSocket framing and JSON unchanged, so a subscriber just scans
the bytes it receives for tokens (one regex pass per read) instead of decoding the protocol.
Chunk headers and frame headers sit between events, never inside a token.
"""

from __future__ import annotations

import asyncio
import re
import resource
import time
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["run_worker", "TOKEN", "BUCKET_US", "BUCKETS"]

TOKEN = re.compile(rb"~(\d+):(\d+)~")
BUCKET_US = 100  # latency histogram resolution
BUCKETS = 200_001  # up to 20 s; anything later lands in the last bucket
CONNECT_CONCURRENCY = 200
PORTS_PER_SOURCE = 20_000  # below the ~28k of the default ephemeral port range
SOURCES_PER_WORKER = 16
SOURCE_BASE = 1  # 127.0.1.1 and up (127.0.0.1 is where the server listens)
_HEADER_END = b"\r\n\r\n"
_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
_CURSOR = re.compile(rb'"cursor":"([^"]+)"')
_LAST_MODIFIED = re.compile(rb"(?i)\r\nlast-modified: *([^\r]+)")
_ETAG = re.compile(rb"(?i)\r\netag: *([^\r]+)")
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


class Worker:
    def __init__(self, spec: dict[str, Any], conn: Connection) -> None:
        self.spec = spec
        self.conn = conn
        self.hist = [0] * BUCKETS
        self.subs: list[_Sub] = []
        self.ready = 0
        self.finished = 0
        self.delivered = 0
        self.answers = 0  # long poll: answers that carried events (delivered / answers: the batching)
        self.disorder = 0  # an event at or before one already seen (duplicate or out of order)
        self.skipped = 0  # seq jumps: an event arrived after one it should follow was missing
        self.dropped = 0  # connections closed by the server mid-run
        self.errors: list[str] = []
        self.first_ns = 0
        self.last_ns = 0
        self.done_sent = False

    def record(self, sub: _Sub, data: bytes, now_ns: int) -> int:
        """Count the tokens in data; returns where the last one ended."""
        now_us = now_ns // 1000
        hist = self.hist
        last = sub.last
        got = end = 0
        for m in TOKEN.finditer(data):
            end = m.end()
            seq = int(m[1])
            if seq <= last:
                self.disorder += 1
                continue
            if seq != last + 1:
                self.skipped += seq - last - 1
            last = seq
            got += 1
            lat = (now_us - int(m[2])) // BUCKET_US
            hist[lat if 0 <= lat < BUCKETS else (0 if lat < 0 else BUCKETS - 1)] += 1
        if got:
            sub.last = last
            sub.got += got
            self.delivered += got
            if not self.first_ns:
                self.first_ns = now_ns
            self.last_ns = now_ns
            if sub.got >= sub.expected and not sub.complete:
                sub.complete = True
                self.finished += 1
                if self.finished == len(self.subs) and not self.done_sent:
                    self.done_sent = True
                    self.conn.send(("done",))
        return end

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        spec = self.spec
        host, port = "127.0.0.1", spec["port"]
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def connect(sub: _Sub) -> None:
            async with sem:
                for attempt in range(5):
                    try:
                        await loop.create_connection(lambda: sub, host, port, local_addr=sub.source)
                        await asyncio.wait_for(sub.ready_event.wait(), 30)
                        return
                    except (TimeoutError, OSError) as exc:
                        if attempt == 4:
                            self.errors.append(f"connect: {exc!r}")
                        await asyncio.sleep(0.2 * (attempt + 1))

        kind = spec["transport"]
        # One source address has ~28k ephemeral ports toward the server's one port: past that,
        # spread the connections over more loopback addresses (all of 127/8 is local on Linux).
        spread = len(spec["subs"]) > PORTS_PER_SOURCE
        first = SOURCE_BASE + spec.get("index", 0) * SOURCES_PER_WORKER
        for i, (channel, path) in enumerate(spec["subs"]):
            expected = spec["expected"].get(channel, 0)
            if kind == "lp":
                sub: _Sub = _LongPoll(self, channel, path, expected, spec["cursor_polls"])
            else:
                sub = _Stream(self, channel, stream_request(kind, path), expected)
            if spread:
                sub.source = (f"127.0.{first + i % SOURCES_PER_WORKER}.1", 0)
            self.subs.append(sub)
        if not any(s.expected for s in self.subs):
            self.done_sent = True  # nothing to wait for (idle connections)
        await asyncio.gather(*(connect(s) for s in self.subs))
        self.conn.send(("ready", self.ready, self.errors[:5]))

        stop = asyncio.Event()
        started: dict[str, float] = {}

        def on_message() -> None:
            while self.conn.poll():
                msg = self.conn.recv()
                if msg[0] == "go":
                    started["cpu"] = _cpu()
                    started["wall"] = time.monotonic()
                elif msg[0] == "stop":
                    stop.set()

        loop.add_reader(self.conn.fileno(), on_message)
        await stop.wait()
        loop.remove_reader(self.conn.fileno())
        wall = time.monotonic() - started.get("wall", time.monotonic())
        cpu = _cpu() - started.get("cpu", _cpu())
        lost = sum(max(0, s.expected - s.got) for s in self.subs)
        sparse = {i: n for i, n in enumerate(self.hist) if n}
        self.conn.send(
            (
                "result",
                {
                    "delivered": self.delivered,
                    "answers": self.answers,
                    "lost": lost,
                    "disorder": self.disorder,
                    "skipped": self.skipped,
                    "dropped": self.dropped,
                    "connected": self.ready,
                    "errors": self.errors[:5],
                    "hist": sparse,
                    "first_ns": self.first_ns,
                    "last_ns": self.last_ns,
                    "cpu_s": cpu,
                    "wall_s": wall,
                },
            )
        )
        for s in self.subs:
            s.closing = True
            if s.transport is not None:
                s.transport.abort()


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def stream_request(kind: str, path: str) -> bytes:
    """The request head that opens an SSE stream or a WebSocket on `path`."""
    if kind == "sse":
        return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class _Sub(asyncio.Protocol):
    def __init__(self, worker: Worker, channel: str, expected: int) -> None:
        self.w = worker
        self.channel = channel
        self.expected = expected
        self.last = -1
        self.got = 0
        self.complete = False
        self.closing = False
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.is_ready = False
        self.ready_event = asyncio.Event()
        self.source: tuple[str, int] | None = None  # the local address to connect from (None: any)

    def _mark_ready(self) -> None:
        if not self.is_ready:
            self.is_ready = True
            self.w.ready += 1
            self.ready_event.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing and self.is_ready:
            self.w.dropped += 1
        self.transport = None


class _Stream(_Sub):
    """SSE or WebSocket: one request, then a stream of bytes to scan."""

    def __init__(self, worker: Worker, channel: str, request: bytes, expected: int) -> None:
        super().__init__(worker, channel, expected)
        self.request = request

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        if self.buf:
            data = self.buf + data
        if not self.is_ready:
            end = data.find(_HEADER_END)
            if end < 0:
                self.buf = data
                return
            status = data[9:12]
            if status not in (b"200", b"101"):
                self.w.errors.append(f"status {data[:end][:200]!r}")
                self.closing = True
                self.transport.close()
                return
            self._mark_ready()
            data = data[end + 4 :]
        end = self.w.record(self, data, now)
        # Keep a token cut by this read for the next one (its opening ~ is the last ~ left).
        cut = data.rfind(b"~", end)
        self.buf = data[cut:] if cut >= 0 and len(data) - cut < 48 else b""


class _LongPoll(_Sub):
    """One request at a time over a keep-alive connection; the next one resumes from the last
    answer (gateway: ?since=<cursor>; Nchan: If-Modified-Since / If-None-Match)."""

    def __init__(self, worker: Worker, channel: str, path: str, expected: int, cursor_polls: bool) -> None:
        super().__init__(worker, channel, expected)
        self.path = path
        self.cursor_polls = cursor_polls
        self.cursor = "0-0"
        self.extra = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._request()
        self._mark_ready()

    def _request(self) -> None:
        if self.cursor_polls:
            path = self.path.replace("since=0-0", f"since={self.cursor}")
        else:
            path = self.path
        self.transport.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + self.extra + b"\r\n")

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(_HEADER_END)
            if end < 0:
                break
            head = buf[:end]
            m = _CONTENT_LENGTH.search(head)
            length = int(m[1]) if m else 0
            if len(buf) < end + 4 + length:
                break
            body = buf[end + 4 : end + 4 + length]
            buf = buf[end + 4 + length :]
            status = head[9:12]
            if status == b"200":
                before = self.w.delivered
                self.w.record(self, body, now)
                if self.w.delivered > before:
                    self.w.answers += 1
                if self.cursor_polls:
                    c = _CURSOR.search(body)
                    if c:
                        self.cursor = c[1].decode()
                else:
                    lm, et = _LAST_MODIFIED.search(head), _ETAG.search(head)
                    self.extra = b""
                    if lm:
                        self.extra += b"If-Modified-Since: " + lm[1] + b"\r\n"
                    if et:
                        self.extra += b"If-None-Match: " + et[1] + b"\r\n"
            elif status != b"304":
                self.w.errors.append(f"status {head[:120]!r}")
            if not self.closing and self.transport is not None:
                self._request()
        self.buf = buf


def run_worker(spec: dict[str, Any], conn: Connection) -> None:
    """Process entry point (multiprocessing, spawn)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(Worker(spec, conn).main())
