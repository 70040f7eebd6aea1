"""The /diagnose helper endpoints: bounded bursts on diag.* channels only, path facts, the record
of what probe requests looked like on arrival, the verdict endpoint, and the transport hooks
(WebSocket echo on diag channels, SSE ?padding=)."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
import requests
import websocket

from gateway.app import create_app
from gateway.diagnose.probes import MAX_VERDICT_BYTES, RateLimit
from tests.helpers import Gateway


@pytest.fixture
def client() -> Any:
    app = create_app({"server": {"access_log": False}, "demo": {"channel": ""}})
    return app.test_client()


def wait_events(client: Any, channel: str, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        events = client.get(f"/poll/{channel}?since=0-0").get_json()["events"]
        if len(events) >= n:
            break
        time.sleep(0.05)
    return events


def test_burst_publishes_timed_events_without_a_token(client: Any) -> None:
    r = client.post("/diagnose/burst?channel=diag.t1&n=4&gap_ms=100&tag=x")
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["n"] == 4
    events = wait_events(client, "diag.t1", 4)
    assert [e["event"] for e in events] == ["x"] * 4
    data = [json.loads(e["data"]) for e in events]
    assert [d["seq"] for d in data] == [0, 1, 2, 3]
    spacing = [b["sent_ms"] - a["sent_ms"] for a, b in zip(data, data[1:], strict=False)]
    assert all(80 <= s <= 400 for s in spacing), spacing


@pytest.mark.parametrize(
    "query, status, code",
    [
        ("channel=prices&n=1", 400, "not_diagnostic"),
        ("channel=diag.&n=1", 400, "not_diagnostic"),
        ("channel=diag.a%20b", 400, "invalid_channel"),
        ("channel=diag.a&n=21", 400, "invalid_argument"),
        ("channel=diag.a&n=x", 400, "invalid_argument"),
        ("channel=diag.a&gap_ms=-1", 400, "invalid_argument"),
        ("channel=diag.a&delay_ms=999999", 400, "invalid_argument"),
        ("", 400, "invalid_channel"),
    ],
)
def test_burst_rejects_bad_input_with_json(client: Any, query: str, status: int, code: str) -> None:
    r = client.post(f"/diagnose/burst?{query}")
    assert r.status_code == status
    assert r.get_json()["error"] == code and r.get_json()["detail"]


def test_burst_also_answers_get(client: Any) -> None:
    # The page falls back to GET where something on the path refuses POSTs.
    assert client.get("/diagnose/burst?channel=diag.get&n=1").status_code == 202
    assert len(wait_events(client, "diag.get", 1)) == 1


def test_burst_is_rate_limited_per_client(client: Any) -> None:
    codes = [client.post("/diagnose/burst?channel=diag.rl&n=1&gap_ms=0").status_code for _ in range(80)]
    assert codes[0] == 202 and 429 in codes
    assert client.post("/diagnose/burst?channel=diag.rl&n=1").get_json()["error"] == "rate_limited"


def test_rate_limit_refills() -> None:
    limit = RateLimit(rate=1.0, burst=2)
    assert limit.allow("a", now=0) and limit.allow("a", now=0)
    assert not limit.allow("a", now=0.1)
    assert limit.allow("a", now=1.2)
    assert limit.allow("b", now=0.1)


def test_burst_is_open_to_foreign_origins_but_publish_is_not(client: Any) -> None:
    r = client.post("/diagnose/burst?channel=diag.o&n=1", headers={"Origin": "http://elsewhere.test"})
    assert r.status_code == 202
    r = client.get("/poll/prices", headers={"Origin": "http://elsewhere.test"})
    assert r.status_code == 403


def test_origin_matches_a_host_header_without_port(client: Any) -> None:
    # nginx's usual `proxy_set_header Host $host;` drops the port the browser's Origin carries.
    r = client.get("/poll/prices", headers={"Origin": "http://gw.example:8080", "Host": "gw.example"})
    assert r.status_code == 200
    r = client.get("/poll/prices", headers={"Origin": "http://evil.example:8080", "Host": "gw.example"})
    assert r.status_code == 403


def test_facts_report_proxy_headers_and_known_platforms(client: Any) -> None:
    r = client.get(
        "/diagnose/facts",
        headers={"Via": "1.1 vegur", "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"},
    )
    facts = r.get_json()
    assert r.headers["Cache-Control"] == "no-store"
    assert facts["headers"]["Via"] == "1.1 vegur"
    assert facts["headers"]["X-Forwarded-For"] == "203.0.113.7"
    assert facts["platform"] == "heroku" and facts["platform_limits"]["idle_s"] == 55
    assert facts["proxy_headers_seen"] is True
    assert facts["gateway"]["longpoll_max_timeout_s"] == 25
    plain = client.get("/diagnose/facts").get_json()
    assert plain["platform"] is None and plain["proxy_headers_seen"] is False


def test_seen_records_probe_requests_and_the_answer(client: Any) -> None:
    client.get("/ws/diag.seen", headers={"Connection": "keep-alive"})  # no Upgrade: the gateway answers 426
    records = client.get("/diagnose/seen?channel=diag.seen").get_json()["requests"]
    assert records[-1]["transport"] == "websocket"
    assert records[-1]["upgrade"] == "" and records[-1]["status"] == 426
    assert client.get("/diagnose/seen?channel=prices").status_code == 400


def test_verdict_endpoint(client: Any) -> None:
    r = client.post("/diagnose/verdict", json={"probes": {}})
    assert r.status_code == 200
    body = r.get_json()
    assert body["recommended"] is None and set(body["transports"]) == {"short_poll", "long_poll", "sse", "websocket"}
    assert client.post("/diagnose/verdict", data="{", content_type="application/json").get_json()["error"] == (
        "invalid_json"
    )
    assert client.post("/diagnose/verdict", json=[1, 2]).status_code == 400
    big = client.post("/diagnose/verdict", data="x" * (MAX_VERDICT_BYTES + 10), content_type="application/json")
    assert big.status_code == 413


def test_page_renders_with_bounded_hold(client: Any) -> None:
    page = client.get("/diagnose?hold=3").get_data(as_text=True)
    assert '"hold": 3.0' in page and 'id="diagnosis-json"' in page and 'id="diagnose-share"' in page
    assert 'src="static/diagnose.js"' in page and "http://" not in page.split("<body>")[1].split("</header>")[1]
    assert '"hold": 600.0' in client.get("/diagnose?hold=1e9").get_data(as_text=True)
    assert '"hold": 1.0' in client.get("/diagnose?hold=-5").get_data(as_text=True)
    assert '"hold": 15.0' in client.get("/diagnose?hold=nan").get_data(as_text=True)
    thorough = client.get("/diagnose?mode=thorough").get_data(as_text=True)
    assert '"hold": 110.0' in thorough and '"mode": "thorough"' in thorough
    assert 'src="../static/diagnose.js"' in client.get("/diagnose/?hold=3").get_data(as_text=True)
    assert client.get("/static/diagnose.js").status_code == 200
    assert client.get("/static/diagnose.css").status_code == 200


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Any:
    gw = Gateway({"sse": {"heartbeat_s": 0.5}}, tmp_path_factory.mktemp("diag-live"))
    yield gw
    gw.stop()


def test_websocket_clients_may_publish_on_diag_channels_only(live: Gateway) -> None:
    ws = websocket.create_connection(f"{live.ws_url}/ws/diag.echo", timeout=5)
    try:
        ws.send(json.dumps({"event": "echo", "data": "ping-1"}))
        frame = json.loads(ws.recv())
        assert frame["event"] == "echo" and frame["data"] == "ping-1"
    finally:
        ws.close()
    ws = websocket.create_connection(f"{live.ws_url}/ws/prices", timeout=5)
    try:
        ws.send(json.dumps({"data": "x"}))
        assert json.loads(ws.recv())["error"] == "publish_not_allowed"
    finally:
        ws.close()


def read_head(url: str) -> bytes:
    """A streaming response up to the end of its head (the retry: line), read off the raw socket."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
        data = b""
        while b"retry:" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_sse_padding_parameter_is_bounded(live: Gateway) -> None:
    data = read_head(f"{live.url}/sse/diag.pad?padding=3000")
    body = data.split(b"\r\n\r\n", 1)[1]
    assert b":" + b" " * 3000 + b"\n\n" in body
    data = read_head(f"{live.url}/sse/diag.pad?padding=99999999")
    assert b" " * 65536 in data and b" " * 65537 not in data
    plain = read_head(f"{live.url}/sse/diag.pad?padding=lots")
    assert b"retry:" in plain and b" " * 100 not in plain


