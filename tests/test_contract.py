"""Black-box conformance to /work/shared/contract.md, run the way an outside suite runs us:
the Procfile's command (`python app.py`) with the shipped config.toml, PORT and
GATEWAY_PUBLISH_TOKEN in the environment, once without and once with REDIS_URL.

Both gateways start once for the module; a long poll with no `timeout` and an idle SSE stream
are opened at once, so the default hold and the heartbeat are measured while the rest runs."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket

from tests.clients import SSEClient, WSClient
from tests.helpers import ROOT, free_port, stop_process, wait_until
from tests.redis_server import RedisServer

TOKEN = "contract-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ALLOWED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"
BACKENDS = ["memory", "redis"]


def procfile_command() -> list[str]:
    line = next(x for x in (ROOT / "Procfile").read_text().splitlines() if x.startswith("web:"))
    return shlex.split(line.partition(":")[2])


class Shipped:
    """The Procfile's web command with the shipped config; env as Heroku would set it."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        base = {
            k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "GATEWAY_PUBLISH_TOKEN", "GATEWAY_CONFIG")
        }
        base |= {"PORT": str(self.port), "PYTHONUNBUFFERED": "1"} | env
        command = procfile_command()
        command[0] = sys.executable if command[0] in ("python", "python3") else command[0]
        self.log_path = tmp / f"shipped-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(command, cwd=ROOT, env=base, stdout=self._log, stderr=subprocess.STDOUT)
        ready = lambda: requests.get(self.url + "/healthz", timeout=1).status_code == 200  # noqa: E731
        wait_until(self.proc, ready, "the gateway", lambda: self.log_path.read_text(errors="replace"))

    def publish(self, channel: str, data: str, event: str | None = None) -> str:
        body: dict[str, Any] = {"json": {"data": data, "event": event}} if event else {"data": data.encode()}
        r = requests.post(f"{self.url}/publish/{channel}", headers=AUTH, timeout=5, **body)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def poll(self, channel: str, since: str | None = None) -> dict[str, Any]:
        r = requests.get(f"{self.url}/poll/{channel}", params={"since": since} if since else {}, timeout=5)
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self) -> None:
        stop_process(self.proc, timeout=15)
        self._log.close()


class Background:
    """Started with the gateways: a long poll with no timeout, and an idle SSE stream."""

    def __init__(self, gw: Shipped) -> None:
        self.channel = f"idle.{uuid.uuid4().hex[:8]}"
        self.poll_result: dict[str, Any] = {}
        self.sse = SSEClient(f"{gw.url}/sse/{self.channel}", timeout=40)
        self.threads = [
            threading.Thread(target=self._poll, args=(gw,), daemon=True),
            threading.Thread(target=self._read_sse, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _poll(self, gw: Shipped) -> None:
        started = time.monotonic()
        r = requests.get(f"{gw.url}/longpoll/{self.channel}", timeout=40)
        self.poll_result = {"status": r.status_code, "body": r.json(), "held": time.monotonic() - started}

    def _read_sse(self) -> None:
        try:  # no event comes: this collects comments (heartbeats) until finish() closes it
            self.sse.next_event(time.monotonic() + 35)
        except (requests.RequestException, OSError, AttributeError):
            pass

    def finish(self) -> None:
        self.threads[0].join(40)
        self.sse.close()
        self.threads[1].join(5)


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Shipped, Background]]]:
    tmp = tmp_path_factory.mktemp("contract")
    redis = RedisServer(tmp)
    started: dict[str, tuple[Shipped, Background]] = {}
    try:
        for name, env in (("memory", {}), ("redis", {"REDIS_URL": redis.url})):
            gw = Shipped(tmp, {"GATEWAY_PUBLISH_TOKEN": TOKEN, **env})
            started[name] = (gw, Background(gw))
        yield started
    finally:
        for gw, background in started.values():
            background.sse.close()
            gw.stop()
        redis.stop()


@pytest.fixture(params=BACKENDS)
def gw(request: pytest.FixtureRequest, gateways: dict[str, tuple[Shipped, Background]]) -> Shipped:
    return gateways[request.param][0]


@pytest.fixture
def memory(gateways: dict[str, tuple[Shipped, Background]]) -> Shipped:
    return gateways["memory"][0]


