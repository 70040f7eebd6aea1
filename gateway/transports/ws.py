"""WebSocket: one JSON text frame per event; frames from the client publish where allowed, or
subscribe and unsubscribe channels on the open socket."""

from __future__ import annotations

import _thread
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, g, request
from simple_websocket import ConnectionClosed, Server
from werkzeug.routing import WebsocketMismatch
from wsproto.events import Ping
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from gateway.admission import Admission, Ticket
from gateway.errors import BadRequest, error_response
from gateway.heads import forget_unread_headers
from gateway.hub import Hub
from gateway.limits import Bucket
from gateway.readwatch import ReadWatch, park, parkable, watchable
from gateway.state import state
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
from gateway.transports.push import Pusher, Rounds, SlowConsumer, bound_send_buffer, run_blocking, ws_encode

__all__ = ["bp", "init_app"]

log = logging.getLogger(__name__)

bp = Blueprint("ws", __name__)

SERVICE_RESTART = 1012  # close code: the server is restarting, reconnect
POLICY_VIOLATION = 1008  # close code: no pong to our ping, or the token expired
TRY_AGAIN_LATER = 1013  # close code: a slow consumer, dropped; it may resume
INPUT_BUFFER_BYTES = 256 * 1024  # client frames waiting to be handled; the reader stops above it
INPUT_BUFFER_FRAMES = 64
FRAMES_PER_ROUND = 16  # client frames handled before the stream yields to others


def init_app(app: Any) -> None:
    cfg = state(app).config
    # No ping_interval: the stream's own greenlet pings (see stream()), so simple-websocket's
    # reader needs no selector and each connection one greenlet less.
    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": cfg.server.max_body_bytes, "thread_class": _HeldReader}


@bp.before_request
def _check_before_upgrade() -> None:
    """Admit (or refuse with a JSON error) before the handshake, while we can still answer HTTP."""
    if request.view_args is not None and "channel" in request.view_args:
        ticket = admit("ws", request.view_args["channel"])
        # Where the stream starts, resolved now: a store outage is then a 503, not a broken socket.
        g.ws_positions = positions(ticket, hub())
        g.ws_ticket = ticket
    # Refuse permessage-deflate: compressing per connection would undo encode-once fan-out
    # (every frame is written as the same bytes to every subscriber; see push.py).
    request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)


@bp.teardown_request
def _release(exc: BaseException | None) -> None:
    ticket = g.pop("ws_ticket", None)
    if ticket is not None:
        ticket.close()


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


@bp.route("/ws/<path:channel>", websocket=True)
def stream(channel: str) -> Response:
    ws = Server(request.environ, **current_app.config.get("SOCK_SERVER_OPTIONS", {}))  # sends the 101
    forget_unread_headers(request.environ)  # the handshake is done; the stream may last for hours
    conn = _Connection(ws, g.ws_ticket, g.ws_positions, request.environ)
    if ws.mode != "gevent":  # another server (e.g. werkzeug's): serve it here, as flask-sock does
        _serve(conn)
        return Response() if ws.mode == "werkzeug" else _Upgraded(None)
    # Served after the view has returned, as an SSE body is: Flask's contexts (and their share
    # of the greenlet's saved stack) are gone while the connection lives. It closes the ticket.
    g.pop("ws_ticket")
    return _Upgraded(conn)


class _Upgraded(Response):
    """The answer of a view that has done the handshake: the WSGI server gets no status and no
    headers (the 101 is written), and a body that runs the connection (when conn is given)."""

    def __init__(self, conn: _Connection | None) -> None:
        super().__init__()
        self._conn = conn

    def __call__(self, environ: dict, start_response: Any) -> Any:
        return [] if self._conn is None else _body(self._conn, environ)


def _body(conn: _Connection, environ: dict) -> Iterator[bytes]:
    detach = environ.get("gateway.detach")
    if detach is not None and parkable(conn.pusher.wakeup):
        # No greenlet while the socket is idle: a frame, an event or a ping runs a round.
        _forget_handshake(conn.ws)
        release = detach()
        park(_life(conn), lambda _: end_detached(conn.ticket, conn.raw_sock, b"", release))
        return
    try:
        _serve(conn)
    finally:
        conn.ticket.close()
    yield from ()


