"""Several workers, one answer: how many subscribers every worker has on each channel, now.

`GET /channels/<name>` on any worker counts the streams of all of them (the contract: workers
behave to every client as one gateway). The answering worker writes a fresh token into
`ask.<its pid>` in the workers' shared directory; every worker looks at the asks every CHECK_S
and answers a token it has not answered yet by writing its counts, with every token it answers,
to `<its pid>.counts`; the asker waits (up to WAIT_S) until each live worker has answered its
token. Tokens are only compared for equality, so no clock is compared across processes. A
worker answers at most once per ANSWER_EVERY_S however often it is asked, and requests that
arrive while a survey is under way share its answer.

The directory is the metrics snapshots' (gateway/metricsdir.py), this user's and writable by
no one else.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.metricsdir import alive, private_dir, read_private, write_private

__all__ = ["Survey"]

log = logging.getLogger(__name__)

CHECK_S = 0.05
ANSWER_EVERY_S = 0.25
WAIT_S = 2.0

Counts = dict[str, dict[str, int]]  # channel -> {transport: open subscriptions}


class _Round:
    """One survey in flight; requests that arrive meanwhile wait for it and share its totals."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.totals: Counts = {}


class Survey:
    """One worker's side of the survey: answers the others' asks (a Service: start/stop) and
    asks them (everywhere())."""

    def __init__(self, path: str | os.PathLike, counts: Callable[[], Counts]) -> None:
        self.path = Path(path)
        self.counts = counts  # this process's own, live
        self.pid = str(os.getpid())
        self._answered: dict[str, str] = {}
        self._answered_at = -ANSWER_EVERY_S
        self._seen: dict[str, tuple[tuple[int, int, int], str]] = {}  # ask file -> (stat key, token)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()
        self._round: _Round | None = None
        self._warned = False

    # -- a Service ---------------------------------------------------------------------------
    def start(self) -> None:
        private_dir(self.path)
        try:
            self._answer({})  # the others know this worker from its counts file
        except OSError as exc:
            self._warn(f"writing this worker's subscriber counts failed: {exc}")
        self._thread = threading.Thread(target=self._run, name="survey", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        for name in (f"{self.pid}.counts", f"ask.{self.pid}"):
            (self.path / name).unlink(missing_ok=True)

    # -- answering ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(CHECK_S):
            try:
                asks = self._asks()
                new = any(self._answered.get(pid) != token for pid, token in asks.items())
                if new and time.monotonic() - self._answered_at >= ANSWER_EVERY_S:
                    self._answer(asks)
            except Exception as exc:  # noqa: BLE001 (this thread must outlive a bad moment)
                self._warn(f"answering a survey of the workers failed: {exc!r}")

    def _asks(self) -> dict[str, str]:
        """The other workers' current tokens; a file is read again only once it has changed."""
        asks, seen = {}, {}
        for path in self.path.glob("ask.*"):
            pid = path.name[len("ask.") :]
            if pid == self.pid or not _is_pid(pid):
                continue
            try:
                info = path.stat()
            except OSError:
                continue
            key = (info.st_ino, info.st_mtime_ns, info.st_size)
            known = self._seen.get(pid)
            token = known[1] if known is not None and known[0] == key else (read_private(path) or "")[:64]
            seen[pid] = (key, token)
            if token:
                asks[pid] = token
        self._seen = seen
        return asks

    def _answer(self, asks: dict[str, str]) -> None:
        self._answered, self._answered_at = asks, time.monotonic()
        # Two lines: who was answered (all an asker waiting for its token reads), then the counts.
        head = json.dumps({"pid": int(self.pid), "answered": asks})
        write_private(self.path, f"{self.pid}.counts", head + "\n" + json.dumps(self.counts()))

    # -- asking ------------------------------------------------------------------------------
    def everywhere(self) -> Counts:
        """channel -> {transport: n} summed over every live worker: this one's live, the others'
        as they answered this survey (or, for a worker that did not answer within WAIT_S, as
        it last did). A request that arrives during a survey shares it."""
        with self._guard:
            current, mine = self._round, self._round is None
            if mine:
                current = self._round = _Round()
        assert current is not None
        if not mine:
            current.done.wait(WAIT_S + 1.0)
            return current.totals
        try:
            totals: Counts = {}
            for channels in [*self._ask(), self.counts()]:
                _add(totals, channels)
            current.totals = totals
            return totals
        finally:
            with self._guard:
                self._round = None
            current.done.set()

    def _ask(self) -> list[Any]:
        """Each other live worker's counts, as it answered this survey's token (or last did)."""
        token = secrets.token_hex(8)
        try:
            write_private(self.path, f"ask.{self.pid}", token)
        except OSError as exc:
            self._warn(f"asking the workers for their counts failed: {exc}; using their last answers")
            token = ""
        deadline = time.monotonic() + WAIT_S
        while True:
            answers = self._answers()
            waiting = token and any(answered.get(self.pid) != token for answered, _ in answers.values())
            if not waiting or time.monotonic() >= deadline:
                return [_channels(text) for _, text in answers.values()]
            time.sleep(CHECK_S)  # a greenlet's sleep: app.py patches time for gevent

    def _answers(self) -> dict[str, tuple[dict[str, Any], str]]:
        """pid -> (the tokens it answered, the text of its counts) of every other live worker."""
        out = {}
        for path in self.path.glob("*.counts"):
            pid = path.name[: -len(".counts")]
            if pid == self.pid or not _is_pid(pid):
                continue
            if not alive(int(pid)):
                path.unlink(missing_ok=True)
                (self.path / f"ask.{pid}").unlink(missing_ok=True)
                continue
            head, _, counts = (read_private(path) or "").partition("\n")
            try:
                answered = json.loads(head).get("answered")
            except (ValueError, AttributeError):
                continue
            if isinstance(answered, dict):
                out[pid] = (answered, counts)
        return out

    def _warn(self, message: str) -> None:
        if not self._warned:  # once: a directory gone bad would otherwise log 20 lines a second
            self._warned = True
            log.warning("%s", message)


def _is_pid(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _channels(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}


def _add(totals: Counts, channels: Any) -> None:
    if not isinstance(channels, dict):
        return
    for channel, by_transport in channels.items():
        if isinstance(by_transport, dict):
            into = totals.setdefault(channel, {})
            for transport, n in by_transport.items():
                if isinstance(n, int):
                    into[transport] = into.get(transport, 0) + n
