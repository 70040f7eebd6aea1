"""Several worker processes, one /metrics: each worker writes a snapshot of its counters into a
shared directory (server.metrics_dir), and whichever worker is scraped sums those of the workers
alive. A snapshot is plain JSON written atomically, so a reader never sees half of one. The
directory is this user's and no one else may write it (private_dir): the workers trust what they
read there (their subscriber counts, gateway/survey.py, live there too).

Why not prometheus_client's multiprocess mode: it writes a memory-mapped file under a lock on
every increment, which is the fan-out's hot path; one snapshot every few seconds costs nothing
there.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import Metric

from gateway.errors import ConfigError

__all__ = [
    "SnapshotDir",
    "SnapshotWriter",
    "alive",
    "forget_worker",
    "private_dir",
    "process_families",
    "process_samples",
    "read_private",
    "write_private",
]

log = logging.getLogger(__name__)

SNAPSHOT_EVERY_S = 5.0
STALE_AFTER_S = 30.0  # a snapshot this old is a worker that hangs or is gone: left out
MAX_FILE_BYTES = 16 * 1024 * 1024  # a file larger than this is no worker's


class SnapshotDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def own(self) -> Path:
        return self.path / f"{os.getpid()}.json"

    def write(self, snapshot: dict[str, Any]) -> None:
        write_private(self.path, self.own.name, json.dumps(snapshot))  # made by private_dir at start

    def remove(self) -> None:
        self.own.unlink(missing_ok=True)

    def read(self, now: float | None = None) -> list[dict[str, Any]]:
        """The snapshots of the workers alive (this one's included, as last written)."""
        now = time.time() if now is None else now
        out = []
        for path in sorted(self.path.glob("*.json")):
            try:
                snap = json.loads(read_private(path) or "null")
            except ValueError:  # not ours
                continue
            pid = snap.get("pid") if isinstance(snap, dict) else None
            if not isinstance(pid, int) or not alive(pid):
                path.unlink(missing_ok=True)  # a worker that exited: its counters go with it
                continue
            written = snap.get("time")
            if isinstance(written, (int, float)) and now - written <= STALE_AFTER_S:
                out.append(snap)
        return out


def alive(pid: int) -> bool:
    """Whether a process of this pid runs (any number read from a file: no valid pid is false)."""
    if pid == os.getpid():
        return True
    if not 0 < pid < 2**31:  # os.kill would refuse it (or signal a process group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def private_dir(path: Path, key: str = "server.metrics_dir") -> Path:
    """Create `path` (mode 0700) or check that it is a real directory of this user that no one
    else may write; a ConfigError naming `key` otherwise (whoever may write there could forge
    what the workers read, or plant links for them to write through)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(path)
    except OSError as exc:
        detail = f"cannot create {str(path)!r} ({exc.strerror})"
        raise ConfigError(f"{key}: {detail}; set {key} to a writable path") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise ConfigError(
            f"{key}: {str(path)!r} must be a directory of this user that others cannot write "
            f"(owner uid {info.st_uid}, {stat.filemode(info.st_mode)}); remove it or set {key}"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: cannot write in {str(path)!r}; make it writable or set {key}")
    return path


def forget_worker(directory: Path, pid: int) -> None:
    """A worker's files, removed once it has exited (by its parent, which saw it go): nothing
    of it is read or waited for again, even if another process comes to have its pid."""
    for path in (directory / f"{pid}.json", directory / f"{pid}.counts", directory / f"ask.{pid}"):
        path.unlink(missing_ok=True)
    for path in directory.glob(f".*.{pid}.tmp"):  # a write it was killed in the middle of
        path.unlink(missing_ok=True)


def write_private(directory: Path, name: str, text: str) -> None:
    """Write `text` to directory/name atomically, readable by this user only, never through a link."""
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, directory / name)


def read_private(path: Path) -> str | None:
    """The text of a file written by write_private (None: gone, a link, not a plain file, or
    too large)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not block us
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            data = f.read(MAX_FILE_BYTES + 1)
        except OSError:
            return None
    return None if len(data) > MAX_FILE_BYTES else data.decode("utf-8", "replace")


class SnapshotWriter:
    """Calls write() every SNAPSHOT_EVERY_S on a daemon thread (a greenlet under gevent)."""

    def __init__(self, write: Callable[[], None], remove: Callable[[], None]) -> None:
        self._write = write
        self._remove = remove
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-snapshot", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._remove()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._write()
            except Exception:  # a full disk must not take the gateway down
                log.exception("writing the metrics snapshot failed")
            self._stop.wait(SNAPSHOT_EVERY_S)
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
