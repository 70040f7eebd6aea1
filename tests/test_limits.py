"""Connection limits (contract "Limits (v2)") against live gateways: per client 429 and in all
503, with the JSON error shape and Retry-After, on SSE, long poll (a held one counts) and
WebSocket (as the handshake's answer); a freed slot is reusable; X-Forwarded-For counts only
from a trusted proxy."""

from __future__ import annotations

import http.client
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from tests.clients import RawResponse, raw_request
from tests.helpers import Gateway

BASE: dict[str, Any] = {
    "sse": {"heartbeat_s": 0.5, "retry_ms": 500},
    "websocket": {"ping_s": 5.0},
    "poll": {"longpoll_max_timeout_s": 10.0},
}
STREAMS = ["sse", "longpoll", "ws"]
SETTLE_S = 0.3
HOLD_S = 8  # a held long poll's timeout: long enough to be counted while the test looks


def limited(**limits: Any) -> dict[str, Any]:
    return BASE | {"limits": limits}


class Held:
    """One open connection that the gateway should count: an SSE stream or a WebSocket whose
    answer (200 / 101) has arrived, or a long poll sent and not yet answered."""

    def __init__(self, gw: Gateway, transport: str, channel: str, xff: str | None = None) -> None:
        headers = {"X-Forwarded-For": xff} if xff else {}
        self.transport = transport
        self.response: RawResponse | None = None
        self.sock: socket.socket
        if transport == "longpoll":
            self.sock = socket.create_connection(("127.0.0.1", gw.port), timeout=HOLD_S + 10)
            lines = [f"GET /longpoll/{channel}?timeout={HOLD_S} HTTP/1.1", f"Host: 127.0.0.1:{gw.port}"]
            lines += [f"{k}: {v}" for k, v in headers.items()]
            self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            # A held poll gives no sign of being counted: let the gateway read it before the test
            # probes (a probe admitted first would take the slot and the poll would be refused).
            time.sleep(SETTLE_S)
        else:
            headers["Accept"] = "text/event-stream"
            path = f"/{transport}/{channel}"
            self.response = raw_request(gw.port, path, headers, websocket_upgrade=transport == "ws")
            assert self.response.status == (101 if transport == "ws" else 200), (
                transport,
                self.response.status,
                self.response.body[:300],
            )
            self.sock = self.response.sock

    def answer_status(self) -> int:
        """A held long poll: wait for its answer (at its timeout) and return the status."""
        data = b""
        while b"\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return int(data.split(b" ", 2)[1])

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture
def held() -> Iterator[list[Held]]:
    """A list the test appends its open connections to; all closed at teardown."""
    out: list[Held] = []
    yield out
    for h in out:
        h.close()


def attempt(gw: Gateway, transport: str, channel: str, xff: str | None = None) -> RawResponse:
    headers = {"Accept": "text/event-stream", **({"X-Forwarded-For": xff} if xff else {})}
    path = f"/{transport}/{channel}" + ("?timeout=0" if transport == "longpoll" else "")
    r = raw_request(gw.port, path, headers, websocket_upgrade=transport == "ws")
    r.close()
    return r


def admitted(r: RawResponse, transport: str) -> bool:
    return r.status == (101 if transport == "ws" else 200)


def assert_limited(r: RawResponse, status: int) -> None:
    assert r.status == status, (r.status, r.headers, r.body[:300])
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("detail"), str) and body["detail"], body
    retry_after = r.headers.get("retry-after", "")
    assert retry_after.isdigit(), f"Retry-After must be a number of seconds, got {retry_after!r}"


def refused_soon(gw: Gateway, transport: str, channel: str, status: int, xff: str | None = None) -> RawResponse:
    """Try until refused (a held long poll is counted once the gateway has read it), at most ~5 s."""
    end = time.monotonic() + 5
    while True:
        r = attempt(gw, transport, channel, xff)
        if r.status == status or time.monotonic() > end:
            return r
        time.sleep(0.1)


