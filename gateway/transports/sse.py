"""Server-Sent Events: one long response, events as `id:`/`event:`/`data:` blocks."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, request

from gateway.admission import Ticket
from gateway.config import Config
from gateway.hub import Hub, gap_event
from gateway.readwatch import ReadWatch, park, parkable, watchable
from gateway.transports.common import (
    admission,
    admit,
    alive_until_expiry,
    config,
    end_detached,
    hub,
    idle_until_expiry,
    positions,
)
from gateway.transports.multipush import MultiPusher
from gateway.transports.push import (
    Pusher,
    Rounds,
    SlowConsumer,
    bound_send_buffer,
    chunk,
    run_blocking,
    sse_encoder,
)

__all__ = ["bp"]

bp = Blueprint("sse", __name__)

HEARTBEAT = b": heartbeat\n\n"
# On shutdown: come back soon (to this or another instance); Last-Event-ID resumes the stream.
RECONNECT_HINT = b"retry: 1000\n\n"
EXPIRED = b": token expired; reconnect with a fresh token and Last-Event-ID to resume\n\n"
SLOW = b": disconnected: this client fell too far behind (limits.slow_consumer_bytes); reconnect with Last-Event-ID\n\n"
MAX_PADDING = 65536


@bp.get("/sse/", defaults={"channel": ""})
@bp.get("/sse/<path:channel>")
def stream(channel: str) -> Response:
    ticket = admit("sse", channel)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if request.method == "HEAD":  # a GET's headers (once admitted), and no stream behind them
        return Response(b"", mimetype="text/event-stream", headers=headers)
    gateway = hub()
    cfg = config()
    starts = positions(ticket, gateway)
    head = b""
    padding = cfg.sse.padding_bytes
    # ?padding=<bytes> lets /diagnose test whether padding helps; only on channels whose policy
    # is the probes' (elsewhere it would let anyone amplify a tiny request into 64 KB answers).
    if all(admission().policy(c) is not None for c in ticket.channels):
        padding = min(max(request.args.get("padding", padding, type=int), 0), MAX_PADDING)
    if padding:
        # Some proxies and old browsers hold the first few KB back; a comment pushes it through.
        head += b":" + b" " * padding + b"\n\n"
    head += f"retry: {cfg.sse.retry_ms}\n\n".encode()
    body = _events(gateway, ticket, starts, head, cfg, request.environ)
    return Response(body, mimetype="text/event-stream", headers=headers, direct_passthrough=True)


def _events(
    gateway: Hub, ticket: Ticket, starts: dict[str, str], head: bytes, cfg: Config, environ: dict
) -> Iterator[bytes]:
    """The stream's body; runs after the view has returned, outside the app context. The server
    closes it however the stream ends, which closes the ticket, unless the stream took the
    connection over (then _end() closes both)."""
    ticket.open()
    owned = True  # False once the stream has the connection (and the ticket) to itself
    try:
        yield head  # the server sends the headers with it; from here on the socket is ours
        sock, chunked = environ.get("gateway.socket"), environ.get("gateway.chunked")
        if sock is not None and chunked is not None:
            framed = chunked()
            pusher, rounds = _stream(gateway, ticket, starts, cfg, sock, framed)
            detach = environ.get("gateway.detach")
            if detach is not None and parkable(pusher.wakeup):
                # No greenlet while the stream waits: an idle stream costs its few objects.
                release = detach()
                owned = False
                park(rounds, lambda tail: end_detached(ticket, sock, _last_chunks(tail, framed), release))
                return
            tail = run_blocking(rounds)
            if tail:
                yield tail
            return
        # Served by something other than gateway.server: the plain loop (one channel).
        heartbeat_s, limit = cfg.sse.heartbeat_s, cfg.poll.max_batch
        ((channel, cursor),) = starts.items()
        while not gateway.closing and alive_until_expiry(ticket):
            batch = gateway.wait(channel, cursor, idle_until_expiry(ticket, heartbeat_s), limit)
            if batch.gap:
                data = gap_event(batch, cursor).sse + b"".join(e.sse for e in batch.events)
            elif batch.events:
                data = b"".join(e.sse for e in batch.events)
            elif gateway.closing:
                break
            else:
                data = HEARTBEAT
            cursor = batch.cursor
            yield data
        yield EXPIRED if not alive_until_expiry(ticket) else RECONNECT_HINT
    finally:
        if owned:
            ticket.close()


def _stream(
    gateway: Hub, ticket: Ticket, starts: dict[str, str], cfg: Config, sock: Any, framed: bool
) -> tuple[Pusher | MultiPusher, Rounds[bytes]]:
    """The stream on the fast path (push.py): its pusher, and its rounds, which end with the
    last words (unframed) for the client."""
    heartbeat_s, limit, slow_bytes = cfg.sse.heartbeat_s, cfg.poll.max_batch, cfg.limits.slow_consumer_bytes
    bound_send_buffer(sock, slow_bytes)
    pusher: Pusher | MultiPusher
    if ticket.multi:
        pusher = MultiPusher(sock, "sse", starts, framed)
    else:
        kind, encode = sse_encoder(framed)
        pusher = Pusher(sock, kind, encode, *starts.values())
    pusher.slow_bytes = slow_bytes
    return pusher, _rounds(gateway, ticket, sock, pusher, limit, heartbeat_s, framed)


def _rounds(
    gateway: Hub, ticket: Ticket, sock: Any, pusher: Pusher | MultiPusher, limit: int, heartbeat_s: float, framed: bool
) -> Rounds[bytes]:
    heartbeat = chunk(HEARTBEAT) if framed else HEARTBEAT
    alive = lambda: alive_until_expiry(ticket)  # noqa: E731
    idle = lambda: idle_until_expiry(ticket, heartbeat_s)  # noqa: E731
    hangup = _watch_for_hangup(sock, pusher)
    try:
        if isinstance(pusher, MultiPusher):
            yield from pusher.rounds(gateway, limit, idle, lambda: pusher.write(heartbeat), alive)
        else:
            yield from pusher.rounds(gateway, ticket.channels[0], limit, idle, lambda: pusher.write(heartbeat), alive)
    except SlowConsumer:
        ticket.end_reason = "slow_consumer"
        _try_send(sock, chunk(SLOW) if framed else SLOW)
        return b""
    except OSError:  # the client went away (or was cut as a slow consumer)
        if pusher.slow:
            ticket.end_reason = "slow_consumer"
        return b""
    finally:
        if hangup is not None:
            hangup.close()
        ticket.bytes_sent, ticket.events_sent = pusher.bytes_sent, pusher.events_sent
    if not alive_until_expiry(ticket):
        ticket.end_reason = "token_expired"
        return EXPIRED
    if gateway.closing:
        ticket.end_reason = "shutdown"
    return RECONNECT_HINT


def _last_chunks(tail: bytes | None, framed: bool) -> bytes:
    """A detached stream's last words and, chunked, the body's last chunk; nothing when the
    client is gone or was cut (no tail)."""
    if not tail:
        return b""
    return chunk(tail) + b"0\r\n\r\n" if framed else tail


def _watch_for_hangup(sock: Any, pusher: Pusher | MultiPusher) -> ReadWatch | None:
    """An SSE client sends nothing once its request is in, so its socket turning readable means
    it hung up (EOF or reset): the stream ends now, not at the next heartbeat's failed write
    (up to two heartbeats later), and stops counting against the connection limits."""
    if not watchable(sock):
        return None
    raw = sock._sock

    def on_readable() -> None:
        try:
            data = raw.recv(1, socket.MSG_PEEK)  # peek: bytes, if any, stay where they are
        except BlockingIOError:
            watch.start()  # nothing after all: keep watching
            return
        except OSError:
            data = b""
        if data:
            return  # bytes after the request (pipelined?): not a hang-up; heartbeats will tell
        pusher.dead = True
        pusher.hold += 1  # the hub writes to it no more
        pusher.wake()

    watch = ReadWatch(sock, on_readable)
    watch.start()
    return watch


def _try_send(sock: object, data: bytes) -> None:
    """A last word to a client we are dropping; if its socket cannot take it now, never mind."""
    raw = getattr(sock, "_sock", None)
    try:
        if raw is not None:
            raw.send(data)
    except OSError:
        pass
