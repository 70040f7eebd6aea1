"""Keep-alive long polls answered by the lean loop (gateway/transports/pollloop.py), and the
hand-over of a connection to the general server at the first request that is anything else."""

from __future__ import annotations

import json
import select
import socket
import struct
import time

import jwt
import requests
from prometheus_client.parser import text_string_to_metric_families

from gateway.transports import pollloop
from gateway.transports.pollloop import _HeadMemo
from tests.helpers import TOKEN

PEER = ("127.0.0.1", 5555)
_MEMO = _HeadMemo()


def parse_head(head: bytes, peer: tuple[str, int]):  # noqa: ANN201
    """pollloop.parse_head, checked against the loop's memo of parsed heads, asked twice (once
    parsing, once remembered): all three must agree."""
    parsed = pollloop.parse_head(head, peer)
    assert _MEMO.parse(head, peer) == parsed
    assert _MEMO.parse(head, peer) == parsed
    return parsed


def test_remembered_heads_are_each_callers_own_and_bounded() -> None:
    memo = _HeadMemo()
    head = b"GET /longpoll/a?since=1-0 HTTP/1.1\r\nHost: x"
    first, _, _ = memo.parse(head, ("10.0.0.1", 1))
    first["HTTP_HOST"] = "changed by its caller"
    second, _, _ = memo.parse(head, ("10.0.0.2", 2))
    assert second["HTTP_HOST"] == "x" and (second["REMOTE_ADDR"], second["REMOTE_PORT"]) == ("10.0.0.2", "2")
    assert first["REMOTE_ADDR"] == "10.0.0.1"
    memo._known.entries = 3
    for i in range(10):
        memo.parse(b"GET /longpoll/a?since=%d-0 HTTP/1.1\r\nHost: x" % i, PEER)
        assert len(memo._known) <= 3
    memo.parse(b"GET /longpoll/a?x=" + b"y" * pollloop.MEMO_HEAD_BYTES + b" HTTP/1.1", PEER)
    assert all(len(h) <= pollloop.MEMO_HEAD_BYTES for h in memo._known)  # long heads are not kept


def test_remembered_header_blocks_serve_other_request_lines_alike() -> None:
    """Heads that differ only in their request line (a publisher's channels, pollers' cursors)
    share one parse of their header lines, and each still parses as it would alone; a publish
    and a poll with the same header lines do not share it (Content-Length means two things)."""
    memo = _HeadMemo()
    block = b"\r\nHost: x\r\nContent-Length: 5\r\nAuthorization: Bearer t"
    heads = [b"POST /publish/c%d HTTP/1.1" % i + block for i in range(5)]
    heads += [b"GET /longpoll/c%d?since=%d-0 HTTP/1.1" % (i, i) + block for i in range(3)]
    heads += [b"GET /longpoll/c HTTP/1.1\r\nHost: y", b"POST /publish/c HTTP/1.1\r\nHost: y"]
    for head in heads:
        assert memo.parse(head, PEER) == pollloop.parse_head(head, PEER)
    assert len(memo._fields) == 4  # the block for publishes, for polls, and Host: y for each
    environ, _, line = memo.parse(heads[3], PEER)
    assert environ["PATH_INFO"] == "/publish/c3" and environ["CONTENT_LENGTH"] == 5 and line.endswith("c3 HTTP/1.1")
    assert memo.parse(heads[6], PEER) is None  # a GET with a Content-Length goes to the general server


