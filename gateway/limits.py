"""Bounds on what one client may take: connection counts and token-bucket rates.

Refusals carry the contract's JSON shape and Retry-After: 429 when one client is over its share,
503 when the whole process is full.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict

from gateway.errors import BadRequest

__all__ = ["Bucket", "TokenBuckets", "over_limit"]


class Bucket:
    """One token bucket (e.g. per connection): two floats, no lock (one greenlet uses it)."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens, self.last = rate, burst, burst, time.monotonic()

    def take(self) -> float:
        """0 if allowed (a token taken), else the seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate if self.rate > 0 else math.inf


class TokenBuckets:
    """A token bucket per key: `burst` at once, refilled at `rate` per second; bounded in keys
    (the least recently seen are forgotten, which only ever forgives)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str, now: float | None = None) -> float:
        """0 if allowed (a token taken), else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate if self.rate > 0 else math.inf
            self._buckets[key] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait


def over_limit(status: int, code: str, detail: str, retry_after_s: float) -> BadRequest:
    retry = str(max(1, math.ceil(min(retry_after_s, 3600))))
    return BadRequest(code, detail, status, {"Retry-After": retry})
