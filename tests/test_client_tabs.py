"""Tabs share one connection: eight pages of one origin in ONE Chromium context, WebSocket refused
by a proxy (so the client is on SSE), each page following its channels through gateway.mjs. Every
page gets every event of its channels exactly once, in order; the proxy sees one event stream at a
time; and when the leader's page closes mid-stream, the others carry on with nothing lost or twice."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.browser import browser  # noqa: F401 (fixture)
from tests.helpers import Gateway
from tests.hostile import HostileProxy

PAGES = 8
GATEWAY = {"sse": {"heartbeat_s": 0.5, "retry_ms": 500}, "history": {"size": 500}}
FAST = {"stallMs": 4000, "connectTimeoutMs": 4000, "backoffMs": 100, "graceMs": 500}


class StreamCountingProxy(HostileProxy):
    """Refuses every WebSocket upgrade (403) and counts the event streams it carries: how many
    are open now, the most open at once, and every SSE request line."""

    def __init__(self, upstream_port: int) -> None:
        self.sse_requests: list[str] = []
        self.open_streams = 0
        self.most_open = 0
        self._count = threading.Lock()
        super().__init__(upstream_port, "refuse_upgrade")

    def _respond(self, first: bytes, upstream: Any, client: Any) -> None:
        if not first.startswith(b"GET /sse/"):
            return super()._respond(first, upstream, client)
        with self._count:
            self.sse_requests.append(first.decode("latin-1"))
            self.open_streams += 1
            self.most_open = max(self.most_open, self.open_streams)
        try:
            super()._respond(first, upstream, client)
        finally:
            self._cut(upstream)  # the browser went: end the gateway's side of the stream too
            with self._count:
                self.open_streams -= 1


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway(GATEWAY, Path(tmp_path_factory.mktemp("tabs")))
    yield gateway
    gateway.stop()


@pytest.fixture
def proxy(gw: Gateway) -> Iterator[StreamCountingProxy]:
    p = StreamCountingProxy(gw.port)
    yield p
    p.stop()


@pytest.fixture
def tabs(browser: Any, proxy: StreamCountingProxy) -> Iterator[Callable[[Callable[[int], list[str]]], list[Any]]]:  # noqa: F811
    """tabs(channels_of) -> PAGES pages of the proxy's origin in one context, page i following
    channels_of(i) with window.got = [[channel, id], ...] and window.states."""
    context = browser.new_context()

    def open_all(channels_of: Callable[[int], list[str]]) -> list[Any]:
        pages = []
        for i in range(PAGES):
            page = context.new_page()
            page.errors = []
            page.on("pageerror", lambda exc, page=page: page.errors.append(str(exc)))
            page.goto(proxy.url + "/healthz", wait_until="domcontentloaded", timeout=10_000)
            page.evaluate(
                """async ([channels, fast]) => {
                    const gw = await import('/static/gateway.mjs');
                    window.got = []; window.states = [];
                    window.sub = gw.subscribe("", channels, Object.assign(fast, {
                        onEvent: (ev) => window.got.push([ev.channel, ev.id, ev.event]),
                        onStateChange: (state, info) => window.states.push([state, info]),
                    }));
                }""",
                [channels_of(i), FAST],
            )
            page.channels = channels_of(i)
            pages.append(page)
        return pages

    yield open_all
    context.close()


def wait(pages: list[Any], condition: str, timeout_s: float = 20) -> None:
    for i, page in enumerate(pages):
        try:
            page.wait_for_function(condition, timeout=timeout_s * 1000, polling=100)
        except Exception:
            got = page.evaluate("window.got.length")
            raise AssertionError(f"page {i}: {condition!r}; {got} events; {page.evaluate('window.states')}") from None


def warm_up(gw: Gateway, pages: list[Any]) -> None:
    """Publish to every channel until every page has an event of each of its channels: then the
    leader's connection carries all of them (a channel new to it starts from now)."""
    union = sorted({c for p in pages for c in p.channels})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for ch in union:
            gw.publish(ch, "warm")
        time.sleep(0.5)
        if all(
            page.evaluate("(chs) => chs.every((c) => window.got.some((g) => g[0] === c))", page.channels)
            for page in pages
        ):
            return
    raise AssertionError([(p.channels, p.evaluate("window.got.length")) for p in pages])


def check_exactly_once(pages: list[Any], sent: list[tuple[str, str]]) -> None:
    """Each page: every event of its channels once, in order per channel; the sent ones all there."""
    for i, page in enumerate(pages):
        got = page.evaluate("window.got")
        for ch in page.channels:
            ids = [g[1] for g in got if g[0] == ch]
            assert len(ids) == len(set(ids)), f"page {i} got an event of {ch} twice: {ids}"
            keys = [tuple(int(x) for x in i.split("-")) for i in ids]
            assert keys == sorted(keys), f"page {i}: {ch} out of order: {ids}"
            want = [eid for c, eid in sent if c == ch]
            assert [x for x in ids if x in set(want)] == want, f"page {i} missed events of {ch}"
        assert not {g[0] for g in got} - set(page.channels), f"page {i} got channels it does not follow"
        assert page.errors == [], page.errors


def leader_of(pages: list[Any]) -> int:
    roles = [p.evaluate("window.sub.role") for p in pages]
    assert roles.count("leader") == 1, roles
    assert set(roles) == {"leader", "follower"}, roles
    return roles.index("leader")