def test_only_plain_keep_alive_long_poll_heads_are_taken():
    environ, keep_alive, line = parse_head(b"GET /longpoll/a,b?since=1-0&timeout=5 HTTP/1.1\r\nHost: x\r\nX-A: 1", PEER)
    assert environ["PATH_INFO"] == "/longpoll/a,b" and environ["QUERY_STRING"] == "since=1-0&timeout=5"
    assert environ["HTTP_X_A"] == "1" and environ["REMOTE_ADDR"] == "127.0.0.1" and keep_alive
    assert line.startswith("GET /longpoll/")
    assert parse_head(b"GET /longpoll/a HTTP/1.1\r\nHost: x\r\nConnection: close", PEER)[1] is False
    assert parse_head(b"GET /longpoll/a HTTP/1.1\r\nHost: x\r\nX-Tab: a\tb\xe9", PEER)[0]["HTTP_X_TAB"] == "a\tb\xe9"
    # No Host, or two: the general server's 400 (RFC 9112 section 3.2).
    assert parse_head(b"GET /longpoll/a HTTP/1.1", PEER) is None
    assert parse_head(b"GET /longpoll/a HTTP/1.1\r\nHost: x\r\nHost: y", PEER) is None
    for head in (
        b"GET /sse/a HTTP/1.1",
        b"POST /longpoll/a HTTP/1.1",
        b"GET /longpoll/a HTTP/1.0",
        b"GET /longpoll/%61 HTTP/1.1",
        b"GET /longpoll/a HTTP/1.1\r\nOrigin: http://x",
        b"GET /longpoll/a HTTP/1.1\r\nContent-Length: 3",
        b"GET /longpoll/a HTTP/1.1\r\nTransfer-Encoding: chunked",
        b"GET /longpoll/a HTTP/1.1\r\nUpgrade: websocket",
        b"GET /longpoll/a HTTP/1.1\r\n folded: line",
        b"GET /longpoll/a HTTP/1.1\r\nBad Name: x",
        b"GET /longpoll/a HTTP/1.1\r\nX: a\x00b",
        b"GET /longpoll/a HTTP/1.1\r\nX: a\rb",
        b"GET /longpoll/a HTTP/1.1\r\nX: a\x7fb",
        b"GET /longpoll/a#f HTTP/1.1",
        b"GET /longpoll/\xc3\xa9 HTTP/1.1",
        b"GET /longpoll/a HTTP/1.1\r\nX\xc3: 1",
        b"GET /longpoll/a HTTP/1.1\r\nX_Forwarded_For: 6.6.6.6",  # the general server drops such names
        b"GET  /longpoll/a HTTP/1.1",
        b"POST /publish/a HTTP/1.1",  # no declared length: chunked or none, the general server's
        b"POST /publish/a HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3",
        b"POST /publish/a HTTP/1.1\r\nContent-Length: -3",
        b"POST /publish/a HTTP/1.1\r\nContent-Length: 99999999",
        b"POST /publish/a HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue",
        b"POST /publish/a HTTP/1.1\r\nContent-Length: 3\r\nOrigin: http://x",
        b"POST /publish/a HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked",
        b"POST /sse/a HTTP/1.1\r\nContent-Length: 3",
    ):
        assert parse_head(head + b"\r\nHost: x", PEER) is None, head  # each refused for its own reason


def test_a_publish_head_with_a_declared_length_is_taken():
    head = b"POST /publish/a HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n"
    head += b"Content-Type: application/json\r\nIdempotency-Key: k"
    environ, keep_alive, _ = parse_head(head, PEER)
    assert environ["REQUEST_METHOD"] == "POST" and environ["PATH_INFO"] == "/publish/a" and keep_alive
    assert environ["CONTENT_LENGTH"] == 12 and environ["CONTENT_TYPE"] == "application/json"
    assert environ["HTTP_IDEMPOTENCY_KEY"] == "k" and "HTTP_CONTENT_TYPE" not in environ


def test_repeated_headers_are_joined_as_the_general_server_joins_them():
    head = b"GET /poll/a HTTP/1.1\r\nHost: x\r\nCookie: sid=good\r\nX-A: 1\r\nCookie: theme=dark\r\nX-A: 2"
    environ, _, _ = parse_head(head, PEER)
    assert environ["HTTP_COOKIE"] == "sid=good; theme=dark"  # as pywsgi: what auth.upstream_url is sent
    assert environ["HTTP_X_A"] == "1,2"


