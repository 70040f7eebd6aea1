"""A real redis-server for tests: a free port on 127.0.0.1, no persistence, its own tmp dir,
always stopped afterwards. Import the `redis_server` fixture (or use RedisServer directly)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port, require_binary


class RedisServer:
    """`redis-server` on a free port; stop() and start() again on the same port (an outage).
    persistent: an append-only file synced on every write, so a kill -9 loses nothing."""

    def __init__(self, workdir: Path, tls: bool = False, persistent: bool = False) -> None:
        self.binary = require_binary("redis-server")
        self.port = free_port()
        self.tls = tls
        self.persistent = persistent
        self.url = f"{'rediss' if tls else 'redis'}://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        if tls:  # a self-signed certificate, like Heroku Redis has
            subprocess.run(
                [require_binary("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                 "-subj", "/CN=localhost", "-keyout", "key.pem", "-out", "cert.pem"],
                cwd=workdir, check=True, capture_output=True, timeout=30,
            )  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        ports = ["--port", "0", "--tls-port", str(self.port)] if self.tls else ["--port", str(self.port)]
        tls = ["--tls-cert-file", "cert.pem", "--tls-key-file", "key.pem", "--tls-auth-clients", "no"]
        args = [
            self.binary,
            *ports,
            *(tls if self.tls else []),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--appendfsync",
            "always",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.workdir / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start-up: {self.log()}")
            if self._answers():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING within 10 s: {self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # an abrupt death, like a crashed or rebooted server
            self.proc.wait(5)
        self.proc = None

    def flush(self) -> None:
        self._command(b"*1\r\n$8\r\nFLUSHALL\r\n")

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def _answers(self) -> bool:
        try:
            return self._command(b"*1\r\n$4\r\nPING\r\n").startswith(b"+PONG")
        except OSError:
            return False

    def _command(self, raw: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as plain:
            s = plain
            if self.tls:
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                s = context.wrap_socket(plain)
            s.sendall(raw)
            return s.recv(64)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


class RedisClusterServers:
    """A real three-primary Redis Cluster: three `redis-server --cluster-enabled yes` on free
    ports (and free cluster-bus ports), joined by `redis-cli --cluster create`. stop_node() and
    start_node() restart one shard (it comes back empty: no persistence)."""

    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        self.binary = require_binary("redis-server")
        self.cli = require_binary("redis-cli")
        self.workdir = workdir
        self.ports = [free_port() for _ in range(nodes)]
        self.bus_ports = [free_port() for _ in range(nodes)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.url = f"redis://127.0.0.1:{self.ports[0]}"
        try:
            for port, bus in zip(self.ports, self.bus_ports, strict=True):
                self._spawn(port, bus)
            addresses = [f"127.0.0.1:{port}" for port in self.ports]
            subprocess.run(
                [self.cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            self.wait_ok()
        except Exception:
            self.stop()
            raise

    def _spawn(self, port: int, bus: int) -> None:
        node_dir = self.workdir / str(port)
        node_dir.mkdir(exist_ok=True)
        args = [
            self.binary, "--port", str(port), "--cluster-enabled", "yes", "--cluster-port", str(bus),
            "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000", "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(node_dir), "--logfile", str(node_dir / "redis.log"),
        ]  # fmt: skip
        self.procs[port] = subprocess.Popen(args, cwd=node_dir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not _answers(port):
            if self.procs[port].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server (cluster node {port}) did not start")
            time.sleep(0.05)

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every node says cluster_state:ok (slots assigned, all nodes reachable)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(b"cluster_state:ok" in self.command(port, "CLUSTER", "INFO") for port in self.procs):
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def node_for(self, key: str) -> int:
        """The port of the primary that holds `key`'s slot."""
        slot = int(self.command(self.ports[0], "CLUSTER", "KEYSLOT", key).split(b"\r\n")[0][1:])
        for port in self.ports:
            for line in self.command(port, "CLUSTER", "NODES").decode().splitlines():
                fields = line.split()
                if len(fields) > 2 and "myself" in fields[2] and any(_covers(r, slot) for r in fields[8:]):
                    return port
        raise RuntimeError(f"no node holds slot {slot}")

    def stop_node(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(5)

    def start_node(self, port: int) -> None:
        self._spawn(port, self.bus_ports[self.ports.index(port)])

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        self.procs.clear()

    def command(self, port: int, *words: str) -> bytes:
        raw = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(raw.encode())
            s.settimeout(2)
            data = b""
            while True:
                chunk = s.recv(65536)
                data += chunk
                if not chunk or _complete(data):
                    return data


def _covers(slot_range: str, slot: int) -> bool:
    if slot_range.startswith("["):  # a slot being migrated
        return False
    low, _, high = slot_range.partition("-")
    return int(low) <= slot <= int(high or low)


def _complete(reply: bytes) -> bool:
    """Whether one RESP reply (a simple line, or a bulk string) has fully arrived."""
    if reply[:1] != b"$":
        return reply.endswith(b"\r\n")
    head, _, body = reply.partition(b"\r\n")
    return len(body) >= int(head[1:]) + 2


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()
