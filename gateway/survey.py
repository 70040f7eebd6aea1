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


class Survey:
    """One worker's side of the survey: answers the others' asks (a Service: start/stop) and
    asks them (everywhere())."""

    def __init__(self, path: str | os.PathLike, counts: Callable[[], Counts]) -> None:
        self.path = Path(path)
        self.counts = counts  # this process's own, live
        self.pid = str(os.getpid())
        self._answered: dict[str, str] = {}
        self._answered_at = -ANSWER_EVERY_S
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._asking = threading.Lock()
        self._last: tuple[float, Counts] = (-1.0, {})  # (when that survey began, its totals)
        self._warned = False

    # -- a Service ---------------------------------------------------------------------------
    def start(self) -> None:
        private_dir(self.path)
        self._answer({})  # the others know this worker from its counts file
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
            except OSError as exc:
                self._warn(f"answering a survey of the workers failed: {exc}")

    def _asks(self) -> dict[str, str]:
        asks = {}
        for path in self.path.glob("ask.*"):
            pid = path.name[len("ask.") :]
            token = read_private(path) if pid != self.pid and pid.isdigit() else None
            if token:
                asks[pid] = token[:64]
        return asks

    def _answer(self, asks: dict[str, str]) -> None:
        self._answered, self._answered_at = asks, time.monotonic()
        answer = {"pid": int(self.pid), "answered": asks, "channels": self.counts()}
        write_private(self.path, f"{self.pid}.counts", json.dumps(answer))

    # -- asking ------------------------------------------------------------------------------
    def everywhere(self) -> Counts:
        """channel -> {transport: n} summed over every live worker: this one's live, the others'
        as they answered this survey (or, for a worker that did not answer within WAIT_S, as
        it last did)."""
        arrived = time.monotonic()
        with self._asking:
            began, totals = self._last
            if began >= arrived:  # a survey that began after this request arrived: share it
                return totals
            began = time.monotonic()
            totals = {}
            for answer in [*self._ask(), {"channels": self.counts()}]:
                _add(totals, answer.get("channels"))
            self._last = (began, totals)
            return totals

    def _ask(self) -> list[dict[str, Any]]:
        token = secrets.token_hex(8)
        try:
            write_private(self.path, f"ask.{self.pid}", token)
        except OSError as exc:
            self._warn(f"asking the workers for their counts failed: {exc}; using their last answers")
            return self._answers()
        deadline = time.monotonic() + WAIT_S
        while True:
            answers = self._answers()
            if all(a.get("answered", {}).get(self.pid) == token for a in answers) or time.monotonic() >= deadline:
                return answers
            time.sleep(CHECK_S)  # a greenlet's sleep: app.py patches time for gevent

    def _answers(self) -> list[dict[str, Any]]:
        """The last answer of every other live worker (files of workers gone are removed)."""
        out = []
        for path in self.path.glob("*.counts"):
            pid = path.name[: -len(".counts")]
            if pid == self.pid or not pid.isdigit():
                continue
            if not alive(int(pid)):
                path.unlink(missing_ok=True)
                (self.path / f"ask.{pid}").unlink(missing_ok=True)
                continue
            try:
                answer = json.loads(read_private(path) or "null")
            except ValueError:
                continue
            if isinstance(answer, dict) and isinstance(answer.get("answered"), dict):
                out.append(answer)
        return out

    def _warn(self, message: str) -> None:
        if not self._warned:  # once: a directory gone bad would otherwise log 20 lines a second
            self._warned = True
            log.warning("%s", message)


def _add(totals: Counts, channels: Any) -> None:
    if not isinstance(channels, dict):
        return
    for channel, by_transport in channels.items():
        if isinstance(by_transport, dict):
            into = totals.setdefault(channel, {})
            for transport, n in by_transport.items():
                if isinstance(n, int):
                    into[transport] = into.get(transport, 0) + n
