"""Server-Sent Events: one long response, events as `id:`/`event:`/`data:` blocks."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, request

from gateway.hub import Hub, gap_event
from gateway.transports.common import channel_arg, config, hub, since_arg
from gateway.transports.push import Pusher, chunk, sse_encoder

__all__ = ["bp"]

bp = Blueprint("sse", __name__)

HEARTBEAT = b": heartbeat\n\n"
# On shutdown: come back soon (to this or another instance); Last-Event-ID resumes the stream.
RECONNECT_HINT = b"retry: 1000\n\n"


@bp.get("/sse/", defaults={"channel": ""})
@bp.get("/sse/<path:channel>")
def stream(channel: str) -> Response:
    channel = channel_arg(channel)
    since = since_arg(header=True)
    gateway = hub()
    cfg = config()
    cursor = since if since is not None else gateway.last_id(channel)
    head = b""
    # ?padding=<bytes> (0-65536; unparseable -> the config's) lets /diagnose test whether padding helps.
    padding = min(max(request.args.get("padding", cfg.sse.padding_bytes, type=int), 0), 65536)
    if padding:
        # Some proxies and old browsers hold the first few KB back; a comment pushes it through.
        head += b":" + b" " * padding + b"\n\n"
    head += f"retry: {cfg.sse.retry_ms}\n\n".encode()
    body = _events(gateway, channel, cursor, head, cfg.sse.heartbeat_s, cfg.poll.max_batch, request.environ)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(body, mimetype="text/event-stream", headers=headers, direct_passthrough=True)


def _events(
    gateway: Hub, channel: str, cursor: str, head: bytes, heartbeat_s: float, limit: int, environ: dict
) -> Iterator[bytes]:
    with gateway.subscription(channel):
        yield head  # the server sends the headers with it; from here on the socket is ours
        sock, chunked = environ.get("gateway.socket"), environ.get("gateway.chunked")
        if sock is not None and chunked is not None:
            kind, encode = sse_encoder(chunked())
            pusher = Pusher(sock, kind, encode, cursor)
            heartbeat = chunk(HEARTBEAT) if chunked() else HEARTBEAT
            try:
                pusher.serve(gateway, channel, limit, heartbeat_s, lambda: pusher.write(heartbeat))
            except OSError:  # the client went away
                return
        else:  # served by something other than gateway.server: the plain loop
            while not gateway.closing:
                batch = gateway.wait(channel, cursor, heartbeat_s, limit)
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
        yield RECONNECT_HINT
