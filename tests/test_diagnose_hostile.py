"""/diagnose in headless Chromium through hostile paths it was never tuned on (tests/hostile.py,
nginx and haproxy variants). For each path the truth is first found independently, with plain
Python clients through the same proxy, and the page's verdict must agree with it. Screenshots
and raw results go to test-artifacts/diagnose-h*."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import websocket

from tests import browser as _browser
from tests import hostile as _hostile
from tests import proxies as _proxies
from tests.clients import SSEClient
from tests.helpers import Gateway

browser, diagnose_page = _browser.browser, _browser.diagnose_page
start_nginx, start_haproxy_conf = _proxies.start_nginx, _proxies.start_haproxy_conf
start_hostile = _hostile.start_hostile

HOLD = 3


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway({}, tmp_path_factory.mktemp("diag-hostile"))  # default heartbeat 15 s, ping 25 s
    yield gw
    gw.stop()


def statuses(v: dict[str, Any]) -> dict[str, str]:
    return {name: t["status"] for name, t in v["transports"].items()}


def channel() -> str:
    return "diag.truth" + base64.b32encode(os.urandom(5)).decode().lower()


def sse_spacing(gateway: Gateway, url: str) -> list[float]:
    """Truth for SSE: open a stream through `url`, publish 4 events 400 ms apart once it is open
    (straight to the gateway), return the arrival times relative to each publish."""
    ch = channel()
    with SSEClient(f"{url}/sse/{ch}?since=0-0", timeout=8) as client:
        assert client.status == 200
        lags = []
        for i in range(4):
            sent = time.monotonic()
            gateway.publish(ch, f"e{i}")
            event = client.next_event(time.monotonic() + 3)
            assert event is not None and event["data"] == f"e{i}"
            lags.append(time.monotonic() - sent)
            time.sleep(0.4)
    return lags


def test_caching_proxy_serves_stale_polls(diagnose_page: Any, gateway: Gateway, start_hostile: Any) -> None:
    """A proxy that caches GET answers for 30 s, Cache-Control ignored: a poller re-asking with
    the same cursor never sees new events. The page used to call short polling ok here."""
    proxy = start_hostile(gateway.port, "cache", 30)
    ch = channel()
    cursor = requests.get(f"{proxy.url}/poll/{ch}", timeout=5).json()["cursor"]
    assert requests.get(f"{proxy.url}/poll/{ch}?since={cursor}", timeout=5).json()["events"] == []
    gateway.publish(ch, "new")
    assert requests.get(f"{gateway.url}/poll/{ch}?since={cursor}", timeout=5).json()["events"]  # it exists...
    assert requests.get(f"{proxy.url}/poll/{ch}?since={cursor}", timeout=5).json()["events"] == []  # ...stale here
    held = f"{proxy.url}/longpoll/{ch}.lp?since=0-0&timeout=1"
    assert requests.get(held, timeout=5).json()["events"] == []
    gateway.publish(f"{ch}.lp", "new")
    assert requests.get(held, timeout=5).json()["events"] == []  # a long poller is stuck too
    assert max(sse_spacing(gateway, proxy.url)) < 1  # streams are not cached

    v = diagnose_page(proxy.url, HOLD, "h1-caching-proxy")
    assert statuses(v) == {"short_poll": "broken", "long_poll": "broken", "sse": "ok", "websocket": "ok"}, v
    assert "cached" in v["transports"]["short_poll"]["reason"] and "cache" in v["transports"]["long_poll"]["reason"]
    assert v["recommended"] == "websocket"


def test_slow_first_byte_is_not_called_buffering(diagnose_page: Any, gateway: Gateway, start_hostile: Any) -> None:
    """Every response's first byte is held 1 s (a slow authenticating proxy); after that,
    events flow one by one. The page used to time its burst from before the stream opened and
    called SSE buffered."""
    proxy = start_hostile(gateway.port, "first_byte_delay", 1.0)
    started = time.monotonic()
    assert requests.get(f"{proxy.url}/poll/{channel()}", timeout=5).status_code == 200
    assert time.monotonic() - started >= 0.9
    assert max(sse_spacing(gateway, proxy.url)) < 0.5  # once open, each event arrives at once

    v = diagnose_page(proxy.url, HOLD, "h2-slow-first-byte")
    sse = v["transports"]["sse"]
    assert sse["status"] == "ok" and sse["buffered"] is False, sse
    assert v["transports"]["websocket"]["ok"] is True, v
    assert v["recommended"] == "websocket"


def test_proxy_refusing_event_streams(diagnose_page: Any, gateway: Gateway, start_hostile: Any) -> None:
    proxy = start_hostile(gateway.port, "refuse_sse")
    assert requests.get(f"{proxy.url}/sse/{channel()}", timeout=5).status_code == 502
    v = diagnose_page(proxy.url, HOLD, "h3-refuse-sse")
    assert statuses(v) == {"short_poll": "ok", "long_poll": "ok", "sse": "broken", "websocket": "ok"}, v
    assert "HTTP 502" in v["transports"]["sse"]["reason"] and v["transports"]["sse"]["buffered"] is False
    assert v["recommended"] == "websocket"


def test_proxy_ending_event_streams_at_once(diagnose_page: Any, gateway: Gateway, start_hostile: Any) -> None:
    """Headers of an event stream pass, then the proxy ends it: not an idle timeout, so no
    heartbeat advice."""
    proxy = start_hostile(gateway.port, "end_sse")
    body = b""
    with requests.get(f"{proxy.url}/sse/{channel()}", stream=True, timeout=5) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        with pytest.raises(requests.RequestException):  # ended before the first chunk of the body
            for chunk in r.iter_content(chunk_size=None):
                body += chunk
    assert body == b""
    v = diagnose_page(proxy.url, HOLD, "h11-end-sse")
    sse = v["transports"]["sse"]
    assert sse["status"] == "broken" and "right after it opened" in sse["reason"], sse
    assert "heartbeat_s" not in sse["fix"]
    assert v["recommended"] == "websocket"


def test_proxy_refusing_upgrades(diagnose_page: Any, gateway: Gateway, start_hostile: Any) -> None:
    proxy = start_hostile(gateway.port, "refuse_upgrade")
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(f"ws://127.0.0.1:{proxy.port}/ws/{channel()}", timeout=5)
    assert refused.value.status_code == 403
    v = diagnose_page(proxy.url, HOLD, "h4-refuse-upgrade")
    assert statuses(v) == {"short_poll": "ok", "long_poll": "ok", "sse": "ok", "websocket": "broken"}, v
    assert "never reached the gateway" in v["transports"]["websocket"]["reason"]
    assert v["recommended"] == "sse"


def test_proxy_answering_the_upgrade_itself(diagnose_page: Any, gateway: Gateway, start_hostile: Any) -> None:
    """The proxy sends a valid 101 itself and hangs up: the socket 'opens' but nothing gets through."""
    proxy = start_hostile(gateway.port, "fake_101")
    ws = websocket.create_connection(f"ws://127.0.0.1:{proxy.port}/ws/{channel()}", timeout=5)
    with pytest.raises((websocket.WebSocketException, OSError)):
        ws.send(json.dumps({"event": "echo", "data": "x"}))
        ws.recv()
    ws.close()
    v = diagnose_page(proxy.url, HOLD, "h5-fake-101")
    assert statuses(v) == {"short_poll": "ok", "long_poll": "ok", "sse": "ok", "websocket": "broken"}, v
    assert "never received this handshake" in v["transports"]["websocket"]["reason"], v["transports"]["websocket"]
    assert v["recommended"] == "sse"


def test_proxy_closing_every_connection_after_4s(diagnose_page: Any, gateway: Gateway, start_hostile: Any) -> None:
    """Connections live 4 s, busy or not: streams and held polls are cut, short polls are fine."""
    proxy = start_hostile(gateway.port, "lifetime", 4)
    ch = channel()
    started, cut = time.monotonic(), None
    with SSEClient(f"{proxy.url}/sse/{ch}?since=0-0", timeout=8) as client:
        for i in range(12):  # busy: an event every 0.5 s
            gateway.publish(ch, f"e{i}")
            try:
                if client.next_event(time.monotonic() + 2) is None:
                    break
            except requests.RequestException:  # cut in the middle of the chunked body
                break
            time.sleep(0.5)
        cut = time.monotonic() - started
    assert 3 <= cut <= 5.5, cut

    v = diagnose_page(proxy.url, 6, "h6-lifetime-4s")
    t = v["transports"]
    assert statuses(v) == {"short_poll": "ok", "long_poll": "degraded", "sse": "degraded", "websocket": "degraded"}, v
    for name in ("long_poll", "sse", "websocket"):
        assert 3 <= t[name]["cut_after_s"] <= 5.5, t[name]
    # Not an idle timeout: keep-alives would not help, and the page must not advise them.
    assert 3 <= v["path"]["lifetime_limit_s"] <= 5.5 and v["path"]["idle_limit_s"] is None, v["path"]
    assert "heartbeat_s below" not in t["sse"]["fix"] and "ping_s below" not in t["websocket"]["fix"]
    assert "busy or not" in t["sse"]["reason"]
    assert v["recommended"] == "short_poll"


def test_scanning_proxy_that_holds_the_first_kilobyte(diagnose_page: Any, gateway: Gateway, start_hostile: Any) -> None:
    """Like an antivirus or content filter: nothing of a response passes until its first 1 KB is
    there. Events are small, so a plain stream shows nothing; with 2 KB of padding it streams."""
    proxy = start_hostile(gateway.port, "sniff", 1024)
    with pytest.raises(requests.ReadTimeout):
        requests.get(f"{proxy.url}/sse/{channel()}", stream=True, timeout=(2, 2))
    ch = channel()
    with SSEClient(f"{proxy.url}/sse/{ch}?since=0-0&padding=2048", timeout=5) as client:
        gateway.publish(ch, "now")
        event = client.next_event(time.monotonic() + 2)
        assert event is not None and event["data"] == "now"

    v = diagnose_page(proxy.url, HOLD, "h10-scanning-proxy")
    sse = v["transports"]["sse"]
    assert sse["status"] == "degraded" and sse["buffered"] is True and sse["works_with_padding"] is True, sse
    assert "padding_bytes = 2048" in sse["fix"]
    assert all(v["transports"][n]["ok"] for n in ("websocket", "long_poll", "short_poll")), v
    assert v["recommended"] == "websocket"


def test_nginx_gzipping_event_streams(diagnose_page: Any, gateway: Gateway, start_nginx: Any) -> None:
    """gzip on for text/event-stream: nginx flushes the compressor with each unbuffered chunk, so
    events still arrive one by one (checked with a client that asks for gzip)."""
    proxy = start_nginx(
        gateway.port,
        _proxies.REALTIME + "    gzip on;\n    gzip_types text/event-stream application/json;\n"
        "    gzip_min_length 0;\n    gzip_proxied any;\n",
    )
    r = requests.get(f"{proxy.url}/sse/{channel()}", stream=True, timeout=5, headers={"Accept-Encoding": "gzip"})
    assert r.headers.get("Content-Encoding") == "gzip"
    r.close()
    assert max(sse_spacing(gateway, proxy.url)) < 1
    v = diagnose_page(proxy.url, HOLD, "h7-nginx-gzip")
    assert all(t["ok"] for t in v["transports"].values()), v
    assert v["transports"]["sse"]["buffered"] is False and v["recommended"] == "websocket"


def test_haproxy_short_tunnel_timeout(diagnose_page: Any, gateway: Gateway, start_haproxy_conf: Any) -> None:
    """haproxy mode http, `timeout server 10s` but `timeout tunnel 3s`: only the upgraded
    WebSocket is cut when idle; SSE and long polls (HTTP, server timeout) survive the hold."""
    proxy = start_haproxy_conf(
        gateway.port, "timeout client 10s\ntimeout server 10s\ntimeout tunnel 3s\noption http-server-close"
    )
    ws = websocket.create_connection(f"ws://127.0.0.1:{proxy.port}/ws/{channel()}", timeout=8)
    started = time.monotonic()
    with pytest.raises((websocket.WebSocketConnectionClosedException, OSError)):
        while time.monotonic() - started < 8:
            ws.recv()
    assert 2.5 <= time.monotonic() - started <= 5
    ws.close()

    v = diagnose_page(proxy.url, 6, "h8-haproxy-tunnel3")
    assert statuses(v) == {"short_poll": "ok", "long_poll": "ok", "sse": "ok", "websocket": "degraded"}, v
    assert 2.5 <= v["transports"]["websocket"]["idle_limit_s"] <= 5, v["transports"]["websocket"]
    assert v["recommended"] == "sse"


def test_quick_run_without_hold_through_a_10s_idle_limit(
    browser: Any, gateway: Gateway, start_haproxy_conf: Any
) -> None:
    """The default quick run (no ?hold=: 15 s) through haproxy with 10 s idle timeouts: the default
    SSE heartbeat (15 s) and WebSocket ping (25 s) do not keep anything alive, so only short
    polling is ok. The truth is taken during the page's run: an idle SSE stream is cut near 10 s."""
    proxy = start_haproxy_conf(gateway.port, "timeout client 10s\ntimeout server 10s\ntimeout tunnel 10s")
    truth: dict[str, float] = {}

    def idle_stream() -> None:
        started = time.monotonic()
        with SSEClient(f"{proxy.url}/sse/{channel()}", timeout=20) as client:
            try:
                client.next_event(time.monotonic() + 20)
            except requests.RequestException:  # cut in the middle of the chunked body
                client.closed = True
            truth["cut"] = time.monotonic() - started if client.closed else -1

    thread = threading.Thread(target=idle_stream, daemon=True)
    thread.start()
    v = _run_quick(browser, proxy.url, "h9-quick-haproxy10")
    thread.join(25)
    assert 9 <= truth.get("cut", 0) <= 12, truth
    assert v["mode"] == "quick" and v["hold_s"] == 15
    assert statuses(v) == {"short_poll": "ok", "long_poll": "degraded", "sse": "degraded", "websocket": "degraded"}, v
    for name in ("sse", "websocket"):
        assert 9 <= v["transports"][name]["idle_limit_s"] <= 12, v["transports"][name]
    assert "sse.heartbeat_s" in v["transports"]["sse"]["fix"]
    assert v["recommended"] == "short_poll"


def _run_quick(browser: Any, url: str, name: str) -> dict[str, Any]:
    """/diagnose exactly as a person opens it: no ?hold=."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    try:
        page.goto(f"{url}/diagnose", wait_until="domcontentloaded", timeout=15_000)
        page.wait_for_function("window.__diagnosis !== undefined", timeout=75_000, polling=200)
        verdict = page.evaluate("window.__diagnosis")
        _browser.ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(_browser.ARTIFACTS / f"diagnose-{name}.png"), full_page=True)
    finally:
        context.close()
    return verdict
