"""Several gateway processes on one port (server.workers): a parent that binds and supervises.

The parent loads the config, binds the port (so a port conflict is still one line), and starts
each worker as a fresh `python app.py` that inherits the listening socket (GATEWAY_LISTEN_FD).
Fresh processes rather than bare forks: a worker builds its app, threads and gevent hub itself,
and the parent never starts any of them. All workers accept from that one socket, so the kernel
hands each new connection to a worker that is free to take it, and while a dead worker is being
replaced its share simply goes to the others: nothing queues behind it. (SO_REUSEPORT, a socket
per worker, spreads more evenly but strands the connections queued on a dead worker's socket
until its successor has started, seconds on a busy machine.)

The parent restarts a worker that dies (logged, with a growing pause if it keeps dying young),
and on SIGTERM/SIGINT tells every worker to drain (each within server.shutdown_grace_s), killing
any that outlive that. Workers share nothing in memory, so more than one needs Redis.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from gateway.config import Config, ConfigError, listen_error
from gateway.metricsdir import forget_worker, private_dir

__all__ = ["worker_count", "is_worker", "inherited_socket", "Supervisor", "LISTEN_FD_ENV"]

log = logging.getLogger("gateway.workers")

LISTEN_FD_ENV = "GATEWAY_LISTEN_FD"
WORKER_ENV = "GATEWAY_WORKER"  # the worker's number, for its log lines
SHARED_DIR_ENV = "GATEWAY_METRICS_DIR"  # server.metrics_dir (gateway/config.py reads it)
LISTEN_BACKLOG = 1024
RESTART_PAUSE_S = 0.5  # after a worker's first unexpected death
RESTART_PAUSE_MAX_S = 30.0
STABLE_AFTER_S = 30.0  # a worker that lived this long died of something new: restart at once
KILL_MARGIN_S = 5.0  # beyond the grace period, before stragglers are killed
CONFIG_ERROR_EXIT = 2  # app.py's exit status for a config error: restarting cannot help


def worker_count(config: Config, env: Mapping[str, str] = os.environ) -> int:
    """server.workers, or $WEB_CONCURRENCY when it is 0, or 1; more than one needs Redis."""
    count = config.server.workers
    where = "server.workers"
    if count == 0:
        raw = env.get("WEB_CONCURRENCY", "").strip()
        where = "WEB_CONCURRENCY"
        try:
            count = int(raw) if raw else 1
        except ValueError:
            raise ConfigError(f"WEB_CONCURRENCY: must be a whole number of processes (got {raw!r})") from None
        if not 1 <= count <= 256:
            raise ConfigError(f"WEB_CONCURRENCY: must be between 1 and 256 (got {count})")
    if count > 1 and not config.redis.url:
        raise ConfigError(
            f"{where}: {count} workers need a shared channel store; set REDIS_URL (redis.url), "
            f"or run 1 worker ({where} = 1)"
        )
    return count


def is_worker() -> bool:
    """Whether this process is a worker a Supervisor started."""
    return bool(os.environ.get(LISTEN_FD_ENV))


def inherited_socket() -> socket.socket | None:
    """In a worker: the listening socket the parent handed down; None in a lone process."""
    fd = os.environ.get(LISTEN_FD_ENV)
    if not fd:
        return None
    _die_with_parent()
    return socket.socket(fileno=int(fd))


def _die_with_parent() -> None:
    """A worker must not outlive a parent that was killed -9 (Linux only; elsewhere best effort)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent was already gone before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class _Worker:
    def __init__(self, number: int, sock: socket.socket) -> None:
        self.number = number
        self.sock = sock
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.pause = 0.0  # before the next restart
        self.restart_at = 0.0
        self.deaths = 0