def _forget_handshake(ws: Any) -> None:
    """Drop what only the handshake needed and an idle socket would keep for its whole life:
    the request (simple-websocket keeps the environ) and wsproto's HTTP/1.1 parser (~2 KB)."""
    ws.environ = None
    handshake = getattr(ws.ws, "handshake", None)
    if getattr(ws.ws, "connection", None) is not None and hasattr(handshake, "_h11_connection"):
        handshake._h11_connection = None  # used only until the connection is established
        handshake._initiating_request = None


def _serve(conn: _Connection) -> None:
    run_blocking(_life(conn))


def _life(conn: _Connection) -> Rounds[None]:
    try:
        yield from conn.rounds()
    except ConnectionClosed:
        pass
    try:
        conn.ws.close()
    except Exception:  # noqa: BLE001 (closed already, or the client is gone)
        pass


class _Connection:
    """One WebSocket: a pusher for its channel(s), client frames, pings, token expiry."""

    __slots__ = (
        "ws",
        "ticket",
        "hub",
        "admission",
        "cfg",
        "upstream_writers",
        "raw_sock",
        "pusher",
        "io",
        "room",
        "keepalive",
        "publish_rate",
        "switch_to_multi",
        "pending",
        "reader",
    )

    def __init__(self, ws: Any, ticket: Ticket, starts: dict[str, str], environ: dict) -> None:
        self.ws = ws
        self.ticket = ticket
        self.hub: Hub = hub()
        self.admission: Admission = admission()
        self.cfg = config()
        self.upstream_writers = state().upstream_writers
        # Under gevent, simple-websocket works on a dup() of the client socket: two descriptors
        # per connection, which halves how many clients fit under the open-files limit. Use the
        # server's own socket instead (its reader has not started yet, see _HeldReader).
        own = environ.get("gateway.socket")
        if own is not None and ws.sock is not own and ws.sock.fileno() != own.fileno():
            ws.sock.close()
            ws.sock = own
        self.raw_sock = ws.sock
        bound_send_buffer(ws.sock, self.cfg.limits.slow_consumer_bytes)
        self.pusher: Pusher | MultiPusher = (
            MultiPusher(ws.sock, "ws", starts) if ticket.multi else Pusher(ws.sock, "ws", ws_encode, *starts.values())
        )
        self.pusher.slow_bytes = self.cfg.limits.slow_consumer_bytes
        # Events go out through the pusher, straight from the publisher when the socket can take
        # them; every other write (pings, pongs, error frames, close) goes through its lock too.
        self.io = _SocketIO(ws.sock, self)
        ws.sock = self.io
        # simple-websocket's reader sets ws.event when a frame arrives or the socket closes:
        # make that wake this stream's greenlet, which then handles the frames itself.
        ws.event = self.pusher.wakeup
        self.room: threading.Event | None = None  # made when the reader first waits for room
        self.keepalive = _KeepAlive(ws, self.cfg.websocket.ping_s)
        rate = self.cfg.limits.ws_publish_rate
        self.publish_rate = Bucket(rate, max(1.0, 4 * rate)) if rate else None
        self.switch_to_multi = False
        self.pending: tuple[str, str] = ("", "")  # the channel a single-channel socket subscribed to
        self.reader: _FrameReader | None = None

    def rounds(self) -> Rounds[None]:
        """The connection's life (see push.py's Rounds)."""
        ws, ticket = self.ws, self.ticket
        if watchable(self.raw_sock):
            # No greenlet waits on an idle socket: a watcher notices the client's frames.
            self.reader = _FrameReader(self)
            self.reader.start()
        else:
            # A bare thread (a greenlet under gevent): a threading.Thread object costs ~2 KB more.
            _thread.start_new_thread(ws.thread.target, ())
        ticket.open()
        ping_s = self.cfg.websocket.ping_s
        try:
            while True:
                pusher = self.pusher
                alive = lambda: ws.connected and alive_until_expiry(ticket) and not self.switch_to_multi  # noqa: E731
                idle = lambda: idle_until_expiry(ticket, ping_s)  # noqa: E731
                limit, ping = self.cfg.poll.max_batch, self.keepalive.ping
                if isinstance(pusher, MultiPusher):
                    yield from pusher.rounds(self.hub, limit, idle, ping, alive, self.on_wake)
                else:
                    yield from pusher.rounds(self.hub, ticket.channels[0], limit, idle, ping, alive, self.on_wake)
                if not self.switch_to_multi:
                    break
                self._become_multi()
        except SlowConsumer:
            ticket.end_reason = "slow_consumer"
            self._close_quietly(TRY_AGAIN_LATER, "slow consumer: fell too far behind; reconnect with ?since=<cursor>")
            return
        except (ConnectionClosed, OSError):  # the client went away mid-write (or was cut as too slow)
            if self.pusher.slow:
                ticket.end_reason = "slow_consumer"
            return
        finally:
            ticket.bytes_sent, ticket.events_sent = self.pusher.bytes_sent, self.pusher.events_sent
            if self.reader is not None:
                self.reader.stop()  # before the server closes the socket under its watcher
        if ws.connected and not alive_until_expiry(ticket):
            ticket.end_reason = "token_expired"
            ws.close(POLICY_VIOLATION, "token expired; reconnect with a fresh token and ?since=<cursor>")
        elif self.hub.closing and ws.connected:
            ticket.end_reason = "shutdown"
            ws.close(SERVICE_RESTART, "server restarting; reconnect with ?since=<last id>")

    # -- client frames --------------------------------------------------------------------------
    def on_wake(self) -> None:
        ws = self.ws
        handled = 0
        while ws.input_buffer and handled < FRAMES_PER_ROUND and not self.switch_to_multi:
            if self.publish_rate is not None and self.publish_rate.take():
                break  # over the rate: leave the rest buffered (the reader stops when it is full)
            message = ws.input_buffer.pop(0)
            if self.room is not None:
                self.room.set()
            self._handle_frame(message)
            handled += 1
        if ws.input_buffer:
            self.pusher.wake()  # more to do: another round, after others had their turn
            time.sleep(0.05 if handled == 0 else 0)
        self.keepalive.ping_if_due()

    def _handle_frame(self, message: str | bytes) -> None:
        try:
            if isinstance(message, bytes):
                try:
                    message = message.decode("utf-8")
                except UnicodeDecodeError:
                    raise BadRequest("invalid_frame", "binary frames must be UTF-8 text") from None
            obj = _json_object(message)
            if obj is not None and "action" in obj:
                self._control(obj)
                return
            channel = self._publish_channel(obj)
            self._publish(channel, message, obj)
        except BadRequest as exc:
            self._send_error(exc)

    def _publish_channel(self, obj: dict | None) -> str:
        """A publishing frame goes to its "channel" (multi-channel connections must name one)."""
        named = obj.get("channel") if obj is not None else None
        if named is not None:
            if not isinstance(named, str) or named not in self.ticket.channels:
                raise BadRequest("invalid_channel", "publish only to a channel this connection follows")
            return named
        if len(self.ticket.channels) != 1:
            raise BadRequest("channel_required", 'this connection follows several channels: add "channel" to the frame')
        return self.ticket.channels[0]

    def _publish(self, channel: str, message: str, obj: dict | None) -> None:
        forward = self.upstream_writers.get(channel)
        if forward is not None:
            forward(message)
            return
        policy = self.admission.policy(channel)
        allowed = any(_glob(channel, p) for p in self.cfg.websocket.client_publish) or self.admission.auth.may_publish(
            self.ticket.principal, channel
        )
        data, event = _parse_frame(message, obj)
        if not allowed and policy is not None and policy.client_publish_max_bytes:
            if len(data.encode()) > policy.client_publish_max_bytes:
                raise BadRequest(
                    "too_large", f"frames on this channel carry at most {policy.client_publish_max_bytes} bytes", 413
                )
            allowed = True
        if not allowed:
            raise BadRequest(
                "publish_not_allowed",
                f"clients may not publish to {channel!r}; add it to websocket.client_publish, "
                "or connect with a token whose publish claim matches it",
                403,
            )
        self.hub.publish(channel, data, event)

    def _control(self, obj: dict) -> None:
        action, channel = obj.get("action"), obj.get("channel")
        if action not in ("subscribe", "unsubscribe"):
            raise BadRequest("invalid_action", 'action must be "subscribe" or "unsubscribe"')
        if not isinstance(channel, str):
            raise BadRequest("invalid_channel", '"channel" must be a channel name', 400)
        ticket = self.ticket
        try:
            if action == "subscribe":
                self.admission.admit_more(ticket, channel)
                since = obj.get("since")
                if since is not None and not isinstance(since, str):
                    raise BadRequest("invalid_since", '"since" must be a cursor or id string')
                start = self.admission.starts([channel], since, False)[channel] if since else None
                position = start if start is not None else self.hub.last_id(channel)
                if channel not in ticket.channels:
                    ticket.add_channel(channel)
                    if isinstance(self.pusher, MultiPusher):
                        self.pusher.add(channel, position)
                    else:
                        self.pending = (channel, position)
                        self.switch_to_multi = True
                        self.pusher.wake()  # end this serve round now, not at the next ping
            else:
                if channel in ticket.channels:
                    if len(ticket.channels) == 1:
                        raise BadRequest("last_channel", "a connection keeps at least one channel; close it instead")
                    ticket.remove_channel(channel)
                    if isinstance(self.pusher, MultiPusher):
                        self.pusher.remove(channel)
                    else:  # cannot happen: one channel left is refused above
                        pass
        except BadRequest as exc:
            exc.action, exc.channel = action, channel  # type: ignore[attr-defined]
            raise
        reply = {"event": f"{action}d", "action": action, "channel": channel, "ok": True}
        if "ref" in obj:
            reply["ref"] = obj["ref"]
        self.ws.send(json.dumps(reply))

    def _close_quietly(self, code: int, reason: str) -> None:
        try:
            self.ws.close(code, reason)
        except (ConnectionClosed, OSError):
            pass

    def _become_multi(self) -> None:
        """A single-channel socket that subscribed to another channel: from now on its frames
        name their channel and carry the one cursor for all."""
        old = self.pusher
        assert isinstance(old, Pusher)
        channel, position = self.pending
        starts = {self.ticket.channels[0]: old.cursor, channel: position}
        self.pusher = MultiPusher(self.raw_sock, "ws", starts)
        self.pusher.slow_bytes = self.cfg.limits.slow_consumer_bytes
        self.pusher.bytes_sent, self.pusher.events_sent = old.bytes_sent, old.events_sent  # one connection's totals
        self.ws.event = self.pusher.wakeup
        self.io.pusher = self.pusher
        self.ticket.multi = True
        self.switch_to_multi = False

    def _send_error(self, exc: BadRequest) -> None:
        detail: dict[str, Any] = {"error": exc.code, "detail": exc.detail}
        for key in ("action", "channel"):
            if hasattr(exc, key):
                detail[key] = getattr(exc, key)
        self.ws.send(json.dumps({"event": "error", "data": json.dumps(detail), **detail}))


