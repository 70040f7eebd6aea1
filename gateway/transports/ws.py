"""WebSocket: one JSON text frame per event; frames from the client publish where allowed."""

from __future__ import annotations

import _thread
import fnmatch
import json
import logging
import time
from typing import Any

from flask import Blueprint, Response, g, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed
from werkzeug.routing import WebsocketMismatch
from wsproto.events import Ping
from wsproto.utilities import RemoteProtocolError

from gateway.diagnose import is_diag_channel
from gateway.errors import BadRequest, error_response
from gateway.hub import Hub
from gateway.state import state
from gateway.transports.common import channel_arg, config, hub, since_arg
from gateway.transports.push import Pusher, ws_encode

__all__ = ["bp", "sock", "init_app"]

log = logging.getLogger(__name__)

bp = Blueprint("ws", __name__)
sock = Sock()

SERVICE_RESTART = 1012  # close code: the server is restarting, reconnect
POLICY_VIOLATION = 1008  # close code: no pong to our ping


def init_app(app: Any) -> None:
    cfg = state(app).config
    # No ping_interval: the stream's own greenlet pings (see stream()), so simple-websocket's
    # reader needs no selector and each connection one greenlet less.
    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": cfg.server.max_body_bytes, "thread_class": _HeldReader}


@bp.before_request
def _check_before_upgrade() -> None:
    """Reject bad input with a JSON error before the handshake, while we can still answer HTTP."""
    if request.view_args is not None and "channel" in request.view_args:
        channel = channel_arg(request.view_args["channel"])
        # Where the stream starts, resolved now: a store outage is then a 503, not a broken socket.
        g.ws_cursor = since_arg() or hub().last_id(channel)
    # Refuse permessage-deflate: compressing per connection would undo encode-once fan-out
    # (every frame is written as the same bytes to every subscriber; see push.py).
    request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)


@bp.errorhandler(RemoteProtocolError)
def _bad_handshake(exc: RemoteProtocolError) -> Response:
    """A malformed handshake (no key, a version other than 13) is the client's mistake: 400 and
    the version we speak (RFC 6455 4.4), not a 500."""
    detail = f"not a valid WebSocket handshake ({exc}); use a WebSocket client (RFC 6455, version 13)"
    return error_response(400, "invalid_handshake", detail, {"Sec-WebSocket-Version": "13"})


@bp.get("/ws/", defaults={"channel": ""})
@bp.get("/ws/<path:channel>")
def not_upgraded(channel: str) -> None:
    """A plain request (or a handshake with no channel): _check_before_upgrade has already
    answered bad input with 400, as for every other route; what is left needs an upgrade."""
    raise WebsocketMismatch()


bp.add_url_rule("/ws/", "handshake_without_channel", not_upgraded, defaults={"channel": ""}, websocket=True)


@sock.route("/ws/<path:channel>", bp=bp)
def stream(ws: Any, channel: str) -> None:
    gateway = hub()
    cfg = config()
    cursor = g.ws_cursor
    # Under gevent, simple-websocket works on a dup() of the client socket: two descriptors per
    # connection, which halves how many clients fit under the open-files limit. Use the
    # server's own socket instead (its reader has not started yet, see _HeldReader).
    own = request.environ.get("gateway.socket")
    if own is not None and ws.sock is not own and ws.sock.fileno() != own.fileno():
        ws.sock.close()
        ws.sock = own
    # Events go out through the pusher, straight from the publisher when the socket can take
    # them; every other write (pings, pongs, error frames, close) goes through its lock too.
    pusher = Pusher(ws.sock, "ws", ws_encode, cursor)
    ws.sock = _SendAll(ws.sock, pusher)
    # simple-websocket's reader sets ws.event when a frame arrives or the socket closes: make
    # that wake this stream's greenlet, which then handles the frames itself (no reader thread).
    ws.event = pusher.wakeup
    # A bare thread (a greenlet under gevent): a threading.Thread object costs ~2 KB more.
    _thread.start_new_thread(ws.thread.target, ())
    forward = state().upstream_writers.get(channel)
    allowed = (
        forward is not None
        or is_diag_channel(channel)
        or any(fnmatch.fnmatchcase(channel, p) for p in cfg.websocket.client_publish)
    )
    keepalive = _KeepAlive(ws, cfg.websocket.ping_s)

    def on_wake() -> None:
        while ws.input_buffer:
            _handle_frame(ws, gateway, channel, allowed, forward, ws.input_buffer.pop(0))
        keepalive.ping_if_due()

    with gateway.subscription(channel):
        try:
            pusher.serve(
                gateway,
                channel,
                cfg.poll.max_batch,
                cfg.websocket.ping_s,
                keepalive.ping,
                lambda: ws.connected,
                on_wake,
            )
        except (ConnectionClosed, OSError):  # the client went away mid-write
            return
    if gateway.closing and ws.connected:
        ws.close(SERVICE_RESTART, "server restarting; reconnect with ?since=<last id>")


