"""Many channels on one connection (contract "Many channels on one connection (v2)") against live
gateways: every event of every channel exactly once, one cursor that resumes them all (with a gap
of its own for a channel whose history ran out), poll and long poll on lists, the limits on the
list, WebSocket subscribe/unsubscribe, and the same across two processes on one Redis."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests

from tests.clients import SSEClient, WSClient, raw_request
from tests.helpers import Gateway
from tests.redis_server import RedisServer, redis_server  # noqa: F401  (a fixture)

CONFIG: dict[str, Any] = {
    "history": {"size": 200},
    "sse": {"heartbeat_s": 0.5, "retry_ms": 500},
    # The default ping interval: a WebSocket must not need its next ping to notice anything.
    "websocket": {"ping_s": 25.0},
    "poll": {"max_batch": 100, "longpoll_max_timeout_s": 10.0},
}
Item = dict[str, Any]  # {"channel", "id", "event", "data", "cursor"}
EVENT_WAIT_S = 8  # generous for loopback on a loaded machine, far below the 25 s ping interval


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway(CONFIG, Path(tmp_path_factory.mktemp("multi")))
    yield gateway
    gateway.stop()


def names(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"m{i}.{tag}" for i in range(n)]


# -- readers that turn each transport's framing into the same items --------------------------------
class MultiSSE:
    """An SSE stream on a list of channels: each event's data is the JSON envelope
    {"channel", "id", "data"}, its `event:` the event name and its `id:` the one cursor."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.sse = SSEClient(url, headers)
        assert self.sse.status == 200, self.sse.response.text[:300]
        self.raw: list[dict[str, str]] = []  # the events as they came, before unwrapping

    def next(self, deadline: float) -> Item | None:
        ev = self.sse.next_event(deadline)
        if ev is None:
            return None
        self.raw.append(ev)
        body = json.loads(ev["data"])
        assert isinstance(body, dict) and "channel" in body, ev
        return {
            "channel": body["channel"],
            "id": body.get("id"),
            "event": ev["event"],
            "data": body.get("data"),
            "cursor": ev["id"],
        }

    def close(self) -> None:
        self.sse.close()


class MultiWS:
    """A WebSocket on a list of channels: frames carry channel, id, event, data and cursor."""

    def __init__(self, url: str) -> None:
        self.ws = WSClient(url)

    def next(self, deadline: float) -> Item | None:
        self.ws.ws.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            return self.ws.next_frame()
        except Exception:  # the deadline passed or the socket ended
            return None

    def send(self, obj: dict[str, Any]) -> None:
        self.ws.send(json.dumps(obj))

    def close(self) -> None:
        self.ws.close()


def read_until(reader: Any, done: Callable[[list[Item]], bool], deadline_s: float = 15) -> list[Item]:
    got: list[Item] = []
    end = time.monotonic() + deadline_s
    while not done(got) and time.monotonic() < end:
        item = reader.next(end)
        if item is None:
            break
        got.append(item)
    return got


def read_n(reader: Any, n: int, deadline_s: float = 15) -> list[Item]:
    got = read_until(reader, lambda g: len(g) >= n, deadline_s)
    assert len(got) == n, f"got {len(got)} of {n}: {got}"
    return got


def read_to_sentinel(reader: Any, sentinel: str, deadline_s: float = 15, at_least: int = 1) -> list[Item]:
    """Everything until the event whose data is `sentinel` (published last) has arrived, and
    with it at least `at_least` real events: order across channels is not promised, so a
    sentinel alone does not prove that another channel's backlog is complete."""

    def done(got: list[Item]) -> bool:
        real = [i for i in got if i["event"] != "gap"]
        return any(i.get("data") == sentinel for i in real) and len(real) >= at_least

    got = read_until(reader, done, deadline_s)
    assert done(got), f"no sentinel or too few events (want {at_least}); got {got}"
    return got