@pytest.fixture
def ch() -> str:
    return f"c.{uuid.uuid4().hex[:10]}"


def assert_error(r: requests.Response, status: int, code: str | None = None) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["error"], str) and body["error"] and isinstance(body["detail"], str) and body["detail"]
    assert code is None or body["error"] == code, body


def ws_refused(url: str) -> tuple[int, dict[str, Any]]:
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(url, timeout=5)
    return info.value.status_code, json.loads(info.value.resp_body)


# --- channel names -----------------------------------------------------------------------------


def test_channel_names_on_every_route(memory):
    gw = memory
    good = ["a", "9", "a" * 128, ALLOWED[:26] + ALLOWED[26:52], "0" + ALLOWED[52:], "x" + ALLOWED[62:]]
    for name in good:
        assert gw.poll(name)["gap"] is False
        assert requests.get(f"{gw.url}/longpoll/{name}?timeout=0", timeout=5).status_code == 200
        assert requests.post(f"{gw.url}/publish/{name}", data=b"x", headers=AUTH, timeout=5).status_code == 202
        with SSEClient(f"{gw.url}/sse/{name}") as sse:
            assert sse.status == 200, name
        websocket.create_connection(f"{gw.ws_url}/ws/{name}", timeout=5).close()
    # percent-encoded legal characters are the same channel
    gw.publish("pct:one", "p")
    assert gw.poll("pct%3Aone", "0-0")["events"][0]["data"] == "p"

    bad = ["a" * 129, ".a", "_a", ":a", "-a", "a%20b", "a/b", "a%2Fb", "%C3%A9", "a%00", "a*", "a%3F", ""]
    for name in bad:
        for path in (f"/poll/{name}", f"/longpoll/{name}?timeout=0", f"/sse/{name}", f"/ws/{name}"):
            assert_error(requests.get(gw.url + path, timeout=5), 400, "invalid_channel")
        assert_error(requests.post(f"{gw.url}/publish/{name}", data=b"x", headers=AUTH, timeout=5), 400)
        status, body = ws_refused(f"{gw.ws_url}/ws/{name}")
        assert status == 400 and body["error"] == "invalid_channel", name


# --- the JSON error shape --------------------------------------------------------------------


