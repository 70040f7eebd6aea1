"""Running one case against one server: start it fresh, connect the subscribers (worker
processes), publish, wait for delivery, and read the server's CPU and memory from /proc."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.cases import Case
from bench.churn import run_churn, run_soak
from bench.load import run_worker
from bench.profile import Profiler
from bench.publisher import Publisher
from bench.servers import Server
from bench.stats import merge, percentiles

__all__ = ["run_case"]

SATURATED = 0.85  # a worker busier than this share of a core may itself be the bottleneck


def run_case(server: Server, case: Case, workers: int, pad: int, profile: Path | None = None) -> dict[str, Any]:
    if case.connects:
        return run_churn(server, case)
    if case.seconds:
        return run_soak(server, case)
    return asyncio.run(_run(server, case, workers, pad, profile))


def _assign(server: Server, case: Case, workers: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    channels = [f"bench{i}" for i in range(case.channels)]
    per_channel = case.messages // case.channels
    expected = {c: per_channel for c in channels}
    if case.multi:  # one subscription over every channel; sequence numbers run across them all
        channels = [",".join(channels)]
        expected = {channels[0]: per_channel * case.channels}
    specs = [
        {
            "port": server.port,
            "server": server.name,
            "cursor_polls": server.cursor_polls,
            "transport": case.transport,
            "expected": expected,
            "subs": [],
        }
        for _ in range(workers)
    ]
    for k, spec in enumerate(specs):
        spec["index"] = k  # which loopback source addresses it may use (load.py)
    for i in range(case.subscribers):
        channel = channels[i % len(channels)]
        spec = specs[i % workers]
        if case.transport == "lp":
            spec["subs"].append((channel, server.longpoll_path(channel, None)))
        elif case.transport != "mixed":
            spec["subs"].append((channel, server.paths(case.transport, channel)))
    if case.transport == "mixed":  # one worker per transport kind keeps each worker's protocol uniform
        specs = _split_mixed(server, case, channels, workers)
    return specs, expected


def _split_mixed(server: Server, case: Case, channels: list[str], workers: int) -> list[dict[str, Any]]:
    specs = []
    for k in range(workers):
        transport = "sse" if k % 2 == 0 else "ws"
        specs.append(
            {
                "port": server.port,
                "server": server.name,
                "cursor_polls": server.cursor_polls,
                "transport": transport,
                "expected": {},
                "subs": [],
                "index": k,
            }
        )
    for i in range(case.subscribers):
        k = i % workers
        transport = specs[k]["transport"]
        channel = channels[i % len(channels)]
        specs[k]["subs"].append((channel, server.paths(transport, channel)))
    return specs


async def _recv(conn: Connection, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not conn.poll():
        if time.monotonic() > deadline:
            raise TimeoutError("worker did not answer")
        await asyncio.sleep(0.02)
    return conn.recv()


async def _run(server: Server, case: Case, workers: int, pad: int, profile: Path | None) -> dict[str, Any]:
    if case.transport == "mixed" and workers < 2:
        workers = 2
    specs, expected = _assign(server, case, workers)
    ctx = multiprocessing.get_context("spawn")
    procs, conns = [], []
    peak = {"rss": 0, "pss": 0}
    sampling = True

    async def sample() -> None:
        while sampling:
            try:
                rss, pss = server.memory_kb()
            except OSError:
                return
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            await asyncio.sleep(0.2)

    base_rss, base_pss = server.memory_kb()
    sampler = asyncio.create_task(sample())
    result: dict[str, Any] = {
        "server": server.name,
        "case": case.name,
        "transport": case.transport,
        "subscribers": case.subscribers,
        "channels": case.channels,
    }
    publisher = None
    try:
        for spec in specs:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=run_worker, args=(spec, child), daemon=True)
            p.start()
            procs.append(p)
            conns.append(parent)
        connect_timeout = 30 + case.subscribers / 200
        connected, errors = 0, []
        for conn in conns:
            msg = await _recv(conn, connect_timeout)
            connected += msg[1]
            errors += msg[2]
        result["connected"] = connected
        if errors:
            result["connect_errors"] = errors[:3]
        # Let the server finish registering subscribers (long poll requests are in flight).
        await asyncio.sleep(1.0 + (case.subscribers / 5000 if case.transport == "lp" else 0.2))
        if case.idle:
            await asyncio.sleep(2.0)
            rss, pss = server.memory_kb()
            result.update(_idle_figures(base_rss, base_pss, rss, pss, connected))
        else:
            profiler = None
            if profile is not None and server.name == "gateway":
                seconds = case.messages / case.rate if case.rate else 5
                profiler = Profiler(server.pid, profile / f"{case.name}.raw", seconds)
            await _publish_and_wait(server, case, conns, result, pad)
            if profiler is not None:
                result["profile"] = profiler.stop()
        for conn in conns:
            conn.send(("stop",))
        reports = []
        for conn in conns:
            while True:
                msg = await _recv(conn, 30)
                if msg[0] == "result":
                    reports.append(msg[1])
                    break
        sampling = False
        await sampler
        result.update(_figures(case, reports, expected, result))
        result["peak_rss_mb"] = round(peak["rss"] / 1024, 1)
        result["peak_pss_mb"] = round(peak["pss"] / 1024, 1)
        return result
    finally:
        sampling = False
        if publisher is not None:
            publisher.close()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def _idle_figures(base_rss: int, base_pss: int, rss: int, pss: int, connected: int) -> dict[str, Any]:
    n = max(1, connected)
    return {
        "base_pss_mb": round(base_pss / 1024, 1),
        "idle_pss_mb": round(pss / 1024, 1),
        "kb_per_conn_pss": round((pss - base_pss) / n, 2),
        "kb_per_conn_rss": round((rss - base_rss) / n, 2),
    }


async def _publish_and_wait(
    server: Server, case: Case, conns: list[Connection], result: dict[str, Any], pad: int
) -> None:
    publisher = await Publisher.open(server.port, server.publish_request, pad)
    channels = [f"bench{i}" for i in range(case.channels)]
    for conn in conns:
        conn.send(("go",))
    user0, system0 = server.cpu_times()
    t0 = time.time_ns()
    start = time.monotonic()
    per_channel = case.messages // case.channels
    total = per_channel * case.channels
    for i in range(total):
        if case.rate:
            delay = start + i / case.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        # In a multi-channel case every stream sees every channel, so one sequence spans them.
        await publisher.publish(channels[i % case.channels], i if case.multi else i // case.channels)
    publish_s = time.monotonic() - start
    await publisher.drain(30)
    # Wait until every worker saw every event, or give up after a grace period.
    done = 0
    deadline = time.monotonic() + max(10.0, case.subscribers / 1000 * 2)
    pending = list(conns)
    while pending and time.monotonic() < deadline:
        for conn in list(pending):
            if conn.poll():
                if conn.recv()[0] == "done":
                    done += 1
                    pending.remove(conn)
        await asyncio.sleep(0.01)
    user, system = server.cpu_times()
    result["server_cpu_s"] = round(user - user0 + system - system0, 3)
    result["server_user_s"] = round(user - user0, 3)
    result["publish_s"] = round(publish_s, 2)
    result["publish_failed"] = publisher.failed
    result["publish_unanswered"] = publisher.sent - publisher.answered
    result["t0_ns"] = t0
    publisher.close()


def _figures(
    case: Case, reports: list[dict[str, Any]], expected: dict[str, int], result: dict[str, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cpu_share = [r["cpu_s"] / r["wall_s"] for r in reports if r["wall_s"] > 0]
    out["client_cpu_max"] = round(max(cpu_share, default=0.0), 2)
    out["client_saturated"] = out["client_cpu_max"] > SATURATED
    out["dropped"] = sum(r["dropped"] for r in reports)
    errors = [e for r in reports for e in r["errors"]]
    if errors:
        out["errors"] = errors[:3]
    if case.idle:
        return out
    delivered = sum(r["delivered"] for r in reports)
    answers = sum(r.get("answers", 0) for r in reports)
    if answers:  # long poll: events per answer above 1 means answers carried a backlog
        out["events_per_answer"] = round(delivered / answers, 2)
    want = case.messages // case.channels * case.subscribers * (case.channels if case.multi else 1)
    p50, p95, p99, pmax = percentiles(merge([r["hist"] for r in reports]))
    last = max((r["last_ns"] for r in reports if r["last_ns"]), default=0)
    span = (last - result.pop("t0_ns")) / 1e9 if last else 0
    out.update(
        {
            "messages": case.messages,
            "expected": want,
            "delivered": delivered,
            "lost": sum(r["lost"] for r in reports),
            "disorder": sum(r["disorder"] for r in reports),
            "p50_ms": p50,
            "p95_ms": p95,
            "p99_ms": p99,
            "max_ms": pmax,
            "deliveries_per_s": round(delivered / span) if span > 0 else 0,
            "cpu_us_per_delivery": round(result["server_cpu_s"] / delivered * 1e6, 2) if delivered else None,
            "user_us_per_delivery": round(result["server_user_s"] / delivered * 1e6, 2) if delivered else None,
        }
    )
    return out
