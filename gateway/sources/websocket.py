"""A WebSocket upstream: each message it sends becomes an event. With
`forward_client_messages = true`, text that WebSocket clients send on the channel goes to the
upstream socket, so the bridge works both ways."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

import websocket  # websocket-client

from gateway.config import SourceConfig
from gateway.errors import BadRequest
from gateway.hub import Hub
from gateway.sources.base import Source

__all__ = ["WebSocketSource"]


class WebSocketSource(Source):
    kind = "websocket"

    def __init__(self, cfg: SourceConfig, hub: Hub) -> None:
        super().__init__(cfg, hub)
        url = cfg.url
        if url.startswith(("http://", "https://")):
            url = "ws" + url[4:]
        self.ws_url = url
        self._ws: websocket.WebSocket | None = None
        self._send_lock = threading.Lock()

    def _session(self) -> None:
        header = [f"{name}: {value}" for name, value in self.headers.items()]
        ws = websocket.create_connection(
            self.ws_url, header=header, timeout=self.cfg.timeout_s, enable_multithread=True
        )
        ws.settimeout(None)  # a quiet upstream is fine; stop() and lazy idle close the socket
        self._ws = ws
        try:
            if not self._active():
                return
            self._connected()
            while self._active():
                opcode, payload = ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    return
                if opcode not in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                    continue
                try:
                    text = payload.decode("utf-8")
                except UnicodeDecodeError:
                    self._drop("a binary message that is not UTF-8 text")
                    continue
                self._relay(text, None, self._message_id(text))
        except websocket.WebSocketConnectionClosedException:
            if self._active():
                raise
        finally:
            self._ws = None
            try:
                ws.close(timeout=0.5)
            except Exception:
                pass

    def _message_id(self, text: str) -> str | None:
        """With id_field set, a JSON object message's id de-duplicates re-sends after a reconnect."""
        field = self.cfg.id_field
        if not field or not text.startswith("{"):
            return None
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        return json.dumps(obj[field]) if isinstance(obj, dict) and field in obj else None

    def send(self, text: str) -> None:
        """The upstream writer: a client frame on this channel goes to the upstream socket."""
        ws = self._ws
        if ws is None:
            raise BadRequest(
                "upstream_unavailable",
                "the upstream of this channel is not connected right now; try again shortly",
                503,
            )
        try:
            with self._send_lock:
                ws.send(text)
        except Exception as exc:
            raise BadRequest(
                "upstream_unavailable", f"could not forward to the upstream ({type(exc).__name__})", 502
            ) from None

    def _interrupt(self) -> None:
        ws: Any = self._ws
        if ws is not None and ws.sock is not None:
            try:
                ws.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked recv
            except OSError:
                pass
