"""`python -m gateway.diagnose URL`: the page's probes from a terminal, against a live gateway,
directly and through real nginx; same verdict JSON as the page."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests import hostile as _hostile
from tests import proxies as _proxies
from tests.helpers import ROOT, Gateway, free_port

start_nginx = _proxies.start_nginx  # a fixture (pytest finds fixtures among a module's names)
start_hostile = _hostile.start_hostile


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway({}, tmp_path_factory.mktemp("diag-cli"))
    yield gw
    gw.stop()


def cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway.diagnose", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_cli_direct_prints_the_verdict_json(gateway: Gateway) -> None:
    r = cli(gateway.url, "--hold", "2", "--raw")
    assert r.returncode == 0, r.stderr
    v: dict[str, Any] = json.loads(r.stdout)
    assert {n: t["status"] for n, t in v["transports"].items()} == {
        "short_poll": "ok",
        "long_poll": "ok",
        "sse": "ok",
        "websocket": "ok",
    }, r.stderr
    assert v["transports"]["sse"]["buffered"] is False
    assert v["recommended"] == "websocket" and v["source"] == "cli" and v["mode"] == "custom"
    assert v["raw"]["probes"]["websocket"]["echo"]["arrived"] is True
    assert "recommended: websocket" in r.stderr


def test_cli_through_nginx_without_upgrade(gateway: Gateway, start_nginx: Any) -> None:
    proxy = start_nginx(gateway.port, "no_upgrade")
    r = cli(proxy.url, "--hold", "2")
    v = json.loads(r.stdout)
    assert v["transports"]["websocket"]["status"] == "broken", r.stderr
    assert "Upgrade" in v["transports"]["websocket"]["reason"]
    assert all(v["transports"][n]["ok"] for n in ("sse", "long_poll", "short_poll")), r.stderr
    assert v["recommended"] == "sse"


def test_cli_unreachable_and_bad_urls() -> None:
    r = cli(f"http://127.0.0.1:{free_port()}", timeout=30)
    assert r.returncode == 2 and "cannot reach" in r.stderr and r.stdout == ""
    r = cli("ftp://example.test", timeout=30)
    assert r.returncode == 2 and "http://" in r.stderr


def test_cli_through_a_caching_proxy(gateway: Gateway, start_hostile: Any) -> None:
    """GET answers cached 30 s, Cache-Control ignored (see test_diagnose_hostile for the truth)."""
    proxy = start_hostile(gateway.port, "cache", 30)
    r = cli(proxy.url, "--hold", "2")
    v = json.loads(r.stdout)
    t = v["transports"]
    assert t["short_poll"]["status"] == "broken" and "cached" in t["short_poll"]["reason"], r.stderr
    assert t["long_poll"]["status"] == "broken" and "caches" in t["long_poll"]["reason"], r.stderr
    assert t["sse"]["ok"] and t["websocket"]["ok"] and v["recommended"] == "websocket"


def test_cli_slow_first_byte_is_not_buffering(gateway: Gateway, start_hostile: Any) -> None:
    proxy = start_hostile(gateway.port, "first_byte_delay", 1.0)
    r = cli(proxy.url, "--hold", "2")
    sse = json.loads(r.stdout)["transports"]["sse"]
    assert sse["buffered"] is False and sse["status"] == "ok", sse


def test_cli_raw_results_follow_the_one_plan(gateway: Gateway) -> None:
    from gateway.diagnose.plan import PLAN, unknown_fields

    r = cli(gateway.url, "--hold", "2", "--raw")
    raw = json.loads(r.stdout)["raw"]
    assert raw["plan_version"] == PLAN["version"] and unknown_fields(raw) == [], unknown_fields(raw)
    assert raw["real"]["channel"].startswith(PLAN["channels"]["real_prefix"])
    assert raw["real"]["websocket"]["opened"] is True and raw["real"]["sse"]["status"] == 200
    assert len(raw["probes"]["sse"]["burst"]["arrivals"]) == PLAN["burst"]["n"]


def test_cli_and_page_agree_through_nginx_rewriting_host(gateway: Gateway, start_nginx: Any) -> None:
    """The same finding as the page's (test_diagnose_browser): a real channel's WebSocket with the
    site's Origin is refused by the gateway's origin rule behind nginx's default Host handling."""
    from tests.proxies import REALTIME

    proxy = start_nginx(gateway.port, REALTIME.replace("proxy_set_header Host $host;", ""))
    v = json.loads(cli(proxy.url, "--hold", "2").stdout)
    ws = v["transports"]["websocket"]
    assert ws["findings"] == ["real.origin_refused"] and ws["ok"] is False, ws
    assert "proxy_set_header Host $host;" in ws["fix"] and "server.allowed_origins" in ws["fix"]
    assert v["recommended"] == "sse"
    fixed = json.loads(cli(start_nginx(gateway.port, "realtime").url, "--hold", "2").stdout)
    assert fixed["recommended"] == "websocket" and fixed["transports"]["websocket"]["findings"] == ["ws.ok"]