def run_tabs(gw: Gateway, proxy: StreamCountingProxy, pages: list[Any]) -> None:
    wait(pages, "window.sub.state === 'open' && window.sub.transport === 'sse'")
    warm_up(gw, pages)
    union = sorted({c for p in pages for c in p.channels})
    sent = [(ch, gw.publish(ch, json.dumps({"n": n}))) for n in range(5) for ch in union]
    for page in pages:
        want = sum(5 for ch in page.channels)
        page.wait_for_function(
            "([chs, n]) => window.got.filter((g) => chs.includes(g[0])).length >= n",
            arg=[page.channels, want + len(page.channels)],
            timeout=20_000,
        )
    time.sleep(0.5)
    check_exactly_once(pages, sent)
    assert proxy.open_streams == 1, proxy.sse_requests

    # The leader's page goes while events keep coming: the next page in the lock's queue takes
    # over from the last cursor the old leader relayed.
    leader = leader_of(pages)
    streams_before = len(proxy.sse_requests)
    more: list[tuple[str, str]] = []

    def publish_more() -> None:
        for n in range(8):
            for ch in union:
                more.append((ch, gw.publish(ch, json.dumps({"m": n}))))
            time.sleep(0.15)

    publisher = threading.Thread(target=publish_more)
    publisher.start()
    time.sleep(0.3)
    pages[leader].close()
    publisher.join(30)
    rest = [p for i, p in enumerate(pages) if i != leader]
    for page in rest:
        page.wait_for_function(
            "([chs, ids]) => ids.every((id) => window.got.some((g) => g[1] === id && chs.includes(g[0])))",
            arg=[page.channels, [eid for ch, eid in more if ch in page.channels]],
            timeout=30_000,
        )
    time.sleep(0.5)
    check_exactly_once(rest, sent + more)
    leader_of(rest)
    deadline = time.monotonic() + 5
    while proxy.open_streams != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proxy.open_streams == 1, proxy.sse_requests
    assert len(proxy.sse_requests) > streams_before  # the new leader's stream

    # A follower adds a channel: once add() resolves, the shared connection carries it.
    follower = next(p for p in rest if p.evaluate("window.sub.role") == "follower")
    follower.evaluate("window.sub.add('tabs.added').then(() => { window.added = true; })")
    follower.wait_for_function("window.added === true", timeout=15_000)
    added = gw.publish("tabs.added", "new")
    follower.wait_for_function(f"window.got.some((g) => g[1] === {json.dumps(added)})", timeout=15_000)
    time.sleep(0.5)
    assert [g[1] for g in follower.evaluate("window.got") if g[0] == "tabs.added"] == [added]
    assert not any(g[0] == "tabs.added" for p in rest if p is not follower for g in p.evaluate("window.got"))
    deadline = time.monotonic() + 5
    while proxy.open_streams != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proxy.open_streams == 1, proxy.sse_requests


def test_eight_tabs_one_channel_share_one_stream(gw: Gateway, proxy: StreamCountingProxy, tabs: Any) -> None:
    pages = tabs(lambda i: ["tabs.one"])
    run_tabs(gw, proxy, pages)
    # And the gateway agrees: one subscriber on each of the two channels (tabs.one, tabs.added).
    deadline = time.monotonic() + 5
    while requests.get(f"{gw.url}/healthz", timeout=5).json()["subscribers"] != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert requests.get(f"{gw.url}/healthz", timeout=5).json()["subscribers"] == 2


def test_eight_tabs_three_channels_each_share_one_stream(gw: Gateway, proxy: StreamCountingProxy, tabs: Any) -> None:
    pages = tabs(lambda i: ["tabs.all", f"tabs.pair{i // 2}", f"tabs.own{i}"])
    run_tabs(gw, proxy, pages)


def test_a_quiet_shared_websocket_stays_open_when_tabs_change_its_channels(gw: Gateway, browser: Any) -> None:  # noqa: F811
    # The leader's socket grows by a subscribe frame (its cursor then lists the channels in
    # another order than a poll would): a quiet socket must not be taken for a stalled one.
    context = browser.new_context()
    try:
        pages = []
        for channel in ("quiet.b", "quiet.a"):
            page = context.new_page()
            page.goto(gw.url + "/healthz", wait_until="domcontentloaded", timeout=10_000)
            page.evaluate(
                """async ([channel, fast]) => {
                    const gw = await import('/static/gateway.mjs');
                    window.got = []; window.states = [];
                    window.sub = gw.subscribe("", channel, Object.assign(fast, {
                        onEvent: (ev) => window.got.push([ev.channel, ev.id]),
                        onStateChange: (state, info) => window.states.push([state, info]),
                    }));
                }""",
                [channel, FAST | {"stallMs": 1500, "graceMs": 300}],
            )
            page.wait_for_function("window.sub.state === 'open'", timeout=15_000)
            pages.append(page)
        time.sleep(5)  # quiet for more than three stall checks
        states = pages[0].evaluate("window.states")
        assert pages[0].evaluate("window.sub.role") == "leader"
        assert pages[0].evaluate("window.sub.transport") == "websocket", states
        assert [s for s in states if s[0] == "retry"] == [], states
        ids = {ch: gw.publish(ch, "x") for ch in ("quiet.a", "quiet.b")}
        for page, channel in zip(pages, ("quiet.b", "quiet.a"), strict=True):
            page.wait_for_function("window.got.length >= 1", timeout=10_000)
            assert page.evaluate("window.got") == [[channel, ids[channel]]]
    finally:
        context.close()
