"""/diagnose in real headless Chromium, directly and through real proxies: nginx configured the
five ways of the issue, plus nginx variants and hostile TCP proxies it was not tuned on. The
page's verdict must match what really gets through. Each run saves a screenshot and the raw
results under test-artifacts/."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import websocket

from tests import browser as _browser
from tests import proxies as _proxies
from tests.helpers import Gateway

# Fixtures from the shared modules, bound here (pytest finds fixtures among a module's names).
browser, diagnose_page, tls_browser = _browser.browser, _browser.diagnose_page, _browser.tls_browser
start_nginx, start_tcp_proxy, start_haproxy = _proxies.start_nginx, _proxies.start_tcp_proxy, _proxies.start_haproxy
start_haproxy_conf = _proxies.start_haproxy_conf

HOLD = 3  # short holds keep the file near a minute; the cut case needs a hold past nginx's 5 s


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # Default heartbeat (15 s) and ping (25 s): a 5 s proxy timeout really cuts idle streams.
    gw = Gateway({}, tmp_path_factory.mktemp("diag-browser"))
    yield gw
    gw.stop()


def statuses(verdict: dict[str, Any]) -> dict[str, str]:
    return {name: t["status"] for name, t in verdict["transports"].items()}


def test_direct(diagnose_page: Any, gateway: Gateway) -> None:
    v = diagnose_page(gateway.url, HOLD, "1-direct")
    assert not [c for c in v["_console"] if c.startswith("error")], v["_console"]  # not even a favicon 404
    # A picture per transport: the whole burst drawn as it arrived (one event for the polls).
    assert v["_drawn"] == {"websocket": 5, "sse": 5, "long_poll": 1, "short_poll": 1}, v["_drawn"]
    assert statuses(v) == {"short_poll": "ok", "long_poll": "ok", "sse": "ok", "websocket": "ok"}, v
    assert v["transports"]["sse"]["buffered"] is False
    assert v["recommended"] == "websocket" and v["source"] == "server"
    assert v["path"]["proxy"] is False


def test_nginx_configured_for_realtime(diagnose_page: Any, gateway: Gateway, start_nginx: Any) -> None:
    proxy = start_nginx(gateway.port, "realtime")
    v = diagnose_page(proxy.url, HOLD, "2-nginx-realtime")
    assert statuses(v) == {"short_poll": "ok", "long_poll": "ok", "sse": "ok", "websocket": "ok"}, v
    assert v["recommended"] == "websocket"
    assert v["path"]["proxy"] is True  # X-Forwarded-For and nginx's Server header give it away
    assert not any("rewrites the Host header" in w for w in v["path"]["warnings"])  # Host $host keeps the name
    # A real channel's WebSocket got through too: nothing of the gateway's own rules refused it.
    assert not any(f.startswith("real.") for t in v["transports"].values() for f in t["findings"]), v
    assert not [c for c in v["_console"] if c.startswith("error")], v["_console"]


def test_nginx_not_forwarding_upgrade(diagnose_page: Any, gateway: Gateway, start_nginx: Any) -> None:
    proxy = start_nginx(gateway.port, "no_upgrade")
    with pytest.raises(websocket.WebSocketException):  # reality: no WebSocket gets through
        websocket.create_connection(proxy.url.replace("http", "ws") + "/ws/diag.check", timeout=5)
    v = diagnose_page(proxy.url, HOLD, "3-nginx-no-upgrade")
    assert statuses(v) == {"short_poll": "ok", "long_poll": "ok", "sse": "ok", "websocket": "broken"}, v
    ws = v["transports"]["websocket"]
    assert "Upgrade" in ws["reason"] and "proxy_set_header Upgrade $http_upgrade" in ws["fix"]
    assert v["recommended"] == "sse"


def test_nginx_buffering_forced(diagnose_page: Any, gateway: Gateway, start_nginx: Any) -> None:
    proxy = start_nginx(gateway.port, "buffered")
    with pytest.raises(requests.ReadTimeout):  # reality: the stream is held back by nginx
        requests.get(proxy.url + "/sse/diag.check", stream=True, timeout=(2, 2))
    v = diagnose_page(proxy.url, HOLD, "4-nginx-buffered")
    sse = v["transports"]["sse"]
    assert sse["ok"] is False and sse["buffered"] is True, sse
    assert "proxy_buffering off" in sse["fix"]
    assert v["transports"]["long_poll"]["ok"] and v["transports"]["short_poll"]["ok"]
    assert v["recommended"] == "long_poll"  # this nginx also speaks HTTP/1.0 upstream: no WebSocket either


def test_nginx_read_timeout_5s(diagnose_page: Any, gateway: Gateway, start_nginx: Any) -> None:
    proxy = start_nginx(gateway.port, "timeout5")
    v = diagnose_page(proxy.url, 8, "5-nginx-timeout5")
    t = v["transports"]
    assert t["short_poll"]["ok"] is True
    lp = t["long_poll"]
    assert lp["ok"] is False and 4 <= lp["cut_after_s"] <= 6.5 and "~5 s" in lp["reason"], lp
    for name in ("sse", "websocket"):
        assert t[name]["ok"] is False and t[name]["status"] == "degraded", t[name]
        assert 4 <= t[name]["idle_limit_s"] <= 6.5, t[name]
    assert 4 <= v["path"]["idle_limit_s"] <= 6.5
    assert v["recommended"] == "short_poll"


def test_nginx_buffering_on_with_http11_really_streams(diagnose_page: Any, gateway: Gateway, start_nginx: Any) -> None:
    """Honesty check: nginx 1.22 with proxy_buffering on but an HTTP/1.1 (chunked) upstream relays
    each chunk at once, so the page must NOT call SSE buffered there just because of the config."""
    proxy = start_nginx(gateway.port, "buffered_http11")
    with requests.get(proxy.url + "/sse/diag.check", stream=True, timeout=5) as r:
        started = time.monotonic()
        assert b"retry:" in next(r.iter_content(chunk_size=None))
        assert time.monotonic() - started < 2
    v = diagnose_page(proxy.url, HOLD, "6-nginx-buffering-http11")
    assert v["transports"]["sse"]["ok"] is True and v["transports"]["sse"]["buffered"] is False, v
    assert v["recommended"] == "websocket"


def test_gateway_mounted_under_a_path_prefix(diagnose_page: Any, gateway: Gateway, start_nginx: Any) -> None:
    """A proxy that serves the gateway at /realtime/ (not at the root): the page probes relative to itself."""
    proxy = start_nginx(gateway.port, "realtime", prefix="/realtime")
    v = diagnose_page(proxy.url, HOLD, "7-nginx-prefix")
    assert all(t["ok"] for t in v["transports"].values()), v
    assert v["recommended"] == "websocket"


def test_nginx_rewriting_host(diagnose_page: Any, gateway: Gateway, start_nginx: Any) -> None:
    """Without `proxy_set_header Host`, nginx sends the upstream's address as Host. The probe
    channel gets through (it is exempt from the origin rule), but a real page's WebSocket on a
    real channel is refused 403 by the gateway's origin rule: the verdict says so, observed."""
    from tests.proxies import REALTIME

    proxy = start_nginx(gateway.port, REALTIME.replace("proxy_set_header Host $host;", ""))
    # Reality, as a page of that site would meet it (the site's Origin, a real channel).
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(
            proxy.url.replace("http", "ws") + "/ws/news", timeout=5, origin=proxy.url.rstrip("/")
        )
    assert refused.value.status_code == 403
    v = diagnose_page(proxy.url, HOLD, "8-nginx-host-rewrite")
    ws = v["transports"]["websocket"]
    assert ws["ok"] is False and ws["status"] == "broken" and ws["findings"] == ["real.origin_refused"], ws
    assert "proxy_set_header Host $host;" in ws["fix"] and "server.allowed_origins" in ws["fix"], ws
    assert "refuses this page's WebSocket on a real channel" in ws["reason"]
    assert v["recommended"] == "sse", v
    assert all(v["transports"][n]["ok"] for n in ("sse", "long_poll", "short_poll")), v
    assert any("the gateway was asked for 127.0.0.1:" in e for e in v["path"]["evidence"]), v["path"]
    assert "path.host_rewritten" in v["path"]["findings"], v["path"]


