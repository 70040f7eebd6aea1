"""Redis channel store: channels and their history live in Redis Streams, so any number of
gateway processes share them.

Each channel is one stream (`<prefix>c:{<channel>}`: the hash tag keeps all of a channel's keys
on one cluster shard); Redis issues the "<ms>-<seq>" ids, which grow per stream even across
clock hiccups. Every entry records the id of the entry before it
("p"), so gap detection is as exact as the memory store's. Appending and reading are each one
Lua script (one round trip, atomic). An append PUBLISHes "<node> <channel>" on
`<prefix>notify`; every process listens there and wakes its local readers of that channel.
The append script also trims history (count, age, bytes: `<prefix>b:{<channel>}` counts them)
and honours Idempotency-Key: `<prefix>i:{<channel>}:<key>` holds the first event's id for
max_age, and a repeat stores nothing, whichever process it reaches.

Faults: a Redis error becomes BadRequest("backend_unavailable", ..., 503) at this boundary.
The one exception is a streaming reader (SSE, WebSocket, held long poll) that already holds a
cursor: it is told "nothing new yet", keeps its connection, and is woken when the listener has
reconnected, so streams outlive a short Redis outage instead of dropping every client at once.

The parts: connection.py (clients, timeouts, TLS, error mapping), scripts.py (the Lua scripts),
listener.py (the cross-process wake-ups), store.py (the Store protocol on top of them).
"""

from gateway.hub.redis.store import RedisStore

__all__ = ["RedisStore"]
