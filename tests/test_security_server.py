"""Issue 12, Medium 7: a deadline for the whole request head (apart from the stall timeout) and
a cap on its total size (431 with the JSON error shape)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from gateway.config import ConfigError, from_mapping
from tests.helpers import ROOT, TOKEN, Gateway, free_port

HEAD_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway({"server": {"head_timeout_s": HEAD_TIMEOUT, "max_head_bytes": 16_384}}, tmp_path_factory.mktemp("gw"))
    yield g
    g.stop()


def _connect(gw: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=10)


def _read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, json.loads(body) if body.startswith(b"{") else {}


def test_a_head_trickled_byte_by_byte_is_cut_at_the_deadline(gw: Gateway) -> None:
    sock = _connect(gw)
    started = time.monotonic()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    answer = b""
    try:
        for _ in range(40):  # a header byte every 0.25 s: progress, so the stall timeout never fires
            sock.sendall(b"X")
            sock.settimeout(0.25)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            answer += chunk
            if not chunk or b"\r\n\r\n" in answer:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"error": "head_timeout"' in answer
    assert HEAD_TIMEOUT - 0.2 < elapsed < HEAD_TIMEOUT + 5


def test_a_connection_that_sends_nothing_is_closed_silently(gw: Gateway) -> None:
    sock = _connect(gw)
    started = time.monotonic()
    try:
        assert sock.recv(100) == b""
    finally:
        sock.close()
    assert time.monotonic() - started < HEAD_TIMEOUT + 5


def test_an_idle_keep_alive_connection_is_not_cut_by_the_head_deadline(gw: Gateway) -> None:
    sock = _connect(gw)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock)[0] == 200
        time.sleep(HEAD_TIMEOUT + 0.5)  # idle between requests: the stall timeout's business
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock)[0] == 200
    finally:
        sock.close()


def test_a_head_over_max_head_bytes_is_431(gw: Gateway) -> None:
    lines = "".join(f"X-Pad-{i}: {'v' * 990}\r\n" for i in range(20))  # ~20 KB, each line small
    sock = _connect(gw)
    try:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
        status, body = _read_response(sock)
        assert status == 431 and body["error"] == "head_too_large" and body["detail"]
        assert sock.recv(100) == b""  # and closed
    finally:
        sock.close()


@pytest.mark.parametrize("path", ["/longpoll/cap.small?timeout=0", "/publish/cap.small"])
def test_a_small_max_head_bytes_holds_on_the_lean_loop_too(start_gateway, path: str) -> None:
    # Long polls and keep-alive publishes are answered by the lean loop: its 8 KB cap must not
    # let through heads that server.max_head_bytes refuses.
    g = start_gateway({"server": {"max_head_bytes": 2048}})
    pad = "".join(f"X-Pad-{i}: {'v' * 290}\r\n" for i in range(10))  # ~3 KB: over 2 KB, under 8
    if path.startswith("/publish"):
        body = b"x"
        head = f"POST {path} HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n"
    else:
        body, head = b"", f"GET {path} HTTP/1.1\r\n"
    sock = _connect(g)
    try:
        sock.sendall(f"{head}Host: x\r\n{pad}\r\n".encode() + body)
        status, payload = _read_response(sock)
        assert status == 431 and payload["error"] == "head_too_large"
    finally:
        sock.close()


def test_a_head_under_the_cap_is_served(gw: Gateway) -> None:
    lines = "".join(f"X-Pad-{i}: {'v' * 990}\r\n" for i in range(12))  # ~12 KB
    sock = _connect(gw)
    try:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
        assert _read_response(sock)[0] == 200
    finally:
        sock.close()
    assert "Traceback" not in gw.log()


def test_an_absolute_form_target_names_its_path(gw: Gateway) -> None:
    # RFC 9112 section 3.2.2: a server must accept `GET http://host/path` (proxies send it).
    for target, status in (
        (f"http://127.0.0.1:{gw.port}/poll/abs?since=0-0", 200),
        (f"HTTP://127.0.0.1:{gw.port}/healthz", 200),
        (f"http://127.0.0.1:{gw.port}/poll/bad%20name", 400),
    ):
        sock = _connect(gw)
        try:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            got, body = _read_response(sock)
            assert got == status, (target, body)
        finally:
            sock.close()


def test_more_than_a_hundred_headers_is_a_clean_400(gw: Gateway) -> None:
    lines = "".join(f"X-H{i}: v\r\n" for i in range(120))
    sock = _connect(gw)
    try:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
        status, body = _read_response(sock)
        assert status in (400, 431) and body["error"], body
    finally:
        sock.close()
    time.sleep(0.2)
    assert "Traceback" not in gw.log()


def test_head_config_keys() -> None:
    server = from_mapping({}).server
    assert (server.head_timeout_s, server.max_head_bytes) == (10.0, 32_768)
    with pytest.raises(ConfigError, match="server.max_head_bytes"):
        from_mapping({"server": {"max_head_bytes": 10}})
    with pytest.raises(ConfigError, match="server.head_timeout_s"):
        from_mapping({"server": {"head_timeout_s": 0}})


def test_a_refusal_to_a_client_already_gone_logs_no_traceback(gw: Gateway) -> None:
    # The valid request is answered, then the garbage after it is refused, by which time the
    # client has reset the connection: the refusal's write fails, quietly.
    for _ in range(20):
        sock = _connect(gw)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n0\r\n\r\n")
        assert sock.recv(12).startswith(b"HTTP/1.1 200")
        sock.close()  # linger 0: an RST
    time.sleep(0.5)
    assert "Traceback" not in gw.log() and "BrokenPipe" not in gw.log()


def test_a_malformed_request_line_with_a_token_is_logged_redacted(gw: Gateway) -> None:
    sock = _connect(gw)
    try:
        sock.sendall(b"PUT /poll/x?token=t0ken-VALUE HTTP/9.9\r\nHost: x\r\n\r\n")
        assert _read_response(sock)[0] == 400
    finally:
        sock.close()
    time.sleep(0.3)
    log = gw.log()
    assert "token=***" in log and "t0ken-VALUE" not in log


def test_the_long_poll_keep_alive_loop_keeps_the_head_deadline(gw: Gateway) -> None:
    sock = _connect(gw)
    poll = b"GET /longpoll/hd.loop?since=0-0&timeout=0 HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        sock.sendall(poll)
        assert _read_response(sock)[0] == 200
        time.sleep(HEAD_TIMEOUT + 0.5)  # idle between requests is allowed
        sock.sendall(poll)
        assert _read_response(sock)[0] == 200
        started = time.monotonic()
        sock.sendall(b"GET /longpoll/hd.loop HTTP/1.1\r\n")
        answer = b""
        for _ in range(40):  # trickle, then the deadline answers
            try:
                sock.sendall(b"X")
            except OSError:
                break
            sock.settimeout(0.25)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            answer += chunk
            if not chunk or b"\r\n\r\n" in answer:
                break
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < HEAD_TIMEOUT + 5


_AUTH = f"Authorization: Bearer {TOKEN}\r\n"


@pytest.mark.parametrize(
    "answered, cut_short",
    [
        # a publish, then one whose body never comes whole
        (
            f"POST /publish/hd.pipe HTTP/1.1\r\nHost: x\r\n{_AUTH}Content-Length: 3\r\n\r\none",
            f"POST /publish/hd.pipe HTTP/1.1\r\nHost: x\r\n{_AUTH}Content-Length: 40\r\n\r\nab",
        ),
        # a long poll, then a head that never comes whole
        ("GET /longpoll/hd.pipe2?timeout=0 HTTP/1.1\r\nHost: x\r\n\r\n", "GET /longpoll/hd.pipe2 HTTP/1.1\r\nHo"),
    ],
    ids=["body", "head"],
)
def test_a_request_pipelined_behind_an_answer_is_held_to_the_head_deadline(
    gw: Gateway, answered: str, cut_short: str
) -> None:
    """A request whose first bytes came in the same read as the request before it still has to
    arrive whole within server.head_timeout_s (not the far longer stall timeout), even when no
    further byte ever comes."""
    sock = _connect(gw)
    try:
        sock.sendall((answered + cut_short).encode())
        assert _read_response(sock)[0] in (200, 202)
        started = time.monotonic()
        sock.settimeout(HEAD_TIMEOUT + 4)
        answer = sock.recv(65536)  # then silence: only the deadline can answer
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < HEAD_TIMEOUT + 2


# Runs inside a real gateway process (app.py's own serve(), in a greenlet beside this probe):
# opens SSE streams with large heads, then asks the collector which objects still hold them.
_HEAD_PROBE = """
from gevent import monkey
monkey.patch_all()
import gc, json, os, socket, sys
import gevent
from gateway.app import create_app
from gateway.config import load
from gateway.server import serve

