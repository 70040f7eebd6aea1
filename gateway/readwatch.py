"""Waiting with no greenlet: gevent's I/O watcher notices that a socket has bytes (or an EOF) to
read, and park() holds a stream between its rounds on an event's link and a timer. Beside
server.py, the one other module that knows about gevent."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["ReadWatch", "park", "parkable", "watchable"]

log = logging.getLogger(__name__)

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


def parkable(event: Any) -> bool:
    """Whether a stream waiting on this event can be parked (a gevent event, on a running loop)."""
    return gevent is not None and hasattr(event, "rawlink")


def park(rounds: Any, on_end: Callable[[Any], None]) -> None:
    """Drive a stream's rounds (gateway/transports/push.py's Rounds) with no greenlet while it
    waits: each wait is a link on its event and a timer; a wake-up or the timer runs the next
    round in a short greenlet that exits when the stream waits again. The first round runs
    here. on_end(last words) runs once the rounds end (None if they failed: logged)."""
    _Parked(rounds, on_end).run(None)


class _Parked:
    __slots__ = ("_rounds", "_on_end", "_event", "_timer", "_parked")

    def __init__(self, rounds: Any, on_end: Callable[[Any], None]) -> None:
        self._rounds = rounds
        self._on_end = on_end
        self._event: Any = None
        self._timer: Any = None
        self._parked = False

    def run(self, woken: bool | None) -> None:
        """Rounds until the stream waits; a wake-up that came during them runs one more."""
        try:
            while True:
                event, idle = self._rounds.send(woken)
                if not event.is_set():
                    break
                woken = True
        except StopIteration as stop:
            self._on_end(stop.value)
            return
        except Exception:  # a bug: the stream ends (and says why in the log) rather than hang
            log.exception("a parked stream failed; closing it")
            self._on_end(None)
            return
        self._event, self._parked = event, True
        event.rawlink(self._woken)
        if idle is not None:
            self._timer = gevent.get_hub().loop.timer(max(idle, 0.0))
            self._timer.start(self._timed_out)

    # Both below run in the loop itself, which must never block: the round gets a greenlet.
    def _woken(self, _event: Any) -> None:
        if self._parked:
            self._parked = False
            self._stop_timer()
            gevent.spawn_raw(self.run, True)

    def _timed_out(self) -> None:
        if self._parked:
            self._parked = False
            self._stop_timer()
            self._event.unlink(self._woken)
            gevent.spawn_raw(self.run, False)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None