def test_more_header_lines_than_the_general_server_reads_are_handed_to_it():
    # Python's parser (under pywsgi) counts the blank line that ends the head: 99 lines at most.
    lines = b"\r\nHost: x" + b"".join(b"\r\nX-H%d: v" % i for i in range(pollloop.MAX_HEADER_LINES - 2))
    assert parse_head(b"GET /poll/a HTTP/1.1" + lines, PEER) is not None
    assert parse_head(b"GET /poll/a HTTP/1.1" + lines + b"\r\nX-One-More: v", PEER) is None


def test_connection_close_listed_among_other_options_is_honoured():
    for value in (b"keep-alive, close", b"Keep-Alive,Close", b"close"):
        assert parse_head(b"GET /poll/a HTTP/1.1\r\nHost: x\r\nConnection: " + value, PEER)[1] is False
    assert parse_head(b"GET /poll/a HTTP/1.1\r\nHost: x\r\nConnection: closed-captions", PEER)[1] is True


class _Conn:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        status = int(self.file.readline().split()[1])
        headers = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        return status, headers, self.file.read(int(headers.get("content-length", 0)))

    def close(self) -> None:
        self.file.close()  # the socket closes (FIN, or RST with SO_LINGER 0) once its file has too
        self.sock.close()


def _get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


def test_a_keep_alive_connection_answers_polls_then_hands_over(start_gateway, channel):
    gw = start_gateway({"server": {"access_log": True}})
    conn = _Conn(gw.port)
    try:
        conn.send(_get(f"/longpoll/{channel}?timeout=0"))
        status, headers, body = conn.answer()
        assert status == 200 and headers["cache-control"] == "no-store" and "date" in headers
        cursor = json.loads(body)["cursor"]
        event_id = gw.publish(channel, "hello")
        # Two requests pipelined in one write: both answered in order.
        conn.send(_get(f"/longpoll/{channel}?since={cursor}&timeout=5") + _get("/longpoll/bad!name?timeout=0"))
        status, _, body = conn.answer()
        assert status == 200 and json.loads(body)["events"][0]["id"] == event_id
        status, _, body = conn.answer()
        assert status == 400 and json.loads(body)["error"] == "invalid_channel"
        # Anything else goes to the general server on the same connection, which keeps it.
        conn.send(_get("/healthz"))
        status, _, body = conn.answer()
        assert status == 200 and json.loads(body)["status"] == "ok"
        conn.send(_get(f"/longpoll/{channel}?since={event_id}&timeout=0", "Origin: http://elsewhere.example\r\n"))
        status, _, body = conn.answer()
        assert status == 403 and json.loads(body)["error"] == "origin_not_allowed"
        conn.send(_get(f"/longpoll/{channel}?since={event_id}&timeout=0"))
        assert conn.answer()[0] == 200
    finally:
        conn.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "bad!name" not in gw.log():
        time.sleep(0.05)
    assert f'"GET /longpoll/{channel}?timeout=0 HTTP/1.1" 200' in gw.log()  # the access log still sees them


def test_connection_close_is_honoured_and_a_refused_long_poll_keeps_its_headers(start_gateway, channel):
    gw = start_gateway({"auth": {"secret": "s" * 32}})
    conn = _Conn(gw.port)
    try:
        conn.send(_get(f"/longpoll/{channel}?timeout=0", "Connection: close\r\n"))
        status, headers, body = conn.answer()
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert json.loads(body)["error"] == "unauthorized"
        assert headers.get("connection") == "close"
        assert conn.file.read() == b""  # the gateway closed the connection
    finally:
        conn.close()


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def test_a_refused_publish_with_connection_close_is_closed_at_once(start_gateway, channel):
    # Not left to the garbage collector: a client flooding refused publishes would hold
    # descriptors (CLOSE-WAIT) until it ran.
    gw = start_gateway({})
    for auth in ("", f"Authorization: Bearer {TOKEN}\r\n"):
        conn = _Conn(gw.port)
        try:
            conn.send(_post(f"/publish/{channel}", b"x", "Connection: close\r\n" + auth))
            status, headers, _ = conn.answer()
            assert status == (202 if auth else 401) and headers.get("connection") == "close"
            assert conn.file.read() == b""  # closed by the gateway, within the socket's timeout
        finally:
            conn.close()


