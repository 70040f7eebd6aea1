"""Churn and soak: connections that come and go, and what the gateway keeps afterwards.

Not a latency benchmark. Each case records the gateway process's RSS, PSS, open file
descriptors (/proc/<pid>/fd) and live greenlets (`gateway_greenlets` on /metrics) at three
points: the baseline after a warm-up, the peak while it runs, and the final figure once every
client has gone and the gateway had a short settle. A leak shows as a final figure well above
the baseline.

- churn: `case.connects` connects and disconnects spread over the four transports, at most
  `case.subscribers` at a time. Each one does a little (a short poll answered, a long poll left
  while held, an SSE stream or WebSocket opened and read), then leaves: half close cleanly, half
  abort (a reset), as real clients do.
- soak: `case.seconds` of mixed traffic: a publisher on every channel, and `case.subscribers`
  client loops that each pick a transport, follow a channel for a few seconds and leave; some
  read slowly (pause reading for seconds), some resume from the last id they saw.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from typing import Any

from bench.cases import Case
from bench.load import stream_request
from bench.publisher import Publisher
from bench.servers import Server

__all__ = ["run_churn", "run_soak", "process_figures"]

WARMUP_CONNECTS = 2000  # spread over the transports before the baseline is read
SETTLE_S = (
    60.0  # after the last client left, before the final figures: past a heartbeat (15 s) and a missed ping (25 s)
)
SAMPLE_S = 1.0
TRANSPORTS = ("poll", "longpoll", "sse", "ws")
_GREENLETS = re.compile(rb"(?m)^gateway_greenlets (\S+)")
_CONNECTIONS = re.compile(rb'(?m)^gateway_connections\{transport="(\w+)"\} (\S+)')
_CURSOR = re.compile(rb'"cursor":"([^"]+)"')
_ID = re.compile(rb"(?m)^id: *(\S+)")


async def _http(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def scrape(port: int) -> dict[str, Any]:
    """Live greenlets and open connections, as /metrics reports them."""
    body = await _http(port, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    m = _GREENLETS.search(body)
    conns = {t.decode(): int(float(n)) for t, n in _CONNECTIONS.findall(body)}
    return {"greenlets": int(float(m[1])) if m else None, "connections": sum(conns.values())}


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def process_figures(server: Server) -> dict[str, Any]:
    rss, pss = server.memory_kb()
    metrics = await scrape(server.port)
    return {
        "rss_mb": round(rss / 1024, 1),
        "pss_mb": round(pss / 1024, 1),
        "fds": open_fds(server.pid),
        "greenlets": metrics["greenlets"],
        "connections": metrics["connections"],
    }


class _Peak:
    """Samples the process figures every second; keeps the maximum of each."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.peak: dict[str, Any] = {}
        self.samples = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                now = await process_figures(self.server)
            except (OSError, TimeoutError):
                now = {}
            self.samples += 1
            for k, v in now.items():
                if v is not None:
                    self.peak[k] = max(self.peak.get(k, v), v)
            await asyncio.sleep(SAMPLE_S)

    async def stop(self) -> dict[str, Any]:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        return self.peak


def _request(transport: str, channel: str, since: str | None = None) -> bytes:
    q = f"?since={since}" if since else ""
    if transport == "poll":
        return f"GET /poll/{channel}{q} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    if transport == "longpoll":
        q = f"?since={since or '0-0'}&timeout=20"
        return f"GET /longpoll/{channel}{q} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    return stream_request(transport, f"/{transport}/{channel}{q}")  # "sse" or "ws"


WS_CLOSE = bytes([0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xE8 ^ 2])  # masked close frame, code 1000


