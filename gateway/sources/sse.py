"""An SSE upstream: a streaming GET, parsed as it arrives, each event relayed to the channel.

Reconnects send `Last-Event-ID` (the upstream's last id we relayed) and wait the upstream's
`retry:` after a clean close; events the upstream replays that we already relayed are dropped.
"""

from __future__ import annotations

from typing import Any

import requests

from gateway.config import SourceConfig
from gateway.hub import Hub
from gateway.sources.base import Source, UpstreamError
from gateway.sources.sseparse import SSEParser

__all__ = ["SSESource"]

READ_SIZE = 65536


class SSESource(Source):
    kind = "sse"

    def __init__(self, cfg: SourceConfig, hub: Hub) -> None:
        super().__init__(cfg, hub)
        self.upstream_last_id = ""  # sent as Last-Event-ID on reconnect
        self._http = requests.Session()
        self._http.trust_env = False
        self._response: Any = None

    def _session(self) -> None:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache", **self.headers}
        if self.upstream_last_id:
            headers["Last-Event-ID"] = self.upstream_last_id
        # No read timeout: an event stream may rightly be quiet for a long time.
        resp = self._http.get(self.cfg.url, headers=headers, stream=True, timeout=(self.cfg.timeout_s, None))
        self._response = resp
        try:
            if self._stop.is_set() or not self._wanted:
                return
            _check(resp)
            self._connected()
            parser = SSEParser(self.cfg.max_event_bytes)
            parser.last_id = parser.dispatched_id = self.upstream_last_id
            oversized = 0
            while self._active():
                chunk = resp.raw.read1(READ_SIZE)
                if not chunk:
                    return  # the upstream closed the stream
                for message in parser.feed(chunk):
                    self._relay(message.data, message.event, message.id)
                    # Only after the publish succeeded: a failed one is replayed on reconnect.
                    self.upstream_last_id = message.last_id
                self.upstream_last_id = parser.dispatched_id  # also id-only blocks and dropped events
                if parser.oversized != oversized:
                    self._drop("an event over max_event_bytes", parser.oversized - oversized)
                    oversized = parser.oversized
                if parser.retry_ms is not None:
                    self.retry_s = parser.retry_ms / 1000
        finally:
            self._response = None
            resp.close()

    def _interrupt(self) -> None:
        resp = self._response
        if resp is not None:
            try:
                resp.raw.shutdown()  # wakes a read blocked on the socket
            except Exception:
                pass
            try:
                resp.close()
            except Exception:
                pass


def _check(resp: requests.Response) -> None:
    """Only a 200 text/event-stream is an event stream; anything else is an error to back off on."""
    ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if resp.status_code != 200:
        raise UpstreamError(f"upstream answered HTTP {resp.status_code} {resp.reason or ''}".strip())
    if ctype != "text/event-stream":
        raise UpstreamError(f"upstream answered {ctype or 'no content type'}, not text/event-stream")