def test_pipelined_keep_alive_publishes_are_answered_in_order_with_the_contract_errors(start_gateway, channel):
    gw = start_gateway({})
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    as_json = auth + "Content-Type: application/json\r\n"
    conn = _Conn(gw.port)
    try:
        cursor = json.loads(requests.get(f"{gw.url}/poll/{channel}", timeout=5).content)["cursor"]
        conn.send(
            _post(f"/publish/{channel}", b"one", auth)
            + _post(f"/publish/{channel}", b'{"data": {"n": 2}, "event": "e"}', as_json)
            + _post(f"/publish/{channel}", b"{not json", as_json)
            + _post(f"/publish/{channel}", b"x")  # no token
            + _post("/publish/bad!name", b"x", auth)
            + _post(f"/publish/{channel}", b"k1", auth + "Idempotency-Key: same\r\n")
            + _post(f"/publish/{channel}", b"k2", auth + "Idempotency-Key: same\r\n")
            + _post(f"/publish/{channel}", b"x", auth + "Idempotency-Key: \x01\r\n")
        )
        answers = [conn.answer() for _ in range(8)]
        assert [a[0] for a in answers] == [202, 202, 400, 401, 400, 202, 202, 400]
        assert all(a[1]["content-type"] == "application/json" and "date" in a[1] for a in answers)
        assert [json.loads(a[2]).get("error") for a in answers[2:5]] == [
            "invalid_json",
            "unauthorized",
            "invalid_channel",
        ]
        assert answers[3][1]["www-authenticate"].startswith("Bearer")
        assert json.loads(answers[5][2])["id"] == json.loads(answers[6][2])["id"]  # the repeat stores nothing
        # The general server still answers on the same connection, and the loop takes it back.
        conn.send(_get("/healthz") + _post(f"/publish/{channel}", b"last", auth))
        assert conn.answer()[0] == 200 and conn.answer()[0] == 202
        events = json.loads(requests.get(f"{gw.url}/poll/{channel}?since={cursor}", timeout=5).content)["events"]
        assert [(e["event"], e["data"]) for e in events] == [
            ("message", "one"),
            ("e", '{"n": 2}'),
            ("message", "k1"),
            ("message", "last"),
        ]
    finally:
        conn.close()
    metrics = requests.get(f"{gw.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).text
    refused = {
        (sample.labels["status"], sample.labels["reason"]): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "gateway_publish_refusals_total"
    }
    assert refused[("400", "invalid_json")] == 1 and refused[("401", "unauthorized")] == 1
    assert refused[("400", "invalid_channel")] == 1 and refused[("400", "invalid_idempotency_key")] == 1


def test_an_idle_keep_alive_poller_is_closed_at_the_stall_timeout(start_gateway, channel):
    """Between requests the loop waits for the next one up to server.stall_timeout_s (kept by one
    timer for all connections, not one per wait); a poller that keeps asking is never cut."""
    gw = start_gateway({"server": {"stall_timeout_s": 1.0}})
    busy, idle = _Conn(gw.port), _Conn(gw.port)
    try:
        idle.send(_get(f"/longpoll/{channel}?timeout=0"))
        assert idle.answer()[0] == 200
        started = time.monotonic()
        for _ in range(6):  # 3 s of polls every 0.5 s: well past the stall timeout
            busy.send(_get(f"/longpoll/{channel}?timeout=0"))
            assert busy.answer()[0] == 200
            time.sleep(0.5)
        assert idle.file.read() == b""  # closed by the gateway, about 1-2 s after its answer
        assert time.monotonic() - started < 6
    finally:
        busy.close()
        idle.close()


def test_the_stall_timeout_runs_from_a_pushed_answer(start_gateway, channel):
    """A poller answered by a publish that then asks nothing more is closed a stall timeout
    after that answer, not after the rest of its poll's timeout as well."""
    gw = start_gateway({"server": {"stall_timeout_s": 1.0}})
    conn = _Conn(gw.port)
    try:
        conn.send(_get(f"/longpoll/{channel}?timeout=20"))
        _until_held(gw, 1, 5)
        gw.publish(channel, "one")
        assert conn.answer()[0] == 200
        answered = time.monotonic()
        assert conn.file.read() == b""  # closed by the gateway
        assert time.monotonic() - answered < 4  # about 1-3 s: never the poll's 20
    finally:
        conn.close()


def test_a_later_idle_wait_is_not_shortened_by_an_earlier_pushed_answer(start_gateway, channel):
    """The stall timeout runs from a pushed answer for the idle wait right after it only: once
    the next request came (at once, here) and was answered, idle time counts from then."""
    gw = start_gateway({"server": {"stall_timeout_s": 2.0}})
    conn = _Conn(gw.port)
    try:
        conn.send(_get(f"/longpoll/{channel}?timeout=8"))
        _until_held(gw, 1, 5)
        gw.publish(channel, "one")
        status, _, body = conn.answer()
        cursor = json.loads(body)["cursor"]
        conn.send(_get(f"/longpoll/{channel}?since={cursor}&timeout=3"))  # at once, then held 3 s
        status, _, body = conn.answer()
        assert status == 200 and json.loads(body)["events"] == []
        time.sleep(1.0)  # half the stall timeout since that answer: still open
        conn.send(_get(f"/longpoll/{channel}?since={cursor}&timeout=0"))
        assert conn.answer()[0] == 200
    finally:
        conn.close()


def test_one_long_poll_timing_out_leaves_the_others_held(start_gateway, channel):
    """A long poll's timeout wakes that poll only (up to 0.1 s late); the others on its channel
    stay held until an event comes."""
    gw = start_gateway()
    short, long = _Conn(gw.port), _Conn(gw.port)
    try:
        long.send(_get(f"/longpoll/{channel}?timeout=20"))
        short.send(_get(f"/longpoll/{channel}?timeout=1"))
        started = time.monotonic()
        status, _, body = short.answer()
        assert status == 200 and json.loads(body)["events"] == []
        assert 0.98 < time.monotonic() - started < 2.0  # never early: woken at its slot, it waits out the rest
        assert select.select([long.sock], [], [], 0.8)[0] == []  # still held
        event_id = gw.publish(channel, "now")
        status, _, body = long.answer()
        assert status == 200 and [e["id"] for e in json.loads(body)["events"]] == [event_id]
    finally:
        short.close()
        long.close()


def _until_held(gw, n: int, within_s: float) -> None:  # noqa: ANN001
    """Wait until exactly n long polls are held (the gauge), failing after within_s."""
    deadline = time.monotonic() + within_s
    while _held_longpolls(gw) != n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _held_longpolls(gw) == n


def _held_longpolls(gw) -> float:  # noqa: ANN001
    metrics = requests.get(f"{gw.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).text
    return next(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "gateway_longpolls_held"
    )


def test_a_held_long_poll_ends_when_its_client_hangs_up(start_gateway, channel):
    """A long-poll client sends nothing while it waits: its socket turning readable with no
    bytes means it left, and the poll stops being held at once, not at its timeout."""
    gw = start_gateway({"server": {"access_log": True}})
    conns = [_Conn(gw.port) for _ in range(4)]
    try:
        for conn in conns:
            conn.send(_get(f"/longpoll/{channel}?timeout=20"))
        _until_held(gw, 4, 5)
        conns[0].close()  # a clean close (FIN)
        conns[1].sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conns[1].close()  # a reset (RST)
        conns[3].sock.shutdown(socket.SHUT_WR)  # a half-close counts as gone, as for SSE (and nginx)
        _until_held(gw, 1, 3)  # well before the 20 s timeout
        assert f'"GET /longpoll/{channel}?timeout=20 HTTP/1.1" 499' in gw.log()  # as nginx logs it
        # The one still there is still held, and answered by the next event.
        event_id = gw.publish(channel, "still here")
        status, _, body = conns[2].answer()
        assert status == 200 and [e["id"] for e in json.loads(body)["events"]] == [event_id]
    finally:
        for conn in conns:
            conn.close()


def test_a_hang_up_after_bytes_pipelined_behind_a_held_poll_frees_it_at_once(start_gateway, channel):
    """The pipelined bytes are read and kept while the poll is held, and the watch goes on: a
    client that resets then is gone at once, not at its poll's timeout (its slot free again);
    so is one that closes after half a head, which could never be answered."""
    gw = start_gateway({"server": {"access_log": True}, "limits": {"max_connections_per_client": 1}})
    cases = [(b"G", True), (_get(f"/poll/{channel}"), True), (b"GET /poll/", False)]
    for pipelined, reset in cases:
        conn = _Conn(gw.port)
        try:
            conn.send(_get(f"/longpoll/{channel}?timeout=20"))
            _until_held(gw, 1, 5)
            conn.send(pipelined)
            time.sleep(0.2)
            if reset:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            conn.close()  # a reset (RST), or a plain close (FIN)
        _until_held(gw, 0, 3)  # well before the 20 s timeout
    assert gw.log().count(f'"GET /longpoll/{channel}?timeout=20 HTTP/1.1" 499') == len(cases)


def test_a_request_pipelined_behind_a_held_poll_is_not_a_hang_up(start_gateway, channel):
    gw = start_gateway()
    conn = _Conn(gw.port)
    try:
        conn.send(_get(f"/longpoll/{channel}?timeout=20"))
        _until_held(gw, 1, 5)
        conn.send(_get(f"/longpoll/{channel}?timeout=0"))  # pipelined while the first is held
        time.sleep(0.5)
        assert _held_longpolls(gw) == 1
        event_id = gw.publish(channel, "one")
        status, _, body = conn.answer()
        assert status == 200 and [e["id"] for e in json.loads(body)["events"]] == [event_id]
        status, _, body = conn.answer()
        assert status == 200 and json.loads(body)["events"] == []  # the pipelined one, from now
    finally:
        conn.close()


def _metric(gw, name: str, **labels: str) -> float:  # noqa: ANN001
    metrics = requests.get(f"{gw.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def test_held_long_polls_are_answered_by_the_publish_counted_once_and_kept_alive(start_gateway, channel):
    """Keep-alive long polls held on a channel are answered by the publish itself (one body for
    all, timed as a fast-path flush); each is counted once and its ticket closed at once, before
    its client asks again; the connection then goes on to its next poll."""
    gw = start_gateway({"server": {"access_log": True}})
    conns = [_Conn(gw.port) for _ in range(3)]
    path = f"/longpoll/{channel}?timeout=20"
    try:
        for conn in conns:
            conn.send(_get(path))
        _until_held(gw, 3, 5)
        delivered = _metric(gw, "gateway_events_delivered_total", transport="longpoll")
        timed = _metric(gw, "gateway_delivery_latency_seconds_count")
        first = gw.publish(channel, "one")
        answers = [conn.answer() for conn in conns]
        assert len({body for _, _, body in answers}) == 1  # one body, encoded once
        assert all(status == 200 for status, _, _ in answers)
        assert json.loads(answers[0][2]) == {
            "events": [{"id": first, "event": "message", "data": "one"}],
            "cursor": first,
            "gap": False,
            "more": False,
        }
        # Closed by the publish's side, not at the client's next request (none was sent yet).
        _until_held(gw, 0, 3)
        assert _metric(gw, "gateway_events_delivered_total", transport="longpoll") == delivered + 3
        assert _metric(gw, "gateway_delivery_latency_seconds_count") > timed  # a pushed flush, timed
        assert gw.log().count(f'"GET {path} HTTP/1.1" 200') == 3
        # The same connections poll on from the pushed answer's cursor.
        for conn in conns:
            conn.send(_get(f"/longpoll/{channel}?since={first}&timeout=20"))
        _until_held(gw, 3, 5)
        second = gw.publish(channel, "two")
        for conn in conns:
            status, _, body = conn.answer()
            assert status == 200 and [e["id"] for e in json.loads(body)["events"]] == [second]
        assert _metric(gw, "gateway_events_delivered_total", transport="longpoll") == delivered + 6
    finally:
        for conn in conns:
            conn.close()


def test_a_big_pushed_answer_to_a_slow_reader_arrives_whole(start_gateway, channel):
    """A held poll's big answer, pushed to a client that reads slowly, arrives whole, and the
    connection polls on (a socket that takes only part of it: tests/test_heldpoll_unit.py)."""
    gw = start_gateway()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    sock.settimeout(10)
    sock.connect(("127.0.0.1", gw.port))
    conn = _Conn.__new__(_Conn)
    conn.sock, conn.file = sock, sock.makefile("rb")
    try:
        conn.send(_get(f"/longpoll/{channel}?timeout=20"))
        _until_held(gw, 1, 5)
        data = "x" * 900_000
        first = gw.publish(channel, data)
        time.sleep(0.3)  # the client reads nothing for a while: the rest waits on the gateway's side
        status, _, body = conn.answer()
        assert status == 200 and json.loads(body)["events"] == [{"id": first, "event": "message", "data": data}]
        conn.send(_get(f"/longpoll/{channel}?since={first}&timeout=20"))
        _until_held(gw, 1, 5)
        second = gw.publish(channel, "small")
        status, _, body = conn.answer()
        assert status == 200 and [e["id"] for e in json.loads(body)["events"]] == [second]
    finally:
        conn.close()


def test_a_response_is_reused_only_for_the_same_answer() -> None:
    loop = pollloop.LongPollLoop.__new__(pollloop.LongPollLoop)
    loop._date, loop._last = ("", 0), (None,) * 6
    body = b'{"events":[]}'
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    first = loop._response(200, list(headers), body, True)
    assert loop._response(200, list(headers), body, True) is first  # the shared batch's body
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"\r\n\r\n" + body)
    assert b"Connection: close\r\n" in loop._response(200, list(headers), body, False)
    assert loop._response(503, list(headers), body, True).startswith(b"HTTP/1.1 503 ")
    other = loop._response(200, [*headers, ("Retry-After", "5")], body, True)
    assert b"Retry-After: 5\r\n" in other
    assert b"Retry-After" not in loop._response(200, list(headers), bytes(body), True)  # an equal, other body


def test_the_requests_after_a_pushed_answer_keep_every_contract_rule(start_gateway, channel):
    """After a pushed answer the connection's next requests are read and answered by the held
    polls' Runner (inline: the in-process store, no app asked): the same admission as anywhere,
    so a bad token is a 401, a bad channel a 400, the per-client limit a 429 with Retry-After, a
    short poll is answered, and what the lean loop does not take (an Origin header, several
    channels) is answered by the general server on the same connection."""
    secret = "inline-secret-0123456789abcdef012345"
    gw = start_gateway(
        {"auth": {"secret": secret}, "limits": {"max_connections_per_client": 1}, "server": {"access_log": True}}
    )
    token = jwt.encode({"channels": [f"{channel}*"], "exp": int(time.time()) + 600}, secret, algorithm="HS256")
    bearer = f"Authorization: Bearer {token}\r\n"
    conn, other = _Conn(gw.port), _Conn(gw.port)
    try:
        conn.send(_get(f"/longpoll/{channel}?timeout=20", bearer))
        _until_held(gw, 1, 5)
        first = gw.publish(channel, "one")
        status, _, body = conn.answer()
        assert status == 200 and json.loads(body)["cursor"] == first  # pushed
        conn.send(_get(f"/longpoll/{channel}?since={first}&timeout=0", "Authorization: Bearer nope\r\n"))
        status, headers, body = conn.answer()
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert json.loads(body)["error"] == "unauthorized"
        conn.send(_get("/longpoll/bad!name?timeout=0", bearer))
        status, _, body = conn.answer()
        assert status == 400 and json.loads(body)["error"] == "invalid_channel"
        conn.send(_get(f"/poll/{channel}", bearer))
        status, _, body = conn.answer()
        assert status == 200 and json.loads(body)["cursor"] == first  # from now: the channel's last id
        other.send(_get(f"/longpoll/{channel}?since={first}&timeout=20", bearer))
        _until_held(gw, 1, 5)
        conn.send(_get(f"/longpoll/{channel}?since={first}&timeout=20", bearer))
        status, headers, body = conn.answer()
        assert status == 429 and headers["retry-after"].isdigit()
        assert json.loads(body)["error"] == "too_many_connections_from_client"
        second = gw.publish(channel, "two")  # answers `other`, freeing the client's slot
        assert json.loads(other.answer()[2])["cursor"] == second
        conn.send(_get(f"/longpoll/{channel}?since={first}&timeout=20", bearer))
        status, _, body = conn.answer()
        assert status == 200 and [e["id"] for e in json.loads(body)["events"]] == [second]
        conn.send(_get(f"/longpoll/{channel},{channel}.b?timeout=0", bearer))
        status, _, body = conn.answer()
        assert status == 200 and json.loads(body)["events"] == []  # from now, on both channels
        conn.send(
            _get(f"/longpoll/{channel}?since={second}&timeout=0", bearer + "Origin: http://elsewhere.example\r\n")
        )
        status, _, body = conn.answer()
        assert status == 403 and json.loads(body)["error"] == "origin_not_allowed"
    finally:
        conn.close()
        other.close()
    assert f'"GET /longpoll/{channel}?since={first}&timeout=0 HTTP/1.1" 401' in gw.log()


def test_heads_the_lean_loop_does_not_take_are_answered_by_the_general_server(start_gateway, channel):
    """A head ended by bare LFs (RFC 9112 lets a server accept them, and pywsgi does), more
    header lines than the general server reads, and "Connection: keep-alive, close": each gets
    the general server's answer at once, on a fresh connection and after a lean answer alike."""
    gw = start_gateway({"server": {"head_timeout_s": 5}})
    many = "".join(f"X-H{i}: v\r\n" for i in range(99))  # with Host: 100, one too many
    for lean_first in (False, True):
        conn = _Conn(gw.port)
        conn.sock.settimeout(3)  # well inside the head timeout: a wait for more bytes fails here
        try:
            if lean_first:
                conn.send(_get(f"/poll/{channel}"))
                assert conn.answer()[0] == 200
            conn.send(b"GET /healthz HTTP/1.1\nHost: 127.0.0.1\n\n")
            status, _, body = conn.answer()
            assert status == 200 and json.loads(body)["status"] == "ok"
            conn.send(f"GET /poll/{channel} HTTP/1.1\r\nHost: 127.0.0.1\n\n".encode())
            assert conn.answer()[0] == 200
            conn.send(f"GET /poll/{channel} HTTP/1.1\r\nHost: 127.0.0.1\n\r\n".encode())  # LF, then CRLF
            assert conn.answer()[0] == 200
            conn.send(_get(f"/poll/{channel}", many.split("\r\n", 1)[1]))  # 99 lines: read, and answered
            assert conn.answer()[0] == 200
            conn.send(_get(f"/poll/{channel}", many))
            status, _, body = conn.answer()
            assert status == 431 and json.loads(body)["error"] == "too_many_headers"
        finally:
            conn.close()
    for path in ("/healthz", f"/poll/{channel}"):  # the general server's, and the lean loop's
        conn = _Conn(gw.port)
        conn.sock.settimeout(3)
        try:
            conn.send(_get(path, "Connection: keep-alive, close\r\n"))
            assert conn.answer()[0] == 200
            assert conn.file.read(1) == b"", path  # closed after the answer
        finally:
            conn.close()