def test_every_error_has_the_json_shape(memory, ch):
    gw, u = memory, memory.url
    assert_error(requests.get(u + "/no/such/route", timeout=5), 404)
    assert_error(requests.post(u + "/no/such/route", timeout=5), 404)
    assert_error(requests.get(u + "/publish/" + ch, timeout=5), 405)
    for path in (f"/poll/{ch}", f"/longpoll/{ch}", f"/sse/{ch}", f"/ws/{ch}", "/healthz"):
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            assert_error(requests.request(method, u + path, timeout=5), 405)
    assert_error(requests.put(u + "/publish/" + ch, timeout=5), 405)
    assert_error(requests.post(u + "/publish/" + ch, data=b"x", timeout=5), 401, "unauthorized")
    assert_error(requests.post(u + "/publish/" + ch, data=b"x", headers={"Authorization": "Bearer no"}, timeout=5), 401)
    assert_error(requests.post(u + "/publish/" + ch, data=b"x", headers={"Authorization": TOKEN}, timeout=5), 401)
    big = b"x" * (1048576 + 1)
    assert_error(requests.post(u + "/publish/" + ch, data=big, headers=AUTH, timeout=10), 413)
    chunks = (b"y" * 65536 for _ in range(17))  # chunked: no Content-Length to refuse it early
    assert_error(requests.post(u + "/publish/" + ch, data=chunks, headers=AUTH, timeout=10), 413)
    assert_error(requests.get(f"{u}/ws/{ch}", timeout=5), 426)
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13"}
    assert_error(requests.get(f"{u}/ws/{ch}", headers=upgrade, timeout=5), 400)  # no Sec-WebSocket-Key
    old_version = upgrade | {"Sec-WebSocket-Version": "8", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    r = requests.get(f"{u}/ws/{ch}", headers=old_version, timeout=5)
    assert_error(r, 400)
    assert r.headers["Sec-WebSocket-Version"] == "13"
    assert_error(requests.get(f"{u}/longpoll/{ch}?timeout=soon", timeout=5), 400, "invalid_timeout")
    assert_error(requests.get(f"{u}/longpoll/{ch}?timeout=-1", timeout=5), 400, "invalid_timeout")
    # very long ids: ours up to the server's 8 KB request line, the server's own answer past it
    assert_error(requests.get(f"{u}/poll/{ch}?since={'1' * 1000}-0", timeout=5), 400, "invalid_since")
    assert_error(requests.get(f"{u}/poll/{ch}?since={'1' * 20000}-0", timeout=5), 414)
    assert_error(
        requests.get(f"{u}/poll/{ch}", headers={"X-Big": "h" * 70000}, timeout=5), 431
    )  # server.max_head_bytes
    bad_chunks = (
        f"POST /publish/{ch} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as raw:
        raw.sendall(bad_chunks.encode())
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and set(json.loads(body)) == {"error", "detail"}, answer
    # HEAD answers like GET without a body; OPTIONS lists the methods
    head = requests.head(f"{u}/poll/-bad", timeout=5)
    assert head.status_code == 400 and head.headers["Content-Type"] == "application/json" and not head.content
    assert "GET" in requests.options(f"{u}/poll/{ch}", timeout=5).headers["Allow"]
    assert gw.poll(ch, "0-0")["events"] == []  # nothing above was published
    exact = requests.post(f"{u}/publish/{ch}.exact", data=b"z" * 1048576, headers=AUTH, timeout=10)
    assert exact.status_code == 202, exact.text  # the limit itself is allowed


def test_publishing_off_and_an_empty_config_file(tmp_path, ch):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    gw = Shipped(tmp_path, {"GATEWAY_CONFIG": str(empty)})
    try:
        r = requests.post(f"{gw.url}/publish/{ch}", data=b"x", headers=AUTH, timeout=5)
        assert_error(r, 403)
        assert "GATEWAY_PUBLISH_TOKEN" in r.json()["detail"]
        assert gw.poll(ch) == {"events": [], "cursor": "0-0", "gap": False, "more": False}
    finally:
        gw.stop()


def test_config_and_environment_errors_are_one_line(tmp_path):
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[history]\nsise = 5\n")
    cases = [
        ({"GATEWAY_CONFIG": str(unknown)}, "history.sise"),
        ({"REDIS_URL": "localhost:6379"}, "redis.url"),
        ({"PORT": "http"}, "PORT"),
        ({"GATEWAY_PUBLISH_TOKEN": "pasted-with-a-newline\n"}, "server.publish_token"),
    ]
    base = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "GATEWAY_CONFIG")}
    for env, key in cases:
        result = subprocess.run(
            [sys.executable, "app.py"], cwd=ROOT, env=base | {"PORT": str(free_port())} | env,
            capture_output=True, text=True, timeout=15,
        )  # fmt: skip
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and key in lines[0], (env, result.stderr)


def test_procfile_runs_the_gateway_with_gevent():
    command = procfile_command()
    assert command[-1] == "app.py" and command[0].startswith("python"), command
    assert "monkey.patch_all()" in (ROOT / "app.py").read_text()


# --- publishing ----------------------------------------------------------------------------------