def publish_rounds(gw: Gateway, channels: list[str], rounds: range) -> dict[str, list[tuple[str, str]]]:
    """Publish round after round, one event per channel each, interleaved; {channel: [(id, data)]}."""
    out: dict[str, list[tuple[str, str]]] = {c: [] for c in channels}
    for r in rounds:
        for c in channels:
            data = f"{c}#{r}"
            out[c].append((gw.publish(c, data, "tick" if r % 2 else None), data))
    return out


def per_channel(items: list[Item]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for item in items:
        if item["event"] != "gap":
            out.setdefault(item["channel"], []).append((item["id"], item["data"]))
    return out


def merge(*parts: dict[str, list[tuple[str, str]]]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for part in parts:
        for c, events in part.items():
            out.setdefault(c, []).extend(events)
    return {c: e for c, e in out.items() if e}


def assert_exactly(items: list[Item], expected: dict[str, list[tuple[str, str]]]) -> None:
    """Every expected event once, in order per channel, nothing else (and no gap)."""
    assert [i for i in items if i["event"] == "gap"] == [], items
    assert per_channel(items) == {c: e for c, e in expected.items() if e}


def drop(expected: dict[str, list[tuple[str, str]]], seen: list[Item]) -> dict[str, list[tuple[str, str]]]:
    """`expected` without the events already seen."""
    ids = {(i["channel"], i["id"]) for i in seen}
    return {c: [e for e in events if (c, e[0]) not in ids] for c, events in expected.items()}


# -- every event of every channel, once -----------------------------------------------------------
def test_one_sse_stream_on_five_channels_gets_every_event_once(gw):
    chans = names(5)
    stream = MultiSSE(f"{gw.url}/sse/{','.join(chans)}")
    try:
        sent = publish_rounds(gw, chans, range(4))
        got = read_n(stream, 20)
    finally:
        stream.close()
    assert_exactly(got, sent)
    for ev in stream.raw:
        assert set(json.loads(ev["data"])) == {"channel", "id", "data"}, ev  # the contract's envelope
    for item in got:
        round_ = int(item["data"].rsplit("#", 1)[1])
        assert item["event"] == ("tick" if round_ % 2 else "message"), item
        assert item["cursor"] and item["cursor"].isascii(), item


def test_one_websocket_on_five_channels_gets_every_event_once(gw):
    chans = names(5)
    ws = MultiWS(f"{gw.ws_url}/ws/{','.join(chans)}")
    try:
        sent = publish_rounds(gw, chans, range(4))
        got = read_n(ws, 20)
    finally:
        ws.close()
    assert_exactly(got, sent)
    for item in got:
        assert set(item) >= {"channel", "id", "event", "data", "cursor"}, item
        assert item["event"] == ("tick" if int(item["data"].rsplit("#", 1)[1]) % 2 else "message")


# -- one cursor resumes them all ------------------------------------------------------------------
@pytest.mark.parametrize("how", ["last_event_id", "since"])
def test_sse_resumes_every_channel_from_the_last_cursor(gw, how):
    chans = names(5)
    stream = MultiSSE(f"{gw.url}/sse/{','.join(chans)}")
    try:
        before = publish_rounds(gw, chans, range(3))
        seen = read_n(stream, 8)  # part of it; the rest is lost with the connection
    finally:
        stream.close()
    after = publish_rounds(gw, chans, range(3, 5))
    cursor = seen[-1]["cursor"]
    url = f"{gw.url}/sse/{','.join(chans)}"
    if how == "since":
        resumed = MultiSSE(url + f"?since={cursor}")
    else:
        resumed = MultiSSE(url, {"Last-Event-ID": cursor})
    try:
        expected = merge(drop(before, seen), after)
        got = read_n(resumed, sum(len(e) for e in expected.values()))
        gw.publish(chans[0], "sentinel")
        got += read_to_sentinel(resumed, "sentinel")
    finally:
        resumed.close()
    assert_exactly(got[:-1], expected)


def test_websocket_resumes_every_channel_from_the_last_cursor(gw):
    chans = names(5)
    ws = MultiWS(f"{gw.ws_url}/ws/{','.join(chans)}")
    try:
        before = publish_rounds(gw, chans, range(3))
        seen = read_n(ws, 7)
    finally:
        ws.close()
    after = publish_rounds(gw, chans, range(3, 5))
    resumed = MultiWS(f"{gw.ws_url}/ws/{','.join(chans)}?since={seen[-1]['cursor']}")
    try:
        expected = merge(drop(before, seen), after)
        got = read_n(resumed, sum(len(e) for e in expected.values()))
        gw.publish(chans[2], "sentinel")
        got += read_to_sentinel(resumed, "sentinel")
    finally:
        resumed.close()
    assert_exactly(got[:-1], expected)


def _gap_scenario(gw: Gateway, open_reader: Callable[[list[str], str | None], Any]) -> None:
    """Channel 0 loses history while the reader is away (history.size is 5); 1 and 2 do not.
    `gw` publishes; the reader may be on another process."""
    chans = names(3)
    reader = open_reader(chans, None)
    try:
        publish_rounds(gw, chans, range(1))
        seen = read_n(reader, 3)
    finally:
        reader.close()
    lost = [gw.publish(chans[0], f"a{i}") for i in range(12)]  # history keeps the last 5
    kept_b = [(gw.publish(chans[1], f"b{i}"), f"b{i}") for i in range(2)]
    reader = open_reader(chans, seen[-1]["cursor"])
    try:
        sentinel = gw.publish(chans[2], "sentinel")
        got = read_to_sentinel(reader, "sentinel", at_least=5 + 2 + 1)
    finally:
        reader.close()
    gaps = [i for i in got if i["event"] == "gap"]
    assert [g["channel"] for g in gaps] == [chans[0]], got  # its own gap, naming the channel
    first_a = next(n for n, i in enumerate(got) if i["event"] != "gap" and i["channel"] == chans[0])
    assert got.index(gaps[0]) < first_a, "the gap must come before the channel's next real event"
    assert per_channel(got) == {
        chans[0]: [(lost[i], f"a{i}") for i in range(7, 12)],
        chans[1]: kept_b,
        chans[2]: [(sentinel, "sentinel")],
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose channels keep only 5 events of history."""
    gateway = Gateway(CONFIG | {"history": {"size": 5}}, Path(tmp_path_factory.mktemp("small")))
    yield gateway
    gateway.stop()


def test_a_channel_whose_history_ran_out_gets_its_own_gap_on_sse(small):
    gw = small

    def open_sse(chans: list[str], cursor: str | None) -> MultiSSE:
        return MultiSSE(f"{gw.url}/sse/{','.join(chans)}", {"Last-Event-ID": cursor} if cursor else None)

    _gap_scenario(gw, open_sse)


def test_a_channel_whose_history_ran_out_gets_its_own_gap_on_websocket(small):
    gw = small

    def open_ws(chans: list[str], cursor: str | None) -> MultiWS:
        return MultiWS(f"{gw.ws_url}/ws/{','.join(chans)}" + (f"?since={cursor}" if cursor else ""))

    _gap_scenario(gw, open_ws)


def _gap_named(answer: dict[str, Any], channel: str) -> bool:
    """Whether a poll answer reports a gap for `channel`: a gap event of that channel, or the
    channel named in the answer's own fields (beside "gap": true)."""
    if any(e.get("event") == "gap" and e.get("channel") == channel for e in answer["events"]):
        return True
    return channel in json.dumps({k: v for k, v in answer.items() if k not in ("events", "cursor")})


@pytest.mark.parametrize("route", ["poll", "longpoll"])
def test_poll_on_a_list_reports_the_gap_of_the_channel_that_lost_history(small, route):
    a, b = names(2)
    url = f"{small.url}/{route}/{a},{b}"
    cursor = requests.get(url, params={"timeout": 0}, timeout=10).json()["cursor"]
    lost = [small.publish(a, f"a{i}") for i in range(12)]  # history keeps the last 5
    kept = [small.publish(b, f"b{i}") for i in range(2)]
    answer = requests.get(url, params={"since": cursor, "timeout": 0}, timeout=10).json()
    assert answer["gap"] is True, answer
    assert _gap_named(answer, a) and not _gap_named(answer, b), answer
    real = [e for e in answer["events"] if e.get("event") != "gap"]
    assert [e["id"] for e in real if e["channel"] == a] == lost[7:]
    assert [e["id"] for e in real if e["channel"] == b] == kept
    # Its cursor resumes both without another gap.
    again = requests.get(url, params={"since": answer["cursor"], "timeout": 0}, timeout=10).json()
    assert again["events"] == [] and again["gap"] is False, again


def test_a_listed_channel_the_cursor_does_not_know_starts_from_now(gw):
    a, b, c = names(3)
    stream = MultiSSE(f"{gw.url}/sse/{a},{b}")
    try:
        gw.publish(a, "a0")
        cursor = read_n(stream, 1)[0]["cursor"]
    finally:
        stream.close()
    gw.publish(c, "c-before")  # c is not in the cursor: this is before "now"
    a1 = gw.publish(a, "a1")
    resumed = MultiSSE(f"{gw.url}/sse/{a},{b},{c}", {"Last-Event-ID": cursor})
    try:
        got = read_n(resumed, 1)
        c1 = gw.publish(c, "c-after")
        got += read_to_sentinel(resumed, "c-after")
    finally:
        resumed.close()
    assert [(i["channel"], i["id"], i["event"]) for i in got] == [(a, a1, "message"), (c, c1, "message")]


# -- short and long poll on a list ---------------------------------------------------------------
def test_poll_and_long_poll_on_a_list_with_one_cursor(gw):
    a, b = names(2)
    url = f"{gw.url}/poll/{a},{b}"
    first = requests.get(url, timeout=10).json()
    assert first["events"] == [] and first["gap"] is False and first["cursor"]
    sent = {a: [(gw.publish(a, "a0"), "a0"), (gw.publish(a, "a1"), "a1")], b: [(gw.publish(b, "b0"), "b0")]}
    answer = requests.get(url, params={"since": first["cursor"]}, timeout=10).json()
    assert answer["gap"] is False
    assert {(e["channel"], e["id"]) for e in answer["events"]} == {(c, i) for c in sent for i, _ in sent[c]}
    assert per_channel([dict(e, event=e.get("event", "message")) for e in answer["events"]]) == sent
    again = requests.get(url, params={"since": answer["cursor"]}, timeout=10).json()
    assert again["events"] == [] and again["gap"] is False

    held: dict[str, Any] = {}

    def hold() -> None:
        r = requests.get(f"{gw.url}/longpoll/{a},{b}", params={"since": again["cursor"], "timeout": 8}, timeout=20)
        held.update(status=r.status_code, body=r.json(), at=time.monotonic())

    poller = threading.Thread(target=hold, daemon=True)
    poller.start()
    time.sleep(0.5)
    assert poller.is_alive(), f"the long poll answered before any event: {held}"
    published_at = time.monotonic()
    b1 = gw.publish(b, "b1")
    poller.join(15)
    assert held["status"] == 200 and held["at"] - published_at < 5
    assert [(e["channel"], e["id"], e["data"]) for e in held["body"]["events"]] == [(b, b1, "b1")]
    # The long poll's cursor resumes both channels: only what comes after it.
    a2 = gw.publish(a, "a2")
    last = requests.get(url, params={"since": held["body"]["cursor"]}, timeout=10).json()
    assert [(e["channel"], e["id"]) for e in last["events"]] == [(a, a2)]


# -- the list itself -----------------------------------------------------------------------------
def _refused_400(gw: Gateway, transport: str, listing: str) -> None:
    path = f"/{transport}/{listing}" + ("?timeout=0" if transport == "longpoll" else "")
    r = raw_request(gw.port, path, {"Accept": "text/event-stream"}, websocket_upgrade=transport == "ws")
    try:
        assert r.status == 400, (transport, listing, r.status, r.body[:300])
        body = r.json()
        assert body["error"] and body["detail"], body
    finally:
        r.close()


@pytest.mark.parametrize("transport", ["poll", "longpoll", "sse", "ws"])
def test_more_channels_than_the_limit_or_an_invalid_name_is_400(start_gateway, transport):
    gw = start_gateway(CONFIG | {"limits": {"max_channels_per_connection": 3}})
    chans = names(4)
    ok = raw_request(gw.port, f"/{transport}/{','.join(chans[:3])}?timeout=0", websocket_upgrade=transport == "ws")
    assert ok.status == (101 if transport == "ws" else 200), ok.body[:300]
    ok.close()
    _refused_400(gw, transport, ",".join(chans))
    _refused_400(gw, transport, f"{chans[0]},bad!name")
    _refused_400(gw, transport, f"{chans[0]},,{chans[1]}")
    _refused_400(gw, transport, f"{chans[0]},-leading-dash")


def test_websocket_subscribe_past_the_channel_limit_is_an_error_frame(start_gateway):
    gw = start_gateway(CONFIG | {"limits": {"max_channels_per_connection": 3}})
    a, b, c, d = names(4)
    ws = MultiWS(f"{gw.ws_url}/ws/{a},{b},{c}")
    try:
        ws.send({"action": "subscribe", "channel": d})
        reply = _reply(ws)
        assert reply["event"] == "error" and reply.get("error"), reply
        gw.publish(d, "must not arrive")
        a0 = gw.publish(a, "still open")
        frame = _event(ws)
        assert (frame["channel"], frame["id"]) == (a, a0), frame
        # Room again after an unsubscribe.
        ws.send({"action": "unsubscribe", "channel": b})
        assert _reply(ws).get("event") != "error"
        ws.send({"action": "subscribe", "channel": d})
        assert _reply(ws).get("event") != "error"
        d1 = gw.publish(d, "now it may")
        frame = _event(ws)
        assert (frame["channel"], frame["id"]) == (d, d1), frame
    finally:
        ws.close()


def test_the_default_limit_is_50_channels(gw):
    chans = names(51)
    assert requests.get(f"{gw.url}/poll/{','.join(chans[:50])}", timeout=10).status_code == 200
    _refused_400(gw, "poll", ",".join(chans))
    _refused_400(gw, "sse", ",".join(chans))


def test_the_cursor_of_50_channels_is_short_ascii_and_works_as_last_event_id(gw):
    tag = uuid.uuid4().hex[:8]
    chans = [f"project-{tag}.user-{i:03d}.notifications" for i in range(50)]  # realistic, 40 characters
    listing = ",".join(chans)
    start = requests.get(f"{gw.url}/poll/{listing}", timeout=10).json()["cursor"]
    for c in chans:
        gw.publish(c, f"first {c}")
    answer = requests.get(f"{gw.url}/poll/{listing}", params={"since": start}, timeout=10).json()
    assert len(answer["events"]) == 50
    cursor = answer["cursor"]
    assert cursor.isascii() and cursor.isprintable() and len(cursor) < 2048, (len(cursor), cursor)
    stream = MultiSSE(f"{gw.url}/sse/{listing}", {"Last-Event-ID": cursor})
    try:
        event_id = gw.publish(chans[17], "only this")
        got = read_n(stream, 1)
    finally:
        stream.close()
    assert (got[0]["channel"], got[0]["id"], got[0]["data"]) == (chans[17], event_id, "only this")
    assert got[0]["cursor"].isascii() and len(got[0]["cursor"]) < 2048


# -- WebSocket subscribe / unsubscribe ------------------------------------------------------------
def _reply(ws: MultiWS) -> Item:
    """The gateway's answer to a subscribe/unsubscribe message (no events are due meanwhile)."""
    frame = ws.next(time.monotonic() + 10)
    assert frame is not None, "no reply to the message"
    return frame


def _event(ws: MultiWS) -> Item:
    frame = ws.next(time.monotonic() + EVENT_WAIT_S)
    assert frame is not None, "no event"
    return frame


@pytest.mark.parametrize("opened_on", ["one channel", "two channels"])
def test_websocket_subscribe_and_unsubscribe_on_an_open_socket(gw, opened_on):
    a, b, c, z = names(4)
    ws = MultiWS(f"{gw.ws_url}/ws/{a}" + (f",{z}" if opened_on == "two channels" else ""))
    try:
        ws.send({"action": "subscribe", "channel": b})
        reply = _reply(ws)
        assert reply.get("event") != "error" and "error" not in reply, reply
        # From here on the socket carries several channels: every frame names its channel and
        # carries the one cursor.
        b0 = gw.publish(b, "b0")
        frame = _event(ws)
        assert (frame.get("channel"), frame["id"], frame["data"]) == (b, b0, "b0"), frame
        assert frame.get("cursor"), frame
        a0 = gw.publish(a, "a0")
        frame = _event(ws)
        assert (frame.get("channel"), frame["id"], frame["data"]) == (a, a0, "a0"), frame
        assert frame.get("cursor"), frame

        ws.send({"action": "unsubscribe", "channel": b})
        reply = _reply(ws)
        assert reply.get("event") != "error" and "error" not in reply, reply
        gw.publish(b, "b1 after unsubscribe")
        a1 = gw.publish(a, "a1")
        frame = _event(ws)
        assert (frame.get("channel"), frame["id"], frame["data"]) == (a, a1, "a1"), frame

        # subscribe with since: what the channel had after that id comes first.
        c0 = gw.publish(c, "c0")
        c1 = gw.publish(c, "c1")
        ws.send({"action": "subscribe", "channel": c, "since": c0})
        frames = [_reply(ws), _event(ws)]
        events = [f for f in frames if f.get("channel") == c and f.get("id")]
        assert [(f["id"], f["data"]) for f in events] == [(c1, "c1")], frames
        cursor = events[0]["cursor"]
    finally:
        ws.close()
    # The last frame's cursor resumes both channels the socket had, on a fresh connection.
    a2, c2 = gw.publish(a, "a2"), gw.publish(c, "c2")
    resumed = MultiWS(f"{gw.ws_url}/ws/{a},{c}?since={cursor}")
    try:
        sentinel = gw.publish(a, "sentinel")
        got = read_to_sentinel(resumed, "sentinel", EVENT_WAIT_S, at_least=3)
    finally:
        resumed.close()
    assert per_channel(got) == {a: [(a2, "a2"), (sentinel, "sentinel")], c: [(c2, "c2")]}


def test_websocket_subscribe_to_an_invalid_channel_is_an_error_frame_not_a_close(gw):
    (a,) = names(1)
    ws = MultiWS(f"{gw.ws_url}/ws/{a}")
    try:
        for bad in ("bad!name", "", "-dash"):
            ws.send({"action": "subscribe", "channel": bad})
            reply = _reply(ws)
            assert reply["event"] == "error" and reply.get("error"), reply
        ws.send({"action": "subscribe"})  # no channel at all
        reply = _reply(ws)
        assert reply["event"] == "error" and reply.get("error"), reply
        a0 = gw.publish(a, "still open")
        frame = _event(ws)
        assert (frame["id"], frame["data"]) == (a0, "still open")
    finally:
        ws.close()


def test_websocket_subscribe_to_a_forbidden_channel_is_an_error_frame(start_gateway):
    secret = "multi-auth-secret-0123456789abcdef"
    gw = start_gateway(CONFIG | {"auth": {"secret": secret}})
    tag = uuid.uuid4().hex[:8]
    token = jwt.encode({"exp": int(time.time()) + 600, "channels": ["team.*"]}, secret, algorithm="HS256")
    ws = MultiWS(f"{gw.ws_url}/ws/team.a{tag}?token={token}")
    try:
        ws.send({"action": "subscribe", "channel": f"secret.{tag}"})
        reply = _reply(ws)
        assert reply["event"] == "error" and reply.get("error"), reply
        gw.publish(f"secret.{tag}", "must not arrive")
        ws.send({"action": "subscribe", "channel": f"team.b{tag}"})
        reply = _reply(ws)
        assert reply.get("event") != "error" and "error" not in reply, reply
        b0 = gw.publish(f"team.b{tag}", "allowed")
        frame = _event(ws)
        assert (frame["channel"], frame["id"], frame["data"]) == (f"team.b{tag}", b0, "allowed")
    finally:
        ws.close()


# -- two processes on one Redis ------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Gateway]]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("pair")
    env = {"REDIS_URL": redis_server.url}
    one = Gateway(CONFIG, tmp, env)
    try:
        two = Gateway(CONFIG, tmp, env)
    except Exception:
        one.stop()
        raise
    yield one, two
    one.stop()
    two.stop()


def test_redis_subscribe_on_one_process_publish_on_the_other(pair):
    one, two = pair
    a, b = names(2)
    ws = MultiWS(f"{one.ws_url}/ws/{a}")
    try:
        ws.send({"action": "subscribe", "channel": b})
        reply = _reply(ws)
        assert reply.get("event") != "error", reply
        b0 = two.publish(b, "b from two")
        frame = _event(ws)
        assert (frame["channel"], frame["id"], frame["data"]) == (b, b0, "b from two")
    finally:
        ws.close()


def test_redis_multi_channel_cursor_resumes_on_the_other_process(pair):
    one, two = pair
    chans = names(4)
    listing = ",".join(chans)
    stream = MultiSSE(f"{one.url}/sse/{listing}")
    try:
        before = publish_rounds(two, chans, range(2))
        seen = read_n(stream, 5)
    finally:
        stream.close()
    after = publish_rounds(one, chans, range(2, 3))
    resumed = MultiSSE(f"{two.url}/sse/{listing}", {"Last-Event-ID": seen[-1]["cursor"]})
    try:
        expected = merge(drop(before, seen), after)
        got = read_n(resumed, sum(len(e) for e in expected.values()))
        one.publish(chans[1], "sentinel")
        got += read_to_sentinel(resumed, "sentinel")
    finally:
        resumed.close()
    assert_exactly(got[:-1], expected)
    # The poll cursor too: one process's cursor, the other's answer.
    cursor = requests.get(f"{one.url}/poll/{listing}", timeout=10).json()["cursor"]
    late = two.publish(chans[3], "late")
    answer = requests.get(f"{two.url}/poll/{listing}", params={"since": cursor}, timeout=10).json()
    assert [(e["channel"], e["id"]) for e in answer["events"]] == [(chans[3], late)]


def test_redis_a_channel_whose_history_ran_out_gets_its_own_gap_across_processes(start_gateway, redis_server):  # noqa: F811
    env = {"REDIS_URL": redis_server.url}
    small = CONFIG | {"history": {"size": 5}}
    one, two = start_gateway(small, env), start_gateway(small, env)
    readers = iter([one, two])  # the first connection on one process, the resumed one on the other

    def open_sse(chans: list[str], cursor: str | None) -> MultiSSE:
        gw = next(readers)
        return MultiSSE(f"{gw.url}/sse/{','.join(chans)}", {"Last-Event-ID": cursor} if cursor else None)

    _gap_scenario(two, open_sse)


def test_redis_websocket_cursor_resumes_on_the_other_process(pair):
    one, two = pair
    chans = names(3)
    listing = ",".join(chans)
    ws = MultiWS(f"{one.ws_url}/ws/{listing}")
    try:
        before = publish_rounds(two, chans, range(2))
        seen = read_n(ws, 4)
    finally:
        ws.close()
    after = publish_rounds(one, chans, range(2, 3))
    resumed = MultiWS(f"{two.ws_url}/ws/{listing}?since={seen[-1]['cursor']}")
    try:
        expected = merge(drop(before, seen), after)
        got = read_n(resumed, sum(len(e) for e in expected.values()))
        one.publish(chans[0], "sentinel")
        got += read_to_sentinel(resumed, "sentinel")
    finally:
        resumed.close()
    assert_exactly(got[:-1], expected)