def _glob(channel: str, pattern: str) -> bool:
    from fnmatch import fnmatchcase

    return fnmatchcase(channel, pattern)


def _json_object(message: str) -> dict | None:
    try:
        obj = json.loads(message)
    except (ValueError, RecursionError):  # not JSON (or nested beyond the parser's stack): plain text
        return None
    return obj if isinstance(obj, dict) else None


def _parse_frame(message: str, obj: dict | None) -> tuple[str, str]:
    """A JSON object with "data" (and "event") publishes like POST /publish; any other text is
    the data of a `message` event."""
    if obj is None or "data" not in obj:
        return message, "message"
    data = obj["data"]
    event = obj.get("event", "message")
    if event is None:
        event = "message"
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


class _KeepAlive:
    """Pings every ping_s; a client that has not answered the previous ping by the next one is
    closed (as simple-websocket would)."""

    __slots__ = ("ws", "ping_s", "next")

    def __init__(self, ws: Any, ping_s: float) -> None:
        self.ws = ws
        self.ping_s = ping_s
        self.next = time.monotonic() + ping_s

    def ping_if_due(self) -> None:
        if time.monotonic() >= self.next:
            self.ping()

    def ping(self) -> None:
        ws = self.ws
        if time.monotonic() < self.next - 0.01:
            return  # woken early (e.g. the token's expiry): not time for a ping yet
        self.next = time.monotonic() + self.ping_s
        if not ws.connected:
            return
        if not ws.pong_received:
            ws.close(POLICY_VIOLATION, "Ping/Pong timeout")
            return
        ws.pong_received = False
        ws.sock.send(ws.ws.send(Ping()))


