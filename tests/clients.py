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
