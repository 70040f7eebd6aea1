"""Asking the app: GET <auth.upstream_url>?channel=<name>&transport=<t> with the client's Cookie
and Authorization. 2xx allows, 401/403 refuse with that status, anything else (or silence past
the timeout) is 503: never an allow. Answers are cached briefly per credential and channel, so a
short poller does not call the app every second; the cache is bounded (oldest dropped first).
A request that names several private channels shares one timeout among its questions (see
`budget`): fifty channels cannot hold a request for fifty timeouts."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict

import requests
from urllib3.util import Timeout

__all__ = ["AppAuthorizer", "ALLOW", "UNAVAILABLE"]

log = logging.getLogger(__name__)

ALLOW = 200
UNAVAILABLE = 503


class AppAuthorizer:
    def __init__(self, url: str, timeout_s: float, cache_s: float, cache_size: int) -> None:
        self._url = url
        self._timeout = timeout_s
        self._cache_s = cache_s
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str, str], tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._http = requests.Session()
        self._http.trust_env = False  # the app is named in config, never reached through env proxies
        self._next_error_log = 0.0

    def budget(self) -> float:
        """The deadline (monotonic) for one request's questions: auth.upstream_timeout_s from now."""
        return time.monotonic() + self._timeout

    def decide(
        self,
        channel: str,
        transport: str,
        cookie: str | None,
        authorization: str | None,
        deadline: float | None = None,
    ) -> int:
        """ALLOW, 401, 403 or UNAVAILABLE for this credential reading this channel; a question
        that would start past `deadline` (see budget) is UNAVAILABLE without asking."""
        key = (_credential_key(cookie, authorization), channel, transport)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        left = self._timeout if deadline is None else min(self._timeout, deadline - now)
        if left <= 0.01:
            self._warn("took the whole auth.upstream_timeout_s for this request's channels")
            return UNAVAILABLE
        status = self._ask(channel, transport, cookie, authorization, left)
        if status != UNAVAILABLE and self._cache_s > 0:  # an outage is never remembered
            with self._lock:
                self._cache[key] = (now + self._cache_s, status)
                self._cache.move_to_end(key)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return status

    def _ask(self, channel: str, transport: str, cookie: str | None, authorization: str | None, left: float) -> int:
        headers = {}
        if cookie:
            headers["Cookie"] = cookie
        if authorization:
            headers["Authorization"] = authorization
        try:
            r = self._http.get(
                self._url,
                params={"channel": channel, "transport": transport},
                headers=headers,
                timeout=Timeout(total=left),  # connect and reading the head, together
                allow_redirects=False,
                stream=True,
            )
            r.close()  # only the status matters; never read an unbounded body
        except requests.RequestException as exc:
            self._warn(f"no answer ({type(exc).__name__})")
            return UNAVAILABLE
        if 200 <= r.status_code < 300:
            return ALLOW
        if r.status_code in (401, 403):
            return r.status_code
        self._warn(f"answered {r.status_code}")
        return UNAVAILABLE

    def _warn(self, what: str) -> None:
        now = time.monotonic()
        if now >= self._next_error_log:  # at most one line every few seconds, however many fail
            self._next_error_log = now + 5.0
            log.warning("auth.upstream_url %s; refusing with 503 until it answers 2xx/401/403", what)


def _credential_key(cookie: str | None, authorization: str | None) -> str:
    """A digest, so the cache never holds a credential in clear."""
    raw = f"{cookie or ''}\n{authorization or ''}".encode()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()
