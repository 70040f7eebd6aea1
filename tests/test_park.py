"""Parked streams (gateway/readwatch.py's park): a stream's rounds run in short greenlets, each
woken by its event or its wait running out; between rounds no greenlet is held."""

from __future__ import annotations

import logging

import gevent
import gevent.event
import greenlet
import pytest

from gateway.readwatch import park, parkable
from gateway.transports.push import run_blocking


def _rounds(event: gevent.event.Event, log: list, waits: list[float | None], fail: bool = False):
    """Yields each wait of `waits` in turn, noting what each was sent and which greenlet ran it."""
    for idle in waits:
        event.clear()
        woken = yield event, idle
        log.append((woken, greenlet.getcurrent()))
    if fail:
        raise RuntimeError("a bug in a round")
    return b"last words"


def test_rounds_are_woken_by_their_event_or_their_wait_and_end_with_last_words() -> None:
    event = gevent.event.Event()
    seen: list = []
    ended: list = []
    assert parkable(event)
    park(_rounds(event, seen, [60.0, 0.05, None]), ended.append)
    assert seen == []  # the first round ran here and is parked on a 60 s wait
    event.set()
    gevent.sleep(0.01)
    assert [w for w, _ in seen] == [True]  # woken by the event, long before 60 s
    gevent.sleep(0.2)
    assert [w for w, _ in seen] == [True, False]  # the 0.05 s wait ran out
    gevent.sleep(0.2)
    assert ended == []  # None: waits for ever
    event.set()
    gevent.sleep(0.01)
    assert [w for w, _ in seen] == [True, False, True] and ended == [b"last words"]
    # Each round ran in its own short greenlet, gone by now: nothing held between rounds.
    runners = [g for _, g in seen]
    assert len(set(map(id, runners))) == 3 and all(g.dead for g in runners)
    assert greenlet.getcurrent() not in runners


def test_a_wake_up_during_a_round_runs_the_next_one_at_once() -> None:
    event = gevent.event.Event()
    seen: list = []

    def rounds():
        event.clear()
        event.set()  # a publish while the round wrote, after it cleared its event: not missed
        woken = yield event, 60.0
        seen.append(woken)
        return b""

    ended: list = []
    park(rounds(), ended.append)
    assert seen == [True] and ended == [b""]  # no 60 s wait


def test_a_failing_round_ends_the_stream_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    event = gevent.event.Event()
    ended: list = []
    with caplog.at_level(logging.ERROR, logger="gateway.readwatch"):
        park(_rounds(event, [], [0.01], fail=True), ended.append)
        gevent.sleep(0.1)
    assert ended == [None]
    assert "parked stream failed" in caplog.text and "a bug in a round" in caplog.text


def test_the_blocking_driver_runs_the_same_rounds_in_the_caller() -> None:
    event = gevent.event.Event()
    seen: list = []
    gevent.spawn_later(0.02, event.set)
    assert run_blocking(_rounds(event, seen, [5.0, 0.01])) == b"last words"
    assert [w for w, _ in seen] == [True, False]
    assert all(g is greenlet.getcurrent() for _, g in seen)
