"""Start-up (config errors, embedded default), health, the index page, and SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import requests
import websocket

from tests.clients import SSEClient, longpoll, poll
from tests.helpers import ROOT, free_port


def run_app(env: dict[str, str], timeout: float = 10) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "GATEWAY_PUBLISH_TOKEN")} | env
    return subprocess.run(
        [sys.executable, "app.py"], cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout
    )


def test_broken_config_stops_start_up_with_one_clear_line(tmp_path):
    cases = {
        "[server]\nprot = 1\n": "server.prot: unknown key",
        "[history]\nsize = 'big'\n": "history.size: must be a whole number",
        "[history]\nsize = 0\n": "history.size: 0 is out of range",
        "[sse]\nheartbeat_s = true\n": "sse.heartbeat_s: must be a number",
        "[[sources]]\nkind = 'ftp'\nurl = 'http://x'\nchannel = 'c'\n": "sources[0].kind",
        "[server\n": "not valid TOML",
        # A broken value in the file is an error though $PORT (set below) overrides it.
        "[server]\nport = 'abc'\n": "server.port: must be a whole number",
        "[server]\nport = 70000\n": "server.port: 70000 is out of range",
        # Listening fails on an address this machine does not have: the key to change is the host.
        "[server]\nhost = '192.0.2.1'\n": "server.host: cannot listen on 192.0.2.1",
        b"[server]\npublish_token = '\xff'\n": "not UTF-8 text",
    }
    for text, expected in cases.items():
        path = tmp_path / "bad.toml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        result = run_app({"GATEWAY_CONFIG": str(path), "PORT": str(free_port())})
        assert result.returncode == 2, text
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (text, result.stderr)
    result = run_app({"PORT": "eighty"})
    assert result.returncode == 2 and "PORT: must be a whole number" in result.stderr
    result = run_app({"PORT": "-1"})
    assert result.returncode == 2 and "PORT: -1 is out of range" in result.stderr
    result = run_app({"GATEWAY_CONFIG": str(tmp_path / "missing.toml")})
    assert result.returncode == 2 and "GATEWAY_CONFIG" in result.stderr


def test_empty_config_file_is_valid(start_gateway, tmp_path, channel):
    gw = start_gateway({})
    assert requests.get(f"{gw.url}/healthz", timeout=5).json()["status"] == "ok"


def test_shipped_config_serves_a_ticking_demo_channel_and_an_index(start_gateway):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_CONFIG", "REDIS_URL")} | {"PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        body = longpoll(url, "demo", timeout=5)
        assert body["events"] and body["events"][0]["event"] == "tick"
        page = requests.get(url + "/", timeout=5)
        assert page.status_code == 200 and "/sse/demo" in page.text and "curl" in page.text
    finally:
        proc.terminate()
        proc.wait(15)


def test_health(gateway):
    r = requests.get(f"{gateway.url}/healthz", timeout=5)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_sigterm_tells_every_stream_to_come_back_and_exits_quickly(start_gateway, channel):
    gw = start_gateway({"sse": {"heartbeat_s": 30}, "websocket": {"ping_s": 30}})
    cursor = poll(gw.url, channel)["cursor"]
    sse = SSEClient(f"{gw.url}/sse/{channel}")
    ws = websocket.create_connection(f"{gw.ws_url}/ws/{channel}", timeout=10)
    held: dict = {}
    holder = threading.Thread(target=lambda: held.update(longpoll(gw.url, channel, cursor, timeout=9)))
    holder.start()
    time.sleep(0.5)
    started = time.monotonic()
    gw.proc.terminate()

    # SSE: a reconnect hint, then the stream ends.
    assert sse.next_event() is None
    assert sse.retries[-1] == 1000
    # WebSocket: close frame 1012 (service restart).
    opcode, data = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 1012
    # Long poll: answered now, empty, with a cursor to resume from.
    holder.join(5)
    assert held == {"events": [], "cursor": cursor, "gap": False, "more": False}
    assert gw.proc.wait(15) == 0
    assert time.monotonic() - started < 10


def test_sigterm_answers_long_polls_held_with_no_stream_open(start_gateway, channel):
    """Polls the lean loop holds (one by its parked greenlet, one by the Runner after a pushed
    answer) are answered before the process exits, though no stream's goodbye keeps it busy."""
    gw = start_gateway({})
    cursor = poll(gw.url, channel)["cursor"]
    first = requests.Session()  # one keep-alive connection: its second poll is held inline
    answers: dict[str, dict] = {}

    def hold(name: str, session: requests.Session, since: str) -> None:
        r = session.get(f"{gw.url}/longpoll/{channel}", params={"since": since, "timeout": 20}, timeout=25)
        answers[name] = r.json() if r.status_code == 200 else {"status": r.status_code}

    pushed = threading.Thread(target=hold, args=("pushed", first, cursor))
    pushed.start()
    time.sleep(0.3)
    event_id = gw.publish(channel, "one")
    pushed.join(10)
    assert [e["data"] for e in answers["pushed"]["events"]] == ["one"]
    inline = threading.Thread(target=hold, args=("inline", first, event_id))
    parked = threading.Thread(target=hold, args=("parked", requests.Session(), event_id))
    inline.start()
    parked.start()
    time.sleep(0.5)
    started = time.monotonic()
    gw.proc.terminate()
    inline.join(10)
    parked.join(10)
    empty = {"events": [], "cursor": event_id, "gap": False, "more": False}
    assert answers.get("inline") == empty and answers.get("parked") == empty, answers
    assert gw.proc.wait(15) == 0
    assert time.monotonic() - started < 3  # answered at once: the wait ends with the last poll, not the grace


def test_a_port_in_use_is_one_clear_line(start_gateway):
    busy = start_gateway({})
    result = run_app({"PORT": str(busy.port), "GATEWAY_CONFIG": str(ROOT / "config.toml")})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("config error: server.port: cannot listen on") and "PORT" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
