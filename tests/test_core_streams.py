"""SSE and WebSocket against a live gateway: framing, heartbeats, resume, gaps, client frames."""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest
import requests
import websocket

from tests.clients import SSEClient, WSClient, poll


def test_sse_headers_retry_and_multiline_data(gateway, channel):
    with SSEClient(f"{gateway.url}/sse/{channel}") as sse:
        assert sse.status == 200
        assert sse.headers["Content-Type"].startswith("text/event-stream")
        assert sse.headers["Cache-Control"] == "no-cache"
        assert sse.headers["X-Accel-Buffering"] == "no"
        event_id = gateway.publish(channel, "line one\nline two\r\nline three", "note")
        event = sse.next_event()
        assert event == {"id": event_id, "event": "note", "data": "line one\nline two\nline three"}
        assert sse.retries == [500]


def test_sse_raw_wire_format(gateway, channel):
    with SSEClient(f"{gateway.url}/sse/{channel}") as sse:
        event_id = gateway.publish(channel, "a\nb")
        raw = b""
        while b"data: b\n\n" not in raw:
            raw += next(sse._chunks)
    assert f"id: {event_id}\nevent: message\ndata: a\ndata: b\n\n".encode() in raw


def test_sse_heartbeats_while_idle(gateway, channel):
    with SSEClient(f"{gateway.url}/sse/{channel}") as sse:
        # heartbeat_s is 0.5 here: an event after 1.6 s arrives behind at least two heartbeats.
        time.sleep(1.6)
        gateway.publish(channel, "after quiet")
        assert sse.next_event()["data"] == "after quiet"
        assert sse.comments.count("heartbeat") >= 2


def test_sse_resume_with_last_event_id_gets_missed_events_once(gateway, channel):
    with SSEClient(f"{gateway.url}/sse/{channel}") as sse:
        ids = [gateway.publish(channel, str(i)) for i in range(3)]
        seen = sse.events(2)
    missed = [gateway.publish(channel, str(i)) for i in range(3, 6)]
    with SSEClient(f"{gateway.url}/sse/{channel}?since={ids[0]}", {"Last-Event-ID": seen[-1]["id"]}) as sse:
        again = sse.events(4)
    assert [e["id"] for e in again] == [ids[2]] + missed
    assert all(e["event"] == "message" for e in again)


def test_sse_resume_with_since_parameter(gateway, channel):
    ids = [gateway.publish(channel, str(i)) for i in range(4)]
    with SSEClient(f"{gateway.url}/sse/{channel}?since={ids[1]}") as sse:
        assert [e["id"] for e in sse.events(2)] == ids[2:]


def test_sse_gap_event_comes_before_the_next_real_event(gateway, channel):
    first = gateway.publish(channel, "lost")
    for i in range(55):
        gateway.publish(channel, str(i))
    with SSEClient(f"{gateway.url}/sse/{channel}", {"Last-Event-ID": first}) as sse:
        events = sse.events(51)
    assert events[0]["event"] == "gap"
    assert json.loads(events[0]["data"])["requested"] == first
    assert [e["data"] for e in events[1:]] == [str(i) for i in range(5, 55)]
    # The gap event's id is a cursor that resumes without another gap.
    assert poll(gateway.url, channel, events[0]["id"])["gap"] is False


