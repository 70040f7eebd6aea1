"""Short poll and long poll against a live gateway: order, cursors, resume, gaps, timeouts."""

from __future__ import annotations

import threading
import time

import requests

from tests.clients import longpoll, poll


def test_poll_without_since_starts_from_now(gateway, channel):
    gateway.publish(channel, "before")
    body = poll(gateway.url, channel)
    assert body["events"] == [] and body["gap"] is False
    gateway.publish(channel, "after")
    body = poll(gateway.url, channel, body["cursor"])
    assert [e["data"] for e in body["events"]] == ["after"]


def test_empty_channel_cursor_resumes_without_gap(gateway, channel):
    cursor = poll(gateway.url, channel)["cursor"]
    ids = [gateway.publish(channel, f"m{i}") for i in range(3)]
    body = poll(gateway.url, channel, cursor)
    assert [e["id"] for e in body["events"]] == ids
    assert body["gap"] is False and body["cursor"] == ids[-1]


def test_events_in_order_with_growing_ids_and_exactly_once(gateway, channel):
    cursor = poll(gateway.url, channel)["cursor"]
    ids = [gateway.publish(channel, str(i)) for i in range(20)]
    seen = []
    # Two polls split across a publish: nothing is lost or repeated between them.
    body = poll(gateway.url, channel, cursor)
    seen += body["events"]
    late = gateway.publish(channel, "late")
    body = poll(gateway.url, channel, body["cursor"])
    seen += body["events"]
    assert [e["id"] for e in seen] == ids + [late]
    assert [e["data"] for e in seen] == [str(i) for i in range(20)] + ["late"]
    keys = [tuple(map(int, i.split("-"))) for i in ids]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(e["event"] == "message" for e in seen)


def test_resume_older_than_history_reports_gap(gateway, channel):
    first = gateway.publish(channel, "0")
    for i in range(1, 60):  # history holds 50
        gateway.publish(channel, str(i))
    body = poll(gateway.url, channel, first)
    assert body["gap"] is True
    assert [e["data"] for e in body["events"]] == [str(i) for i in range(10, 60)]
    # The returned cursor is known again: no second gap.
    again = poll(gateway.url, channel, body["cursor"])
    assert again["gap"] is False and again["events"] == []


def test_resume_from_the_event_just_before_history_is_not_a_gap(gateway, channel):
    ids = [gateway.publish(channel, str(i)) for i in range(51)]  # the first falls out of history
    body = poll(gateway.url, channel, ids[0])
    assert body["gap"] is False
    assert [e["id"] for e in body["events"]] == ids[1:]


def test_unknown_id_reports_gap(gateway, channel):
    gateway.publish(channel, "x")
    body = poll(gateway.url, channel, "123-4")
    assert body["gap"] is True
    assert [e["data"] for e in body["events"]] == ["x"]
    future = poll(gateway.url, channel, "99999999999999-0")
    assert future["gap"] is True and future["events"] == []


def test_unknown_channel_with_an_id_reports_gap(gateway, channel):
    body = poll(gateway.url, channel, "1700000000000-0")
    assert body == {"events": [], "cursor": "0-0", "gap": True, "more": False}


def test_batches_are_capped_and_say_more(start_gateway, channel):
    gw = start_gateway({"poll": {"max_batch": 5}})
    cursor = poll(gw.url, channel)["cursor"]
    for i in range(12):
        gw.publish(channel, str(i))
    got = []
    for _ in range(4):
        body = poll(gw.url, channel, cursor)
        got += [e["data"] for e in body["events"]]
        cursor = body["cursor"]
        if not body["more"]:
            break
    assert got == [str(i) for i in range(12)]


def test_longpoll_returns_at_once_when_events_are_pending(gateway, channel):
    cursor = poll(gateway.url, channel)["cursor"]
    gateway.publish(channel, "a")
    gateway.publish(channel, "b")
    started = time.monotonic()
    body = longpoll(gateway.url, channel, cursor, timeout=5)
    assert time.monotonic() - started < 1.0
    assert [e["data"] for e in body["events"]] == ["a", "b"]


