"""A poll upstream: GET the URL every `interval` seconds and publish only what changed.

Conditional requests (If-None-Match / If-Modified-Since) let the upstream answer 304; a body
identical to the last one is not published either. With `items = true` the body must be a JSON
array and each item not seen before becomes one event (keyed by `id_field`, or by its content).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import requests

from gateway.config import SourceConfig
from gateway.hub import Hub
from gateway.sources.base import RecentIds, Source, UpstreamError

__all__ = ["PollSource"]

READ_SIZE = 65536


class PollSource(Source):
    kind = "poll"

    def __init__(self, cfg: SourceConfig, hub: Hub) -> None:
        super().__init__(cfg, hub)
        self._etag = ""
        self._last_modified = ""
        self._digest = b""
        self.seen_items = RecentIds(10_000)
        self._http = requests.Session()
        self._http.trust_env = False
        self._response: Any = None

    def _session(self) -> None:
        while self._active():
            started = time.monotonic()
            self._poll_once()
            self._connected()
            self._pause(max(0.0, self.cfg.interval - (time.monotonic() - started)))

    def _poll_once(self) -> None:
        headers = dict(self.headers)
        if self._etag:
            headers["If-None-Match"] = self._etag
        if self._last_modified:
            headers["If-Modified-Since"] = self._last_modified
        resp = self._http.get(self.cfg.url, headers=headers, stream=True, timeout=self.cfg.timeout_s)
        self._response = resp
        try:
            if resp.status_code == 304:
                return
            if resp.status_code != 200:
                raise UpstreamError(f"upstream answered HTTP {resp.status_code} {resp.reason or ''}".strip())
            body = self._read_body(resp)
            validators = resp.headers.get("ETag", ""), resp.headers.get("Last-Modified", "")
        finally:
            self._response = None
            resp.close()
        if body is None:
            # Too big: remember the validators so an unchanged body is not fetched and counted again.
            self._etag, self._last_modified = validators
            return
        digest = hashlib.sha256(body).digest()
        if digest != self._digest:
            self._publish(body)
        # Only now: a failed publish leaves them unset, so the next poll fetches it again.
        self._digest = digest
        self._etag, self._last_modified = validators

    def _read_body(self, resp: requests.Response) -> bytes | None:
        """The body, or None when it is over max_event_bytes. The whole read must finish within
        timeout_s, so an upstream that trickles cannot hold the source forever."""
        deadline = time.monotonic() + self.cfg.timeout_s
        limit = self.cfg.max_event_bytes
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = resp.raw.read1(READ_SIZE, decode_content=True)
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                self._drop(f"a response over max_event_bytes ({limit} bytes)")
                return None
            parts.append(chunk)
            if time.monotonic() > deadline:
                raise UpstreamError(f"upstream took over timeout_s ({self.cfg.timeout_s} s) to send its body")

    def _publish(self, body: bytes) -> None:
        text = body.decode("utf-8", "replace")
        if not self.cfg.items:
            self._relay(text)
            return
        try:
            items = json.loads(text)
        except ValueError:
            raise UpstreamError("upstream body is not JSON, but items = true expects a JSON array") from None
        if not isinstance(items, list):
            raise UpstreamError(f"upstream JSON is a {type(items).__name__}, but items = true expects an array")
        self.seen_items.capacity = max(10_000, 2 * len(items))
        for item in items:
            key = self._key(item)
            if key in self.seen_items:
                continue
            data = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
            self._relay(data)
            self.seen_items.add(key)

    def _key(self, item: Any) -> str:
        field = self.cfg.id_field
        if field and isinstance(item, dict) and field in item:
            return "id:" + json.dumps(item[field])
        return "body:" + json.dumps(item, sort_keys=True)

    def _interrupt(self) -> None:
        resp = self._response
        if resp is not None:
            try:
                resp.close()
            except Exception:
                pass
