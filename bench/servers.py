"""The servers under test: our gateway (`python app.py`) and, when installed, nginx + Nchan.

Each server is started fresh for a case on a free loopback port with a generated config, and
exposes the same small surface to the load generator: URLs per transport, a publish request,
and its process id for CPU and memory readings from /proc.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = [
    "Server",
    "GatewayProtocol",
    "GatewayServer",
    "NchanServer",
    "FloorServer",
    "nchan_module",
    "cpu_times",
    "memory_kb",
    "raise_fd_limit",
]

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"
NCHAN_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules", "/etc/nginx/modules")


FD_LIMIT_WANTED = 250_000  # the 100k idle case: 100k server sockets, 100k client ones, spare


def raise_fd_limit() -> int:
    """Lift the open-files limit (children inherit it): the hard one up to FD_LIMIT_WANTED where
    we may (root, within fs.nr_open), else the soft one to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < FD_LIMIT_WANTED:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                wanted = min(FD_LIMIT_WANTED, int(f.read()))
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (OSError, ValueError):  # not privileged: keep the hard limit we have
            pass
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KB from /proc/<pid>/smaps_rollup."""
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def _or_zero(read, pid: int, zero):  # noqa: ANN001, ANN202 (a reader of /proc and its empty value)
    """A process that has just exited (a worker being replaced) counts as nothing."""
    try:
        return read(pid)
    except (OSError, ValueError, IndexError):
        return zero


def children(pid: int) -> list[int]:
    """Direct child processes, from /proc (Linux)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


class RedisProcess:
    """A throwaway redis-server for Redis-mode cases (no persistence, loopback only)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; Redis-mode cases need it")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(args, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def nchan_module() -> str | None:
    if not shutil.which("nginx"):
        return None
    for d in NCHAN_MODULE_DIRS:
        path = Path(d) / "ngx_nchan_module.so"
        if path.exists():
            return str(path)
    return None


class Server:
    name = "server"
    proc: subprocess.Popen
    port: int
    cursor_polls = False  # long polls resume from the answer's cursor (else Nchan's If-Modified-Since)

    def paths(self, transport: str, channel: str) -> str:
        raise NotImplementedError

    def publish_request(self, channel: str, body: bytes) -> bytes:
        raise NotImplementedError

    def longpoll_path(self, channel: str, cursor: str | None) -> str:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        """Every process whose CPU and memory count as this server's (gateway workers, Redis)."""
        return [self.proc.pid]

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds of every process of this server's: the user part is the
        server's own code, the system part mostly the kernel's sends and receives."""
        user = system = 0.0
        for pid in self.pids():
            u, s = _or_zero(cpu_times, pid, (0.0, 0.0))
            user, system = user + u, system + s
        return user, system

    def memory_kb(self) -> tuple[int, int]:
        rss = pss = 0
        for pid in self.pids():
            r, p = _or_zero(memory_kb, pid, (0, 0))
            rss, pss = rss + r, pss + p
        return rss, pss

    def _wait_port(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start-up:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not start listening:\n{self.log()}")

    def log(self) -> str:
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


class GatewayProtocol(Server):
    """A server that speaks the gateway's long poll and publish (ours, and bench/floor.py)."""

    cursor_polls = True
    _log_path: Path

    def longpoll_path(self, channel: str, cursor: str | None) -> str:
        return f"/longpoll/{channel}?since={cursor or '0-0'}&timeout=25"

    def publish_request(self, channel: str, body: bytes) -> bytes:
        return (
            f"POST /publish/{channel} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")[-3000:]


