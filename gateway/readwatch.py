"""Noticing that a socket has bytes (or an EOF) to read with no greenlet parked on it: gevent's
I/O watcher. Beside server.py, the one other module that knows about gevent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ReadWatch", "watchable"]

try:
    import gevent
    from gevent.socket import socket as _GeventSocket
except ImportError:  # pragma: no cover (the gateway always runs on gevent)
    gevent = None  # type: ignore[assignment]
    _GeventSocket = None  # type: ignore[assignment,misc]


def watchable(sock: Any) -> bool:
    """Whether sock is a gevent socket on a running loop (else: read it from a thread)."""
    return _GeventSocket is not None and isinstance(sock, _GeventSocket) and hasattr(sock, "_sock")


class ReadWatch:
    """Runs on_readable() in a fresh greenlet each time the socket becomes readable, once per
    start(): the greenlet does its work and exits, and start() arms the watch again. An idle
    socket then costs a watcher, not a greenlet with its saved stack."""

    __slots__ = ("_watcher", "_on_readable", "_closed")

    def __init__(self, sock: Any, on_readable: Callable[[], None]) -> None:
        self._watcher = gevent.get_hub().loop.io(sock.fileno(), 1)  # 1: readable
        self._on_readable = on_readable
        self._closed = False

    def start(self) -> None:
        # A greenlet spawned before close() may still ask to watch again: never once closed
        # (libev would re-arm a closed watcher, on an fd that may be another connection's by then).
        if not self._closed and not self._watcher.active:
            self._watcher.start(self._fire)

    def _fire(self) -> None:
        # In the loop itself, which must never block: hand the reading to a greenlet.
        self._watcher.stop()
        gevent.spawn_raw(self._on_readable)

    def close(self) -> None:
        self._closed = True
        self._watcher.stop()
        self._watcher.close()
