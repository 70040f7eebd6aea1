"""server.workers: several `python app.py` worker processes on one port, over one real Redis.
Subscribers spread across the workers get every event once and in order on every transport; a
worker killed with SIGKILL is restarted and its clients resume without loss; SIGTERM stops them
all within the grace period; several workers without Redis is a one-line start-up error."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket

from gateway.config import ConfigError, from_mapping, load
from gateway.workers import worker_count
from tests.clients import SSEClient, longpoll
from tests.helpers import ROOT, Gateway, to_toml, wait_until
from tests.redis_server import RedisServer, redis_server  # noqa: F401  (a fixture)

CONFIG = {
    "server": {"workers": 2, "shutdown_grace_s": 2.0},
    "sse": {"heartbeat_s": 1.0, "retry_ms": 300},
    "poll": {"longpoll_max_timeout_s": 10.0},
}
EVENTS = 12


class Workers(Gateway):
    """A gateway started with server.workers = 2; ready once both workers answer /healthz."""

    def _wait_ready(self) -> None:
        wait_until(self.proc, lambda: len(self.pids()) == 2, "both workers", self.log, timeout=90)

    def pids(self, tries: int = 24) -> dict[int, int]:
        """pid -> its subscriber count, from /healthz over fresh connections (the kernel spreads
        them across the workers' sockets)."""
        seen: dict[int, int] = {}
        for _ in range(tries):
            try:
                health = requests.get(self.url + "/healthz", timeout=3).json()
                seen[health["pid"]] = health["subscribers"]
            except (requests.RequestException, ValueError, KeyError):
                pass
        return seen


@pytest.fixture(scope="module")
def workers(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:  # noqa: F811
    gw = Workers(CONFIG, tmp_path_factory.mktemp("workers"), {"REDIS_URL": redis_server.url})
    yield gw
    gw.stop()


def _wait(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


class Resuming(threading.Thread):
    """A subscriber that reads `n` events and, when its connection breaks, reconnects with its
    last id (SSE: Last-Event-ID, WebSocket: ?since=), as a real client does."""

    def __init__(self, gw: Gateway, channel: str, transport: str, since: str, n: int) -> None:
        super().__init__(daemon=True)
        self.gw, self.channel, self.transport, self.last, self.n = gw, channel, transport, since, n
        self.events: list[dict[str, Any]] = []
        self.connects = 0
        self.connected = threading.Event()
        self.deadline = time.monotonic() + 90

    def run(self) -> None:
        while len(self.events) < self.n and time.monotonic() < self.deadline:
            try:
                self.connects += 1
                if self.transport == "sse":
                    self._sse()
                else:
                    self._ws()
            except (requests.RequestException, websocket.WebSocketException, OSError, ValueError):
                time.sleep(0.2)  # the worker died under us, or is restarting: come back

    def _take(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.last = event["id"]

    def _sse(self) -> None:
        with SSEClient(f"{self.gw.url}/sse/{self.channel}", {"Last-Event-ID": self.last}) as sse:
            if sse.status != 200:
                raise ValueError(sse.status)
            self.connected.set()
            while len(self.events) < self.n:
                event = sse.next_event(time.monotonic() + 30)
                if event is None:
                    return
                self._take(event)

    def _ws(self) -> None:
        ws = websocket.create_connection(f"{self.gw.ws_url}/ws/{self.channel}?since={self.last}", timeout=30)
        try:
            self.connected.set()
            while len(self.events) < self.n:
                self._take(json.loads(ws.recv()))
        finally:
            ws.close()


def _start_subscribers(gw: Gateway, channel: str, n: int, each: int = 5) -> list[Resuming]:
    since = gw.cursor(channel)
    subs = [Resuming(gw, channel, t, since, n) for t in ("sse", "ws") for _ in range(each)]
    for s in subs:
        s.start()
    for s in subs:
        assert s.connected.wait(30), "a subscriber could not connect"
    return subs


def _check_delivery(subs: list[Resuming], ids: list[str]) -> None:
    for s in subs:
        s.join(max(1.0, s.deadline - time.monotonic()))
        assert [e["id"] for e in s.events] == ids, f"{s.transport} after {s.connects} connect(s)"
        assert all(e["event"] == "message" for e in s.events)  # no gap: nothing was lost


def test_subscribers_spread_across_workers_get_every_event_once_in_order(workers, channel):
    before = workers.pids()
    subs = _start_subscribers(workers, channel, EVENTS)
    # Both workers hold some of these streams (each counts its own subscribers in /healthz).
    spread = _wait(
        lambda: (p := workers.pids()) and len(p) == 2 and all(p[pid] > before.get(pid, 0) for pid in p) and p,
        "both workers hold subscribers",
    )
    assert sum(spread.values()) - sum(before.values()) == len(subs)
    for _ in range(6):  # whichever worker answers, it counts the streams of both, as they are now
        r = requests.get(f"{workers.url}/channels/{channel}", timeout=10)
        assert r.json()["subscribers"] == {"sse": 5, "ws": 5, "longpoll": 0}, r.text
    cursor = workers.cursor(channel)
    pollers: list[list[dict[str, Any]]] = [[] for _ in range(3)]

    def long_poll(out: list[dict[str, Any]]) -> None:
        since = cursor
        deadline = time.monotonic() + 60
        while len(out) < EVENTS and time.monotonic() < deadline:
            batch = longpoll(workers.url, channel, since, timeout=5)  # a new connection: either worker
            out.extend(batch["events"])
            since = batch["cursor"]

    threads = [threading.Thread(target=long_poll, args=(out,), daemon=True) for out in pollers]
    for t in threads:
        t.start()
    ids = [workers.publish(channel, f"e{i}") for i in range(EVENTS)]  # each over a fresh connection too
    _check_delivery(subs, ids)
    for t in threads:
        t.join(60)
    for out in pollers:
        assert [e["id"] for e in out] == ids
        assert [e["data"] for e in out] == [f"e{i}" for i in range(EVENTS)]


def test_a_killed_worker_is_restarted_and_its_clients_resume_without_loss(workers, channel):
    subs = _start_subscribers(workers, channel, 2 * EVENTS)
    ids = [workers.publish(channel, f"a{i}") for i in range(EVENTS)]
    victim = next(iter(workers.pids()))
    shared = Path(_environ(victim)["GATEWAY_METRICS_DIR"])
    assert (shared / f"{victim}.counts").exists()
    os.kill(victim, signal.SIGKILL)
    # Publishes go on meanwhile; the ones that reach the dead worker's socket wait for its successor.
    ids += [workers.publish(channel, f"b{i}") for i in range(EVENTS)]
    _check_delivery(subs, ids)
    assert any(s.connects > 1 for s in subs)  # some clients were on the killed worker
    pids = _wait(lambda: (p := workers.pids()) and len(p) == 2 and p, "two workers answer again")
    assert victim not in pids
    assert f"(pid {victim}) was killed by SIGKILL" in workers.log()
    assert "restarting in" in workers.log()
    # The parent removed the dead worker's files: no survey waits for it, whoever gets its pid.
    assert not [p.name for p in shared.iterdir() if str(victim) in p.name]
    # Every subscriber has read its events and gone: both workers (the new one too) count none.
    _wait(
        lambda: (
            requests.get(f"{workers.url}/channels/{channel}", timeout=10).json()["subscribers"]
            == {"sse": 0, "ws": 0, "longpoll": 0}
        ),
        "no subscribers left in any worker",
    )


def test_sigterm_drains_every_worker_within_the_grace_period(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
    channel: str,
):
    gw = Workers(CONFIG, tmp_path, {"REDIS_URL": redis_server.url})
    try:
        pids = list(gw.pids())
        # The workers' shared directory: made by the parent for them alone, removed at the end.
        (shared,) = {_environ(pid).get("GATEWAY_METRICS_DIR") for pid in pids}
        assert shared and os.stat(shared).st_mode & 0o777 == 0o700
        sse = SSEClient(f"{gw.url}/sse/{channel}")
        ws = websocket.create_connection(f"{gw.ws_url}/ws/{channel}", timeout=10)
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        code = gw.proc.wait(30)
        elapsed = time.monotonic() - started
        assert code == 0, gw.log()
        assert elapsed < CONFIG["server"]["shutdown_grace_s"] + 3, elapsed
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert sse.next_event(time.monotonic() + 5) is None  # the stream was ended, not left hanging
        with pytest.raises((websocket.WebSocketException, OSError)):
            while True:
                ws.recv()  # the 1012 close, then nothing
        assert "killing it" not in gw.log() and "all workers stopped" in gw.log()
        assert not os.path.exists(shared)
        sse.close()
    finally:
        gw.stop()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if b"=" in item)


# -- start-up errors: one line, exit status 2 ----------------------------------------------------
def _run_app(tmp_path: Path, config: dict[str, Any], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(config))
    full_env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "WEB_CONCURRENCY")}
    full_env.update({"GATEWAY_CONFIG": str(path), **env})
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=90
    )


