"""static/gateway.mjs in a real headless Chromium against a real gateway: one channel on each
forced transport, several channels on one connection, publish(), and tokens (a refused one ends in
state "unauthorized"/"forbidden" with no retry loop, counted at a relay in front of the gateway)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.browser import browser  # noqa: F401 (fixture)
from tests.helpers import TOKEN, Gateway
from tests.hostile import HostileProxy

TRANSPORTS = ("websocket", "sse", "long_poll", "short_poll")
GATEWAY = {
    "sse": {"heartbeat_s": 0.5, "retry_ms": 500},
    "history": {"size": 200},
    "poll": {"longpoll_max_timeout_s": 10.0},
}
# Short timers, so a fallback takes about a second instead of half a minute.
FAST = {
    "stallMs": 3000,
    "connectTimeoutMs": 3000,
    "graceMs": 500,
    "backoffMs": 100,
    "pollIntervalMs": 200,
    "longPollTimeoutS": 5,
}
SECRET = "test-secret-for-the-browser-client"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway(GATEWAY, Path(tmp_path_factory.mktemp("module")))
    yield gateway
    gateway.stop()


@pytest.fixture
def page_of(browser: Any) -> Iterator[Any]:  # noqa: F811
    """page_of(url) -> a page of that origin in a fresh context, gateway.mjs imported as window.gw."""
    contexts: list[Any] = []

    def open_(url: str) -> Any:
        context = browser.new_context()
        contexts.append(context)
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        page.goto(url + "/healthz", wait_until="domcontentloaded", timeout=10_000)
        page.evaluate("import('/static/gateway.mjs').then((m) => { window.gw = m; })")
        page.wait_for_function("window.gw !== undefined", timeout=10_000)
        return page

    yield open_
    for context in contexts:
        context.close()


def follow(page: Any, channels: Any, **options: Any) -> None:
    """window.sub = subscribe("", channels, options): events in window.got as [channel, id, event,
    data], states in window.states as [state, info]."""
    page.evaluate(
        """([channels, options]) => {
            window.got = []; window.states = [];
            window.sub = window.gw.subscribe("", channels, Object.assign(options, {
                onEvent: (ev) => window.got.push([ev.channel, ev.id, ev.event, ev.data]),
                onStateChange: (state, info) => window.states.push([state, info]),
            }));
        }""",
        [channels, FAST | options],
    )


def wait_js(page: Any, condition: str, timeout_s: float = 15) -> None:
    try:
        page.wait_for_function(condition, timeout=timeout_s * 1000, polling=50)
    except Exception:
        got = page.evaluate("window.got")
        states = page.evaluate("window.states")
        raise AssertionError(f"{condition!r} never held; got {got}; states {states}") from None


def mint(secret: str, channels: list[str], exp_in: float = 300, publish: list[str] | None = None) -> str:
    jwt = pytest.importorskip("jwt")
    claims: dict[str, Any] = {"exp": int(time.time() + exp_in), "channels": channels, "sub": "browser-test"}
    if publish is not None:
        claims["publish"] = publish
    return jwt.encode(claims, secret, algorithm="HS256")


# -- one channel, each transport -------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_one_channel_on_each_transport_once_in_order(gw: Gateway, page_of: Any, transport: str) -> None:
    channel = f"mod.one.{transport}"
    page = page_of(gw.url)
    follow(page, channel, transports=[transport], shareTabs=False)
    wait_js(page, "window.sub.state === 'open'")
    ids = [gw.publish(channel, json.dumps({"n": i})) for i in range(12)]
    wait_js(page, "window.got.length >= 12")
    time.sleep(0.5)  # nothing more may come
    got = page.evaluate("window.got")
    assert [g[1] for g in got] == ids
    assert {g[0] for g in got} == {channel} and {g[2] for g in got} == {"message"}
    assert [json.loads(g[3])["n"] for g in got] == list(range(12))
    assert page.evaluate("window.sub.transport") == transport
    assert page.evaluate("window.sub.lastId") == ids[-1]
    assert page.evaluate("window.sub.role") == "private"

    # Resuming from an id the channel no longer holds: a gap naming the channel, then everything.
    page.evaluate("window.sub.close()")
    follow(page, channel, transports=[transport], since="1-0")
    wait_js(page, "window.got.length >= 13")
    got = page.evaluate("window.got")
    assert got[0][0] == channel and got[0][2] == "gap", got[0]
    assert [g[1] for g in got[1:]] == ids
    assert page.evaluate("window.sub.role") == "private"  # its own cursor: its own connection
    page.evaluate("window.sub.close()")
    assert page.evaluate("window.states[window.states.length - 1][0]") == "closed"
    assert page.errors == []


def test_per_channel_handlers_and_a_bad_channel_fails_once(gw: Gateway, page_of: Any) -> None:
    page = page_of(gw.url)
    page.evaluate(
        """() => {
            window.a = []; window.states = [];
            window.sub = window.gw.subscribe("", null, {
                channels: { "mod.handler": (ev) => window.a.push(ev.id) },
                onStateChange: (s) => window.states.push(s), shareTabs: false, transports: ["sse"],
            });
        }"""
    )
    page.wait_for_function("window.sub.state === 'open'", timeout=10_000)
    ids = [gw.publish("mod.handler", str(i)) for i in range(3)]
    page.wait_for_function("window.a.length >= 3", timeout=10_000)
    assert page.evaluate("window.a") == ids
    page.evaluate("window.sub.close()")

    follow(page, "no spaces allowed", shareTabs=False)
    wait_js(page, "window.sub.state === 'failed'", 10)
    info = page.evaluate("window.states[window.states.length - 1][1]")
    assert info["status"] == 400 and info["error"] == "invalid_channel", info
    assert "not a valid channel name" in info["reason"]


# -- publish() -------------------------------------------------------------------------------------
def test_publish_resolves_to_the_id_and_rejects_with_status_and_code(gw: Gateway, page_of: Any) -> None:
    page = page_of(gw.url)
    before = gw.cursor("mod.pub")
    out = page.evaluate(
        "(t) => window.gw.publish('', 'mod.pub', {price: 3}, {token: () => Promise.resolve(t), event: 'tick'})", TOKEN
    )
    assert out["channel"] == "mod.pub"
    events = requests.get(f"{gw.url}/poll/mod.pub", params={"since": before}, timeout=5).json()["events"]
    assert events == [{"id": out["id"], "event": "tick", "data": '{"price": 3}'}]

    refused = page.evaluate(
        """() => window.gw.publish('', 'mod.pub', 'x', {token: 'wrong'}).then(
            () => null, (e) => ({status: e.status, error: e.error, message: e.message, isError: e instanceof Error}))"""
    )
    assert refused["status"] == 401 and refused["error"] == "unauthorized" and refused["isError"], refused
    assert "HTTP 401" in refused["message"]
    bad = page.evaluate(
        "(t) => window.gw.publish('', 'no spaces', 'x', {token: t}).then(() => null, (e) => [e.status, e.error])",
        TOKEN,
    )
    assert bad == [400, "invalid_channel"]


# -- several channels on one connection (server side: contract "Many channels on one connection") ---
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_several_channels_on_one_connection_and_add_remove(gw: Gateway, page_of: Any, transport: str) -> None:
    chans = [f"mod.multi.{transport}.{i}" for i in range(3)]
    page = page_of(gw.url)
    follow(page, chans[:2], transports=[transport], shareTabs=False)
    wait_js(page, "window.sub.state === 'open'")
    sent = []
    for i in range(4):
        for ch in chans[:2]:
            sent.append([ch, gw.publish(ch, f"{ch}:{i}")])
    wait_js(page, f"window.got.length >= {len(sent)}")
    got = page.evaluate("window.got")
    for ch in chans[:2]:
        assert [g[1] for g in got if g[0] == ch] == [s[1] for s in sent if s[0] == ch]

    # Add the third channel, drop the first: WebSocket in place, the others by one reconnect.
    # Once add() has resolved, an event published at once is not missed.
    page.evaluate(
        f"""window.changed = false; window.sub.add({json.dumps(chans[2])})
            .then(() => window.sub.remove({json.dumps(chans[0])})).then(() => {{ window.changed = true; }})"""
    )
    wait_js(page, "window.changed === true")
    page.evaluate("window.got = []")
    later = [[ch, gw.publish(ch, "later")] for ch in chans]
    wait_js(page, "window.got.length >= 2")
    time.sleep(0.5)
    got = page.evaluate("window.got")
    assert sorted([g[0], g[1]] for g in got) == sorted(later[1:])  # none from the removed channel
    assert page.errors == []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_one_channel_then_two_loses_and_repeats_nothing(gw: Gateway, page_of: Any, transport: str) -> None:
    # A one-channel connection's cursor is that channel's id, which the gateway does not take for
    # a list: the client must carry the first channel over the change without a gap or a repeat.
    first, second = f"mod.grow.{transport}.a", f"mod.grow.{transport}.b"
    page = page_of(gw.url)
    follow(page, first, transports=[transport], shareTabs=False)
    wait_js(page, "window.sub.state === 'open'")
    sent = [gw.publish(first, "before")]
    wait_js(page, "window.got.length >= 1")
    page.evaluate(f"window.sub.add({json.dumps(second)})")
    sent += [gw.publish(first, f"during {i}") for i in range(5)]  # while the client changes over
    wait_js(page, "window.sub.channels.length === 2 && window.sub.state === 'open'")
    time.sleep(1)
    sent += [gw.publish(first, "after")]
    other = gw.publish(second, "second")
    wait_js(page, f"window.got.length >= {len(sent) + 1}")
    time.sleep(0.5)
    got = page.evaluate("window.got")
    assert [g[1] for g in got if g[0] == first] == sent, got
    assert [g[1] for g in got if g[0] == second] == [other]
    assert not [g for g in got if g[2] == "gap"]
    assert page.errors == []


@pytest.fixture(scope="module")
def short_history_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway(GATEWAY | {"history": {"size": 3}}, Path(tmp_path_factory.mktemp("short")))
    yield gateway
    gateway.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_channel_whose_history_ran_out_gets_its_own_gap(
    short_history_gw: Gateway, page_of: Any, transport: str
) -> None:
    gw = short_history_gw
    busy, quiet = f"mod.gap.{transport}.busy", f"mod.gap.{transport}.quiet"
    page = page_of(gw.url)
    follow(page, [busy, quiet], transports=[transport], shareTabs=False)
    wait_js(page, "window.sub.state === 'open'")
    gw.publish(busy, "seen")
    gw.publish(quiet, "seen")
    wait_js(page, "window.got.length >= 2")
    cursor = page.evaluate("window.sub.lastId")
    page.evaluate("window.sub.close()")
    busy_ids = [gw.publish(busy, f"missed {i}") for i in range(6)]  # history keeps the last 3
    quiet_id = gw.publish(quiet, "missed")

    follow(page, [busy, quiet], transports=[transport], shareTabs=False, since=cursor)
    wait_js(page, "window.got.length >= 5")
    time.sleep(0.5)
    got = page.evaluate("window.got")
    gaps = [g for g in got if g[2] == "gap"]
    assert [g[0] for g in gaps] == [busy], got  # the busy channel's own gap, none for the quiet one
    assert [g[1] for g in got if g[0] == busy and g[2] != "gap"] == busy_ids[-3:]
    assert [g[1] for g in got if g[0] == quiet] == [quiet_id]
    # Its gap comes before the busy channel's first resumed event.
    busy_rows = [g for g in got if g[0] == busy]
    assert busy_rows[0][2] == "gap", got
    assert page.errors == []


# -- tokens (server side: contract "Access control") ---------------------------------------------------
class CountingProxy(HostileProxy):
    """A plain relay (a "sniff" of zero bytes passes everything at once) that counts the requests
    it carries, by request line."""

    def __init__(self, upstream_port: int) -> None:
        self.requests: list[str] = []
        super().__init__(upstream_port, "sniff", 0)

    def _respond(self, first: bytes, upstream: Any, client: Any) -> None:
        line = first.decode("latin-1")
        if line.split(" ")[1].startswith(("/poll/", "/longpoll/", "/sse/", "/ws/")):
            self.requests.append(line)
        super()._respond(first, upstream, client)


@pytest.fixture(scope="module")
def auth_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = GATEWAY | {"auth": {"secret": SECRET, "leeway_s": 0.0, "public": ["mod.public.*"]}}
    gateway = Gateway(config, Path(tmp_path_factory.mktemp("auth")))
    yield gateway
    gateway.stop()


@pytest.fixture
def counting(auth_gw: Gateway) -> Iterator[CountingProxy]:
    assert requests.get(f"{auth_gw.url}/poll/mod.private", timeout=5).status_code == 401  # checked: private
    proxy = CountingProxy(auth_gw.port)
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_token_refused_is_unauthorized_with_no_retry_loop(
    auth_gw: Gateway, counting: CountingProxy, page_of: Any, transport: str
) -> None:
    page = page_of(counting.url)
    wrong = mint("not-the-secret-but-as-long-as-the-real-one", ["mod.private"])
    page.evaluate(
        """([token, transport, fast]) => {
            window.asked = 0; window.states = []; window.got = [];
            window.sub = window.gw.subscribe("", "mod.private", Object.assign(fast, {
                transports: [transport], shareTabs: false,
                token: () => { window.asked++; return Promise.resolve(token); },
                onEvent: (ev) => window.got.push(ev),
                onStateChange: (state, info) => window.states.push([state, info]),
            }));
        }""",
        [wrong, transport, FAST],
    )
    wait_js(page, "window.sub.state === 'unauthorized'", 10)
    counted = len(counting.requests)
    time.sleep(3)  # a retry loop would show here
    assert len(counting.requests) == counted, counting.requests
    assert 2 <= counted <= 3, counting.requests  # the first try, the one with a fresh token (+ a handshake)
    assert page.evaluate("window.asked") == 2  # the token function got one more chance
    state, info = page.evaluate("window.states[window.states.length - 1]")
    assert state == "unauthorized" and info["status"] == 401 and info["error"] == "unauthorized", info
    # Fetch requests carry the token as a header, not in the URL.
    if transport != "websocket":
        assert not any("token=" in r for r in counting.requests), counting.requests


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_token_for_another_channel_is_forbidden_and_a_good_one_reads(
    auth_gw: Gateway, counting: CountingProxy, page_of: Any, transport: str
) -> None:
    page = page_of(counting.url)
    follow(page, "mod.private", transports=[transport], shareTabs=False, token=mint(SECRET, ["other.*"]))
    wait_js(page, "window.sub.state === 'forbidden'", 10)
    info = page.evaluate("window.states[window.states.length - 1][1]")
    assert info["status"] == 403 and info["error"] == "forbidden", info
    counted = len(counting.requests)
    time.sleep(2)
    assert len(counting.requests) == counted  # no retry loop
    page.evaluate("window.sub.close()")

    follow(page, "mod.private", transports=[transport], shareTabs=False, token=mint(SECRET, ["mod.*"]))
    wait_js(page, "window.sub.state === 'open'")
    ids = [auth_gw.publish("mod.private", str(i)) for i in range(3)]
    wait_js(page, "window.got.length >= 3")
    assert [g[1] for g in page.evaluate("window.got")] == ids


def test_without_web_locks_each_subscription_connects_on_its_own(gw: Gateway, page_of: Any) -> None:
    page = page_of(gw.url)
    page.evaluate("Object.defineProperty(Navigator.prototype, 'locks', {get: () => undefined, configurable: true})")
    follow(page, "mod.nolocks", transports=["sse"])
    wait_js(page, "window.sub.state === 'open'")
    assert page.evaluate("window.sub.role") == "private"
    ids = [gw.publish("mod.nolocks", str(i)) for i in range(3)]
    wait_js(page, "window.got.length >= 3")
    assert [g[1] for g in page.evaluate("window.got")] == ids
    assert page.errors == []


def test_websocket_refused_at_the_handshake_learns_the_status_with_one_poll(
    auth_gw: Gateway, counting: CountingProxy, page_of: Any
) -> None:
    # With `since` the client skips its first cursor read and opens the socket at once: the
    # browser only says the handshake failed, so the status comes from one poll of the channel.
    page = page_of(counting.url)
    follow(page, "mod.private", transports=["websocket"], since="1-0", token=mint(SECRET, ["other.*"]))
    wait_js(page, "window.sub.state === 'forbidden'", 10)
    info = page.evaluate("window.states[window.states.length - 1][1]")
    assert info["status"] == 403 and info["error"] == "forbidden" and info["transport"] == "websocket", info
    time.sleep(2)
    paths = [r.split(" ")[1].split("?")[0] for r in counting.requests]
    assert paths == ["/ws/mod.private", "/poll/mod.private"], counting.requests


@pytest.mark.parametrize("transport", ["websocket", "sse", "long_poll"])
def test_a_stream_ended_at_token_expiry_resumes_with_a_fresh_token(
    auth_gw: Gateway, counting: CountingProxy, page_of: Any, transport: str
) -> None:
    # Tokens that expire 2 s apart: each stream ends at its token's expiry (SSE ends, WebSocket
    # closes 1008, a held poll answers 401); the client asks for the next one and resumes.
    start = time.time()
    tokens = [mint(SECRET, ["mod.*"], exp_in=2 * (k + 1) + 1) for k in range(8)]
    page = page_of(counting.url)
    page.evaluate(
        """([tokens, transport, fast]) => {
            window.asked = 0; window.states = []; window.got = [];
            window.sub = window.gw.subscribe("", "mod.expiring." + transport, Object.assign(fast, {
                transports: [transport], shareTabs: false, longPollTimeoutS: 1,
                token: () => tokens[Math.min(window.asked++, tokens.length - 1)],
                onEvent: (ev) => window.got.push([ev.channel, ev.id]),
                onStateChange: (state, info) => window.states.push([state, info]),
            }));
        }""",
        [tokens, transport, FAST],
    )
    wait_js(page, "window.sub.state === 'open'")
    sent = []
    while time.time() - start < 6.5:
        sent.append(auth_gw.publish(f"mod.expiring.{transport}", "tick"))
        time.sleep(0.2)
    wait_js(page, f"window.got.length >= {len(sent)}", 20)
    time.sleep(0.5)
    assert [g[1] for g in page.evaluate("window.got")] == sent
    assert page.evaluate("window.asked") >= 3  # fresh tokens as the old ones expired
    assert page.evaluate("window.sub.state") in ("open", "connecting", "retry")
    assert not [s for s in page.evaluate("window.states") if s[0] in ("unauthorized", "failed")]


@pytest.mark.parametrize("transport", ["websocket", "sse", "short_poll"])
def test_adding_a_channel_the_token_does_not_grant_is_refused_alone(
    auth_gw: Gateway, counting: CountingProxy, page_of: Any, transport: str
) -> None:
    channel = f"mod.keep.{transport}"
    page = page_of(counting.url)
    follow(page, channel, transports=[transport], shareTabs=False, token=mint(SECRET, ["mod.*"]))
    wait_js(page, "window.sub.state === 'open'")
    refused = page.evaluate(
        "() => window.sub.add('other.secret').then(() => null, (e) => [e.status, e.error, e.channels])"
    )
    assert refused == [403, "forbidden", ["other.secret"]]
    assert page.evaluate("window.sub.channels") == [channel]
    ids = [auth_gw.publish(channel, str(i)) for i in range(3)]
    wait_js(page, "window.got.length >= 3")
    assert [g[1] for g in page.evaluate("window.got")] == ids
    assert page.evaluate("window.sub.state") == "open"
    assert page.evaluate("window.sub.transport") == transport
