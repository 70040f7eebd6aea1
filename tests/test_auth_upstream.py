"""Asking the app (contract "Access control (v2)", `auth.upstream_url`) with a real Flask app that
logs users in with session cookies: what the app is sent, what its answers mean (2xx allows,
401/403 refuse, an error or silence is 503, never an allow), the decision cache, and the same app
behind the gateway's [proxy] deciding for a real Chromium page that uses gateway-client.js."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
import websocket
from flask import Flask, redirect, request, session
from werkzeug.serving import make_server

from tests.browser import browser  # noqa: F401 (fixture)
from tests.clients import RawResponse, raw_request
from tests.helpers import Gateway, free_port

TRANSPORTS = ["poll", "longpoll", "sse", "ws"]
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>private</title>
<script src="/static/gateway-client.js"></script></head>
<body><script>
  var channel = new URLSearchParams(location.search).get("channel");
  window.got = []; window.statuses = [];
  window.client = new GatewayClient("", channel, {
    onEvent: function (ev, transport) { window.got.push([ev.id, ev.data, transport]); },
    onStatus: function (s) { window.statuses.push(s); },
    connectTimeoutMs: 3000, backoffMs: 100, stallMs: 5000
  });
</script></body></html>
"""


class App:
    """A small web app with session-cookie login and the one view the gateway asks:
    /auth?channel=&transport= answers 2xx for the logged-in user's own channels
    (user.<name> and user.<name>.*), 401 when nobody is logged in, 403 otherwise.
    Channels named err.* answer 500, slow.* take 6 s, lag.* allow after 0.8 s, moved.* redirect
    to the login page."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        app = Flask("upstream_app")
        app.secret_key = uuid.uuid4().hex

        @app.get("/login")
        def login() -> Any:
            if "user" not in request.args:
                return "<form>log in</form>"
            session["user"] = request.args["user"]
            return f"logged in as {session['user']}"

        @app.get("/auth")
        def auth() -> Any:
            channel = request.args.get("channel", "")
            with self.lock:
                self.calls.append(
                    {
                        "channel": channel,
                        "transport": request.args.get("transport"),
                        "cookie": request.headers.get("Cookie"),
                        "authorization": request.headers.get("Authorization"),
                    }
                )
            if channel.startswith("err."):
                return {"oops": True}, 500
            if channel.startswith("slow."):
                time.sleep(6)
                return "", 204
            if channel.startswith("lag."):  # slow but allowed: several of them outlast one timeout
                time.sleep(0.8)
                return "", 204
            if channel.startswith("moved."):
                return redirect("/login")
            user = session.get("user")
            if user is None:
                return "log in first", 401
            if channel == f"user.{user}" or channel.startswith(f"user.{user}."):
                return "", 204
            return "not yours", 403

        @app.get("/page")
        def page() -> Any:
            return PAGE

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server("127.0.0.1", self.port, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def calls_for(self, channel: str) -> list[dict[str, Any]]:
        with self.lock:
            return [c for c in self.calls if c["channel"] == channel]

    def cookie(self, user: str) -> str:
        """The Cookie header a browser logged in as `user` would send."""
        r = requests.get(f"{self.url}/login", params={"user": user}, timeout=10)
        assert r.status_code == 200, r.text
        return "; ".join(f"{k}={v}" for k, v in r.cookies.items())

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    a = App()
    yield a
    a.stop()


def gateway_for(app_url: str, tmp: Path, **auth: Any) -> Gateway:
    return Gateway(
        {
            "auth": {"upstream_url": f"{app_url}/auth", "cache_s": 30} | auth,
            "proxy": {"upstream": app_url},
            "sse": {"heartbeat_s": 0.5, "retry_ms": 500},
            "websocket": {"ping_s": 5.0},
            "poll": {"longpoll_max_timeout_s": 10.0},
        },
        tmp,
    )


@pytest.fixture(scope="module")
def gw(app: App, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = gateway_for(app.url, Path(tmp_path_factory.mktemp("upstream")))
    yield gateway
    gateway.stop()


def tag() -> str:
    return uuid.uuid4().hex[:10]


def ask(gw: Gateway, transport: str, channel: str, headers: dict[str, str] | None = None) -> RawResponse:
    path = f"/{transport}/{channel}" + ("?timeout=0" if transport == "longpoll" else "")
    r = raw_request(gw.port, path, {"Accept": "text/event-stream", **(headers or {})}, transport == "ws", timeout=20)
    r.close()
    return r


def assert_admitted(r: RawResponse, transport: str) -> None:
    assert r.status == (101 if transport == "ws" else 200), (r.status, r.body[:300])


def assert_refused(r: RawResponse, status: int, code: str | None = None) -> None:
    assert r.status == status, (r.status, r.headers, r.body[:300])
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert body["error"] == (code or body["error"]) and body["error"] and body["detail"], body


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_app_gets_channel_transport_and_the_clients_credentials(app, gw, transport):
    channel = f"user.alice.{tag()}"
    cookie = app.cookie("alice")
    headers = {"Cookie": cookie, "Authorization": "Bearer app-session-key"}
    assert_admitted(ask(gw, transport, channel, headers), transport)
    calls = app.calls_for(channel)
    assert len(calls) == 1, calls
    assert calls[0]["transport"] == transport
    assert calls[0]["cookie"] == cookie
    assert calls[0]["authorization"] == "Bearer app-session-key"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_apps_401_and_403_are_the_gateways_answer(app, gw, transport):
    channel = f"user.alice.{tag()}"
    assert_refused(ask(gw, transport, channel), 401, "unauthorized")
    assert_refused(ask(gw, transport, channel, {"Cookie": app.cookie("bob")}), 403, "forbidden")
    assert_admitted(ask(gw, transport, channel, {"Cookie": app.cookie("alice")}), transport)


def test_an_app_error_a_redirect_or_silence_is_503_never_an_allow(app, gw):
    cookie = {"Cookie": app.cookie("alice")}
    cases = [(t, f"{kind}.{tag()}") for t in TRANSPORTS for kind in ("err", "moved", "slow")]
    results: dict[tuple[str, str], Any] = {}

    def run(transport: str, channel: str) -> None:
        started = time.monotonic()
        try:
            results[(transport, channel)] = (ask(gw, transport, channel, cookie), time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 (reported below)
            results[(transport, channel)] = (exc, time.monotonic() - started)

    threads = [threading.Thread(target=run, args=case, daemon=True) for case in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for case in cases:
        r, took = results[case]
        assert isinstance(r, RawResponse), (case, r)
        assert_refused(r, 503)
        if case[1].startswith("slow."):
            assert took < 15, f"{case}: the gateway waited {took:.1f} s for a silent app (5 s is the limit)"
        assert app.calls_for(case[1]), f"{case}: the app was never asked"


def test_an_app_that_is_down_is_503(app, tmp_path):
    gw = gateway_for(f"http://127.0.0.1:{free_port()}", tmp_path)  # nothing listens there
    try:
        for transport in TRANSPORTS:
            assert_refused(ask(gw, transport, f"user.alice.{tag()}", {"Cookie": app.cookie("alice")}), 503)
    finally:
        gw.stop()


def test_one_request_shares_one_timeout_among_its_channels(app, tmp_path):
    gw = gateway_for(app.url, tmp_path, upstream_timeout_s=1.5)
    try:
        assert_admitted(ask(gw, "sse", f"lag.{tag()}"), "sse")  # 0.8 s: within the timeout
        names = ",".join(f"lag.{tag()}" for _ in range(6))  # 6 x 0.8 s asked one after another
        started = time.monotonic()
        r = ask(gw, "sse", names)
        took = time.monotonic() - started
        assert_refused(r, 503, "auth_unavailable")
        assert took < 3.5, f"a request for 6 slow channels took {took:.1f} s (one 1.5 s budget)"
        assert sum(len(app.calls_for(n)) for n in names.split(",")) <= 3  # the rest were never asked
    finally:
        gw.stop()


def test_decisions_are_cached_per_credential_and_channel(app, gw):
    channel = f"user.alice.{tag()}"
    alice, bob = app.cookie("alice"), app.cookie("bob")
    for _ in range(5):
        r = requests.get(f"{gw.url}/poll/{channel}", headers={"Cookie": alice}, timeout=10)
        assert r.status_code == 200, r.text
    assert len(app.calls_for(channel)) == 1, "five short polls within auth.cache_s must ask the app once"
    for _ in range(3):  # another credential is another decision, cached too
        assert requests.get(f"{gw.url}/poll/{channel}", headers={"Cookie": bob}, timeout=10).status_code == 403
    assert len(app.calls_for(channel)) == 2
    # No credential at all is a third: alice's cached allow is not served to it.
    assert requests.get(f"{gw.url}/poll/{channel}", timeout=10).status_code == 401
    assert len(app.calls_for(channel)) == 3
    other = f"user.alice.{tag()}"  # and another channel too
    assert requests.get(f"{gw.url}/poll/{other}", headers={"Cookie": alice}, timeout=10).status_code == 200
    assert len(app.calls_for(other)) == 1


def test_cached_decisions_expire_after_cache_s(app, tmp_path):
    gw = gateway_for(app.url, tmp_path, cache_s=1)
    try:
        channel = f"user.alice.{tag()}"
        alice = app.cookie("alice")
        for _ in range(2):
            assert requests.get(f"{gw.url}/poll/{channel}", headers={"Cookie": alice}, timeout=10).status_code == 200
        assert len(app.calls_for(channel)) == 1
        time.sleep(2.5)
        assert requests.get(f"{gw.url}/poll/{channel}", headers={"Cookie": alice}, timeout=10).status_code == 200
        assert len(app.calls_for(channel)) == 2
    finally:
        gw.stop()


# -- the browser test: the app and the gateway on one origin ------------------------------
def _open(browser: Any, gw: Gateway, user: str | None, channel: str) -> tuple[Any, Any]:  # noqa: F811
    context = browser.new_context()
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    if user is not None:  # log in through the gateway's [proxy]: the cookie is for the gateway's origin
        page.goto(f"{gw.url}/login?user={user}", wait_until="domcontentloaded", timeout=15_000)
        assert f"logged in as {user}" in page.content()
    page.goto(f"{gw.url}/page?channel={channel}", wait_until="domcontentloaded", timeout=15_000)
    return context, page


def test_a_logged_in_browser_page_receives_its_private_channel(browser, gw):  # noqa: F811
    channel = f"user.alice.{tag()}"
    context, page = _open(browser, gw, "alice", channel)
    try:
        page.wait_for_function("window.statuses.some(s => s.state === 'open')", timeout=20_000, polling=100)
        time.sleep(0.5)
        ids = [gw.publish(channel, f"private {i}") for i in range(3)]
        try:
            page.wait_for_function("window.got.length >= 3", timeout=20_000, polling=100)
        except Exception:
            raise AssertionError(f"statuses {page.evaluate('window.statuses')}") from None
        got = page.evaluate("window.got")
        assert [(g[0], g[1]) for g in got] == [(i, f"private {i_}") for i_, i in enumerate(ids)]
        assert page.errors == []
    finally:
        context.close()


@pytest.mark.parametrize(("user", "status", "state"), [(None, 401, "unauthorized"), ("bob", 403, "forbidden")])
def test_a_browser_page_without_the_right_login_is_refused(browser, app, gw, user, status, state):  # noqa: F811
    channel = f"user.alice.{tag()}"
    context, page = _open(browser, gw, user, channel)
    try:
        try:  # the client's documented end states for a refusal
            page.wait_for_function(
                "window.statuses.some(s => ['unauthorized', 'forbidden', 'failed'].includes(s.state))",
                timeout=20_000,
                polling=100,
            )
        except Exception:
            raise AssertionError(f"statuses {page.evaluate('window.statuses')}") from None
        statuses = page.evaluate("window.statuses")
        final = statuses[-1]
        assert (final["state"], final.get("status")) == (state, status), statuses
        gw.publish(channel, "must not arrive")
        time.sleep(1.5)
        assert page.evaluate("window.statuses") == statuses, "the client went on after a refusal (a retry loop)"
        assert page.evaluate("window.got") == []
        # The app saw the browser's own cookie (or none), for this channel.
        calls = app.calls_for(channel)
        assert calls and all(("session=" in (c["cookie"] or "")) == (user is not None) for c in calls), calls
    finally:
        context.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_channel_of_a_multi_channel_request_is_asked(app, gw, transport):
    mine, also_mine, theirs = f"user.alice.{tag()}", f"user.alice.{tag()}", f"user.bob.{tag()}"
    alice = {"Cookie": app.cookie("alice")}
    assert_admitted(ask(gw, transport, f"{mine},{also_mine}", alice), transport)
    assert len(app.calls_for(mine)) == 1 and len(app.calls_for(also_mine)) == 1
    assert_refused(ask(gw, transport, f"{mine},{theirs}", alice), 403, "forbidden")
    assert app.calls_for(theirs), "the app was not asked about the other user's channel"


def test_a_valid_token_or_a_public_channel_does_not_ask_the_app(app, tmp_path):
    secret = "upstream-and-token-secret-0123456789"
    gw = gateway_for(app.url, tmp_path, secret=secret, public=["pub.*"])
    try:
        channel, public, asked = f"user.carol.{tag()}", f"pub.{tag()}", f"user.alice.{tag()}"
        token = jwt.encode({"exp": int(time.time()) + 600, "channels": [channel]}, secret, algorithm="HS256")
        for transport in TRANSPORTS:
            assert_admitted(ask(gw, transport, channel, {"Authorization": f"Bearer {token}"}), transport)
            assert_admitted(ask(gw, transport, public), transport)
        assert app.calls_for(channel) == [] and app.calls_for(public) == []
        # Without a token the app decides, as before.
        assert_admitted(ask(gw, "poll", asked, {"Cookie": app.cookie("alice")}), "poll")
        assert_refused(ask(gw, "poll", f"user.carol.{tag()}"), 401, "unauthorized")
        assert len(app.calls_for(asked)) == 1
    finally:
        gw.stop()


def test_websocket_subscribe_asks_the_app_like_the_url(app, gw):
    first, second, theirs = f"user.alice.{tag()}", f"user.alice.{tag()}", f"user.bob.{tag()}"
    ws = websocket.create_connection(f"{gw.ws_url}/ws/{first}", timeout=10, header=[f"Cookie: {app.cookie('alice')}"])
    try:
        ws.send(json.dumps({"action": "subscribe", "channel": second}))
        reply = json.loads(ws.recv())
        assert reply.get("event") != "error", reply
        assert [c["transport"] for c in app.calls_for(second)] == ["ws"]
        ws.send(json.dumps({"action": "subscribe", "channel": theirs}))
        reply = json.loads(ws.recv())
        assert reply["event"] == "error" and reply.get("error"), reply
        assert app.calls_for(theirs), "the app was not asked"
        event_id = gw.publish(second, "allowed")  # the socket is still open and delivers
        frame = json.loads(ws.recv())
        assert (frame.get("channel"), frame["id"]) == (second, event_id), frame
    finally:
        ws.close()
