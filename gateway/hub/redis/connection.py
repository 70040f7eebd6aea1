"""Connecting to Redis (pool, timeouts, TLS) and turning its errors into our 503."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from gateway.errors import BadRequest

__all__ = ["connect", "ErrorReporter", "LazyCluster", "hint", "never_sent", "ERRORS"]

# What a Redis call may raise: redis-py's cluster client has errors of its own beside RedisError.
ERRORS = (RedisError, RedisClusterException)

log = logging.getLogger("gateway.hub.redis")

CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
ERROR_LOG_EVERY_S = 5.0
POOL_WAIT_S = 5.0  # how long a command waits for a free pooled connection


def connect(url: str, tls_verify: bool = True, max_connections: int = 50, cluster: bool = False) -> tuple[Any, Any]:
    """Two clients: a bounded pool for commands, and one connection for the listener. With
    `cluster`, the URL names any one node; redis-py finds the others and routes each command
    to the shard of its keys."""
    common: dict[str, Any] = {
        "decode_responses": True,
        "encoding_errors": "surrogatepass",
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
    }
    if url.startswith("rediss://") and not tls_verify:
        common["ssl_cert_reqs"] = "none"
    # One immediate retry replaces a pooled connection that died with a restarted Redis;
    # timeouts are not retried, so an append that may have run is never run twice.
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    if cluster:
        from redis.cluster import RedisCluster

        # Per node: the same bounded, waiting pool. No client-level retries: redis-py's cluster
        # client would retry timeouts too, and run an append twice. MOVED/ASK redirections after
        # a failover or resharding are followed all the same, and the slot map re-read.
        options = {**common, "socket_timeout": COMMAND_TIMEOUT_S, "retry": Retry(NoBackoff(), 0)}
        client = LazyCluster(
            lambda: RedisCluster.from_url(
                url,
                max_connections=max_connections,
                connection_pool_class=redis.BlockingConnectionPool,
                timeout=POOL_WAIT_S,
                **options,
            )
        )
        # One subscription on whichever node serves the topic's slot: a PUBLISH on any node of
        # a cluster reaches the subscribers of every node.
        listen_client = LazyCluster(lambda: RedisCluster.from_url(url, **options))
        return client, listen_client
    # A bounded pool that makes callers wait their turn (gevent-friendly) rather than fail
    # when hundreds of readers are woken at once.
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        socket_timeout=COMMAND_TIMEOUT_S,
        retry=retry,
        **common,
    )
    client = redis.Redis(connection_pool=pool)
    listen_client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **common)
    return client, listen_client


class LazyCluster:
    """A RedisCluster made on first use. Its constructor must reach a node to learn the slot
    map; made lazily, a gateway starts (and answers 503) while the cluster is down, as it does
    with one Redis server. Failing to reach any node is a ConnectionError, like theirs."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._client: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    try:
                        self._client = self._factory()
                    except RedisClusterException as exc:
                        raise RedisConnectionError(str(exc)) from None
        return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)

    def register_script(self, code: str) -> Callable[..., Any]:
        script: Any = None

        def run(keys: list[str], args: list[Any]) -> Any:
            nonlocal script
            if script is None:
                script = self.get().register_script(code)
            return script(keys=keys, args=args)

        return run

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class ErrorReporter:
    """Our 503 for a Redis error; logged at most every few seconds, however many requests fail."""

    def __init__(self) -> None:
        self._failures = 0
        self._next_log = 0.0

    def unavailable(self, action: str, exc: Exception, detail: str = "try again shortly") -> BadRequest:
        """`detail` ends the sentence: what the client should do about it."""
        now = time.monotonic()
        self._failures += 1
        if now >= self._next_log:
            self._next_log = now + ERROR_LOG_EVERY_S
            log.warning(
                "redis unavailable (%s): %s%s [%d failed call(s) since the last report]",
                action,
                exc,
                hint(exc),
                self._failures,
            )
            self._failures = 0
        return BadRequest(
            "backend_unavailable",
            f"cannot {action}: the Redis backend is unavailable ({type(exc).__name__}); {detail}",
            503,
        )


def never_sent(exc: Exception) -> bool:
    """Whether the command certainly never reached Redis (no connection was made or free), as
    opposed to a timeout or a reset after sending, when it may have run."""
    text = str(exc)
    return "connecting to" in text or "No connection available" in text or "Connection refused" in text


def hint(exc: Exception) -> str:
    """The fix for the one failure operators meet most: a managed Redis's self-signed certificate."""
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return "; for a self-signed certificate (Heroku Redis) set redis.tls_verify = false"
    return ""