def test_proxy_that_accepts_the_upgrade_but_relays_no_frames(
    diagnose_page: Any, gateway: Gateway, start_tcp_proxy: Any
) -> None:
    proxy = start_tcp_proxy(gateway.port, "blackhole_ws")
    v = diagnose_page(proxy.url, HOLD, "9-blackhole-websocket")
    ws = v["transports"]["websocket"]
    assert ws["status"] == "broken" and "nothing arrives" in ws["reason"], ws
    assert all(v["transports"][n]["ok"] for n in ("sse", "long_poll", "short_poll")), v
    assert v["recommended"] == "sse"


def test_proxy_that_releases_data_every_two_seconds(diagnose_page: Any, gateway: Gateway, start_tcp_proxy: Any) -> None:
    """Not nginx: a proxy that holds the server's bytes and lets them out every 2 s. Everything
    arrives, but bunched: the streams are not ok, SSE is buffered, and the page says so. (Every
    answer is ~2 s late, which from the browser looks like a slow link: long poll may pass.)"""
    proxy = start_tcp_proxy(gateway.port, "flush_every", 2.0)
    v = diagnose_page(proxy.url, HOLD, "10-flush-every-2s")
    sse, ws = v["transports"]["sse"], v["transports"]["websocket"]
    assert sse["buffered"] is True and sse["status"] == "degraded" and "bunched" in sse["reason"], sse
    assert ws["status"] == "degraded" and "bunched" in ws["reason"], ws
    assert v["transports"]["short_poll"]["status"] == "degraded"  # a 2 s round trip is slow
    assert v["recommended"] in (None, "long_poll")


