"""The coarse deadline wheel of the gevent seam (gateway/server.py): one repeating timer for
every stall timeout and long-poll hold, instead of a timer per wait."""

from __future__ import annotations

import time

import gevent

from gateway.server import _CoarseDeadlines


def test_deadlines_expire_late_never_early_and_a_failure_spares_the_rest() -> None:
    expired: dict[str, float] = {}

    def expire(what: str) -> None:
        expired[what] = time.monotonic()
        if what == "fails":
            raise RuntimeError("one expiry failing")

    wheel = _CoarseDeadlines(0.05, expire)
    start = time.monotonic()
    for what in ("fails", "a", "b"):
        wheel.add(what, 0.2)
    removed = wheel.add("removed", 0.2)
    wheel.remove("removed", removed)
    gevent.sleep(0.5)
    assert set(expired) == {"fails", "a", "b"}  # the failure did not drop the rest of its slot
    for when in expired.values():
        assert 0.2 <= when - start <= 0.2 + 2 * 0.05 + 0.1  # up to two slots late (and scheduling)


def test_a_wheel_alone_does_not_keep_the_loop_alive() -> None:
    # An embedder's gevent.wait() returns once its own work is done, though the wheel's
    # repeating timer is still started.
    wheel = _CoarseDeadlines(0.05, lambda what: None)
    wheel.add("x", 60.0)
    done = gevent.spawn(gevent.sleep, 0.1)
    started = time.monotonic()
    gevent.wait(timeout=5)
    assert done.dead and time.monotonic() - started < 2