def test_sse_head_gets_the_headers_and_no_stream(gateway, channel):
    # The next request on the same connection must be answered right after HEAD's headers:
    # no body, no chunk terminator, no stream that events would later be written into.
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(
            f"HEAD /sse/{channel} HTTP/1.1\r\nHost: x\r\n\r\n"
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        gateway.publish(channel, "not for a HEAD")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    assert rest.startswith(b"HTTP/1.1 200"), rest[:80]
    assert b"not for a HEAD" not in raw


def test_sse_padding_is_sent_first_when_configured(start_gateway, channel):
    gw = start_gateway({"sse": {"padding_bytes": 2048}})
    with SSEClient(f"{gw.url}/sse/{channel}") as sse:
        first = next(sse._chunks)
    assert first.startswith(b":" + b" " * 2048 + b"\n\n")


def test_ws_delivers_events_as_json_frames_in_order(gateway, channel):
    with WSClient(f"{gateway.ws_url}/ws/{channel}") as ws:
        time.sleep(0.2)  # subscribed from "now": let the handshake settle before publishing
        ids = [gateway.publish(channel, f"m{i}") for i in range(10)]
        frames = ws.events(10)
    assert frames == [{"id": i, "event": "message", "data": f"m{n}"} for n, i in enumerate(ids)]


def test_ws_resume_with_since_gets_missed_events_once(gateway, channel):
    ids = [gateway.publish(channel, str(i)) for i in range(5)]
    with WSClient(f"{gateway.ws_url}/ws/{channel}?since={ids[1]}") as ws:
        assert [f["id"] for f in ws.events(3)] == ids[2:]
        later = gateway.publish(channel, "later")
        assert ws.next_frame()["id"] == later


def test_ws_gap_frame_first_when_history_was_lost(gateway, channel):
    with WSClient(f"{gateway.ws_url}/ws/{channel}?since=1000-0") as ws:
        gateway.publish(channel, "x")
        frames = ws.events(2)
    assert frames[0]["event"] == "gap" and frames[1]["data"] == "x"


def test_ws_client_frames_publish_where_allowed(gateway):
    chat = f"chat.{time.monotonic_ns()}"
    with WSClient(f"{gateway.ws_url}/ws/{chat}") as alice, WSClient(f"{gateway.ws_url}/ws/{chat}") as bob:
        time.sleep(0.2)
        alice.send("hi bob")
        alice.send(json.dumps({"data": {"x": 1}, "event": "move"}))
        for client in (alice, bob):
            first, second = client.events(2)
            assert (first["event"], first["data"]) == ("message", "hi bob")
            assert (second["event"], json.loads(second["data"])) == ("move", {"x": 1})
    assert [e["data"] for e in poll(gateway.url, chat, "0-0")["events"]] == ["hi bob", '{"x": 1}']


def test_ws_client_frames_elsewhere_get_an_error_frame_and_the_socket_stays_open(gateway, channel):
    with WSClient(f"{gateway.ws_url}/ws/{channel}") as ws:
        ws.send("not allowed")
        error = ws.next_frame()
        assert error["event"] == "error" and error["error"] == "publish_not_allowed"
        event_id = gateway.publish(channel, "still here")
        assert ws.next_frame() == {"id": event_id, "event": "message", "data": "still here"}
    assert poll(gateway.url, channel, "0-0")["events"][0]["data"] == "still here"


def test_ws_handshake_refused_for_bad_input_and_foreign_origin(gateway, channel):
    cases = [
        (f"/ws/{channel}?since=junk", {}, 400),
        ("/ws/bad%20name", {}, 400),
        (f"/ws/{channel}", {"origin": "https://evil.example"}, 403),
    ]
    for path, kwargs, status in cases:
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            websocket.create_connection(gateway.ws_url + path, timeout=5, **kwargs)
        assert info.value.status_code == status, path
        assert json.loads(info.value.resp_body)["error"]


def test_ws_route_without_upgrade_is_426(gateway, channel):
    import requests

    r = requests.get(f"{gateway.url}/ws/{channel}", timeout=5)
    assert r.status_code == 426 and r.json()["error"] == "websocket_required"


def test_ws_server_sends_keepalive_pings(start_gateway, channel):
    gw = start_gateway({"websocket": {"ping_s": 0.3}})
    ws = websocket.create_connection(f"{gw.ws_url}/ws/{channel}", timeout=5)
    try:
        opcode, _ = ws.recv_data_frame(control_frame=True)[0], None
        assert opcode == websocket.ABNF.OPCODE_PING
    finally:
        ws.close()


@pytest.mark.parametrize("channels", ["hup.one", "hup.a,hup.b"])
@pytest.mark.parametrize("how", ["close", "reset", "half_close"])
def test_sse_stream_ends_as_soon_as_its_client_hangs_up(start_gateway, channels, how):
    """A half-close (the client shuts its sending side, as nginx also treats it) counts too."""
    # Heartbeats a minute apart: only the hang-up itself can end these streams within the test.
    gw = start_gateway({"sse": {"heartbeat_s": 60.0}})

    def subscribers() -> int:
        return requests.get(f"{gw.url}/healthz", timeout=5).json()["subscribers"]

    socks = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
        s.sendall(f"GET /sse/{channels} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        socks.append(s)
    per_stream = len(channels.split(","))
    deadline = time.monotonic() + 5
    while subscribers() != 3 * per_stream and time.monotonic() < deadline:
        time.sleep(0.05)
    assert subscribers() == 3 * per_stream
    for s in socks:
        if how == "half_close":
            s.shutdown(socket.SHUT_WR)  # still open for reading
            continue
        if how == "reset":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    deadline = time.monotonic() + 5
    while subscribers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert subscribers() == 0  # without the hang-up watch: still 3 streams, for up to 2 minutes
    for s in socks:
        s.close()
