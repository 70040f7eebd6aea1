"""Server-Sent Events: one long response, events as `id:`/`event:`/`data:` blocks."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, request

from gateway.admission import Ticket
from gateway.hub import Hub, gap_event
from gateway.transports.common import admission, admit, alive_until_expiry, config, hub, idle_until_expiry, positions
from gateway.transports.multipush import MultiPusher
from gateway.transports.push import Pusher, chunk, sse_encoder

__all__ = ["bp"]

bp = Blueprint("sse", __name__)

HEARTBEAT = b": heartbeat\n\n"
# On shutdown: come back soon (to this or another instance); Last-Event-ID resumes the stream.
RECONNECT_HINT = b"retry: 1000\n\n"
EXPIRED = b": token expired; reconnect with a fresh token and Last-Event-ID to resume\n\n"
MAX_PADDING = 65536


@bp.get("/sse/", defaults={"channel": ""})
@bp.get("/sse/<path:channel>")
def stream(channel: str) -> Response:
    ticket = admit("sse", channel)
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
    body = _events(gateway, ticket, starts, head, cfg.sse.heartbeat_s, cfg.poll.max_batch, request.environ)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    response = Response(body, mimetype="text/event-stream", headers=headers, direct_passthrough=True)
    response.call_on_close(ticket.close)  # however the stream ends, even before its first byte
    return response


def _events(
    gateway: Hub, ticket: Ticket, starts: dict[str, str], head: bytes, heartbeat_s: float, limit: int, environ: dict
) -> Iterator[bytes]:
    ticket.open()
    yield head  # the server sends the headers with it; from here on the socket is ours
    sock, chunked = environ.get("gateway.socket"), environ.get("gateway.chunked")
    if sock is not None and chunked is not None:
        framed = chunked()
        heartbeat = chunk(HEARTBEAT) if framed else HEARTBEAT
        alive = lambda: alive_until_expiry(ticket)  # noqa: E731
        idle = lambda: idle_until_expiry(ticket, heartbeat_s)  # noqa: E731
        try:
            if ticket.multi:
                multi = MultiPusher(sock, "sse", starts, framed)
                multi.serve(gateway, limit, idle, lambda: multi.write(heartbeat), alive)
            else:
                ((channel, cursor),) = starts.items()
                kind, encode = sse_encoder(framed)
                pusher = Pusher(sock, kind, encode, cursor)
                pusher.serve(gateway, channel, limit, idle, lambda: pusher.write(heartbeat), alive)
        except OSError:  # the client went away
            return
        if not alive_until_expiry(ticket):
            ticket.end_reason = "token_expired"
            yield chunk(EXPIRED) if framed else EXPIRED
            return
    else:  # served by something other than gateway.server: the plain loop (one channel)
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
        if not alive_until_expiry(ticket):
            yield EXPIRED
            return
    ticket.end_reason = "shutdown" if gateway.closing else ticket.end_reason
    yield RECONNECT_HINT
