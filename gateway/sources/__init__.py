"""Upstream sources: each configured `[[sources]]` entry feeds one channel (sse, poll, websocket)."""

from __future__ import annotations

from flask import Flask

from gateway.config import SourceConfig
from gateway.hub import Hub
from gateway.sources.base import Source, UpstreamError
from gateway.sources.poll import PollSource
from gateway.sources.sse import SSESource
from gateway.sources.websocket import WebSocketSource
from gateway.state import state

__all__ = ["init_app", "make_source", "Source", "UpstreamError", "SSESource", "PollSource", "WebSocketSource"]

KINDS: dict[str, type[Source]] = {"sse": SSESource, "poll": PollSource, "websocket": WebSocketSource}


def make_source(cfg: SourceConfig, hub: Hub) -> Source:
    return KINDS[cfg.kind](cfg, hub)


def init_app(app: Flask) -> None:
    """Build one source per config entry as a service; /status reads them from the app."""
    st = state(app)
    hub, config = st.hub, st.config
    sources = [make_source(cfg, hub) for cfg in config.sources]
    if config.redis.url and sources:
        # Processes share channels through Redis: each upstream is relayed by the one holding its lease.
        from gateway.sources.lease import LeaseStore  # lazily: only a Redis deployment needs it

        timeout = min(2.0, max(0.1, min(s.cfg.lease_ttl_s for s in sources) / 4))
        leases = LeaseStore(config.redis, timeout)
        for source in sources:
            source.use_lease(leases.lease(source.cfg))
    st.sources = sources
    st.services.extend(sources)
    for source in sources:
        if isinstance(source, WebSocketSource) and source.cfg.forward_client_messages:
            st.upstream_writers[source.cfg.channel] = source.send
