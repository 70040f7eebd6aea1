"""The live view and static/gateway-client.js in a real headless Chromium against real gateways:
direct, behind an nginx that refuses WebSocket and buffers SSE, and behind one that cuts idle sockets."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import ARTIFACTS, browser  # noqa: F401 (fixture)
from tests.helpers import Gateway
from tests.proxies import REALTIME, Nginx

# Plain HTTP/1.0 to the gateway (so no Upgrade), buffering forced despite X-Accel-Buffering: no.
REFUSE_WS_BUFFER_SSE = """
    proxy_set_header Host $host;
    proxy_buffering on;
    proxy_ignore_headers X-Accel-Buffering;
"""
# Realtime settings, but a connection with nothing to read for 2 s is cut.
CUT_IDLE = REALTIME.replace("proxy_read_timeout 3600s;", "proxy_read_timeout 2s;")
GATEWAY = {
    "sse": {"heartbeat_s": 0.5, "retry_ms": 500},
    # Pings would keep the socket busy; here silence must be real so nginx's idle cut happens.
    "websocket": {"ping_s": 60.0},
    "history": {"size": 200},
    "poll": {"longpoll_max_timeout_s": 10.0},
}
# The client with short timers, so a fallback takes about a second instead of half a minute.
FAST = {
    "stallMs": 1500,
    "connectTimeoutMs": 1500,
    "graceMs": 500,
    "backoffMs": 100,
    "pollIntervalMs": 200,
    "longPollTimeoutS": 5,
}


@pytest.fixture(scope="module")
def chromium(browser: Any) -> Any:  # noqa: F811
    return browser


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway(GATEWAY, Path(tmp_path_factory.mktemp("live")))
    yield gateway
    gateway.stop()


@pytest.fixture
def open_page(chromium: Any) -> Iterator[Any]:
    """open_page(url) -> a page in a fresh context, with page errors collected in page.errors."""
    contexts: list[Any] = []

    def open_(url: str) -> Any:
        context = chromium.new_context()
        contexts.append(context)
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        page.goto(url, wait_until="domcontentloaded", timeout=10_000)
        return page

    yield open_
    for context in contexts:
        context.close()


def start_client(page: Any, channel: str, **options: Any) -> None:
    """Load gateway-client.js into a page of the gateway's origin and start window.client, which
    records what it delivers in window.got, gaps in window.gaps and statuses in window.statuses."""
    page.add_script_tag(url="/static/gateway-client.js")
    page.evaluate(
        """([channel, options]) => {
            window.got = []; window.gaps = []; window.statuses = [];
            window.client = new GatewayClient("", channel, Object.assign(options, {
                onEvent: (ev, transport) => window.got.push([ev.id, ev.event, ev.data, transport]),
                onGap: (info, transport) => window.gaps.push([info, transport]),
                onStatus: (s) => window.statuses.push(s),
            }));
        }""",
        [channel, options],
    )


def wait_for_count(page: Any, n: int, timeout_s: float = 15) -> list[list[str]]:
    try:
        page.wait_for_function(f"window.got.length >= {n}", timeout=timeout_s * 1000, polling=50)
    except Exception:
        raise AssertionError(
            f"got {page.evaluate('window.got')}; statuses {page.evaluate('window.statuses')}"
        ) from None
    return page.evaluate("window.got")


def publish_many(gw: Gateway, channel: str, n: int, every_s: float = 0.0, start: int = 0) -> list[str]:
    ids = []
    for i in range(start, start + n):
        ids.append(gw.publish(channel, json.dumps({"n": i, "time": time.time()})))
        time.sleep(every_s)
    return ids


# -- the live view -------------------------------------------------------------------------------------
def test_live_view_shows_every_event_on_all_four_transports(gw: Gateway, open_page: Any) -> None:
    page = open_page(f"{gw.url}/diagnose/live?channel=live.view&interval=300&timeout=5")
    page.wait_for_function(
        "window.__live && window.__live.started && ['websocket', 'sse']"
        ".every(n => window.__live.transports[n].state === 'open')",
        timeout=10_000,
    )
    ids = publish_many(gw, "live.view", 3, every_s=0.2)
    page.wait_for_function(
        "Object.values(window.__live.transports).every(t => t.ids.length >= 3)", timeout=10_000, polling=100
    )
    time.sleep(0.7)  # a few more short polls, so its cost shows
    live = page.evaluate("window.__live")
    for name, col in live["transports"].items():
        assert col["ids"] == ids, name  # the same events, once each, in order
        assert all(lat is not None and -100 < lat < 5000 for lat in col["latencies"]), (name, col["latencies"])
        assert col["stats"]["bytes"] > 0 and col["stats"]["events"] == 3, name
        shown = page.text_content(f"#col-{name} [data-k=events]")
        assert shown == "3", (name, shown)
        assert "ms" in page.text_content(f"#col-{name} [data-k=latency]")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "live-view.png"), full_page=True)
    stats = {name: col["stats"] for name, col in live["transports"].items()}
    # The trade-offs: one request for each stream, a request per event for long poll, one every
    # interval for short poll.
    assert stats["websocket"]["requests"] == 1 and stats["sse"]["requests"] == 1
    assert stats["long_poll"]["requests"] >= 3
    assert stats["short_poll"]["requests"] > stats["long_poll"]["requests"]
    assert page.errors == []


# -- the client, direct ----------------------------------------------------------------------------------
def test_client_delivers_each_event_once_in_order_and_reports_gaps(gw: Gateway, open_page: Any) -> None:
    page = open_page(gw.url + "/healthz")
    start_client(page, "client.direct", **FAST)
    page.wait_for_function("window.client.state === 'open'", timeout=10_000)
    ids = publish_many(gw, "client.direct", 40)
    got = wait_for_count(page, 40)
    assert [g[0] for g in got] == ids
    assert {g[3] for g in got} == {"websocket"}
    assert [json.loads(g[2])["n"] for g in got] == list(range(40))
    time.sleep(0.3)
    assert len(page.evaluate("window.got")) == 40  # and nothing twice

    page.evaluate("window.client.close()")

    # A client resuming from an id the channel does not know is told about the gap, then caught up,
    # on every transport.
    for transport in ("websocket", "sse", "long_poll", "short_poll"):
        start_client(page, "client.direct", since="1-0", transports=[transport], **FAST)
        got = wait_for_count(page, 40)
        assert [g[0] for g in got] == ids and {g[3] for g in got} == {transport}
        assert page.evaluate("window.gaps.length") == 1, transport
        assert page.evaluate("window.gaps[0][0].requested") == "1-0", transport
        page.evaluate("window.client.close()")

    # A channel name the gateway refuses is a hard failure, not an endless retry.
    start_client(page, "no spaces allowed", **FAST)
    page.wait_for_function("window.client.state === 'failed'", timeout=5000)
    assert "not a valid channel name" in page.evaluate("window.statuses[window.statuses.length - 1].reason")
    assert page.errors == []


# -- the client behind hostile proxies -------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile(gw: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    proxy = Nginx(gw.port, REFUSE_WS_BUFFER_SSE, Path(tmp_path_factory.mktemp("nginx-hostile")))
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def cutting(gw: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    proxy = Nginx(gw.port, CUT_IDLE, Path(tmp_path_factory.mktemp("nginx-cut")))
    yield proxy
    proxy.stop()


def test_client_falls_back_past_refused_websocket_and_buffered_sse(gw: Gateway, hostile: Nginx, open_page: Any) -> None:
    page = open_page(hostile.url + "/healthz")
    start_client(page, "client.fallback", **FAST)
    # The client starts from "now": publishing before it has read the channel's cursor would
    # put the first events behind its start. Once it tries a transport, it has the cursor.
    page.wait_for_function("window.statuses.some((s) => s.transport)", timeout=10_000)
    # Publish all through the fallbacks: nothing may be lost or doubled on the way.
    ids: list[str] = []
    publisher = threading.Thread(target=lambda: ids.extend(publish_many(gw, "client.fallback", 30, every_s=0.1)))
    publisher.start()
    publisher.join(20)
    got = wait_for_count(page, 30)
    time.sleep(0.5)
    got = page.evaluate("window.got")
    assert [g[0] for g in got] == ids
    statuses = page.evaluate("window.statuses")
    retries = [s for s in statuses if s["state"] == "retry"]
    assert retries[0]["reason"].startswith("websocket: ") and retries[0]["transport"] == "sse", statuses
    assert retries[1]["reason"].startswith("sse: ") and "sent nothing" in retries[1]["reason"], statuses
    assert retries[1]["transport"] == "long_poll"
    assert page.evaluate("window.client.transport") == "long_poll"
    assert got[-1][3] == "long_poll"


def test_client_resumes_on_the_same_transport_after_a_cut(gw: Gateway, cutting: Nginx, open_page: Any) -> None:
    page = open_page(cutting.url + "/healthz")
    start_client(page, "client.cut", **(FAST | {"stallMs": 20_000, "backoffMs": 1500}))
    page.wait_for_function("window.client.state === 'open'", timeout=10_000)
    first = publish_many(gw, "client.cut", 3)
    wait_for_count(page, 3)
    # Idle for 2 s: nginx cuts the socket; the client waits 0.75-1.5 s before reconnecting, and
    # the events published in that window must come with the resumed stream.
    page.wait_for_function("window.client.state === 'retry'", timeout=6000, polling=20)
    missed = publish_many(gw, "client.cut", 5)
    got = wait_for_count(page, 8)
    assert [g[0] for g in got] == first + missed
    assert {g[3] for g in got} == {"websocket"}
    retry = next(s for s in page.evaluate("window.statuses") if s["state"] == "retry")
    assert retry["transport"] == "websocket" and "closed" in retry["reason"]
    assert page.evaluate("window.client.stats.websocket.requests") == 2


# -- a middlebox in front of the gateway that misbehaves with WebSockets on demand --------------------------
class Relay:
    """A TCP relay on 127.0.0.1 in front of the gateway; plain HTTP passes both ways. With
    `silent_ws` it forwards a WebSocket handshake's answer, then drops every frame the gateway sends
    (the socket looks open, nothing arrives, as with some antivirus proxies). block_ws(True) cuts
    WebSocket connections, open and new, as a network that stops allowing them would."""

    def __init__(self, upstream_port: int, silent_ws: bool = False) -> None:
        self.upstream_port = upstream_port
        self.silent_ws = silent_ws
        self.blocking = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.ws_sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def block_ws(self, on: bool) -> None:
        self.blocking = on
        if on:
            for s in self.ws_sockets:
                _shutdown(s)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            first = client.recv(65536)
            is_ws = first.startswith(b"GET /ws/")
            if not first or (is_ws and self.blocking):
                return _shutdown(client)
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:
            return _shutdown(client)
        upstream.settimeout(None)
        self.sockets.append(upstream)
        if is_ws:
            self.ws_sockets += [client, upstream]
        upstream.sendall(first)
        threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
        self._pipe(upstream, client, is_ws and self.silent_ws)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, swallow_after_headers: bool) -> None:
        head = b""
        try:
            while chunk := src.recv(65536):
                if swallow_after_headers:
                    if b"\r\n\r\n" in head:
                        continue  # a frame: dropped
                    head += chunk
                    chunk = head[: head.index(b"\r\n\r\n") + 4] if b"\r\n\r\n" in head else b""
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            _shutdown(src)
            _shutdown(dst)

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            _shutdown(s)
            s.close()


def _shutdown(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


@pytest.fixture
def silent_relay(gw: Gateway) -> Iterator[Relay]:
    relay = Relay(gw.port, silent_ws=True)
    yield relay
    relay.close()


@pytest.fixture
def relay(gw: Gateway) -> Iterator[Relay]:
    relay = Relay(gw.port)
    yield relay
    relay.close()


def test_client_leaves_a_websocket_that_is_open_but_silent(gw: Gateway, silent_relay: Relay, open_page: Any) -> None:
    # The gateway checks Origin against Host; the relay keeps both, so the handshake succeeds.
    page = open_page(silent_relay.url + "/healthz")
    start_client(page, "client.silent", **FAST)
    page.wait_for_function("window.client.state === 'open'", timeout=10_000)
    ids = publish_many(gw, "client.silent", 5, every_s=0.1)
    got = wait_for_count(page, 5)
    assert [g[0] for g in got] == ids
    assert {g[3] for g in got} == {"sse"}  # the WebSocket delivered nothing; SSE resumed from the cursor
    retry = next(s for s in page.evaluate("window.statuses") if s["state"] == "retry")
    assert retry["reason"] == "websocket: the WebSocket is open but events do not arrive", retry
    ids += publish_many(gw, "client.silent", 3, start=5)
    assert [g[0] for g in wait_for_count(page, 8)] == ids


def test_long_poll_holds_for_less_behind_a_proxy_that_cuts_held_requests(
    gw: Gateway, cutting: Nginx, open_page: Any
) -> None:
    page = open_page(cutting.url + "/healthz")
    start_client(page, "client.lpcut", **(FAST | {"transports": ["long_poll"], "longPollTimeoutS": 8}))
    # nginx answers 504 after 2 s of holding; the client then holds for 1 s and stays on long poll.
    page.wait_for_function("window.client.longPollHoldS < 2", timeout=8000, polling=50)
    ids = publish_many(gw, "client.lpcut", 3, every_s=0.7)
    assert [g[0] for g in wait_for_count(page, 3)] == ids
    statuses = page.evaluate("window.statuses")
    assert not [s for s in statuses if s["state"] in ("retry", "failed")], statuses
    assert any("cut after ~2 s" in (s["reason"] or "") for s in statuses), statuses


def test_client_returns_to_websocket_once_it_works_again(gw: Gateway, relay: Relay, open_page: Any) -> None:
    page = open_page(relay.url + "/healthz")
    start_client(page, "client.upgrade", **(FAST | {"upgradeAfterMs": 1000, "stallMs": 20_000}))
    page.wait_for_function("window.client.state === 'open'", timeout=10_000)
    ids = publish_many(gw, "client.upgrade", 2)
    wait_for_count(page, 2)

    relay.block_ws(True)  # the network stops allowing WebSockets: the client moves to SSE
    page.wait_for_function("window.client.transport === 'sse' && window.client.state === 'open'", timeout=10_000)
    ids += publish_many(gw, "client.upgrade", 2, start=2)
    wait_for_count(page, 4)
    # It tries WebSocket again now and then, since it worked before; while blocked that fails.
    page.wait_for_function(
        "window.statuses.some(s => (s.reason || '').includes('again, it worked earlier'))", timeout=5000
    )
    relay.block_ws(False)
    page.wait_for_function(
        "window.client.transport === 'websocket' && window.client.state === 'open'", timeout=10_000, polling=50
    )
    ids += publish_many(gw, "client.upgrade", 2, start=4)
    got = wait_for_count(page, 6)
    time.sleep(0.3)
    assert [g[0] for g in page.evaluate("window.got")] == ids  # once each, in order, across both switches
    assert [g[3] for g in got] == ["websocket", "websocket", "sse", "sse", "websocket", "websocket"]


def test_the_clients_sse_parser_follows_the_format(gw: Gateway, open_page: Any) -> None:
    page = open_page(gw.url + "/healthz")
    page.add_script_tag(url="/static/gateway-client.js")
    chunks = [
        "retry: 500\n\n: heartbeat\n\n",
        'id: 1-0\nevent: tick\ndata: {"a"',
        ": 1}\n\nid: 2-0\r",  # CRLF split across two chunks
        "\ndata: line one\r\ndata:line two\r\ndata\r\n\r\n",
        "id: 3-0\rdata: cr only\r\rdata: no id line, keeps the last id\n\n",
        "event: unfinished\ndata: never dispatched",
    ]
    events = page.evaluate(
        """(chunks) => {
            const out = [];
            const parser = new GatewayClient.SSEParser((ev) => out.push(ev));
            chunks.forEach((c) => parser.push(c));
            return out;
        }""",
        chunks,
    )
    assert events == [
        {"id": "1-0", "event": "tick", "data": '{"a": 1}'},
        {"id": "2-0", "event": "message", "data": "line one\nline two\n"},
        {"id": "3-0", "event": "message", "data": "cr only"},
        {"id": "3-0", "event": "message", "data": "no id line, keeps the last id"},
    ]
