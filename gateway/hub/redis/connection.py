"""Connecting to Redis (pool, timeouts, TLS) and turning its errors into our 503."""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from gateway.errors import BadRequest

__all__ = ["connect", "ErrorReporter", "hint", "never_sent"]

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

        options = {**common, "socket_timeout": COMMAND_TIMEOUT_S, "retry": retry}
        # redis-py's cluster client re-reads the slot map after a failed command, and tries again.
        client = RedisCluster.from_url(url, max_connections=max_connections, **options)
        listen_client = RedisCluster.from_url(url, max_connections=2, **options)
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
