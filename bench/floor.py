"""The floor: the least a CPython + gevent server can spend on a keep-alive long poll.

Not a gateway. A measuring stick for `python -m bench --servers floor,gateway,nchan`: one
process, gevent's libev loop, no greenlet at all (every connection is an I/O watcher whose
callback reads, answers or holds), no admission, no limits, no metrics, no logging, one
channel list in memory, a parse that only finds the path. It speaks just enough of the
gateway's long-poll and publish protocol for the bench's load generator. Whatever the gateway
costs above this figure is its own code; whatever this costs above Nchan is the runtime's.

With --greenlets, the same requests are served the way the gateway serves them: a greenlet per
connection reading a gevent socket, a held poll's greenlet switched back in once the publisher
has written its answer. The difference between the two is the price of that shape.

    python -m bench.floor PORT [--greenlets]
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import gevent
import gevent.event
import gevent.server
import gevent.signal

_RESPONSE = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nCache-Control: no-store\r\nContent-Length: %d\r\n\r\n"


class Channel:
    __slots__ = ("events", "held", "_answers")

    def __init__(self) -> None:
        self.events: list[bytes] = []  # event n (1-based) is events[n - 1], its body as JSON
        self.held: list[Connection] = []
        self._answers: dict[int, bytes] = {}  # since -> the whole response (shared by its pollers)

    def answer(self, since: int) -> bytes:
        """Everything after `since`, as one response (at most 100 events)."""
        known = self._answers.get(since)
        if known is None:
            shown = self.events[since : since + 100]
            last = since + len(shown)
            body = b'{"events":[%s],"cursor":"%d"}' % (b",".join(shown), last)
            known = _RESPONSE % (200, b"OK", len(body)) + body
            if len(self._answers) > 64:
                self._answers.clear()
            self._answers[since] = known
        return known

    def publish(self, data: bytes) -> None:
        n = len(self.events) + 1
        self.events.append(b'{"id":"%d","data":"%s"}' % (n, data.replace(b"\\", b"\\\\").replace(b'"', b'\\"')))
        held, self.held = self.held, []
        for conn in held:
            conn.answered(self.answer(conn.since))


CHANNELS: dict[bytes, Channel] = {}


class Requests:
    """The requests of one connection, as they come in: answered, or held on their channel."""

    __slots__ = ("buf", "since")

    def __init__(self) -> None:
        self.buf = b""
        self.since = 0

    def feed(self, data: bytes) -> bool:
        """Take bytes read; answer what they complete. True: a poll is now held."""
        buf = self.buf + data if self.buf else data
        held = False
        while not held:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            line = buf[: buf.find(b"\r\n")]
            method, target, _ = line.split(b" ", 2)
            if method == b"POST":
                at = buf.find(b"Content-Length: ", 0, end) + 16
                length = int(buf[at : buf.find(b"\r\n", at)])
                if len(buf) < end + 4 + length:
                    break
                body, buf = buf[end + 4 : end + 4 + length], buf[end + 4 + length :]
                _channel(target[len(b"/publish/") :]).publish(body)
                self.send(_RESPONSE % (202, b"Accepted", 2) + b"{}")
                continue
            buf = buf[end + 4 :]
            path, _, query = target.partition(b"?")
            channel = _channel(path[len(b"/longpoll/") :])
            since = 0
            for part in query.split(b"&"):
                if part.startswith(b"since="):
                    value = part[6:]
                    since = int(value) if value.isdigit() else 0
            since = min(since, len(channel.events))
            if since < len(channel.events):
                self.send(channel.answer(since))
            else:
                self.since = since
                channel.held.append(self)
                held = True
        self.buf = buf
        return held

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def answered(self, data: bytes) -> None:
        """The publisher's answer to this connection's held poll."""
        self.send(data)


class Connection(Requests):
    """A connection as an I/O watcher: its callback reads and answers, in the event loop."""

    __slots__ = ("sock", "watcher")

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.watcher = gevent.get_hub().loop.io(sock.fileno(), 1)
        self.watcher.start(self.readable)

    def readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.watcher.stop()
            self.watcher.close()
            self.sock.close()
            return
        self.feed(data)

    def send(self, data: bytes) -> None:
        try:
            self.sock.send(data)  # answers are small: the socket's buffer takes them whole
        except OSError:
            pass


class GreenletConnection(Requests):
    """A connection as a greenlet, as the gateway holds one (see the module doc)."""

    __slots__ = ("sock", "greenlet")

    def __init__(self, sock: Any) -> None:
        super().__init__()
        self.sock = sock
        self.greenlet = gevent.getcurrent()

    def serve(self) -> None:
        hub = gevent.get_hub()
        while True:
            data = self.sock.recv(65536)
            if not data:
                return
            if self.feed(data):
                hub.switch()  # until the publisher has answered (answered())

    def send(self, data: bytes) -> None:
        try:
            self.sock._sock.send(data)  # one non-blocking send, as the gateway's
        except OSError:
            pass

    def answered(self, data: bytes) -> None:
        self.send(data)
        gevent.get_hub().loop.run_callback(self.greenlet.switch)


def _channel(name: bytes) -> Channel:
    channel = CHANNELS.get(name)
    if channel is None:
        channel = CHANNELS[name] = Channel()
    return channel


def serve_greenlets(port: int) -> None:
    def handle(sock: Any, _address: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        GreenletConnection(sock).serve()

    server = gevent.server.StreamServer(("127.0.0.1", port), handle, backlog=1024)
    server.start()
    _wait_for_signal()


def serve(port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)

    def accept() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            Connection(sock)  # kept alive by its watcher's callback until it closes

    watcher = gevent.get_hub().loop.io(listener.fileno(), 1)
    watcher.start(accept)
    _wait_for_signal()


def _wait_for_signal() -> None:
    done = gevent.event.Event()
    gevent.signal.signal(2, done.set)
    gevent.signal.signal(15, done.set)
    done.wait()


if __name__ == "__main__":
    (serve_greenlets if "--greenlets" in sys.argv[2:] else serve)(int(sys.argv[1]))