def admitted_soon(gw: Gateway, transport: str, channel: str, xff: str | None = None, within_s: float = 10) -> bool:
    """A freed slot is reusable: true once a new connection is admitted (the gateway may need a
    moment to notice a client went away)."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if admitted(attempt(gw, transport, channel, xff), transport):
            return True
        time.sleep(0.1)
    return False


def ch() -> str:
    return f"lim.{uuid.uuid4().hex[:10]}"


@pytest.mark.parametrize("transport", STREAMS)
def test_per_client_limit_is_429_with_retry_after_and_a_freed_slot_is_reusable(start_gateway, held, transport):
    gw = start_gateway(limited(max_connections_per_client=2))
    channel = ch()
    held += [Held(gw, transport, channel), Held(gw, transport, channel)]
    assert_limited(refused_soon(gw, transport, channel, 429), 429)
    if transport == "longpoll":
        # A held long poll frees its slot when it is answered.
        assert [h.answer_status() for h in held] == [200, 200]
    else:
        held[0].close()
    assert admitted_soon(gw, transport, channel), "the freed slot was not reusable"
    assert gw.healthy()


@pytest.mark.parametrize("transport", STREAMS)
def test_streams_of_every_transport_count_together(start_gateway, held, transport):
    gw = start_gateway(limited(max_connections_per_client=2))
    channel = ch()
    others = [t for t in STREAMS if t != transport]
    held += [Held(gw, t, channel) for t in others]
    r = refused_soon(gw, transport, channel, 429)
    assert_limited(r, 429)


def test_a_stream_on_many_channels_is_one_connection(start_gateway, held):
    gw = start_gateway(limited(max_connections_per_client=2))
    tag = uuid.uuid4().hex[:8]
    held.append(Held(gw, "sse", f"a.{tag},b.{tag},c.{tag}"))
    held.append(Held(gw, "ws", f"d.{tag},e.{tag},f.{tag},g.{tag}"))
    assert_limited(refused_soon(gw, "sse", f"h.{tag}", 429), 429)


@pytest.mark.parametrize("transport", STREAMS)
def test_process_limit_is_503_with_retry_after_and_a_freed_slot_is_reusable(start_gateway, held, transport):
    gw = start_gateway(limited(max_connections=2))
    channel = ch()
    held += [Held(gw, "sse", channel), Held(gw, "ws", channel)]
    assert_limited(refused_soon(gw, transport, channel, 503), 503)
    held[1].close()
    assert admitted_soon(gw, transport, channel), "the freed slot was not reusable"


def test_websocket_refusal_is_the_handshakes_http_answer(start_gateway, held):
    gw = start_gateway(limited(max_connections_per_client=1))
    channel = ch()
    held.append(Held(gw, "ws", channel))
    r = raw_request(gw.port, f"/ws/{channel}", websocket_upgrade=True)
    try:
        assert r.status != 101
        assert_limited(r, 429)
        assert "upgrade" not in r.headers.get("connection", "").lower()
    finally:
        r.close()


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(start_gateway, held):
    gw = start_gateway(limited(max_connections_per_client=1))
    channel = ch()
    held.append(Held(gw, "sse", channel, xff="10.0.0.1"))
    for forged in ("10.0.0.2", "10.0.0.3, 10.0.0.4", "not-an-address"):
        assert_limited(refused_soon(gw, "sse", channel, 429, xff=forged), 429)
        assert_limited(refused_soon(gw, "ws", channel, 429, xff=forged), 429)


def test_x_forwarded_for_from_a_trusted_proxy_names_the_client(start_gateway, held):
    gw = start_gateway(limited(max_connections_per_client=1) | {"server": {"trusted_proxies": ["127.0.0.1"]}})
    channel = ch()
    held.append(Held(gw, "sse", channel, xff="10.0.0.1"))
    held.append(Held(gw, "ws", channel, xff="10.0.0.2"))
    held.append(Held(gw, "sse", channel, xff="10.9.9.9, 10.0.0.3"))  # the last address is the client
    held.append(Held(gw, "sse", channel))  # the proxy itself, with no header, is one more client
    for client in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "192.168.7.7, 10.0.0.1"):
        assert_limited(refused_soon(gw, "sse", channel, 429, xff=client), 429)
        assert_limited(refused_soon(gw, "ws", channel, 429, xff=client), 429)
    # Each client's slot is its own: freeing 10.0.0.1's lets 10.0.0.1 in again, nobody else.
    held[0].close()
    assert admitted_soon(gw, "sse", channel, xff="10.0.0.1")
    assert_limited(attempt(gw, "sse", channel, xff="10.0.0.2"), 429)


def test_both_limits_together_through_a_trusted_proxy(start_gateway, held):
    gw = start_gateway(
        limited(max_connections_per_client=2, max_connections=3) | {"server": {"trusted_proxies": ["127.0.0.1"]}}
    )
    channel = ch()
    held += [Held(gw, "sse", channel, xff="10.1.0.1"), Held(gw, "longpoll", channel, xff="10.1.0.1")]
    assert_limited(refused_soon(gw, "ws", channel, 429, xff="10.1.0.1"), 429)  # this client is full
    held.append(Held(gw, "ws", channel, xff="10.1.0.2"))
    for transport in STREAMS:  # now the process is full, for everyone
        assert_limited(refused_soon(gw, transport, channel, 503, xff="10.1.0.3"), 503)
    held[0].close()
    assert admitted_soon(gw, "sse", channel, xff="10.1.0.3")


SECRET = "limits-auth-secret-0123456789abcdef"


def _token(channel: str, exp_in: float = 600) -> str:
    return jwt.encode({"exp": int(time.time() + exp_in), "channels": [channel]}, SECRET, algorithm="HS256")


def test_refused_requests_take_no_slot(start_gateway, held):
    gw = start_gateway(limited(max_connections_per_client=1) | {"auth": {"secret": SECRET, "leeway_s": 0}})
    channel = ch()
    for transport in STREAMS:  # unauthorized, forbidden, invalid: none of them may keep a slot
        for path in (f"/{transport}/{channel}", f"/{transport}/{channel}?token={_token('other')}"):
            r = raw_request(gw.port, path, {"Accept": "text/event-stream"}, websocket_upgrade=transport == "ws")
            r.close()
            assert r.status in (401, 403), (path, r.status)
        r = raw_request(gw.port, f"/{transport}/bad!name", websocket_upgrade=transport == "ws")
        r.close()
        assert r.status == 400
    held.append(Held(gw, "sse", f"{channel}?token={_token(channel)}"))
    assert_limited(refused_soon(gw, "ws", f"{channel}?token={_token(channel)}", 429), 429)


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_a_stream_ended_by_its_token_expiring_frees_its_slot(start_gateway, held, transport):
    gw = start_gateway(limited(max_connections_per_client=1) | {"auth": {"secret": SECRET, "leeway_s": 0}})
    channel = ch()
    held.append(Held(gw, transport, f"{channel}?token={_token(channel, exp_in=4)}"))
    fresh = f"{channel}?token={_token(channel)}"
    assert_limited(attempt(gw, transport, fresh), 429)
    # The gateway ends the stream at expiry (SSE: the response ends; WebSocket: close 1008) and
    # must then count it as gone.
    assert admitted_soon(gw, transport, fresh, within_s=20), "the expired stream still holds its slot"


def test_a_long_poll_held_on_a_keep_alive_connection_counts_and_frees_its_slot(start_gateway):
    gw = start_gateway(limited(max_connections_per_client=1))
    channel = ch()
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=HOLD_S + 10)
    try:
        # Probes here are answered-at-once long polls: an SSE probe's slot lingers until the
        # gateway notices the probe went away (its next heartbeat).
        for _ in range(3):  # answered at once: they hold nothing afterwards
            conn.request("GET", f"/longpoll/{channel}?timeout=0")
            r = conn.getresponse()
            r.read()
            assert r.status == 200
        assert admitted_soon(gw, "longpoll", channel, within_s=5)
        conn.request("GET", f"/longpoll/{channel}?timeout={HOLD_S}")  # held on the same connection
        time.sleep(SETTLE_S)
        # Probe with answered-at-once long polls: one admitted before the held poll is read frees
        # its slot as it answers, so the held poll is not refused in its place.
        assert_limited(refused_soon(gw, "longpoll", channel, 429), 429)
        r = conn.getresponse()
        r.read()
        assert r.status == 200
        assert admitted_soon(gw, "longpoll", channel, within_s=5), "the answered long poll still holds its slot"
    finally:
        conn.close()