class GatewayServer(GatewayProtocol):
    """Our gateway as users run it: `python app.py` with a TOML config."""

    name = "gateway"

    def __init__(
        self,
        workdir: Path,
        extra_toml: str = "",
        root: Path = ROOT,
        workers: int = 0,
        redis: bool = False,
        keepalives: bool = False,
    ) -> None:
        self.port = free_port()
        self.workers = workers
        # Redis mode: a redis-server of its own, whose CPU and memory count as the gateway's.
        self.redis = RedisProcess(workdir) if redis or workers > 1 else None
        config = workdir / "gateway.toml"
        # Heartbeats and pings far apart, so that only events are measured; no access log. Churn
        # and soak keep the defaults (keepalives): a heartbeat is how an idle stream finds its
        # client gone, and what is left after clients leave is what those cases measure.
        quiet = "" if keepalives else "[sse]\nheartbeat_s = 600\n[websocket]\nping_s = 600\n"
        config.write_text(
            f'[server]\npublish_token = "{TOKEN}"\naccess_log = false\nconnection_log = false\nmax_body_bytes = 65536\n'
            f"workers = {workers or 1}\n"
            + quiet
            + "[poll]\nlongpoll_default_timeout_s = 25\n[history]\nsize = 5000\n"
            + extra_toml
        )
        env = {
            k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "GATEWAY_PUBLISH_TOKEN", "WEB_CONCURRENCY")
        }
        env.update({"PORT": str(self.port), "GATEWAY_CONFIG": str(config), "PYTHONUNBUFFERED": "1"})
        if self.redis is not None:
            env["REDIS_URL"] = self.redis.url
        self._log_path = workdir / "gateway.log"
        with open(self._log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(root / "app.py")], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_port()
        if workers > 1:
            self._wait_workers(60.0)

    def _wait_workers(self, timeout: float) -> None:
        """The parent binds at once; wait until every worker answers (each /healthz names its pid)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(children(self.proc.pid)) >= self.workers and len(self._answering()) >= self.workers:
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"not all {self.workers} workers answered:\n{self.log()}")

    def _answering(self) -> set[int]:
        seen: set[int] = set()
        for _ in range(4 * self.workers):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    s.settimeout(2)
                    reply = b""
                    while chunk := s.recv(4096):
                        reply += chunk
                body = reply.partition(b"\r\n\r\n")[2]
                seen.add(int(json.loads(body)["pid"]))
            except (OSError, ValueError, KeyError):
                pass
        return seen

    def pids(self) -> list[int]:
        pids = [self.proc.pid, *children(self.proc.pid)]
        return pids + ([self.redis.proc.pid] if self.redis is not None else [])

    def stop(self) -> None:
        super().stop()
        if self.redis is not None:
            self.redis.stop()

    def paths(self, transport: str, channel: str) -> str:
        return {"sse": f"/sse/{channel}", "ws": f"/ws/{channel}"}[transport]


class FloorServer(GatewayProtocol):
    """bench/floor.py: the least a CPython + gevent long-poll server costs (long poll only)."""

    def __init__(self, workdir: Path, greenlets: bool = False) -> None:
        self.name = "floor-greenlets" if greenlets else "floor"
        self.port = free_port()
        self._log_path = workdir / "floor.log"
        command = [sys.executable, "-m", "bench.floor", str(self.port), *(["--greenlets"] if greenlets else [])]
        with open(self._log_path, "wb") as log:
            self.proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self._wait_port()

    def paths(self, transport: str, channel: str) -> str:
        raise ValueError("the floor server answers long polls only (an lp-* case)")


NGINX_CONF = """\
load_module {module};
worker_processes 1;
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {conns}; multi_accept on; }}
http {{
  access_log off;
  keepalive_requests 10000000;  # the publisher keeps one connection (nginx closes after 1000 by default)
  keepalive_timeout 300s;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fcgi;
  uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  nchan_shared_memory_size 256M;
  server {{
    listen 127.0.0.1:{port} backlog=1024;  # as the gateway's
    location ~ ^/pub/(.+)$ {{
      nchan_publisher; nchan_channel_id $1;
      nchan_message_buffer_length 5000; nchan_message_timeout 1h;
    }}
    location ~ ^/sse/(.+)$ {{
      nchan_subscriber eventsource; nchan_channel_id $1; nchan_subscriber_first_message newest;
      nchan_channel_id_split_delimiter ",";  # /sse/a,b,c: Nchan's multiplexed subscriber
    }}
    location ~ ^/ws/(.+)$ {{
      nchan_subscriber websocket; nchan_channel_id $1; nchan_subscriber_first_message newest;
      nchan_channel_id_split_delimiter ",";
    }}
    location ~ ^/lp/(.+)$ {{
      nchan_subscriber longpoll; nchan_channel_id $1; nchan_subscriber_first_message newest;
    }}
  }}
}}
"""


class NchanServer(Server):
    """nginx with the Nchan module: one worker process (master off, so its pid is the worker)."""

    name = "nchan"

    def __init__(self, workdir: Path, module: str) -> None:
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="nchan-", dir=workdir))
        conf = self._dir / "nginx.conf"
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        conf.write_text(
            NGINX_CONF.format(
                module=module, dir=self._dir, port=self.port, nofile=nofile, conns=max(1024, nofile - 100)
            )
        )
        with open(self._dir / "stdout.log", "wb") as log:
            self.proc = subprocess.Popen(
                ["nginx", "-p", str(self._dir), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_port()

    def paths(self, transport: str, channel: str) -> str:
        return {"sse": f"/sse/{channel}", "ws": f"/ws/{channel}"}[transport]

    def longpoll_path(self, channel: str, cursor: str | None) -> str:
        return f"/lp/{channel}"

    def publish_request(self, channel: str, body: bytes) -> bytes:
        return (
            f"POST /pub/{channel} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    def log(self) -> str:
        path = self._dir / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""
