"""Access control with signed tokens (contract "Access control (v2)") against a live gateway:
every transport refuses bad credentials before any stream byte, patterns and public channels,
streams end when their token expires, scoped publish tokens, and no token in the log."""

from __future__ import annotations

import http.client
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
import websocket

from tests.browser import browser  # noqa: F401 (fixture)
from tests.clients import RawResponse, SSEClient, WSClient, raw_request, ws_close_code
from tests.helpers import TOKEN, Gateway

SECRET = "test-auth-secret-0123456789abcdef"
TRANSPORTS = ["poll", "longpoll", "sse", "ws"]
CONFIG: dict[str, Any] = {
    # leeway 0, so a token minted to expire in a few seconds does (the default allows 30 s of skew).
    "auth": {"secret": SECRET, "public": ["pub.*"], "leeway_s": 0},
    "sse": {"heartbeat_s": 0.5, "retry_ms": 500},
    "websocket": {"ping_s": 5.0},
    "poll": {"longpoll_max_timeout_s": 10.0},
}


def mint(
    channels: list[str] | None = None,
    publish: list[str] | None = None,
    exp_in: float | None = 600,
    key: str = SECRET,
    algorithm: str = "HS256",
    sub: str | None = "tester",
) -> str:
    claims: dict[str, Any] = {}
    if exp_in is not None:
        claims["exp"] = int(time.time() + exp_in)
    if channels is not None:
        claims["channels"] = channels
    if publish is not None:
        claims["publish"] = publish
    if sub is not None:
        claims["sub"] = sub
    return jwt.encode(claims, None if algorithm == "none" else key, algorithm=algorithm)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway(CONFIG, Path(tmp_path_factory.mktemp("auth")))
    yield gateway
    gateway.stop()


@pytest.fixture
def ch() -> str:
    return f"team.{uuid.uuid4().hex[:10]}"


def open_transport(
    gw: Gateway, transport: str, channels: str, token: str | None = None, via: str = "header"
) -> RawResponse:
    """One subscription request on `transport`, with the token in the Authorization header or
    in ?token=; the raw answer (a WebSocket request is a real handshake)."""
    query: list[str] = []
    headers: dict[str, str] = {}
    if transport == "longpoll":
        query.append("timeout=0")
    if token is not None:
        if via == "header":
            headers["Authorization"] = f"Bearer {token}"
        else:
            query.append(f"token={token}")
    path = f"/{transport}/{channels}" + ("?" + "&".join(query) if query else "")
    if transport == "sse":
        headers["Accept"] = "text/event-stream"
    return raw_request(gw.port, path, headers, websocket_upgrade=transport == "ws")


def assert_admitted(r: RawResponse, transport: str) -> None:
    try:
        if transport == "ws":
            assert r.status == 101, (r.status, r.body[:300])
        elif transport == "sse":
            assert r.status == 200, (r.status, r.body[:300])
            assert r.headers["content-type"].startswith("text/event-stream")
        else:
            assert r.status == 200, (r.status, r.body[:300])
            assert "cursor" in r.json()
    finally:
        r.close()


def assert_refused(r: RawResponse, status: int) -> None:
    """The contract's refusal: the status, the JSON error shape, and for 401 the Bearer
    challenge; an answer of its own, never a 101 or the start of an event stream."""
    try:
        assert r.status == status, (r.status, r.headers, r.body[:300])
        assert r.headers.get("content-type", "").startswith("application/json"), r.headers
        body = r.json()
        assert body["error"] == ("unauthorized" if status == 401 else "forbidden"), body
        assert isinstance(body.get("detail"), str) and body["detail"], body
        if status == 401:
            assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), r.headers
    finally:
        r.close()