def test_haproxy_with_4s_idle_timeouts(diagnose_page: Any, gateway: Gateway, start_haproxy: Any) -> None:
    proxy = start_haproxy(gateway.port, "4s")
    v = diagnose_page(proxy.url, 7, "11-haproxy-timeout4")
    t = v["transports"]
    assert t["short_poll"]["ok"] is True, t["short_poll"]
    assert t["long_poll"]["ok"] is False and 3 <= t["long_poll"]["cut_after_s"] <= 5.5, t["long_poll"]
    for name in ("sse", "websocket"):
        assert t[name]["status"] == "degraded" and 3 <= t[name]["idle_limit_s"] <= 5.5, t[name]
    assert v["recommended"] == "short_poll"


def test_verdict_endpoint_unreachable_says_so(diagnose_page: Any, gateway: Gateway, start_nginx: Any) -> None:
    """window.__diagnosis is always set, but there is one verdict and it is the gateway's: with POST
    /diagnose/verdict refused on the way, the page says it has none (and keeps the raw results)
    rather than guessing with a second, untested one."""
    from tests.proxies import REALTIME

    proxy = start_nginx(gateway.port, REALTIME + "    location = /diagnose/verdict { return 502; }\n")
    v = diagnose_page(proxy.url, HOLD, "12-verdict-endpoint-blocked")
    assert v["source"] == "none" and v["recommended"] is None and "HTTP 502" in v["summary"], v
    assert all(t["findings"] == ["no_verdict"] for t in v["transports"].values())
    assert v["raw"]["probes"]["websocket"]["opened"] is True


def test_slow_but_clean_link_is_not_called_broken(diagnose_page: Any, gateway: Gateway, start_tcp_proxy: Any) -> None:
    """400 ms added each way (800 ms round trips): everything still arrives promptly for such a
    link and unbatched, so everything is ok."""
    proxy = start_tcp_proxy(gateway.port, "delay", 0.4)
    v = diagnose_page(proxy.url, HOLD, "13-slow-link-400ms")
    assert all(t["ok"] for t in v["transports"].values()), v
    assert v["transports"]["websocket"]["latency_ms"] >= 700  # the round trip really was slow


