"""The listener: one subscription per process to the notify topic, so a publish on any process
wakes this one's readers. It reconnects with backoff, and notices a subscription that died
without a word (no echo of its own probes)."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.hub.redis.connection import hint

__all__ = ["Listener"]

log = logging.getLogger("gateway.hub.redis")

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0
KEEPALIVE_S = 15.0  # how often the listener probes its subscription and renews local channels' TTLs
ECHO_TIMEOUT_S = 2 * KEEPALIVE_S + 5  # no probe came back for this long: reconnect


class Listener:
    """Calls on_message(channel) for every other node's publish, on_connect() after each
    (re)subscription, and keep_alive(probe) every KEEPALIVE_S, where publishing `probe` on
    the topic proves the subscription still works."""

    def __init__(
        self,
        client: Any,
        topic: str,
        node: str,
        on_message: Callable[[str], None],
        on_connect: Callable[[bool], None],
        keep_alive: Callable[[str], None],
    ) -> None:
        self._client = client
        self._topic = topic
        self._node = node
        self._on_message = on_message
        self._on_connect = on_connect
        self._keep_alive = keep_alive
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pubsub: Any = None  # the current subscription
        self.connected = False  # subscribed to the topic right now
        # Redis was lost to a connection error (not e.g. a refused SUBSCRIBE, after which reads
        # still work and heartbeats deliver): streaming reads skip Redis until it is back.
        self.offline = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="redis-listener", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=0.1)  # it notices within its poll interval; no need to wait

    def _run(self) -> None:
        delay = BACKOFF_INITIAL_S
        first = True
        while not self._stop.is_set():
            pubsub = self.pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._topic)
                self.connected, self.offline = True, False
                self._on_connect(first)
                first = False
                delay = BACKOFF_INITIAL_S
                self._pump(pubsub)
            except Exception as exc:  # the listener must outlive anything, or wake-ups stop for good
                if self._stop.is_set():
                    break
                self.connected = False
                self.offline = isinstance(exc, (RedisConnectionError, RedisTimeoutError))
                first = False
                pause = delay * random.uniform(0.5, 1.0)
                if isinstance(exc, RedisError):
                    log.warning("redis listener disconnected (%s%s); retrying in %.2f s", exc, hint(exc), pause)
                else:
                    log.exception("redis listener failed; retrying in %.2f s", pause)
                self._stop.wait(pause)
                delay = min(delay * 2, BACKOFF_MAX_S)
            finally:
                self.connected = False
                try:
                    pubsub.close()
                except RedisError:
                    pass

    def _pump(self, pubsub: Any) -> None:
        next_keepalive = heard = time.monotonic()
        while not self._stop.is_set():
            message = pubsub.get_message(timeout=min(1.0, KEEPALIVE_S))
            now = time.monotonic()
            if message is not None and message.get("type") in ("message", "smessage"):
                heard = now
                node, _, channel = str(message["data"]).partition(" ")
                if node != self._node and channel:  # our own publishes already woke our readers
                    self._on_message(channel)
            if now >= next_keepalive:
                next_keepalive = now + KEEPALIVE_S
                self._keep_alive(f"{self._node} ")
            if now - heard > ECHO_TIMEOUT_S:
                # A connection that died without a word (a network partition) never errors.
                raise RedisConnectionError(f"no echo on {self._topic} for {now - heard:.0f} s")