def test_publish_bodies(gw, ch):
    u = f"{gw.url}/publish/{ch}"
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"data": b"plain"}, "message", "plain"),
        ({"data": b"", "headers": {"Content-Type": "text/plain"}}, "message", ""),
        ({"data": "h\u00e9llo \u2603 \U0001f600".encode()}, "message", "h\u00e9llo \u2603 \U0001f600"),
        ({"data": b'{"data": 1}', "headers": {"Content-Type": "text/plain"}}, "message", '{"data": 1}'),
        ({"data": b"a\nb\r\nc", "headers": {"Content-Type": "application/octet-stream"}}, "message", "a\nb\r\nc"),
        ({"json": {"data": "s", "event": "price"}}, "price", "s"),
        ({"json": {"data": {"eur": 1.08, "l": [1, None]}}}, "message", '{"eur": 1.08, "l": [1, null]}'),
        ({"json": {"data": None}}, "message", "null"),
        ({"json": {"data": 42, "event": "n", "extra": "ignored"}}, "n", "42"),
        ({"json": {"data": True}}, "message", "true"),
        ({"json": {"data": "\u2603"}}, "message", "\u2603"),
        (
            {"data": b'{"data": [1, 2]}', "headers": {"Content-Type": "application/json; charset=utf-8"}},
            "message",
            "[1, 2]",
        ),
    ]
    ids = []
    for kwargs, event, data in cases:
        headers = AUTH | kwargs.pop("headers", {})
        r = requests.post(u, headers=headers, timeout=5, **kwargs)
        assert r.status_code == 202, r.text
        body = r.json()
        assert set(body) == {"id", "channel"} and body["channel"] == ch
        ids.append((body["id"], event, data))
    events = gw.poll(ch, "0-0")["events"]
    assert [(e["id"], e["event"], e["data"]) for e in events] == ids
    assert all(set(e) == {"id", "event", "data"} for e in events)

    def post(body: bytes, content_type: str = "application/json") -> requests.Response:
        return requests.post(u, data=body, headers=AUTH | {"Content-Type": content_type}, timeout=5)

    for bad in (b"{nope", b"[1]", b'"s"', b'{"event": "x"}', b'{"data": NaN}', b'{"data": 1e999}'):
        assert_error(post(bad), 400)
    assert_error(post(b'{"data": "x", "event": 5}'), 400)
    assert_error(post(b'{"data": ' + b"[" * 100000 + b"]" * 100000 + b"}"), 400, "invalid_json")  # not a 500
    assert_error(post(b'{"data": "x", "event": ""}'), 400)
    assert_error(post(b"\xff\xfe", "text/plain"), 400)
    assert gw.poll(ch, ids[-1][0])["events"] == []  # no refused body was stored


# --- the four transports -----------------------------------------------------------------------


