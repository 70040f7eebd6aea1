"""Chaos with exactly-once accounting, on real processes: a worker killed with SIGKILL while it
holds a publish in flight, Redis stopped for 10 s (SIGSTOP) and continued, Redis restarted with
and without persistence, an upstream that flaps, and a relay that resets connections at random.
Publishers retry with the same Idempotency-Key until acknowledged; SSE, WebSocket and long-poll
subscribers resume like real clients; at the end each subscriber holds every acknowledged event
exactly once and in order, or a `gap` was announced where something was lost (tests/chaos.py
keeps the ledger)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.chaos import GAP, Publisher, ResettingRelay, Subscriber, exactly_once_or_gap, settle, subscribe
from tests.helpers import Gateway, wait_for
from tests.redis_server import RedisServer
from tests.test_workers import Workers
from tests.upstreams import Upstream

G = TypeVar("G", bound=Gateway)
TRANSPORTS = ("sse", "websocket", "longpoll")
CONFIG = {
    "server": {"shutdown_grace_s": 1.0},
    "sse": {"heartbeat_s": 1.0, "retry_ms": 100},
    "poll": {"longpoll_max_timeout_s": 5.0},
}


def _started(make: Callable[[], G]) -> G:
    """make(), again on a fresh port when the one picked was taken meanwhile (a busy machine's
    outgoing connections use the same port range)."""
    for _ in range(5):
        try:
            return make()
        except RuntimeError as exc:
            if "Address already in use" not in str(exc):
                raise
    return make()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def _run(
    base: str,
    gw: Gateway,
    chaos: Callable[[list[Publisher]], None],
    channels: tuple[str, ...],
    allow_gap: bool,
    each: int = 1,
) -> tuple[list[dict[str, int]], list[Publisher]]:
    """Publishers and subscribers on `channels` through `base`; chaos() runs under load; then the
    ledger is checked for every subscriber."""
    subs: list[Subscriber] = []
    for ch in channels:
        subs += subscribe(base, ch, gw.cursor(ch), TRANSPORTS, each)
    time.sleep(0.5)  # connected before the first publish
    pubs = [Publisher(base, ch, f"{ch}-") for ch in channels]
    for p in pubs:
        p.start()
        assert p.ready.wait(10)
    time.sleep(1.0)
    chaos(pubs)
    time.sleep(1.0)
    for p in pubs:
        p.stop()
        assert not p.refused, p.refused
        assert len(p.acked) > 10, f"only {len(p.acked)} publishes acknowledged"
    by_channel = {p.channel: p.acked for p in pubs}
    for s in subs:
        settle([s], by_channel[s.channel])
    return [exactly_once_or_gap(s, by_channel[s.channel], allow_gap) for s in subs], pubs


def test_a_worker_killed_mid_publish_loses_and_duplicates_nothing(redis: RedisServer, tmp_path: Path):
    config = {**CONFIG, "server": {**CONFIG["server"], "workers": 2}}
    gw = _started(lambda: Workers(config, tmp_path, {"REDIS_URL": redis.url}))
    try:
        victim = 0

        def kill_a_worker(pubs: list[Publisher]) -> None:
            nonlocal victim
            # c1's next publish waits on a worker for its last body byte; c2's publisher goes on.
            victim = pubs[0].hold_next()
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: pubs[0].held and pubs[0].held[-1] in pubs[0].acked, "the cut publish is retried", 15)
            # The parent restarts the worker; publishes and clients retry meanwhile.
            wait_for(lambda: (p := gw.pids()) and len(p) == 2 and victim not in p, "two workers answer again", 30)

        counts, pubs = _run(gw.url, gw, kill_a_worker, ("c1", "c2"), allow_gap=False, each=2)
        # The publish in flight at the kill saw its connection break unanswered, and its retry with
        # the same Idempotency-Key was acknowledged (the ledger then found it once everywhere).
        assert pubs[0].cut_in_flight == 1 and not pubs[0].held_not_cut, pubs[0].held_not_cut
        assert any(c["connects"] > 1 for c in counts)  # some subscribers were on the killed worker
        assert f"(pid {victim}) was killed by SIGKILL" in gw.log()
        assert "restarting in" in gw.log()
    finally:
        gw.stop()


def test_redis_stopped_ten_seconds_then_continued(redis: RedisServer, tmp_path: Path):
    gw = _started(lambda: Gateway(CONFIG, tmp_path, {"REDIS_URL": redis.url}))
    try:

        def stall_redis(_: list[Publisher]) -> None:
            assert redis.proc is not None
            os.kill(redis.proc.pid, signal.SIGSTOP)
            try:
                time.sleep(10)
            finally:
                os.kill(redis.proc.pid, signal.SIGCONT)

        _, pubs = _run(gw.url, gw, stall_redis, ("s1",), allow_gap=True)
        assert pubs[0].retries > 0  # publishes were answered 503 or timed out meanwhile
    finally:
        gw.stop()


@pytest.mark.parametrize("persistent", [True, False], ids=["appendonly", "empty"])
def test_redis_restarted(persistent: bool, tmp_path: Path):
    redis = RedisServer(tmp_path, persistent=persistent)
    gw = _started(lambda: Gateway(CONFIG, tmp_path, {"REDIS_URL": redis.url}))
    try:

        def restart_redis(_: list[Publisher]) -> None:
            redis.stop()  # SIGKILL
            time.sleep(1.0)
            redis.start()

        counts, _ = _run(gw.url, gw, restart_redis, ("r1",), allow_gap=not persistent)
        if not persistent:
            assert all(c["gaps"] >= 1 for c in counts), counts  # the lost history is announced to all
    finally:
        gw.stop()
        redis.stop()


def test_a_flapping_upstream_is_bridged_once_or_with_a_gap(tmp_path: Path):
    up = Upstream()
    source = {
        "kind": "sse",
        "url": up.url + "/events",
        "channel": "up",
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.3,
    }
    gw = _started(lambda: Gateway({**CONFIG, "sources": [source]}, tmp_path))
    produced: list[str] = []
    stop = threading.Event()

    def emit() -> None:
        n = 0
        while not stop.is_set():
            up.emit(f"u{n}")
            produced.append(f"u{n}")
            n += 1
            time.sleep(0.02)

    try:
        subs = subscribe(gw.url, "up", gw.cursor("up"), TRANSPORTS)
        time.sleep(0.5)
        emitter = threading.Thread(target=emit, daemon=True)
        emitter.start()
        for _ in range(4):  # down for 0.5-1 s, up for 1 s
            time.sleep(1.0)
            up.kill()
            time.sleep(0.75)
            up.restart()
        time.sleep(1.0)
        stop.set()
        emitter.join(5)
        settle(subs, produced)
        assert len(up.seen("/events")) >= 5  # the source came back after every cut
        for s in subs:
            exactly_once_or_gap(s, produced, allow_gap=True)
    finally:
        stop.set()
        gw.stop()
        up.stop()


def test_a_relay_resetting_connections_at_random(tmp_path: Path):
    gw = _started(lambda: Gateway(CONFIG, tmp_path))
    relay = ResettingRelay(gw.port, 0.1, 1.0)
    try:
        counts, pubs = _run(relay.url, gw, lambda _: time.sleep(4.0), ("x1", "x2"), allow_gap=False)
        assert sum(p.retries for p in pubs) > 0  # publishes were cut mid-request and retried
        assert relay.resets > 10
        assert all(c["connects"] > 1 for c in counts if c["delivered"])
    finally:
        relay.stop()
        gw.stop()


def test_the_ledger_catches_duplicates_reordering_and_silent_loss():
    """The ledger itself can fail: each way of breaking exactly-once is caught; a loss is
    accepted only where allowed and a gap sits between the neighbours that did arrive."""

    def check(log: list[object], allow_gap: bool = True) -> dict[str, int]:
        sub = Subscriber("http://127.0.0.1:9", "c", "sse", "")
        sub.log = log
        return exactly_once_or_gap(sub, ["a", "b", "c"], allow_gap)

    assert check(["a", "b", "c"], allow_gap=False)["delivered"] == 3
    assert check(["a", "z", "b", "c"], allow_gap=False)["delivered"] == 3  # stored, never acknowledged
    assert check(["a", GAP, "c"])["missing"] == 1
    assert check(["a", "b", GAP])["missing"] == 1
    broken = [
        (["a", "b", "b", "c"], True),  # a duplicate
        (["a", "c", "b"], True),  # reordered
        (["a", "c"], True),  # silent loss
        (["a", "b"], True),  # the last one lost, no gap
        (["a", GAP, "c"], False),  # a loss announced, where none is allowed
        (["a", GAP, "b", "c"], False),  # a gap where none may be
    ]
    for log, allow_gap in broken:
        with pytest.raises(AssertionError):
            check(log, allow_gap)
