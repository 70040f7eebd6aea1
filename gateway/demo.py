"""The demo ticker: one event a second on the demo channel, so a fresh `make run` shows life."""

from __future__ import annotations

import json
import logging
import threading
import time

from gateway.errors import BadRequest
from gateway.hub import Hub

__all__ = ["Ticker"]

log = logging.getLogger(__name__)


class Ticker:
    def __init__(self, hub: Hub, channel: str, interval_s: float) -> None:
        self.hub = hub
        self.channel = channel
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"ticker:{self.channel}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        n = 0
        failing = False
        while not self._stop.wait(self.interval_s):
            n += 1
            data = json.dumps({"tick": n, "time": round(time.time(), 3)})
            try:
                self.hub.publish(self.channel, data, "tick")
            except BadRequest as exc:  # a store outage: say so once, keep ticking
                if not failing:
                    log.warning("demo ticker: publishing paused: %s", exc.detail)
                failing = True
                continue
            except Exception:  # a bug must not end the ticker either
                log.exception("demo ticker: publish failed")
                continue
            if failing:
                log.info("demo ticker: publishing again")
                failing = False