def _poll_all(gw: Shipped, ch: str, since: str, n: int, long: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while len(out) < n and time.monotonic() < deadline:
        if long:
            r = requests.get(f"{gw.url}/longpoll/{ch}", params={"since": since, "timeout": 5}, timeout=15)
            assert r.status_code == 200, r.text
            body = r.json()
        else:
            body = gw.poll(ch, since)
        assert body["gap"] is False
        out += body["events"]
        since = body["cursor"]
    return out


def test_four_transports_deliver_the_same_events_with_the_same_ids(gw, ch):
    start = gw.poll(ch)["cursor"]  # no since: no events, the current cursor
    with SSEClient(f"{gw.url}/sse/{ch}") as sse, WSClient(f"{gw.ws_url}/ws/{ch}") as ws:
        assert sse.status == 200 and sse.headers["Content-Type"].startswith("text/event-stream")
        ids = [
            gw.publish(ch, "one"),
            gw.publish(ch, "multi\nline\ndata", "update"),
            gw.publish(ch, '{"json": "as text"}'),
            gw.publish(ch, "\u00e9\u2603", "uni"),
        ]
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(set(ids)) == 4
        expected = [
            {"id": ids[0], "event": "message", "data": "one"},
            {"id": ids[1], "event": "update", "data": "multi\nline\ndata"},
            {"id": ids[2], "event": "message", "data": '{"json": "as text"}'},
            {"id": ids[3], "event": "uni", "data": "\u00e9\u2603"},
        ]
        assert ws.events(4) == expected
        assert sse.events(4) == expected
        assert sse.retries and sse.retries[0] > 0  # retry: before the first event
    assert _poll_all(gw, ch, start, 4, long=False) == expected
    assert _poll_all(gw, ch, start, 4, long=True) == expected


def test_since_absent_starts_from_now_on_every_transport(gw, ch):
    gw.publish(ch, "old")
    body = gw.poll(ch)
    assert body["events"] == [] and body["gap"] is False and body["cursor"] != "0-0"
    result: dict[str, Any] = {}
    held = threading.Thread(
        target=lambda: result.update(requests.get(f"{gw.url}/longpoll/{ch}?timeout=10", timeout=20).json())
    )
    held.start()
    with SSEClient(f"{gw.url}/sse/{ch}") as sse, WSClient(f"{gw.ws_url}/ws/{ch}") as ws:
        time.sleep(0.3)  # the long poll is held by now
        new = gw.publish(ch, "new")
        assert ws.next_frame()["id"] == new
        assert sse.events(1)[0]["id"] == new
    held.join(15)
    assert [e["data"] for e in result["events"]] == ["new"]


def test_resume_gets_every_missed_event_exactly_once_on_every_transport(gw, ch):
    first = gw.publish(ch, "a")
    missed = [gw.publish(ch, x) for x in ("b", "c", "d")]
    want = ["b", "c", "d"]
    assert [e["data"] for e in gw.poll(ch, first)["events"]] == want
    assert [e["data"] for e in _poll_all(gw, ch, first, 3, long=True)] == want
    streams = [
        SSEClient(f"{gw.url}/sse/{ch}?since={first}"),
        SSEClient(f"{gw.url}/sse/{ch}", headers={"Last-Event-ID": first}),
        SSEClient(f"{gw.url}/sse/{ch}?since=0-0", headers={"Last-Event-ID": first}),  # the header wins
    ]
    ws = WSClient(f"{gw.ws_url}/ws/{ch}?since={first}")
    try:
        for sse in streams:
            assert [e["id"] for e in sse.events(3)] == missed
        assert [e["id"] for e in ws.events(3)] == missed
        later = gw.publish(ch, "e")  # then only what is new: nothing twice
        for sse in streams:
            assert sse.events(1)[0]["id"] == later
        assert ws.next_frame()["id"] == later
    finally:
        for sse in streams:
            sse.close()
        ws.close()
    # resuming from the newest id, or from the cursor of an empty channel, is not a gap
    assert gw.poll(ch, later) == {"events": [], "cursor": later, "gap": False, "more": False}
    empty = f"{ch}.empty"
    assert gw.poll(empty, "0-0") == {"events": [], "cursor": "0-0", "gap": False, "more": False}
    with WSClient(f"{gw.ws_url}/ws/{empty}?since=0-0") as ws, SSEClient(f"{gw.url}/sse/{empty}?since=0-0") as sse:
        only = gw.publish(empty, "first")
        assert ws.next_frame() == {"id": only, "event": "message", "data": "first"}
        assert sse.events(1)[0]["id"] == only


def test_gap_is_reported_on_every_transport(gw, ch):
    elsewhere = gw.publish(f"{ch}.other", "x")  # an id unknown to this channel
    gw.publish(ch, "before")
    assert gw.poll(ch, elsewhere)["gap"] is True
    r = requests.get(f"{gw.url}/longpoll/{ch}", params={"since": elsewhere, "timeout": 5}, timeout=10)
    assert r.status_code == 200 and r.json()["gap"] is True
    with (
        SSEClient(f"{gw.url}/sse/{ch}", headers={"Last-Event-ID": elsewhere}) as sse,
        WSClient(f"{gw.ws_url}/ws/{ch}?since={elsewhere}") as ws,
    ):
        after = gw.publish(ch, "after")
        for name, stream in (("sse", lambda: sse.events(1)[0]), ("ws", ws.next_frame)):
            got = [stream()]
            while got[-1]["id"] != after and len(got) < 5:
                got.append(stream())
            # the gap comes first; then real events, in order, ending with the new one
            assert got[0]["event"] == "gap" and got[-1]["id"] == after, (name, got)
            assert [e["data"] for e in got[1:]] in (["before", "after"], ["after"]), (name, got)


def test_unparseable_since_is_400_on_every_transport(memory, ch):
    u = memory.url
    for since in ("junk", "1-", "-1", "1-1-1", "1.5-0", "9" * 40 + "-0", "0-0 ", "\u0661-0"):
        q = requests.utils.quote(since)
        for path in (f"/poll/{ch}?since={q}", f"/longpoll/{ch}?since={q}&timeout=0", f"/sse/{ch}?since={q}"):
            assert_error(requests.get(u + path, timeout=5), 400, "invalid_since")
        status, body = ws_refused(f"{memory.ws_url}/ws/{ch}?since={q}")
        assert status == 400 and body["error"] == "invalid_since", since
    assert_error(requests.get(f"{u}/sse/{ch}", headers={"Last-Event-ID": "garbage"}, timeout=5), 400, "invalid_since")
    # duplicated keys: the first one counts (as Flask, Nchan and most frameworks read them)
    assert_error(requests.get(f"{u}/poll/{ch}?since=junk&since=0-0", timeout=5), 400, "invalid_since")
    assert requests.get(f"{u}/poll/{ch}?since=0-0&since=junk", timeout=5).status_code == 200


def test_longpoll_timeout_is_honoured(gw, ch):
    started = time.monotonic()
    r = requests.get(f"{gw.url}/longpoll/{ch}?timeout=0.5", timeout=10)
    held = time.monotonic() - started
    assert r.status_code == 200 and r.json()["events"] == [] and 0.4 < held < 3
    assert set(r.json()) >= {"events", "cursor", "gap"}


def test_keep_alive_requests_answer_without_a_delayed_ack_stall(gw, ch):
    """Pollers and publishers reuse connections; each answer must not wait ~40 ms for the
    client's delayed ACK (Nagle holding the body back behind the headers)."""
    with requests.Session() as s:
        times = []
        for i in range(15):
            started = time.monotonic()
            if i % 3 == 0:
                r = s.post(f"{gw.url}/publish/{ch}", data=b"k", headers=AUTH, timeout=5)
            else:
                r = s.get(f"{gw.url}/{'poll' if i % 3 == 1 else 'longpoll'}/{ch}?since=0-0", timeout=5)
            assert r.status_code in (200, 202), r.text
            times.append(time.monotonic() - started)
    assert sorted(times)[len(times) // 2] < 0.02, times


def test_concurrent_publishers_keep_ids_growing_and_deliver_each_event_once(gw, ch):
    threads, per = 8, 20
    with WSClient(f"{gw.ws_url}/ws/{ch}") as ws, SSEClient(f"{gw.url}/sse/{ch}") as sse:
        errors: list[str] = []

        def publish_many(tag: int) -> None:
            with requests.Session() as s:
                for i in range(per):
                    r = s.post(f"{gw.url}/publish/{ch}", data=f"{tag}:{i}".encode(), headers=AUTH, timeout=10)
                    if r.status_code != 202:
                        errors.append(r.text)

        workers = [threading.Thread(target=publish_many, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(30)
        assert not errors
        got_ws = ws.events(threads * per)
        got_sse = sse.events(threads * per)
    stored = _poll_all(gw, ch, "0-0", threads * per, long=False)
    keys = [tuple(map(int, e["id"].split("-"))) for e in stored]
    assert keys == sorted(keys) and len(set(keys)) == threads * per
    assert got_ws == stored and got_sse == stored
    for tag in range(threads):  # each publisher's own events keep their order
        mine = [e["data"] for e in stored if e["data"].startswith(f"{tag}:")]
        assert mine == [f"{tag}:{i}" for i in range(per)]


def test_oversized_websocket_frame_closes_with_1009_and_the_connection(memory, ch):
    ws = websocket.create_connection(f"{memory.ws_url}/ws/{ch}", timeout=5)
    try:
        ws.send("y" * (1048576 + 1))
        opcode, frame = ws.recv_data_frame(True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(frame.data[:2], "big") == 1009
        ws.sock.settimeout(3)
        try:  # after the close handshake the server ends the TCP connection (RFC 6455 7.1.1)
            assert ws.sock.recv(100) == b""
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail("the server kept the TCP connection open after the WebSocket closed")
    finally:
        ws.close()


# --- health and what was measured in the background --------------------------------------------


def test_health(gw):
    r = requests.get(f"{gw.url}/healthz", timeout=5)
    assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_longpoll_hold_is_under_30s_and_sse_heartbeats(gateways, backend):
    gw, background = gateways[backend]
    background.finish()
    result = background.poll_result
    assert result["status"] == 200 and result["body"]["events"] == [], result
    assert 5 < result["held"] < 30, result  # held for the default, which stays under proxies' 30 s
    assert "heartbeat" in background.sse.comments, background.sse.comments
    assert background.sse.retries, "no retry: field"


def test_nothing_above_left_a_traceback_in_the_logs(gateways):
    for gw, _ in gateways.values():
        log = gw.log_path.read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]
