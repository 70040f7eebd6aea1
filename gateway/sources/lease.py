"""Leases: with Redis, each upstream source is relayed by exactly one gateway process.

A source may relay only while it holds its lease, the key `<prefix>source:<channel>:<kind>:{<url hash>}`
whose value is the holder's token ("<host>:<pid>:<random>"), set only if absent, with a TTL.
The holder renews it every ttl/3 (compare-and-extend) and deletes it when it stops
(compare-and-delete); the others stay on standby and try again every ttl/2, so a stopped
leader is replaced within about ttl/2 and a dead one within about 1.5 ttl.

Beside the lease lives what the next leader needs to carry on without repeating anything:
`...:state` (a JSON object: the SSE last event id, the poll ETag / Last-Modified / body digest)
and `...:ids` (the most recent upstream ids or item keys relayed, newest first, bounded). The
leader writes both after each relayed event, and only while the lease is still its own.

A holder that cannot renew keeps relaying only until its local deadline (start of the last
successful renewal + 0.9 ttl), which passes before Redis can expire the key for anyone else:
then it stops and tries to lead again. Redis errors become LeaseError at this boundary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from gateway.config import RedisConfig, SourceConfig
from gateway.hub.redis.connection import ERRORS, LazyCluster
from gateway.sources.base import LeaseError, LeaseLost

__all__ = ["LeaseError", "LeaseLost", "LeaseStore", "Lease", "MAX_IDS"]

log = logging.getLogger("gateway.sources")

MAX_IDS = 10_000  # upstream ids / item keys kept for the next leader (as RecentIds keeps in memory)
STATE_TTL_MS = 7 * 86_400_000  # the resume state outlives the lease, but not forever
SAFETY = 0.9  # we trust our lease for this share of the ttl: clocks and round trips are not exact
PUSH_BATCH = 1000  # ids per script call (Lua's unpack has a limit)
POOL_SIZE = 4  # Redis connections for all the leases of a process (small plans cap clients)

# KEYS: lease, state, ids. ARGV: token, ttl_ms. -> {1, token, state, ids...} or {0, holder}.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return {0, cur} end
if cur then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
end
local out = {1, ARGV[1], redis.call('GET', KEYS[2]) or ''}
for _, id in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do out[#out + 1] = id end
return out
"""

# KEYS: lease, state, ids. ARGV: token, ttl_ms, state_ttl_ms. -> 1 (still ours) or 0.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return 1
"""

# KEYS: lease, state, ids. ARGV: token, state ('' = unchanged), state_ttl_ms, max ids, ids...
_SAVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3]) end
if #ARGV > 4 then
  redis.call('LPUSH', KEYS[3], unpack(ARGV, 5))
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[4]) - 1)
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
return 1
"""

