"""Channels: the Hub (fan-out, waiting, subscriber counts) over a Store (history and ids)."""

from __future__ import annotations

from gateway.config import Config
from gateway.hub.events import Batch, Event, gap_event
from gateway.hub.hub import Hub, Observer, Store, WaitAbandoned
from gateway.hub.memory import MemoryStore

__all__ = ["Hub", "Store", "Observer", "Event", "Batch", "gap_event", "MemoryStore", "make_hub", "WaitAbandoned"]


def make_hub(config: Config) -> Hub:
    """A hub on the store the config names: Redis when redis.url is set, else memory."""
    if config.redis.url:
        from gateway.hub.redis import RedisStore  # imported lazily: redis is optional

        redis = config.redis
        store = RedisStore(
            redis.url,
            config.history.size,
            config.history.max_age_s,
            prefix=redis.prefix,
            tls_verify=redis.tls_verify,
            max_connections=redis.max_connections,
            max_bytes=config.history.max_bytes,
            cluster=redis.cluster,
        )
        hub = Hub(store)
        store.attach(hub)
        return hub
    history = config.history
    return Hub(MemoryStore(history.size, history.max_age_s, max_bytes=history.max_bytes))