def test_burst_reaches_a_live_sse_stream(live: Gateway) -> None:
    with requests.get(f"{live.url}/sse/diag.live?since=0-0", stream=True, timeout=5) as r:
        assert requests.post(f"{live.url}/diagnose/burst?channel=diag.live&n=2&gap_ms=50", timeout=5).status_code == 202
        text = b""
        deadline = time.monotonic() + 5
        for chunk in r.iter_content(chunk_size=None):
            text += chunk
            if text.count(b"event: burst") >= 2 or time.monotonic() > deadline:
                break
    assert text.count(b"event: burst") == 2


@pytest.mark.parametrize(
    "headers, platform",
    [
        ({"Via": "1.1 vegur"}, "heroku"),
        ({"CF-Ray": "8a1b2c3d4e5f-AMS", "CF-Connecting-IP": "198.51.100.4"}, "cloudflare"),
        ({"X-Amzn-Trace-Id": "Root=1-67891233-abcdef012345678912345678"}, "aws-elb"),
        ({"Via": "1.1 google", "X-Cloud-Trace-Context": "105445aa7843bc8bf206b120001000/1"}, "google"),
        ({"Via": "1.1 squid"}, None),
    ],
)
def test_known_platforms_are_recognised(client: Any, headers: dict[str, str], platform: str | None) -> None:
    facts = client.get("/diagnose/facts", headers=headers).get_json()
    assert facts["platform"] == platform
    assert (facts["platform_limits"] is not None) == (platform is not None)