gevent.spawn(serve, create_app(config=load()))
port, n, big, request = int(os.environ["PORT"]), int(sys.argv[1]), sys.argv[2], sys.argv[3]
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
    except OSError:
        gevent.sleep(0.1)
socks, opened = [], 0
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall((request % i + big + "\\r\\n").encode())
    opened += s.recv(4096)[9:12] in (b"200", b"101")
    socks.append(s)
gevent.sleep(0.5)
gc.collect()
marker = "X-Pad-value-"
def holds(o):
    values = o.values() if isinstance(o, dict) else o
    return any(isinstance(v, str) and marker in v for v in values)
holders = [type(o).__name__ for o in gc.get_objects() if isinstance(o, (dict, list, tuple)) and holds(o)]
print(json.dumps({"opened": opened, "holders": holders}))
sys.stdout.flush()
os._exit(0)
"""


STREAM_REQUESTS = {
    "sse": "GET /sse/heads%d HTTP/1.1\r\nHost: x\r\n",
    "ws": "GET /ws/heads%d HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
}


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_a_large_request_head_is_not_kept_for_the_stream_s_life(tmp_path, transport: str) -> None:
    """Hole 7, the second half: 90 header lines (~30 KB, under the default 32 KB cap) were kept
    as long as the SSE or WebSocket stream they opened (in its WSGI environ: 30 such streams, +295 MB with
    the old 8 KB lines). Once a stream has begun, nothing in the gateway may still hold the
    values of headers it never reads."""
    big = "".join(f"X-Pad-{i:02}: X-Pad-value-{'v' * 308}\r\n" for i in range(90))
    assert 29_000 < len(big) < 32_000
    config = tmp_path / "gateway.toml"
    config.write_text("[sse]\nheartbeat_s = 600\n[websocket]\nping_s = 600\n")
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "WEB_CONCURRENCY")}
    env.update({"PORT": str(free_port()), "GATEWAY_CONFIG": str(config), "PYTHONPATH": str(ROOT)})
    out = subprocess.run(
        [sys.executable, "-c", _HEAD_PROBE, "5", big, STREAM_REQUESTS[transport]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["opened"] == 5, out.stderr[-2000:]
    assert report["holders"] == [], f"the heads of open streams are still held by {report['holders']}"
