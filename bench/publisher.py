"""The publisher: one keep-alive connection with pipelined POSTs, so publishing costs the
load generator little and events on a channel keep their order. Each body carries the token
`~<seq>:<publish µs>~` that subscribers use to measure latency, loss and order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["Publisher"]


class Publisher(asyncio.Protocol):
    def __init__(self, make_request: Callable[[str, bytes], bytes], pad: int, window: int = 32) -> None:
        self.make_request = make_request
        self.pad = b"x" * pad
        self.window = window
        self.sent = 0
        self.answered = 0
        self.failed = 0
        self.transport: asyncio.Transport | None = None
        self._room = asyncio.Event()
        self._room.set()
        self._tail = b""

    @classmethod
    async def open(cls, port: int, make_request: Callable[[str, bytes], bytes], pad: int) -> Publisher:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: cls(make_request, pad), "127.0.0.1", port)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        # Responses are small and well-formed: count status lines (bodies never contain one).
        # The 8 bytes kept from the last read complete a cut status line but cannot hold a
        # whole one, so nothing is counted twice.
        data = self._tail + data
        self.answered += data.count(b"HTTP/1.1 ")
        self.failed += data.count(b"HTTP/1.1 4") + data.count(b"HTTP/1.1 5")
        self._tail = data[-8:]
        if self.sent - self.answered < self.window:
            self._room.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._room.set()

    async def publish(self, channel: str, seq: int) -> None:
        if self.transport is None:
            raise ConnectionError("publisher connection lost")
        while self.sent - self.answered >= self.window:
            self._room.clear()
            await self._room.wait()
            if self.transport is None:
                raise ConnectionError("publisher connection lost")
        body = b"~%d:%d~" % (seq, time.time_ns() // 1000) + self.pad
        self.transport.write(self.make_request(channel, body))
        self.sent += 1

    async def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.answered < self.sent and time.monotonic() < deadline and self.transport is not None:
            await asyncio.sleep(0.01)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
