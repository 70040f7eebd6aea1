"""Reading a socket after some of its bytes were already read elsewhere."""

from __future__ import annotations

import io
import socket

__all__ = ["Prefixed"]


class Prefixed(io.RawIOBase):
    """The bytes already read, then the rest of the socket (wrap it in io.BufferedReader)."""

    def __init__(self, prefix: bytes, sock: socket.socket) -> None:
        self._prefix = memoryview(prefix)
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._sock.recv_into(buffer)
