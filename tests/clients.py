"""Minimal real clients for the four transports, for tests (blocking, with timeouts)."""

from __future__ import annotations

import json
import time
from typing import Any

import requests
import websocket


class SSEClient:
    """Reads an SSE stream over a real HTTP connection; keeps events, comments and retry hints."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> None:
        self.response = requests.get(
            url, headers={"Accept": "text/event-stream", **(headers or {})}, stream=True, timeout=timeout
        )
        self.status = self.response.status_code
        self.headers = self.response.headers
        self._chunks = self.response.iter_content(chunk_size=None)
        self._buffer = ""
        self.comments: list[str] = []
        self.retries: list[int] = []
        self.closed = False

    def next_event(self, deadline: float | None = None) -> dict[str, str] | None:
        """The next event; None when the server ended the stream (or, with a monotonic
        deadline, when it passes while only heartbeats arrive)."""
        while deadline is None or time.monotonic() < deadline:
            if "\n\n" in self._buffer:
                block, self._buffer = self._buffer.split("\n\n", 1)
                event = self._parse(block)
                if event is not None:
                    return event
                continue
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self.closed = True
                return None
            self._buffer += chunk.decode()
        return None

    def events(self, n: int, deadline_s: float = 10) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        end = time.monotonic() + deadline_s
        while len(out) < n and time.monotonic() < end:
            event = self.next_event(end)
            if event is None:
                break
            out.append(event)
        return out

    def _parse(self, block: str) -> dict[str, str] | None:
        fields: dict[str, Any] = {}
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "retry":
                self.retries.append(int(value))
            elif name in ("id", "event"):
                fields[name] = value
        if not data:
            return None
        return {"id": fields.get("id", ""), "event": fields.get("event", "message"), "data": "\n".join(data)}

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> SSEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WSClient:
    def __init__(self, url: str, timeout: float = 10, **kwargs: Any) -> None:
        self.ws = websocket.create_connection(url, timeout=timeout, **kwargs)

    def next_frame(self) -> dict[str, Any]:
        return json.loads(self.ws.recv())

    def events(self, n: int) -> list[dict[str, Any]]:
        return [self.next_frame() for _ in range(n)]

    def send(self, text: str) -> None:
        self.ws.send(text)

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> WSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def poll(base: str, channel: str, since: str | None = None) -> dict[str, Any]:
    params = {"since": since} if since else {}
    r = requests.get(f"{base}/poll/{channel}", params=params, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def longpoll(base: str, channel: str, since: str | None = None, timeout: float = 5) -> dict[str, Any]:
    params: dict[str, Any] = {"timeout": timeout}
    if since:
        params["since"] = since
    r = requests.get(f"{base}/longpoll/{channel}", params=params, timeout=timeout + 10)
    assert r.status_code == 200, r.text
    return r.json()


# -- v2: raw requests whose status matters more than their stream (auth, limits) -----------------
class RawResponse:
    """The status line, headers and (for a non-streaming answer) the body of one raw HTTP answer."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes, sock: Any) -> None:
        self.status = status
        self.headers = headers  # lower-cased names
        self.body = body
        self.sock = sock  # still open when the answer is a stream or a 101; close() it

    def json(self) -> Any:
        return json.loads(self.body.decode())

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def raw_request(
    port: int, path: str, headers: dict[str, str] | None = None, websocket_upgrade: bool = False, timeout: float = 10
) -> RawResponse:
    """GET `path` over a fresh socket and read the answer's head (and body when it has a
    Content-Length). With websocket_upgrade, a real RFC 6455 handshake: the answer is either
    101 (the socket then speaks WebSocket) or the gateway's HTTP refusal. A streaming answer
    (SSE) keeps the socket open with whatever of the stream arrived in `body`."""
    import base64
    import os
    import socket

    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if websocket_upgrade:
        key = base64.b64encode(os.urandom(16)).decode()
        lines += ["Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13", f"Sec-WebSocket-Key: {key}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    parsed: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    length = parsed.get("content-length")
    if length is not None and status != 101:
        while len(body) < int(length):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return RawResponse(status, parsed, body, sock)


def ws_close_code(ws: Any, deadline_s: float = 15) -> int | None:
    """Read frames from a websocket-client connection until the server's close frame; its code
    (None when the connection ended without one or the deadline passed)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            opcode, frame = ws.recv_data_frame(True)
        except websocket.WebSocketTimeoutException:
            continue
        except (websocket.WebSocketConnectionClosedException, OSError):
            return None
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return int.from_bytes(frame.data[:2], "big") if len(frame.data) >= 2 else None
    return None
