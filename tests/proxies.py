"""Real nginx (and haproxy) in front of a gateway, configured per test: each proxy gets its own
tmp dir with a complete minimal config (the system nginx.conf is never read), logs, pid and
temp paths inside it, a free port on 127.0.0.1, and is always stopped."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port, require_binary

__all__ = ["Nginx", "NGINX_PRESETS", "REALTIME", "start_nginx"]

# The location settings the README recommends for realtime (tested by test_diagnose_browser).
REALTIME = """
    proxy_http_version 1.1;
    proxy_set_header Upgrade $http_upgrade;
    proxy_set_header Connection $connection_upgrade;
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_buffering off;
    proxy_cache off;
    proxy_read_timeout 3600s;
    proxy_send_timeout 3600s;
"""

NGINX_PRESETS = {
    "realtime": REALTIME,
    # A plain reverse proxy: HTTP/1.0 upstream, Upgrade/Connection not forwarded.
    "no_upgrade": """
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
""",
    # Buffering forced, the gateway's `X-Accel-Buffering: no` ignored, nginx's default HTTP/1.0 upstream.
    "buffered": """
    proxy_set_header Host $host;
    proxy_buffering on;
    proxy_ignore_headers X-Accel-Buffering;
""",
    # The same with HTTP/1.1 and Upgrade forwarded: nginx 1.22 then relays each upstream chunk at once.
    "buffered_http11": REALTIME.replace(
        "proxy_buffering off;", "proxy_buffering on;\n    proxy_ignore_headers X-Accel-Buffering;"
    ),
    "timeout5": REALTIME.replace("proxy_read_timeout 3600s;", "proxy_read_timeout 5s;"),
}

_CONF = """
worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    server {{
        listen 127.0.0.1:{port};
        location {prefix}/ {{
            proxy_pass http://127.0.0.1:{upstream}{upstream_path};
{location}
        }}
    }}
}}
"""


class Nginx:
    def __init__(self, upstream_port: int, location: str, tmp: Path, prefix: str = "") -> None:
        binary = require_binary("nginx")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{prefix}"  # prefix: the gateway mounted under a path
        self.dir = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.conf = tmp / "nginx.conf"
        upstream_path = "/" if prefix else ""
        self.conf.write_text(
            _CONF.format(
                tmp=tmp,
                port=self.port,
                upstream=upstream_port,
                upstream_path=upstream_path,
                prefix=prefix,
                location=location,
            )
        )
        cmd = [binary, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(self.conf), "-g", "daemon off;"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited at start-up:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not start listening:\n{self.log()}")

    def log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """start_nginx(upstream_port, preset_or_location, prefix="") -> a running Nginx; all stopped at teardown."""
    started: list[Nginx] = []

    def start(upstream_port: int, location: str, prefix: str = "") -> Nginx:
        proxy = Nginx(upstream_port, NGINX_PRESETS.get(location, location), tmp_path / f"nginx-{len(started)}", prefix)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