class _KeepAlive:
    """Pings every ping_s; a client that has not answered the previous ping by the next one is
    closed (as simple-websocket would)."""

    def __init__(self, ws: Any, ping_s: float) -> None:
        self.ws = ws
        self.ping_s = ping_s
        self.next = time.monotonic() + ping_s

    def ping_if_due(self) -> None:
        if time.monotonic() >= self.next:
            self.ping()

    def ping(self) -> None:
        ws = self.ws
        self.next = time.monotonic() + self.ping_s
        if not ws.connected:
            return
        if not ws.pong_received:
            ws.close(POLICY_VIOLATION, "Ping/Pong timeout")
            return
        ws.pong_received = False
        ws.sock.send(ws.ws.send(Ping()))


def _handle_frame(ws: Any, gateway: Hub, channel: str, allowed: bool, forward: Any, message: str | bytes) -> None:
    """A frame from the client: publish (or forward upstream) where allowed, else an error frame."""
    try:
        if not allowed:
            raise BadRequest(
                "publish_not_allowed",
                f"clients may not publish to {channel!r}; add it to websocket.client_publish to allow it",
                403,
            )
        if isinstance(message, bytes):
            try:
                message = message.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest("invalid_frame", "binary frames must be UTF-8 text") from None
        if forward is not None:
            forward(message)
        else:
            data, event = _parse_frame(message)
            gateway.publish(channel, data, event)
    except BadRequest as exc:
        detail = {"error": exc.code, "detail": exc.detail}
        ws.send(json.dumps({"event": "error", "data": json.dumps(detail), **detail}))


def _parse_frame(message: str) -> tuple[str, str]:
    """A JSON object with "data" (and "event") publishes like POST /publish; any other text is
    the data of a `message` event."""
    try:
        obj = json.loads(message)
    except (ValueError, RecursionError):  # not JSON (or nested beyond the parser's stack): plain text
        return message, "message"
    if not isinstance(obj, dict) or "data" not in obj:
        return message, "message"
    data = obj["data"]
    event = obj.get("event", "message")
    if not isinstance(event, str):
        raise BadRequest("invalid_event", "event must be a string")
    if isinstance(data, str):
        return data, event
    try:  # NaN / Infinity parse in Python but are not JSON text
        return json.dumps(data, allow_nan=False), event
    except ValueError:
        raise BadRequest("invalid_json", '"data" holds NaN or Infinity, which JSON cannot carry') from None
    except RecursionError:
        raise BadRequest("invalid_json", '"data" is nested too deeply') from None


class _HeldReader:
    """simple-websocket starts its reader thread as soon as the handshake is done; this holds
    it back until stream() has set the connection up (see there)."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.name = "ws-reader"

    def start(self) -> None:
        pass


class _SendAll:
    """simple-websocket writes with socket.send(), which may write only part of a large frame
    to a slow client; this makes every write whole, and serialises it with the pusher's."""

    def __init__(self, sock: Any, pusher: Pusher) -> None:
        self._sock = sock
        self._pusher = pusher

    def send(self, data: bytes) -> int:
        self._pusher.write(data)
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
