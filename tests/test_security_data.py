"""Issue 12, High 3 and a Low: data or names that would poison a channel are refused at the door
(HTTP, WebSocket frames, upstream sources), and the channel keeps working for everyone."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from gateway.errors import BadRequest
from gateway.eventdata import InvalidData, check_data
from gateway.hub import Hub
from gateway.hub.memory import MemoryStore
from gateway.names import check_event_name
from tests.clients import SSEClient, WSClient, poll
from tests.helpers import TOKEN, Gateway
from tests.upstreams import Upstream, wait_for

AUTH = {"Authorization": f"Bearer {TOKEN}"}
SURROGATE_JSON = '{"data": "a\\ud800b"}'  # the JSON escape of a lone surrogate


def test_check_data_refuses_lone_surrogates_only() -> None:
    for ok in ("", "plain", "héllo wörld", "😀 \U0010ffff \x00 \ufffe", "a\r\nb"):
        assert check_data(ok) == ok
    for bad in ("\ud800", "x\udfff", "\ud83d", "😀\udc00"):
        with pytest.raises(InvalidData) as info:
            check_data(bad)
        assert info.value.code == "invalid_data" and info.value.status == 400


def test_hub_publish_refuses_bad_data_and_stores_nothing() -> None:
    hub = Hub(MemoryStore(10, 60))
    with pytest.raises(InvalidData):
        hub.publish("c", "\ud800")
    assert hub.read("c", "0-0", 10).events == []


def test_event_names_that_look_reserved_or_are_not_text_are_refused() -> None:
    for name in ("gap ", " gap", "error\t", "\u00a0gap", " x", "x ", "e\ud800"):
        with pytest.raises(BadRequest):
            check_event_name(name)
    assert check_event_name("price update") == "price update"


def test_json_surrogate_is_400_and_the_channel_stays_healthy(gateway: Gateway, channel: str) -> None:
    before = gateway.publish(channel, "before")
    sse = SSEClient(f"{gateway.url}/sse/{channel}?since={before}")
    try:
        r = requests.post(
            f"{gateway.url}/publish/{channel}",
            data=SURROGATE_JSON,
            headers={**AUTH, "Content-Type": "application/json"},
            timeout=5,
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"] == "invalid_data" and r.json()["detail"]
        r = requests.post(
            f"{gateway.url}/publish/{channel}",
            json={"data": "x", "event": "gap "},
            headers=AUTH,
            timeout=5,
        )
        assert r.status_code == 400 and r.json()["error"] == "invalid_event"
        after = gateway.publish(channel, "after")
        # The SSE stream was not cut, and every poll from before still answers.
        event = sse.next_event(time.monotonic() + 10)
        assert event is not None and event["data"] == "after" and event["id"] == after
        assert [e["data"] for e in poll(gateway.url, channel, "0-0")["events"]] == ["before", "after"]
        r = requests.get(f"{gateway.url}/longpoll/{channel}", params={"since": "0-0", "timeout": 1}, timeout=10)
        assert r.status_code == 200 and len(r.json()["events"]) == 2
    finally:
        sse.response.close()
    assert "Traceback" not in gateway.log()


def test_websocket_frame_with_a_surrogate_gets_an_error_frame(gateway: Gateway) -> None:
    channel = f"chat.{time.monotonic_ns()}"
    with WSClient(f"{gateway.ws_url}/ws/{channel}") as ws:
        ws.send(SURROGATE_JSON)
        frame = ws.next_frame()
        assert frame["event"] == "error" and frame["error"] == "invalid_data"
        ws.send(json.dumps({"data": "fine"}))
        frame = ws.next_frame()
        assert frame["data"] == "fine"
    assert [e["data"] for e in poll(gateway.url, channel, "0-0")["events"]] == ["fine"]


# -- upstream sources ------------------------------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.stop()


def _status(gw: Gateway) -> dict[str, dict]:
    return {s["channel"]: s for s in requests.get(gw.url + "/status", timeout=5).json()["sources"]}


def test_poll_source_skips_an_item_with_a_surrogate_instead_of_wedging(
    start_gateway: Callable[..., Gateway], upstream: Upstream
) -> None:
    upstream.emit("first")
    upstream.emit("bad \ud800 item")  # served as the JSON escape \ud800
    upstream.emit("third")
    source = {"kind": "poll", "url": upstream.url + "/items", "channel": "p", "interval": 0.1, "items": True}
    gw = start_gateway({"sources": [{**source, "id_field": "id", "backoff_initial_s": 0.05, "backoff_max_s": 0.2}]})
    events = wait_for(lambda: len(e := poll(gw.url, "p", "0-0")["events"]) >= 2 and e)
    assert [json.loads(e["data"])["data"] for e in events] == ["first", "third"]
    upstream.emit("fourth")
    wait_for(lambda: len(poll(gw.url, "p", "0-0")["events"]) == 3)
    st = _status(gw)["p"]
    assert st["state"] == "connected" and st["dropped"] == 1 and st["reconnects"] == 0, st
    assert "Traceback" not in gw.log()


class _RawSSE:
    """An SSE upstream that sends fixed bytes, then holds the stream open."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/events"
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            conn.recv(65536)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
            conn.sendall(head + self.body)

    def stop(self) -> None:
        self.listener.close()
        for conn in self._conns:
            conn.close()


def test_sse_source_with_surrogate_bytes_and_reserved_names_keeps_relaying(
    start_gateway: Callable[..., Gateway],
) -> None:
    # The UTF-8-like encoding of U+D800 (not valid UTF-8), a "gap " name, then a good event.
    body = b"id: 1\ndata: bad \xed\xa0\x80\n\nid: 2\nevent: gap \ndata: spoof\n\nid: 3\ndata: good\n\n"
    up = _RawSSE(body)
    try:
        gw = start_gateway({"sources": [{"kind": "sse", "url": up.url, "channel": "s", "backoff_initial_s": 0.05}]})
        events = wait_for(lambda: len(e := poll(gw.url, "s", "0-0")["events"]) >= 3 and e)
        assert events[0]["data"] == "bad \ufffd\ufffd\ufffd"  # replaced, as the SSE rules say
        assert events[1]["event"] == "upstream.gap" and events[1]["data"] == "spoof"
        assert events[2]["data"] == "good"
        assert "Traceback" not in gw.log()
    finally:
        up.stop()