async def _visit(port: int, transport: str, channel: str, stay_s: float, clean: bool, stats: dict[str, int]) -> None:
    """One connect, a little traffic, one disconnect."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    try:
        writer.write(_request(transport, channel))
        if transport == "longpoll":  # held: leave while the gateway waits for an event
            await asyncio.sleep(stay_s)
        else:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status = head[9:12]
            stats[f"status_{status.decode(errors='replace')}"] = stats.get(f"status_{status.decode()}", 0) + 1
            if transport == "poll":
                await asyncio.wait_for(reader.read(), 10)
            else:
                await asyncio.sleep(stay_s)
                if clean and transport == "ws":
                    writer.write(WS_CLOSE)
        stats[transport] = stats.get(transport, 0) + 1
    finally:
        if clean:
            writer.close()
        else:
            writer.transport.abort()


async def _churn(server: Server, n: int, concurrency: int, channels: int, stats: dict[str, int]) -> None:
    sem = asyncio.Semaphore(concurrency)
    rnd = random.Random(n)

    async def one(i: int) -> None:
        async with sem:
            try:
                transport = TRANSPORTS[i % 4]
                await _visit(server.port, transport, f"churn{i % channels}", rnd.uniform(0.0, 0.05), i % 2 == 0, stats)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                stats["errors"] = stats.get("errors", 0) + 1
                stats.setdefault("first_error", repr(exc)[:200])  # type: ignore[arg-type]

    # Tasks in bounded batches: 100,000 pending coroutines would themselves weigh on the client.
    batch = concurrency * 10
    for start in range(0, n, batch):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + batch))))


async def _baseline(server: Server, channels: int) -> dict[str, Any]:
    await _churn(server, WARMUP_CONNECTS, 100, channels, {})
    await asyncio.sleep(SETTLE_S)
    return await process_figures(server)


async def _final(server: Server) -> dict[str, Any]:
    await asyncio.sleep(SETTLE_S)
    return await process_figures(server)


def _summary(base: dict[str, Any], peak: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"baseline": base, "peak": peak, "final": final}
    for k in ("rss_mb", "pss_mb", "fds", "greenlets"):
        if base.get(k) is not None and final.get(k) is not None:
            out[f"{k}_final_minus_base"] = round(final[k] - base[k], 1)
    return out


def run_churn(server: Server, case: Case) -> dict[str, Any]:
    return asyncio.run(_run_churn(server, case))


async def _run_churn(server: Server, case: Case) -> dict[str, Any]:
    base = await _baseline(server, case.channels)
    peak = _Peak(server)
    stats: dict[str, int] = {}
    started = time.monotonic()
    await _churn(server, case.connects, case.subscribers, case.channels, stats)
    seconds = time.monotonic() - started
    peak_figures = await peak.stop()
    final = await _final(server)
    result = {"server": server.name, "case": case.name, "transport": "all4", "subscribers": case.subscribers}
    result.update(
        {"connects": case.connects, "churn_s": round(seconds, 1), "connects_per_s": round(case.connects / seconds)}
    )
    result["visits"] = stats
    result.update(_summary(base, peak_figures, final))
    return result


def run_soak(server: Server, case: Case) -> dict[str, Any]:
    return asyncio.run(_run_soak(server, case))


async def _run_soak(server: Server, case: Case) -> dict[str, Any]:
    base = await _baseline(server, case.channels)
    peak = _Peak(server)
    stats: dict[str, int] = {}
    channels = [f"soak{i}" for i in range(case.channels)]
    deadline = time.monotonic() + case.seconds
    publisher = await Publisher.open(server.port, server.publish_request, 40)

    async def publish() -> None:
        i = 0
        start = time.monotonic()
        while time.monotonic() < deadline:
            await publisher.publish(channels[i % len(channels)], i)
            i += 1
            delay = start + i / case.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        stats["published"] = i

    async def client(k: int) -> None:
        rnd = random.Random(k)
        last_id: str | None = None
        while time.monotonic() < deadline:
            transport = rnd.choice(TRANSPORTS)
            channel = rnd.choice(channels)
            slow = rnd.random() < 0.1
            resume = last_id if rnd.random() < 0.3 else None
            try:
                last_id = await _follow(server.port, transport, channel, rnd.uniform(1, 15), slow, resume, stats)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                stats["errors"] = stats.get("errors", 0) + 1
                stats.setdefault("first_error", repr(exc)[:200])  # type: ignore[arg-type]
                await asyncio.sleep(0.5)
            await asyncio.sleep(rnd.uniform(0, 1))

    pub = asyncio.create_task(publish())
    await asyncio.gather(*(client(k) for k in range(case.subscribers)))
    await pub
    await publisher.drain(30)
    stats["publish_failed"] = publisher.failed
    publisher.close()
    peak_figures = await peak.stop()
    final = await _final(server)
    result = {"server": server.name, "case": case.name, "transport": "all4", "subscribers": case.subscribers}
    result.update({"soak_s": case.seconds, "rate": case.rate, "channels": case.channels, "visits": stats})
    result.update(_summary(base, peak_figures, final))
    return result


async def _follow(
    port: int, transport: str, channel: str, stay_s: float, slow: bool, since: str | None, stats: dict[str, int]
) -> str | None:
    """Follow a channel for stay_s on one transport; returns the last event id seen (SSE)."""
    kind = transport + ("-slow" if slow else "") + ("-resume" if since else "")
    stats[kind] = stats.get(kind, 0) + 1
    end = time.monotonic() + stay_s
    last: str | None = since
    if transport in ("poll", "longpoll"):  # a loop of requests on one connection (poll: new ones)
        while time.monotonic() < end:
            request = _request(transport, channel, since)
            body = await _http(port, request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1), 30)
            stats["answers"] = stats.get("answers", 0) + 1
            cursor = _CURSOR.search(body)
            if cursor:
                since = cursor[1].decode()
            if transport == "poll":
                await asyncio.sleep(1.0)
        return last
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    try:
        writer.write(_request(transport, channel, since))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if head[9:12] not in (b"200", b"101"):
            stats[f"status_{head[9:12].decode()}"] = stats.get(f"status_{head[9:12].decode()}", 0) + 1
            return None
        while (left := end - time.monotonic()) > 0:
            if slow:  # a slow reader: nothing read for seconds, so the gateway's writes back up
                await asyncio.sleep(min(left, 3.0))
            try:
                data = await asyncio.wait_for(reader.read(65536), min(left, 2.0))
            except TimeoutError:
                continue
            if not data:
                stats["cut"] = stats.get("cut", 0) + 1
                break
            stats["bytes"] = stats.get("bytes", 0) + len(data)
            ids = _ID.findall(data)
            if ids:
                last = ids[-1].decode()
        return last if transport == "sse" else None
    finally:
        if random.random() < 0.5:
            writer.close()
        else:
            writer.transport.abort()