BAD_TOKENS = {
    "missing": (lambda ch: None, 401),
    "garbage": (lambda ch: "not-a-token", 401),
    "three_bad_parts": (lambda ch: "abc.def.ghi", 401),
    "alg_none": (lambda ch: mint([ch], algorithm="none"), 401),
    "alg_hs512": (lambda ch: mint([ch], algorithm="HS512"), 401),  # the contract's tokens are HS256 only
    "expired": (lambda ch: mint([ch], exp_in=-3600), 401),
    "no_exp": (lambda ch: mint([ch], exp_in=None), 401),
    "wrong_key": (lambda ch: mint([ch], key="another-secret-0123456789abcdef"), 401),
    "other_channel": (lambda ch: mint(["elsewhere.*"]), 403),
    "no_channels_claim": (lambda ch: mint(None, publish=[ch]), 403),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_bad_credentials_are_refused_before_any_stream_byte(gw, ch, transport, case):
    make, status = BAD_TOKENS[case]
    assert_refused(open_transport(gw, transport, ch, make(ch)), status)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_wrongly_signed_token_in_the_query_is_refused_too(gw, ch, transport):
    assert_refused(open_transport(gw, transport, ch, mint([ch], key="x" * 32), via="query"), 401)
    assert_refused(open_transport(gw, transport, ch, mint(["nothing.here"]), via="query"), 403)


@pytest.mark.parametrize("via", ["header", "query"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_valid_token_is_admitted_as_bearer_header_or_query(gw, ch, transport, via):
    assert_admitted(open_transport(gw, transport, ch, mint([ch]), via=via), transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_channel_patterns_in_the_token(gw, transport):
    token = mint(["team.*", "room-??"])
    tag = uuid.uuid4().hex[:8]
    assert_admitted(open_transport(gw, transport, f"team.{tag}", token), transport)
    assert_admitted(open_transport(gw, transport, "room-42", token), transport)
    assert_refused(open_transport(gw, transport, f"teams{tag}", token), 403)
    assert_refused(open_transport(gw, transport, "team", token), 403)
    assert_refused(open_transport(gw, transport, "room-420", token), 403)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_public_channels_need_no_token_and_others_still_do(gw, transport):
    assert_admitted(open_transport(gw, transport, f"pub.{uuid.uuid4().hex[:8]}"), transport)
    tag = uuid.uuid4().hex[:8]
    assert_admitted(open_transport(gw, transport, f"pub.a{tag},pub.b{tag}"), transport)
    assert_refused(open_transport(gw, transport, f"pubx{uuid.uuid4().hex[:8]}"), 401)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_multi_channel_request_with_one_forbidden_channel_is_refused(gw, transport):
    tag = uuid.uuid4().hex[:8]
    token = mint(["team.*"])
    assert_admitted(open_transport(gw, transport, f"team.a{tag},team.b{tag},pub.c{tag}", token), transport)
    assert_refused(open_transport(gw, transport, f"team.a{tag},secret.{tag},team.b{tag}", token), 403)
    # No credential at all: a public channel in the list does not open the private one.
    assert_refused(open_transport(gw, transport, f"pub.c{tag},team.a{tag}"), 401)


def test_an_sse_stream_ends_when_its_token_expires(gw, ch):
    with (
        SSEClient(f"{gw.url}/sse/{ch}?token={mint([ch], exp_in=4)}") as short,
        SSEClient(f"{gw.url}/sse/{ch}?token={mint([ch])}") as long,
    ):
        assert short.status == 200 and long.status == 200
        opened = time.monotonic()
        first = gw.publish(ch, "before expiry")
        seen = []
        while (event := short.next_event(time.monotonic() + 20)) is not None:
            seen.append(event["id"])
        assert short.closed, "the stream was still open 20 s after its token expired"
        assert seen == [first]
        assert time.monotonic() - opened > 1  # not refused or cut at once: it was a live stream
        # The stream with a valid token is unaffected.
        event_id = gw.publish(ch, "still here")
        assert [e["id"] for e in long.events(2)] == [first, event_id]
    # A fresh token and Last-Event-ID resume where the expired stream ended.
    with SSEClient(f"{gw.url}/sse/{ch}?token={mint([ch])}", {"Last-Event-ID": seen[-1]}) as again:
        assert [e["id"] for e in again.events(1)] == [event_id]


def test_a_websocket_closes_with_1008_when_its_token_expires(gw, ch):
    ws = websocket.create_connection(f"{gw.ws_url}/ws/{ch}?token={mint([ch], exp_in=4)}", timeout=5)
    try:
        assert ws_close_code(ws, deadline_s=20) == 1008
    finally:
        ws.close()


def _publish(gw: Gateway, channel: str, token: str, data: str = "x") -> requests.Response:
    return requests.post(
        f"{gw.url}/publish/{channel}",
        data=data,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain"},
        timeout=10,
    )


def test_scoped_publish_tokens(gw, ch):
    publisher = mint([], publish=["team.*"])
    r = _publish(gw, ch, publisher, "from a scoped token")
    assert r.status_code == 202, r.text
    event_id = r.json()["id"]
    # As on every route, the token may come as ?token= (a page that cannot set headers).
    r = requests.post(f"{gw.url}/publish/{ch}", params={"token": publisher}, data="by query", timeout=10)
    assert r.status_code == 202, r.text
    query_id = r.json()["id"]
    read = requests.get(f"{gw.url}/poll/{ch}", params={"since": "0-0", "token": mint([ch])}, timeout=10)
    events = [(e["id"], e["data"]) for e in read.json()["events"]]
    assert events == [(event_id, "from a scoped token"), (query_id, "by query")]

    for channel, token in ((f"other.{ch}", publisher), (ch, mint([ch]))):  # no matching claim; no claim
        refused = _publish(gw, channel, token)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] and refused.json()["detail"]
    refused = _publish(gw, ch, mint([], publish=["team.*"], key="y" * 32))
    assert refused.status_code == 401, refused.text
    # Nothing the refusals sent was stored.
    read = requests.get(f"{gw.url}/poll/{ch}", params={"since": "0-0", "token": mint([ch])}, timeout=10)
    assert [e["id"] for e in read.json()["events"]] == [event_id, query_id]
    # The admin token still publishes everywhere.
    for channel in (ch, f"other.{ch}", "pub.anything"):
        assert _publish(gw, channel, TOKEN).status_code == 202


def test_websocket_frames_publish_only_where_the_token_allows(gw):
    tag = uuid.uuid4().hex[:8]
    token = mint(["chat.*"], publish=[f"chat.room{tag}"])
    with WSClient(f"{gw.ws_url}/ws/chat.room{tag}?token={token}") as ws:
        ws.send("hello")
        frame = ws.next_frame()
        assert frame.get("event") != "error" and frame["data"] == "hello", frame
    with WSClient(f"{gw.ws_url}/ws/chat.lobby{tag}?token={token}") as ws:
        ws.send("not here")
        frame = ws.next_frame()
        assert frame["event"] == "error" and frame.get("error"), frame
        # An error frame, not a close: the socket still delivers.
        event_id = gw.publish(f"chat.lobby{tag}", "after the refusal")
        frame = ws.next_frame()
        assert (frame["id"], frame["data"]) == (event_id, "after the refusal")
    stored = requests.get(f"{gw.url}/poll/chat.lobby{tag}", params={"since": "0-0", "token": token}, timeout=10).json()[
        "events"
    ]
    assert [e["data"] for e in stored] == ["after the refusal"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_token_reaches_the_log(start_gateway, log_format):
    gw = start_gateway(CONFIG | {"server": {"access_log": True, "log_format": log_format}})
    tag = uuid.uuid4().hex[:8]
    ch = f"team.{tag}"
    good = mint([ch], publish=[ch], sub=f"logged-{tag}")
    bad = mint([ch], key="z" * 32)
    expired = mint([ch], exp_in=-3600)
    for token in (good, bad, expired):
        requests.get(f"{gw.url}/poll/{ch}?token={token}", timeout=10)
        requests.get(f"{gw.url}/longpoll/{ch}?timeout=0&token={token}", timeout=10)
        raw_request(gw.port, f"/sse/{ch}?token={token}", {"Accept": "text/event-stream"}).close()
        raw_request(gw.port, f"/ws/{ch}?token={token}", websocket_upgrade=True).close()
        requests.get(f"{gw.url}/poll/{ch}", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        _publish(gw, ch, token)
    time.sleep(1.0)  # streams closed by the client are logged when the server notices
    log = gw.log()
    assert f"/poll/{ch}" in log and f"/sse/{ch}" in log, log[-2000:]  # the access log is on
    for token in (good, bad, expired):
        _, payload, signature = token.split(".")
        leaks = [line[:160] for line in log.splitlines() if payload in line or signature in line]
        assert leaks == [], f"{len(leaks)} log lines carry (part of) a token, e.g. {leaks[:2]}"


def test_without_auth_keys_every_channel_is_public(start_gateway):
    gw = start_gateway({"sse": {"heartbeat_s": 0.5}})
    ch = f"team.{uuid.uuid4().hex[:8]}"
    for transport in TRANSPORTS:
        assert_admitted(open_transport(gw, transport, ch), transport)
    with SSEClient(f"{gw.url}/sse/{ch}") as sse:
        event_id = gw.publish(ch, "open to all")
        assert [(e["id"], e["data"]) for e in sse.events(1)] == [(event_id, "open to all")]


@pytest.mark.parametrize("route", ["poll", "longpoll"])
def test_each_request_on_a_keep_alive_connection_is_authorized_on_its_own(gw, ch, route):
    """A credential belongs to one request: the next one on the same connection brings its own."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.connect()
        local = conn.sock.getsockname()
        plan = [
            (f"token={mint([ch])}", {}, 200),
            ("", {}, 401),
            ("", {"Authorization": f"Bearer {mint([ch])}"}, 200),
            ("", {}, 401),
            (f"token={mint(['elsewhere'])}", {}, 403),
            (f"token={mint([ch])}", {}, 200),
            ("", {"Authorization": f"Bearer {mint([ch], key='w' * 32)}"}, 401),
        ]
        for query, headers, status in plan:
            conn.request("GET", f"/{route}/{ch}?timeout=0&{query}", headers=headers)
            r = conn.getresponse()
            body = json.loads(r.read())
            assert r.status == status, (query, headers, r.status, body)
            if status == 401:
                assert body["error"] == "unauthorized"
                assert (r.getheader("WWW-Authenticate") or "").lower().startswith("bearer"), r.getheaders()
            elif status == 403:
                assert body["error"] == "forbidden"
            assert conn.sock is not None and conn.sock.getsockname() == local, "the connection was not kept"
    finally:
        conn.close()


# -- the browser client's `token` option, in a real Chromium --------------------------------------
def _client_page(browser: Any, gw: Gateway, channel: str, options_js: str) -> tuple[Any, Any]:  # noqa: F811
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{gw.url}/healthz", wait_until="domcontentloaded", timeout=15_000)  # the gateway's origin
    page.add_script_tag(url="/static/gateway-client.js")
    page.evaluate(
        """([channel, options]) => {
            window.got = []; window.statuses = [];
            const opts = Object.assign(eval("(" + options + ")"), {
                onEvent: (ev, transport) => window.got.push([ev.id, ev.data, transport]),
                onStatus: (s) => window.statuses.push(s),
                connectTimeoutMs: 3000, backoffMs: 100, pollIntervalMs: 200, longPollTimeoutS: 5,
            });
            window.client = new GatewayClient("", channel, opts);
        }""",
        [channel, options_js],
    )
    return context, page


@pytest.mark.parametrize("transport", ["websocket", "sse", "long_poll", "short_poll"])
def test_the_browser_client_sends_its_token_on_every_transport(browser, gw, ch, transport):  # noqa: F811
    token = mint([ch])
    # A function is asked before each connect; a plain string works the same way.
    options = f'{{transports: ["{transport}"], token: () => "{token}"}}'
    context, page = _client_page(browser, gw, ch, options)
    try:
        try:
            page.wait_for_function("window.statuses.some(s => s.state === 'open')", timeout=15_000, polling=100)
            time.sleep(0.5)
            ids = [gw.publish(ch, f"private {i}") for i in range(2)]
            page.wait_for_function("window.got.length >= 2", timeout=15_000, polling=100)
        except Exception:
            raise AssertionError(f"statuses {page.evaluate('window.statuses')}") from None
        got = page.evaluate("window.got")
        assert [(g[0], g[1], g[2]) for g in got] == [(ids[0], "private 0", transport), (ids[1], "private 1", transport)]
    finally:
        context.close()


def test_the_browser_client_without_a_token_stops_as_unauthorized(browser, gw, ch):  # noqa: F811
    context, page = _client_page(browser, gw, ch, "{}")
    try:
        page.wait_for_function(
            "window.statuses.some(s => ['unauthorized', 'forbidden', 'failed'].includes(s.state))",
            timeout=15_000,
            polling=100,
        )
        final = page.evaluate("window.statuses")[-1]
        assert (final["state"], final.get("status")) == ("unauthorized", 401), final
    finally:
        context.close()