def test_several_workers_without_redis_is_a_one_line_start_up_error(tmp_path: Path):
    run = _run_app(tmp_path, {"server": {"workers": 2}}, {"PORT": "0"})
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "config error: server.workers: 2 workers need a shared channel store; set REDIS_URL (redis.url), "
        "or run 1 worker (server.workers = 1)"
    ]
    run = _run_app(tmp_path, {}, {"PORT": "0", "WEB_CONCURRENCY": "3"})
    assert run.returncode == 2 and run.stderr.strip().startswith("config error: WEB_CONCURRENCY: 3 workers need")
    assert len(run.stderr.strip().splitlines()) == 1


def test_a_shared_directory_others_may_write_is_a_one_line_start_up_error(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    config = {"server": {"workers": 2, "metrics_dir": str(shared)}}
    run = _run_app(tmp_path, config, {"PORT": "0", "REDIS_URL": redis_server.url})
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.strip().splitlines()  # from the parent, before any worker starts
    assert line.startswith("config error: server.metrics_dir: ") and "others cannot write" in line, line


def test_a_taken_port_is_one_line_with_workers_too(redis_server: RedisServer, tmp_path: Path):  # noqa: F811
    holder = socket.create_server(("127.0.0.1", 0))
    try:
        port = holder.getsockname()[1]
        config = {"server": {"workers": 2, "host": "127.0.0.1"}}
        run = _run_app(tmp_path, config, {"PORT": str(port), "REDIS_URL": redis_server.url})
    finally:
        holder.close()
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: server.port: cannot listen on 127.0.0.1:{port}")


def test_worker_count_follows_server_workers_then_web_concurrency():
    redis = {"redis": {"url": "redis://127.0.0.1:6379/0"}}
    assert worker_count(from_mapping({}), {}) == 1
    assert worker_count(from_mapping({}), {"WEB_CONCURRENCY": "1"}) == 1
    assert worker_count(from_mapping(redis), {"WEB_CONCURRENCY": "4"}) == 4
    assert worker_count(from_mapping({"server": {"workers": 3}, **redis}), {"WEB_CONCURRENCY": "8"}) == 3
    assert worker_count(from_mapping({"server": {"workers": 1}}), {"WEB_CONCURRENCY": "8"}) == 1
    with pytest.raises(ConfigError, match=r"^WEB_CONCURRENCY: must be a whole number"):
        worker_count(from_mapping(redis), {"WEB_CONCURRENCY": "two"})
    with pytest.raises(ConfigError, match=r"^WEB_CONCURRENCY: must be between 1 and 256"):
        worker_count(from_mapping(redis), {"WEB_CONCURRENCY": "0"})


def test_workers_do_not_outlive_a_parent_killed_with_sigkill(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
):
    gw = Workers(CONFIG, tmp_path, {"REDIS_URL": redis_server.url})
    try:
        pids = list(gw.pids())
        gw.proc.kill()
        gw.proc.wait(10)

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        _wait(lambda: all(gone(pid) for pid in pids), "the orphaned workers exit", timeout=30)
    finally:
        gw.stop()


def test_app_json_provisions_redis_a_token_and_workers_with_a_config_that_loads():
    app = json.loads((ROOT / "app.json").read_text())
    assert any(addon["plan"].startswith("heroku-redis") for addon in app["addons"])
    assert app["env"]["GATEWAY_PUBLISH_TOKEN"]["generator"] == "secret"
    assert int(app["env"]["WEB_CONCURRENCY"]["value"]) >= 2
    config_path = ROOT / app["env"]["GATEWAY_CONFIG"]["value"]
    config = load(config_path, env={"REDIS_URL": "rediss://:pw@ec2.example.com:6380", "WEB_CONCURRENCY": "2"})
    assert config.redis.tls_verify is False and config.redis.url.startswith("rediss://")
    workers = worker_count(config, {"WEB_CONCURRENCY": app["env"]["WEB_CONCURRENCY"]["value"]})
    # Within the mini plan's 20 clients, even while a preboot runs old and new dynos together.
    assert workers * (config.redis.max_connections + 1) * 2 <= 20


def test_a_worker_that_keeps_dying_young_is_restarted_ever_more_slowly(tmp_path: Path):
    """No crash loop: a worker that dies at once waits 0.5 s, then 1 s, then 2 s... each logged."""
    script = (
        "import logging, sys\n"
        "from gateway.config import from_mapping\n"
        "from gateway.workers import Supervisor\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "config = from_mapping({'server': {'host': '127.0.0.1', 'port': 0, 'workers': 2},"
        " 'redis': {'url': 'redis://127.0.0.1:1/0'}})\n"
        "sys.exit(Supervisor(config, 1, argv=[sys.executable, '-c', 'raise SystemExit(1)']).run())\n"
    )
    log_path = tmp_path / "supervisor.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def pauses() -> list[float]:
        lines = log_path.read_text().splitlines()
        return [float(line.rsplit("restarting in ", 1)[1].split()[0]) for line in lines if "restarting in" in line]

    try:
        _wait(lambda: len(pauses()) >= 3, "three restarts", timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    out = log_path.read_text()
    assert proc.returncode == 0, out
    assert "exited with status 1" in out
    assert pauses()[:3] == [0.5, 1.0, 2.0], out