class Supervisor:
    """Binds the port, runs `count` workers on it, and keeps them running until a signal."""

    def __init__(self, config: Config, count: int, argv: list[str] | None = None) -> None:
        self._config = config
        self._count = count
        # The same command that started us (python app.py ...), run again as a worker.
        self._argv = argv or [sys.executable, *sys.orig_argv[1:]]
        self._stopping = False
        self._workers: list[_Worker] = []
        # The workers' (metrics snapshots, subscriber counts): the configured one, else made
        # here and removed at the end.
        self._shared_dir: Path | None = None

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status for the parent process."""
        configured = self._config.server.metrics_dir
        if configured:
            self._shared_dir = private_dir(Path(configured))  # one line here, not one per worker
        sock = self._bind()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        host, port = self._config.server.host, sock.getsockname()[1]
        log.info("gateway: %d workers on http://%s:%d (parent pid %d)", self._count, host, port, os.getpid())
        if self._shared_dir is None:
            # A fresh one only this user may enter, rather than a guessable name in the temp dir
            # that another local user could create first.
            self._shared_dir = Path(tempfile.mkdtemp(prefix=f"gateway-{port}-"))
        self._workers = [_Worker(i + 1, sock) for i in range(self._count)]
        status = 0
        try:
            for worker in self._workers:
                self._start(worker)
            while not self._stopping:
                status = self._reap_and_restart()
                if status:
                    self._stopping = True
                    break
                time.sleep(0.2)
            self._drain()
        finally:
            sock.close()
            if self._shared_dir is not None and not configured:  # ours: made above
                shutil.rmtree(self._shared_dir, ignore_errors=True)
        return status

    # -- binding ---------------------------------------------------------------------------
    def _bind(self) -> socket.socket:
        """One listening socket that every worker accepts from; errors as one line."""
        host, port = self._config.server.host, self._config.server.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise listen_error(host, port, exc) from None
        sock.set_inheritable(True)
        return sock

    # -- running workers -------------------------------------------------------------------
    def _start(self, worker: _Worker) -> None:
        env = dict(os.environ)
        env[LISTEN_FD_ENV] = str(worker.sock.fileno())
        env[WORKER_ENV] = str(worker.number)
        if self._shared_dir is not None:
            env[SHARED_DIR_ENV] = str(self._shared_dir)
        worker.proc = subprocess.Popen(self._argv, env=env, pass_fds=(worker.sock.fileno(),))
        worker.started = time.monotonic()
        log.info("worker %d started (pid %d)", worker.number, worker.proc.pid)

    def _reap_and_restart(self) -> int:
        """Restart dead workers when their pause is over; non-zero: give up with this status."""
        now = time.monotonic()
        for worker in self._workers:
            if worker.proc is None:
                if now >= worker.restart_at and not self._stopping:
                    self._start(worker)
                continue
            code = worker.proc.poll()
            if code is None:
                continue
            if self._shared_dir is not None:
                forget_worker(self._shared_dir, worker.proc.pid)
            lived = now - worker.started
            if code == CONFIG_ERROR_EXIT and worker.deaths == 0 and lived < STABLE_AFTER_S:
                log.error("worker %d stopped on a config error (above); stopping", worker.number)
                worker.proc = None
                return CONFIG_ERROR_EXIT
            worker.deaths += 1
            # Dying young again and again is a crash loop: back off, so it does not spin.
            worker.pause = (
                0.0 if lived >= STABLE_AFTER_S else min(max(worker.pause * 2, RESTART_PAUSE_S), RESTART_PAUSE_MAX_S)
            )
            worker.restart_at = now + worker.pause
            log.warning(
                "worker %d (pid %d) %s after %.1f s; restarting in %.1f s",
                worker.number,
                worker.proc.pid,
                _describe(code),
                lived,
                worker.pause,
            )
            worker.proc = None
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _drain(self) -> None:
        """Every worker drains on its own (SIGTERM); kill whoever outlives the grace period."""
        running = [w.proc for w in self._workers if w.proc is not None and w.proc.poll() is None]
        log.info("shutting down: draining %d worker(s)", len(running))
        started = time.monotonic()
        for proc in running:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = started + self._config.server.shutdown_grace_s + KILL_MARGIN_S
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop within the grace period; killing it", proc.pid)
                proc.kill()
                proc.wait(5)
        log.info("all workers stopped in %.1f s", time.monotonic() - started)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
