"""Several worker processes, one /metrics: each worker writes a snapshot of its counters into a
shared directory (server.metrics_dir), every few seconds and whenever a worker asks for fresh
ones (touching the directory's `refresh` file); whichever worker is scraped asks, then sums those
of the workers alive. A snapshot is plain JSON written atomically, so a reader never sees half of
one.

Why not prometheus_client's multiprocess mode: it writes a memory-mapped file under a lock on
every increment, which is the fan-out's hot path; one snapshot every few seconds costs nothing
there.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import Metric

__all__ = ["SnapshotDir", "SnapshotWriter", "process_samples", "process_families"]

log = logging.getLogger(__name__)

SNAPSHOT_EVERY_S = 5.0
STALE_AFTER_S = 30.0  # a snapshot this old is a worker that hangs or is gone: left out
# A worker answering for all of them (/channels/<name>) asks the others for fresh snapshots: each
# looks for that request this often, and writes for it at most once per REFRESH_EVERY_S, so
# asking in a loop cannot make the workers do more than that.
REFRESH_CHECK_S = 0.05
REFRESH_EVERY_S = 0.25


class SnapshotDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def own(self) -> Path:
        return self.path / f"{os.getpid()}.json"

    def write(self, snapshot: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.own.with_suffix(".tmp")
        tmp.write_text(json.dumps(snapshot), encoding="utf-8")
        os.replace(tmp, self.own)

    def remove(self) -> None:
        self.own.unlink(missing_ok=True)

    @property
    def _refresh(self) -> Path:
        return self.path / "refresh"

    def ask_for_fresh(self) -> float:
        """Ask every worker for a snapshot now; returns when asked (see read_fresh)."""
        asked = time.time()
        self.path.mkdir(parents=True, exist_ok=True)
        self._refresh.touch()
        os.utime(self._refresh, (asked, asked))
        return asked

    def refresh_asked(self) -> float:
        """When a fresh snapshot was last asked for (0: never)."""
        try:
            return self._refresh.stat().st_mtime
        except OSError:
            return 0.0

    def read_fresh(self, wait_s: float = 4 * REFRESH_EVERY_S) -> list[dict[str, Any]]:
        """The snapshots of the other workers alive, each written after this call asked for
        it, waiting up to wait_s for them (a worker that does not answer in time counts as last
        written)."""
        asked = self.ask_for_fresh()
        deadline = time.monotonic() + wait_s
        while True:
            snaps = self.read()
            others = [s for s in snaps if s.get("pid") != os.getpid()]
            if all(s.get("time", 0) >= asked for s in others) or time.monotonic() >= deadline:
                return others
            time.sleep(REFRESH_CHECK_S)

    def read(self, now: float | None = None) -> list[dict[str, Any]]:
        """The snapshots of the workers alive (this one's included, as last written)."""
        now = time.time() if now is None else now
        out = []
        for path in sorted(self.path.glob("*.json")):
            try:
                snap = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # removed meanwhile, or not ours
                continue
            pid = snap.get("pid") if isinstance(snap, dict) else None
            if not isinstance(pid, int) or not _alive(pid):
                path.unlink(missing_ok=True)  # a worker that exited: its counters go with it
                continue
            if now - float(snap.get("time", 0)) <= STALE_AFTER_S:
                out.append(snap)
        return out


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class SnapshotWriter:
    """Calls write() every SNAPSHOT_EVERY_S on a daemon thread (a greenlet under gevent), and
    sooner when a worker asks for fresh snapshots (`asked()`: when it last did)."""

    def __init__(
        self, write: Callable[[], None], remove: Callable[[], None], asked: Callable[[], float] = lambda: 0.0
    ) -> None:
        self._write = write
        self._remove = remove
        self._asked = asked
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-snapshot", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._remove()

    def _run(self) -> None:
        while not self._stop.is_set():
            written = time.time()
            try:
                self._write()
            except Exception:  # a full disk must not take the gateway down
                log.exception("writing the metrics snapshot failed")
            due = time.monotonic() + SNAPSHOT_EVERY_S
            while not self._stop.wait(REFRESH_CHECK_S) and time.monotonic() < due:
                if self._asked() > written and time.time() - written >= REFRESH_EVERY_S:
                    break
        self._remove()


def process_samples() -> list[list[Any]]:
    """The library's process samples (CPU, memory, open files) of this process, as plain data."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    out = []
    for family in registry.collect():
        for s in family.samples:
            out.append([family.name, family.type, family.documentation, s.name, s.labels, s.value])
    return out


def process_families(snaps: list[dict[str, Any]]) -> Iterator[Metric]:
    """Each worker's process_* samples, told apart by a pid label."""
    families: dict[str, Metric] = {}
    for snap in snaps:
        for name, typ, doc, sample, labels, value in snap.get("process", []):
            family = families.get(name)
            if family is None:
                family = families[name] = Metric(name, doc, typ)
            family.add_sample(sample, {**labels, "pid": str(snap["pid"])}, value)
    yield from families.values()