def _full(frames: list) -> bool:
    return len(frames) >= INPUT_BUFFER_FRAMES or sum(len(f) for f in frames) >= INPUT_BUFFER_BYTES


class _HeldReader:
    """simple-websocket starts its reader thread as soon as the handshake is done; this holds
    it back until the connection is set up (see _Connection)."""

    __slots__ = ("target", "name")

    def __init__(self, target: Any) -> None:
        self.target = target
        self.name = "ws-reader"

    def start(self) -> None:
        pass


class _FrameReader:
    """simple-websocket's reader without its greenlet: each time the socket is readable a short
    greenlet reads what is there, lets simple-websocket handle it (frames to ws.input_buffer,
    pongs, the close handshake) and exits. While INPUT_BUFFER_BYTES of frames wait to be
    handled it waits for room before watching again, so a client that sends faster than we
    handle is slowed by TCP instead of filling our memory."""

    __slots__ = ("_conn", "_raw", "_watch", "_stopped")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._raw = conn.raw_sock._sock  # the OS socket, non-blocking under gevent
        self._watch = ReadWatch(conn.raw_sock, self._read)
        self._stopped = False

    def start(self) -> None:
        if not self._stopped:
            self._watch.start()

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._watch.close()

    def _read(self) -> None:
        conn = self._conn
        ws = conn.ws
        if self._stopped or not ws.connected:
            return
        try:
            data = self._raw.recv(ws.receive_bytes)
        except BlockingIOError:  # woken for nothing
            self.start()
            return
        except OSError:  # reset
            data = b""
        try:
            if not data:
                raise OSError("the client closed the connection")
            ws.ws.receive_data(data)
            ws.connected = ws._handle_events()
        except (OSError, LocalProtocolError):
            ws.connected = False
        if not ws.connected:
            ws.event.set()
            self.stop()
            ws.sock.close()  # as simple-websocket's reader does when it ends
            return
        while _full(ws.input_buffer) and ws.connected and not self._stopped:
            if conn.room is None:
                conn.room = threading.Event()
            conn.room.clear()
            conn.room.wait(1.0)
        self.start()


class _SocketIO:
    """The socket as simple-websocket sees it. Writes: whole (socket.send() may write only part
    of a large frame to a slow client) and serialised with the pusher's. Reads: the reader
    stops while INPUT_BUFFER_BYTES of client frames wait to be handled, so a client that sends
    faster than we handle is slowed by TCP instead of filling our memory."""

    __slots__ = ("_sock", "pusher", "_conn")

    def __init__(self, sock: Any, conn: _Connection) -> None:
        self._sock = sock
        self.pusher = conn.pusher
        self._conn = conn

    def send(self, data: bytes) -> int:
        self.pusher.write(data)
        return len(data)

    def recv(self, n: int) -> bytes:
        conn = self._conn
        while _full(conn.ws.input_buffer) and conn.ws.connected:
            if conn.room is None:
                conn.room = threading.Event()
            conn.room.clear()
            conn.room.wait(1.0)
        return self._sock.recv(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