# KEYS: lease. ARGV: token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def owner_token() -> str:
    """Who holds a lease, readable in /status: the dyno or host name, the pid, and a random part."""
    host = os.environ.get("DYNO") or socket.gethostname()
    return f"{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LeaseStore:
    """One Redis client for every lease of this process."""

    def __init__(self, cfg: RedisConfig, timeout_s: float) -> None:
        options: dict[str, Any] = {
            "decode_responses": True,
            "encoding_errors": "surrogatepass",
            # Short: a renewal that hangs must not outlive the lease it is renewing.
            "socket_connect_timeout": timeout_s,
            "socket_timeout": timeout_s,
            # One immediate retry replaces a connection that died with a restarted Redis; every
            # script here is safe to run twice.
            "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        }
        if cfg.url.startswith("rediss://") and not cfg.tls_verify:
            options["ssl_cert_reqs"] = "none"
        # A call that finds every connection busy waits its turn, no longer than a command may take.
        if cfg.cluster:
            from redis.cluster import RedisCluster

            # Made on first use (see LazyCluster): a cluster that is down at start-up is a LeaseError.
            self.client = LazyCluster(
                lambda: RedisCluster.from_url(
                    cfg.url,
                    max_connections=POOL_SIZE,
                    connection_pool_class=redis.BlockingConnectionPool,
                    timeout=timeout_s,
                    **options,
                )
            )
        else:
            pool = redis.BlockingConnectionPool.from_url(
                cfg.url, max_connections=POOL_SIZE, timeout=timeout_s, **options
            )
            self.client = redis.Redis(connection_pool=pool)
        self.prefix = cfg.prefix
        self.scripts = {
            name: self.client.register_script(code)
            for name, code in (("acquire", _ACQUIRE), ("renew", _RENEW), ("save", _SAVE), ("release", _RELEASE))
        }

    def lease(self, cfg: SourceConfig) -> Lease:
        digest = hashlib.sha256(cfg.url.encode()).hexdigest()[:16]  # the URL may hold secrets
        # {digest} is the hash tag: in a Redis Cluster the lease and its :state and :ids keys
        # live on one shard, so one script can touch all three.
        return Lease(self, f"{self.prefix}source:{cfg.channel}:{cfg.kind}:{{{digest}}}", cfg.lease_ttl_s)


class Lease:
    def __init__(self, store: LeaseStore, key: str, ttl_s: float) -> None:
        self.key = key
        self.ttl_s = ttl_s
        self.token = owner_token()  # per source: two identical [[sources]] in one process are two owners
        self.holder = ""  # the last known holder's token ("" = nobody, or not asked yet)
        self.held = False  # we believe we hold it (it may have run out: see valid())
        self.resumed: tuple[dict[str, str], list[str]] = ({}, [])  # state and ids found on acquiring
        self._keys = [key, key + ":state", key + ":ids"]
        self._scripts = store.scripts
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._valid_until = 0.0
        self._released: threading.Event | None = None

    # -- asking Redis ------------------------------------------------------------------------
    def acquire(self) -> bool:
        """Take the lease if it is free (or already ours); on success `resumed` holds what the
        previous leader left. False: someone else holds it (see `holder`)."""
        started = time.monotonic()
        reply = self._call("acquire", self.token, self._ttl_ms)
        self.holder = reply[1]
        if not int(reply[0]):
            self.held = False
            return False
        self._valid_until = started + self.ttl_s * SAFETY
        self.held = True
        state = _parse_state(reply[2])
        self.resumed = (state, list(reversed(reply[3:])))  # oldest first
        return True

    def renew(self) -> bool:
        """Extend the lease if it is still ours; False when it has expired or someone took it."""
        started = time.monotonic()
        if not int(self._call("renew", self.token, self._ttl_ms, STATE_TTL_MS)):
            self.held = False
            return False
        self._valid_until = started + self.ttl_s * SAFETY
        return True

    def save(self, state: dict[str, str] | None, ids: list[str]) -> bool:
        """Record progress for the next leader; False (nothing written) if the lease is not ours."""
        text = json.dumps(state, separators=(",", ":")) if state is not None else ""
        for i in range(0, max(1, len(ids)), PUSH_BATCH):
            chunk = ids[i : i + PUSH_BATCH]
            if not int(self._call("save", self.token, text if i == 0 else "", STATE_TTL_MS, MAX_IDS, *chunk)):
                self.held = False
                return False
        return True

    def release(self) -> None:
        """Hand the lease back (only if it is still ours), so a standby takes over at once."""
        self._stop_renewing()
        if not self.held:
            return
        self.held = False
        self._valid_until = 0.0
        self._call("release", self.token)

    def valid(self) -> bool:
        """Whether we may relay right now: held, and renewed recently enough that Redis cannot
        have given it to anyone else yet."""
        return self.held and time.monotonic() < self._valid_until

    # -- keeping it ----------------------------------------------------------------------------
    def keep(self, on_lost: Callable[[str], None]) -> None:
        """Renew every ttl/3 in the background until released; on_lost(reason) once if it is lost."""
        self._stop_renewing()
        released = self._released = threading.Event()
        thread = threading.Thread(target=self._renew_loop, args=(released, on_lost), name=f"lease:{self.key}")
        thread.daemon = True
        thread.start()

    def _renew_loop(self, released: threading.Event, on_lost: Callable[[str], None]) -> None:
        interval = self.ttl_s / 3
        while not released.wait(interval):
            try:
                if self.renew():
                    interval = self.ttl_s / 3
                    continue
                reason = "it expired or another process took it"
            except LeaseError as exc:
                if self.valid():
                    interval = self.ttl_s / 6  # try again sooner while it is still ours
                    log.warning("lease %s: renewal failed (%s); retrying in %.2f s", self.key, exc, interval)
                    continue
                reason = f"could not renew it in time ({exc})"
            if not released.is_set():
                self.held = False
                on_lost(reason)
            return

    def _stop_renewing(self) -> None:
        if self._released is not None:
            self._released.set()
            self._released = None

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return self._scripts[name](keys=self._keys, args=list(args))
        except ERRORS as exc:
            raise LeaseError(f"redis unavailable for the source lease ({type(exc).__name__}: {exc})") from None


def _parse_state(text: str) -> dict[str, str]:
    try:
        state = json.loads(text) if text else {}
    except ValueError:
        return {}
    return {k: v for k, v in state.items() if isinstance(v, str)} if isinstance(state, dict) else {}