# -- bounds against one client locking everyone out (issue 12, item 9) ------------------------------
def test_one_client_cannot_fill_the_burst_slots_of_everyone() -> None:
    """Rotating X-Forwarded-For from an untrusted peer used to give a fresh rate-limit key per
    request, and one address could fill the global cap of bursts in flight (everyone then got 503)."""
    app = create_app({"server": {"access_log": False}, "demo": {"channel": ""}})
    c = app.test_client()
    attacker = {"REMOTE_ADDR": "192.0.2.66"}
    codes = [
        c.post(
            f"/diagnose/burst?channel=diag.flood{i}&n=1&delay_ms=4000",
            headers={"X-Forwarded-For": f"10.1.{i // 250}.{i % 250}"},
            environ_base=attacker,
        ).status_code
        for i in range(230)
    ]
    assert codes.count(202) <= 12 and 429 in codes, codes
    assert 503 not in codes
    r = c.post("/diagnose/burst?channel=diag.other&n=1", environ_base={"REMOTE_ADDR": "192.0.2.77"})
    assert r.status_code == 202, r.get_json()


def test_trusted_proxy_clients_get_their_own_burst_slots() -> None:
    app = create_app({"server": {"access_log": False, "trusted_proxies": ["127.0.0.1"]}, "demo": {"channel": ""}})
    c = app.test_client()
    for who in ("203.0.113.1", "203.0.113.2"):
        codes = [
            c.post("/diagnose/burst?channel=diag.tp&n=1&delay_ms=3000", headers={"X-Forwarded-For": who}).status_code
            for _ in range(14)
        ]
        assert codes[:12] == [202] * 12 and codes[12:] == [429, 429], (who, codes)


def test_burst_delays_and_spans_are_short() -> None:
    app = create_app({"server": {"access_log": False}, "demo": {"channel": ""}})
    c = app.test_client()
    assert c.post("/diagnose/burst?channel=diag.d&n=1&delay_ms=60000").status_code == 400
    r = c.post("/diagnose/burst?channel=diag.d&n=20&gap_ms=2000")
    assert r.status_code == 400 and r.get_json()["error"] == "invalid_argument"


def test_facts_name_the_client_as_the_gateway_does(client: Any) -> None:
    forged = client.get("/diagnose/facts", headers={"X-Forwarded-For": "203.0.113.7"}).get_json()
    assert forged["client_address"] == "127.0.0.1"  # an untrusted peer cannot pick its identity
    app = create_app({"server": {"trusted_proxies": ["127.0.0.1"]}, "demo": {"channel": ""}})
    trusted = app.test_client().get("/diagnose/facts", headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.7"})
    assert trusted.get_json()["client_address"] == "203.0.113.7"
    assert trusted.get_json()["peer_address"] == "127.0.0.1"


def test_verdict_on_deeply_nested_json_is_a_clean_400(client: Any) -> None:
    for body in ("[" * 100_000, '{"a":' * 40_000 + "1" + "}" * 40_000):
        r = client.post("/diagnose/verdict", data=body, content_type="application/json")
        assert r.status_code == 400 and r.get_json()["error"] == "invalid_json", r.data[:200]