@pytest.fixture(scope="module")
def auth_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway({"auth": {"secret": AUTH_SECRET}}, tmp_path_factory.mktemp("diag-cli-auth"))
    yield gw
    gw.stop()


AUTH_SECRET = "diagnose-test-secret-0123456789abcdef"


def subscriber_token(channels: list[str]) -> str:
    import time

    import jwt

    return jwt.encode({"exp": int(time.time()) + 600, "channels": channels}, AUTH_SECRET, algorithm="HS256")


def test_cli_with_access_control_on_observes_authorization(auth_gateway: Gateway) -> None:
    """Probe channels are public, real ones are not: without a token every transport works on the
    probe channel but a real channel answers 401, so none is ok; with a token all four are."""
    v = json.loads(cli(auth_gateway.url, "--hold", "2").stdout)
    for name, t in v["transports"].items():
        assert t["ok"] is False and t["findings"][-1] == "real.unauthorized" and t["real_status"] == 401, (name, t)
        assert "--token" in t["fix"]
    assert v["recommended"] is None and v["fallback"] == "websocket"
    narrow = json.loads(cli(auth_gateway.url, "--hold", "2", "--token", subscriber_token(["news.*"])).stdout)
    assert narrow["transports"]["sse"]["findings"][-1] == "real.forbidden", narrow["transports"]["sse"]
    ok = json.loads(cli(auth_gateway.url, "--hold", "2", "--token", subscriber_token(["*"])).stdout)
    assert {n: t["findings"][0] for n, t in ok["transports"].items()} == {
        "short_poll": "sp.ok",
        "long_poll": "lp.ok",
        "sse": "sse.ok",
        "websocket": "ws.ok",
    }, ok
    assert ok["recommended"] == "websocket"


def test_cli_through_tls_at_nginx(gateway: Gateway, start_nginx: Any) -> None:
    """nginx terminating TLS (self-signed, --insecure): the CLI checks wss:// and agrees with the page."""
    proxy = start_nginx(gateway.port, "realtime", tls=True)
    r = cli(proxy.url, "--hold", "2", "--insecure", "--raw")
    v = json.loads(r.stdout)
    found = {n: t["findings"][0] for n, t in v["transports"].items()}
    # Every request of the CLI opens its own TLS connection: on a loaded machine the long poll's
    # publish may read as slow; what matters here is that each transport gets through.
    assert found.pop("long_poll") in ("lp.ok", "lp.slow"), r.stderr
    assert found == {"short_poll": "sp.ok", "sse": "sse.ok", "websocket": "ws.ok"}, r.stderr
    assert v["raw"]["real"]["websocket"]["opened"] is True and v["recommended"] == "websocket"
    refused = cli(proxy.url, "--hold", "1")  # without --insecure the certificate is checked
    assert refused.returncode == 2 and "cannot reach" in refused.stderr