def test_longpoll_holds_until_an_event(gateway, channel):
    cursor = poll(gateway.url, channel)["cursor"]
    threading.Timer(0.5, gateway.publish, (channel, "wake")).start()
    started = time.monotonic()
    body = longpoll(gateway.url, channel, cursor, timeout=5)
    elapsed = time.monotonic() - started
    assert [e["data"] for e in body["events"]] == ["wake"]
    assert 0.4 < elapsed < 2.0


def test_longpoll_without_since_waits_for_the_next_event(gateway, channel):
    gateway.publish(channel, "old")
    threading.Timer(0.3, gateway.publish, (channel, "new")).start()
    body = longpoll(gateway.url, channel, timeout=5)
    assert [e["data"] for e in body["events"]] == ["new"]


def test_longpoll_times_out_with_no_events(gateway, channel):
    cursor = poll(gateway.url, channel)["cursor"]
    started = time.monotonic()
    body = longpoll(gateway.url, channel, cursor, timeout=0.5)
    assert 0.4 < time.monotonic() - started < 2.0
    assert body == {"events": [], "cursor": cursor, "gap": False, "more": False}


def test_longpoll_timeout_is_capped_by_config(gateway, channel):
    # longpoll_max_timeout_s is 10 in this gateway; a client asking 3600 s is held no longer.
    cursor = poll(gateway.url, channel)["cursor"]
    threading.Timer(0.3, gateway.publish, (channel, "x")).start()
    body = longpoll(gateway.url, channel, cursor, timeout=3600)
    assert [e["data"] for e in body["events"]] == ["x"]


def test_longpoll_loop_loses_nothing_published_between_polls(gateway, channel):
    cursor = poll(gateway.url, channel)["cursor"]
    expected = [str(i) for i in range(30)]

    def publisher():
        for data in expected:
            gateway.publish(channel, data)
            time.sleep(0.01)

    thread = threading.Thread(target=publisher)
    thread.start()
    got: list[str] = []
    deadline = time.monotonic() + 10
    while len(got) < len(expected) and time.monotonic() < deadline:
        body = longpoll(gateway.url, channel, cursor, timeout=2)
        got += [e["data"] for e in body["events"]]
        cursor = body["cursor"]
    thread.join()
    assert got == expected


def test_bad_input_gets_json_errors(gateway, channel):
    cases = [
        (f"/poll/{channel}?since=garbage", 400, "invalid_since"),
        (f"/poll/{channel}?since=-1", 400, "invalid_since"),
        (f"/longpoll/{channel}?since=1.5", 400, "invalid_since"),
        (f"/longpoll/{channel}?timeout=soon", 400, "invalid_timeout"),
        (f"/longpoll/{channel}?timeout=-3", 400, "invalid_timeout"),
        ("/poll/bad%20name", 400, "invalid_channel"),
        ("/poll/-starts-with-dash", 400, "invalid_channel"),
        ("/poll/" + "a" * 129, 400, "invalid_channel"),
        ("/poll/a/b", 400, "invalid_channel"),
        ("/longpoll/caf%C3%A9", 400, "invalid_channel"),
        ("/sse/bad%20name", 400, "invalid_channel"),
        (f"/sse/{channel}?since=nope", 400, "invalid_since"),
        ("/no-such-route", 404, "not_found"),
        # No channel at all: JSON, not an HTML 308 to the same path with a slash.
        ("/poll", 404, "not_found"),
        ("/longpoll", 404, "not_found"),
        ("/sse", 404, "not_found"),
        ("/ws", 404, "not_found"),
        ("/sse/", 400, "invalid_channel"),
    ]
    for path, status, code in cases:
        r = requests.get(gateway.url + path, timeout=5, allow_redirects=False)
        assert r.status_code == status, path
        assert r.headers["Content-Type"].startswith("application/json"), path
        body = r.json()
        assert body["error"] == code and body["detail"], path


def test_wrong_method_is_405_json(gateway, channel):
    for method, path in [("POST", f"/poll/{channel}"), ("DELETE", f"/sse/{channel}"), ("GET", f"/publish/{channel}")]:
        r = requests.request(method, gateway.url + path, timeout=5)
        assert r.status_code == 405, path
        assert set(r.json()) == {"error", "detail"}


def test_longest_valid_channel_name_works(gateway):
    name = "A" + "b.c_d:e-" * 15 + "x" * 7
    assert len(name) == 128
    gateway.publish(name, "ok")
    assert poll(gateway.url, name, "0-0")["events"][0]["data"] == "ok"
