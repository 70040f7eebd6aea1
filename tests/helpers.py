"""Test plumbing shared by every suite: free ports, a TOML writer, a live gateway process,
and the rule that a missing binary skips on a laptop but fails under CI=true."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_binary(name: str) -> str:
    """Path of a system binary; skips with a reason when missing, but fails under CI=true."""
    path = shutil.which(name) or (name if os.path.exists(name) else None)
    if path:
        return path
    reason = f"{name} is not installed (Debian: see .ci/run)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must have {name}: {reason}")
    pytest.skip(reason)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
    """Ask a process to end (sig), kill it if it has not after `timeout` s; its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def wait_until(
    proc: subprocess.Popen, ready: Callable[[], bool], what: str, log: Callable[[], str], timeout: float = 15
) -> None:
    """Poll ready() until it is true; fail with the process's log if it exits or time runs out
    (then the process is stopped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start-up:\n{log()}")
        try:
            if ready():
                return
        except OSError:  # requests' ConnectionError is one too
            pass
        time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError(f"{what} did not become ready:\n{log()}")


def wait_for(check: Callable[[], object], what: str, timeout: float = 15) -> None:
    """Poll check() until it is true; fail naming `what` when time runs out."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


def to_toml(data: dict[str, Any]) -> str:
    """Enough TOML for our configs: tables, arrays of tables, strings, numbers, bools, lists."""
    scalars, tables, arrays = [], [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            scalars.append(f"{key} = {_toml_value(value)}")
    out = scalars[:]
    for key, value in tables:
        out.append(f"\n[{key}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
    for key, items in arrays:
        for item in items:
            out.append(f"\n[[{key}]]")
            out.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
    return "\n".join(out) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


class Gateway:
    """`python app.py` in a subprocess on a free port, as users and the outside suite run it."""

    def __init__(self, config: dict[str, Any], tmp: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        path = tmp / f"gateway-{self.port}.toml"
        # Loopback only: a test gateway is no service, and 0.0.0.0:port would also clash with
        # sockets other tests bind on other loopback addresses (127.0.x.y clients).
        defaults = {"host": "127.0.0.1", "publish_token": TOKEN, "access_log": False}
        config = {"server": defaults, "demo": {"channel": ""}} | config
        config["server"] = defaults | config["server"]
        path.write_text(to_toml(config))
        self.log_path = tmp / f"gateway-{self.port}.log"
        full_env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("REDIS_URL", "GATEWAY_PUBLISH_TOKEN", "WEB_CONCURRENCY", "GATEWAY_AUTH_SECRET")
        }
        full_env.update({"PORT": str(self.port), "GATEWAY_CONFIG": str(path), "PYTHONUNBUFFERED": "1"})
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        wait_until(self.proc, self.healthy, "the gateway", self.log)

    def healthy(self) -> bool:
        return requests.get(self.url + "/healthz", timeout=1).status_code == 200

    def publish(self, channel: str, data: str, event: str | None = None) -> str:
        if event is None:
            r = requests.post(
                f"{self.url}/publish/{channel}",
                data=data.encode(),
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/plain"},
                timeout=5,
            )
        else:
            r = requests.post(
                f"{self.url}/publish/{channel}",
                json={"data": data, "event": event},
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=5,
            )
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def cursor(self, channel: str) -> str:
        return requests.get(f"{self.url}/poll/{channel}", timeout=5).json()["cursor"]

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        code = stop_process(self.proc, sig, timeout)
        self._log.close()
        return code
