"""Real nginx and haproxy (and a small hostile TCP proxy) in front of a gateway, configured per
test: each gets its own tmp dir with a complete minimal config (the system nginx.conf is never
read), logs, pid and temp paths inside it, a free port on 127.0.0.1, and is always stopped."""

from __future__ import annotations

import queue
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port, port_open, require_binary, stop_process, wait_until

__all__ = [
    "Haproxy",
    "Nginx",
    "NGINX_PRESETS",
    "REALTIME",
    "TcpProxy",
    "start_haproxy",
    "start_haproxy_conf",
    "start_nginx",
    "start_tcp_proxy",
]

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
        listen 127.0.0.1:{port}{listen_tls};
{tls}
        location {prefix}/ {{
            proxy_pass http://127.0.0.1:{upstream}{upstream_path};
{location}
        }}
    }}
}}
"""


def self_signed_certificate(tmp: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (browsers in tests run with --ignore-certificate-errors)."""
    openssl = require_binary("openssl")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


class Nginx:
    def __init__(self, upstream_port: int, location: str, tmp: Path, prefix: str = "", tls: bool = False) -> None:
        binary = require_binary("nginx")
        self.port = free_port()
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}{prefix}"  # prefix: the gateway mounted under a path
        self.dir = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.conf = tmp / "nginx.conf"
        upstream_path = "/" if prefix else ""
        tls_lines = ""
        if tls:  # TLS terminated here, HTTP/2 to the browser (nginx 1.22: `listen ... ssl http2`)
            cert, key = self_signed_certificate(tmp)
            tls_lines = f"        ssl_certificate {cert};\n        ssl_certificate_key {key};"
        self.conf.write_text(
            _CONF.format(
                tmp=tmp,
                port=self.port,
                upstream=upstream_port,
                upstream_path=upstream_path,
                prefix=prefix,
                location=location,
                listen_tls=" ssl http2" if tls else "",
                tls=tls_lines,
            )
        )
        cmd = [binary, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(self.conf), "-g", "daemon off;"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        wait_until(self.proc, lambda: port_open(self.port), "nginx", self.log, timeout=10)

    def log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """start_nginx(upstream_port, preset_or_location, prefix="", tls=False) -> a running Nginx (tls:
    a self-signed certificate, HTTP/2 to clients); all stopped at teardown."""
    started: list[Nginx] = []

    def start(upstream_port: int, location: str, prefix: str = "", tls: bool = False) -> Nginx:
        preset = NGINX_PRESETS.get(location, location)
        proxy = Nginx(upstream_port, preset, tmp_path / f"nginx-{len(started)}", prefix, tls)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


class LoopbackRelay:
    """A threaded TCP server on a free loopback port in front of `upstream_port`: a thread per
    connection runs `_handle(client)`; every socket is tracked so that stop() ends them all.
    Subclasses set their own attributes before calling this __init__ (it starts accepting)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._sockets += socks

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._track(client)
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        raise NotImplementedError

    def _open_upstream(self, client: socket.socket) -> socket.socket | None:
        """A tracked connection to the gateway, or None (the client closed) if it cannot be had."""
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:
            client.close()
            return None
        self._track(upstream)
        return upstream

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()
        with self._lock:
            socks, self._sockets = self._sockets, []
        for s in socks:
            try:
                s.close()
            except OSError:
                pass


@contextmanager
def stopped_at_exit(factory: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """A fixture's `start(...)`: builds with factory and stops everything it built at exit."""
    started: list[Any] = []

    def start(*args: Any, **kwargs: Any) -> Any:
        started.append(factory(*args, **kwargs))
        return started[-1]

    try:
        yield start
    finally:
        for item in started:
            item.stop()


class TcpProxy(LoopbackRelay):
    """A hostile TCP proxy on a free loopback port, for paths nginx cannot imitate:
    - mode "blackhole_ws": relays HTTP, accepts WebSocket upgrades, then relays no frames;
    - mode "flush_every": holds what the server sends and releases it every `interval` seconds
      (a buffering proxy of another kind: events arrive bunched, not missing);
    - mode "delay": delivers every chunk `interval` seconds late, both ways, in order (a slow link)."""

    def __init__(self, upstream_port: int, mode: str, interval: float = 2.0) -> None:
        self.mode, self.interval = mode, interval
        super().__init__(upstream_port)

    def _handle(self, client: socket.socket) -> None:
        upstream = self._open_upstream(client)
        if upstream is None:
            return
        upstream.settimeout(None)
        state = {"upgraded": False}
        threading.Thread(target=self._pipe, args=(client, upstream, state, False), daemon=True).start()
        self._pipe(upstream, client, state, True)

    def _pipe(self, src: socket.socket, dst: socket.socket, state: dict, downstream: bool) -> None:
        if self.mode == "delay":
            return self._delayed_pipe(src, dst)
        held, last_flush = b"", time.monotonic()
        if downstream and self.mode == "flush_every":
            src.settimeout(0.05)
        while not self._stopping.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                data = None
            except OSError:
                break
            if data == b"":
                break
            if data and self.mode == "blackhole_ws":
                if state["upgraded"]:
                    continue  # swallow every frame, both ways
                if downstream and data.startswith(b"HTTP/1.1 101"):
                    state["upgraded"] = True
                    data = data.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
            if downstream and self.mode == "flush_every":
                held += data or b""
                if held and time.monotonic() - last_flush < self.interval:
                    continue
                data, held, last_flush = held, b"", time.monotonic()
            if data:
                try:
                    dst.sendall(data)
                except OSError:
                    break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _delayed_pipe(self, src: socket.socket, dst: socket.socket) -> None:
        chunks: queue.Queue = queue.Queue()

        def send_later() -> None:
            while True:
                due, data = chunks.get()
                if data is None:
                    break
                time.sleep(max(0.0, due - time.monotonic()))
                try:
                    dst.sendall(data)
                except OSError:
                    break
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        threading.Thread(target=send_later, daemon=True).start()
        while not self._stopping.is_set():
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            chunks.put((time.monotonic() + self.interval, data or None))
            if not data:
                return


@pytest.fixture
def start_tcp_proxy() -> Iterator[Callable[..., TcpProxy]]:
    """start_tcp_proxy(upstream_port, mode, interval=2.0) -> a running TcpProxy; stopped at teardown."""
    with stopped_at_exit(TcpProxy) as start:
        yield start


_HAPROXY_CONF = """
defaults
    mode http
    timeout connect 2s
{defaults}
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server gateway 127.0.0.1:{upstream}
"""


class Haproxy:
    """Real haproxy in `mode http` in front of a gateway, with the given `defaults` lines."""

    def __init__(self, upstream_port: int, tmp: Path, defaults: str) -> None:
        binary = require_binary("haproxy")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tmp.mkdir(parents=True, exist_ok=True)
        lines = "\n".join("    " + x.strip() for x in defaults.strip().splitlines())
        conf = tmp / "haproxy.cfg"
        conf.write_text(_HAPROXY_CONF.format(defaults=lines, port=self.port, upstream=upstream_port))
        self._log = open(tmp / "haproxy.log", "wb")
        self.proc = subprocess.Popen([binary, "-db", "-f", str(conf)], stdout=self._log, stderr=subprocess.STDOUT)
        log_path = tmp / "haproxy.log"
        wait_until(
            self.proc, lambda: port_open(self.port), "haproxy", lambda: log_path.read_text(errors="replace"), timeout=10
        )

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


@pytest.fixture
def start_haproxy_conf(tmp_path: Path) -> Iterator[Callable[..., Haproxy]]:
    """start_haproxy_conf(upstream_port, defaults) -> a running Haproxy; all stopped at teardown."""
    started: list[Haproxy] = []

    def start(upstream_port: int, defaults: str) -> Haproxy:
        proxy = Haproxy(upstream_port, tmp_path / f"haproxy-{len(started)}", defaults)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def start_haproxy(start_haproxy_conf: Callable[..., Haproxy]) -> Callable[..., Haproxy]:
    """start_haproxy(upstream_port, timeout="4s"): one idle timeout for requests, responses, tunnels."""

    def start(upstream_port: int, timeout: str = "4s") -> Haproxy:
        defaults = f"timeout client {timeout}\ntimeout server {timeout}\ntimeout tunnel {timeout}"
        return start_haproxy_conf(upstream_port, defaults)

    return start
