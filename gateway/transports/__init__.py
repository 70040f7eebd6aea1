"""Client transports: one module each, all reading the same channels through the hub."""

from gateway.transports import poll, sse, ws

__all__ = ["poll", "sse", "ws", "BLUEPRINTS"]

BLUEPRINTS = (poll.bp, sse.bp, ws.bp)