def test_tls_and_http2_at_the_proxy(tls_browser: Any, gateway: Gateway, start_nginx: Any) -> None:
    """nginx terminating TLS (a self-signed certificate) and speaking HTTP/2 to the browser: the page
    says so (no six-connection warning then), WebSocket works over wss://, and the verdict says which
    transports ride the one HTTP/2 connection."""
    proxy = start_nginx(gateway.port, "realtime", tls=True)
    assert proxy.url.startswith("https://")
    v = _browser.run_diagnose(tls_browser, proxy.url, HOLD, "14-nginx-tls-http2")
    assert statuses(v) == {"short_poll": "ok", "long_poll": "ok", "sse": "ok", "websocket": "ok"}, v
    assert v["recommended"] == "websocket"
    path = v["path"]
    assert path["browser_protocol"] == "h2" and path["http2"] is True, path
    assert "path.http2" in path["findings"] and "path.six_connections" not in path["findings"]
    assert path["on_http2_connection"] == ["short_poll", "long_poll", "sse"]
    assert any("wss://" in w for w in path["warnings"]), path["warnings"]
    assert not [c for c in v["_console"] if c.startswith("error")], v["_console"]


def test_an_idle_limit_only_the_thorough_run_catches(diagnose_page: Any, gateway: Gateway, start_haproxy: Any) -> None:
    """haproxy cutting idle connections after 4 s: a run holding 3 s sees nothing and says that
    longer limits would not show; the thorough run (held longer) catches the cut and says how long."""
    proxy = start_haproxy(gateway.port, "4s")
    quick = diagnose_page(proxy.url, 3, "15-haproxy-quick-misses")
    assert all(t["ok"] for t in quick["transports"].values()), quick
    assert "path.short_hold" in quick["path"]["findings"], quick["path"]
    thorough = diagnose_page(proxy.url, 7, "16-haproxy-thorough-catches", "&mode=thorough")
    assert thorough["mode"] == "thorough" and "path.short_hold" not in thorough["path"]["findings"]
    ws = thorough["transports"]["websocket"]
    assert ws["findings"] == ["ws.cut"] and 3 <= ws["idle_limit_s"] <= 5.5, ws
    assert ws["config"] == "[websocket]\nping_s = 2" and "[websocket]\nping_s = 2" in ws["fix"]


def test_access_control_on_real_channels(diagnose_page: Any, tmp_path: Any) -> None:
    """With access control on, a page of the site needs a token on real channels: without one
    nothing is ok (each transport says 401 and how to send a token); with ?token= all four are."""
    import jwt

    secret = "diagnose-browser-secret-0123456789ab"
    gw = Gateway({"auth": {"secret": secret}}, tmp_path)
    try:
        v = diagnose_page(gw.url, HOLD, "17-auth-no-token")
        assert all(t["findings"][-1] == "real.unauthorized" for t in v["transports"].values()), v
        assert v["recommended"] is None and v["fallback"] == "websocket"
        token = jwt.encode({"exp": int(time.time()) + 600, "channels": ["*"]}, secret, algorithm="HS256")
        v = diagnose_page(gw.url, HOLD, "18-auth-token", f"&token={token}")
        assert statuses(v) == {"short_poll": "ok", "long_poll": "ok", "sse": "ok", "websocket": "ok"}, v
        assert v["recommended"] == "websocket"
        assert token not in json.dumps(v)
    finally:
        gw.stop()


def test_the_burst_is_drawn_while_the_probe_runs(browser: Any, gateway: Gateway) -> None:
    """A person sees the burst arrive in the picture before any verdict or sentence."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{gateway.url}/diagnose?hold=6", wait_until="domcontentloaded")
        page.wait_for_function(
            "window.__diagnosis === undefined && ['sse', 'websocket'].every(n =>"
            " document.querySelectorAll('#probe-' + n + '.running .picture svg circle.arrived').length === 5)",
            timeout=20_000,
            polling=100,
        )
        assert page.text_content("#probe-sse .reason") == ""  # nothing to read yet
    finally:
        context.close()
