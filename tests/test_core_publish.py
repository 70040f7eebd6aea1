"""POST /publish/<channel>: tokens, bodies, limits, and the contract's error shapes."""

from __future__ import annotations

import json

import requests

from tests.clients import poll
from tests.helpers import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_raw_body_is_the_data_of_a_message_event(gateway, channel):
    cursor = poll(gateway.url, channel)["cursor"]
    r = requests.post(
        f"{gateway.url}/publish/{channel}",
        data="héllo\nworld".encode(),
        headers={**AUTH, "Content-Type": "text/plain; charset=utf-8"},
        timeout=5,
    )
    assert r.status_code == 202
    body = r.json()
    assert body["channel"] == channel and body["id"]
    events = poll(gateway.url, channel, cursor)["events"]
    assert events == [{"id": body["id"], "event": "message", "data": "héllo\nworld"}]


def test_a_text_body_is_read_in_its_declared_charset(gateway, channel):
    url = f"{gateway.url}/publish/{channel}"
    cursor = poll(gateway.url, channel)["cursor"]
    for charset, text in (("latin-1", "café"), ('"UTF-16"', "naïve ☃"), ("windows-1252", "€5")):
        r = requests.post(
            url,
            data=text.encode(charset.strip('"')),
            headers={**AUTH, "Content-Type": f"text/plain; charset={charset}"},
        )
        assert r.status_code == 202, r.text
    assert [e["data"] for e in poll(gateway.url, channel, cursor)["events"]] == ["café", "naïve ☃", "€5"]
    for charset in ("no-such-charset", "base64", "undefined"):
        r = requests.post(url, data=b"x", headers={**AUTH, "Content-Type": f"text/plain; charset={charset}"}, timeout=5)
        assert r.status_code == 400 and r.json()["error"] == "invalid_body", (charset, r.text)


def test_json_body_sets_event_and_non_string_data_is_stored_as_json(gateway, channel):
    cursor = poll(gateway.url, channel)["cursor"]
    url = f"{gateway.url}/publish/{channel}"
    r1 = requests.post(url, json={"data": "plain", "event": "price"}, headers=AUTH, timeout=5)
    r2 = requests.post(url, json={"data": {"a": [1, 2]}}, headers=AUTH, timeout=5)
    r3 = requests.post(url, json={"data": "x", "event": None}, headers=AUTH, timeout=5)
    assert r1.status_code == r2.status_code == r3.status_code == 202
    events = poll(gateway.url, channel, cursor)["events"]
    assert events[0] == {"id": r1.json()["id"], "event": "price", "data": "plain"}
    assert events[1]["event"] == "message"
    assert json.loads(events[1]["data"]) == {"a": [1, 2]}
    assert events[2]["event"] == "message"  # "event": null is the default name


def test_token_is_required_and_checked(gateway, channel):
    url = f"{gateway.url}/publish/{channel}"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}):
        r = requests.post(url, data=b"x", headers=headers, timeout=5)
        assert r.status_code == 401
        assert r.json()["error"] == "unauthorized"
    assert poll(gateway.url, channel, "0-0")["events"] == []


def test_publishing_is_off_without_a_token(start_gateway, channel):
    gw = start_gateway({"server": {"publish_token": ""}})
    r = requests.post(f"{gw.url}/publish/{channel}", data=b"x", headers=AUTH, timeout=5)
    assert r.status_code == 403
    assert "GATEWAY_PUBLISH_TOKEN" in r.json()["detail"]


def test_oversized_bodies_get_413(gateway, channel):
    url = f"{gateway.url}/publish/{channel}"
    r = requests.post(url, data=b"x" * 5000, headers=AUTH, timeout=5)  # limit is 4096
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    # Chunked, with no Content-Length: still caught.
    r = requests.post(url, data=iter([b"x" * 3000, b"y" * 3000]), headers=AUTH, timeout=5)
    assert r.status_code == 413
    r = requests.post(url, data=b"x" * 4096, headers=AUTH, timeout=5)
    assert r.status_code == 202


def test_bad_bodies_and_names_get_400(gateway, channel):
    url = f"{gateway.url}/publish/{channel}"
    json_headers = {**AUTH, "Content-Type": "application/json"}
    cases = [
        (url, b"{not json", json_headers, "invalid_json"),
        (url, b'["no", "data"]', json_headers, "invalid_json"),
        (url, b'{"data": "x", "event": 5}', json_headers, "invalid_event"),
        (url, b'{"data": "x", "event": "gap"}', json_headers, "reserved_event"),
        (url, b'{"data": "x", "event": "two\\nlines"}', json_headers, "invalid_event"),
        (url, b"\xff\xfe", AUTH, "invalid_body"),
        (f"{gateway.url}/publish/bad%20name", b"x", AUTH, "invalid_channel"),
        (f"{gateway.url}/publish/", b"x", AUTH, "invalid_channel"),
    ]
    for target, data, headers, code in cases:
        r = requests.post(target, data=data, headers=headers, timeout=5)
        assert r.status_code == 400, (data, r.text)
        assert r.json()["error"] == code, data


def test_cors_preflight_for_an_allowed_origin(start_gateway, channel):
    gw = start_gateway({"server": {"allowed_origins": ["https://app.example"]}})
    r = requests.options(
        f"{gw.url}/publish/{channel}",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
        timeout=5,
    )
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
    r = requests.post(
        f"{gw.url}/publish/{channel}", data=b"x", headers={**AUTH, "Origin": "https://app.example"}, timeout=5
    )
    assert r.status_code == 202 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    r = requests.get(f"{gw.url}/poll/{channel}", headers={"Origin": "https://evil.example"}, timeout=5)
    assert r.status_code == 403 and r.json()["error"] == "origin_not_allowed"


def test_same_origin_is_allowed_and_cross_origin_refused_by_default(gateway, channel):
    same = requests.get(f"{gateway.url}/poll/{channel}", headers={"Origin": gateway.url}, timeout=5)
    assert same.status_code == 200
    for path in (f"/poll/{channel}", f"/longpoll/{channel}?timeout=0", f"/sse/{channel}"):
        r = requests.get(gateway.url + path, headers={"Origin": "https://evil.example"}, timeout=5)
        assert r.status_code == 403, path
        assert r.json()["error"] == "origin_not_allowed"
    r = requests.post(
        f"{gateway.url}/publish/{channel}", data=b"x", headers={**AUTH, "Origin": "https://evil.example"}, timeout=5
    )
    assert r.status_code == 403


def test_idempotency_key_repeat_answers_the_first_id_and_stores_nothing(gateway, channel):
    cursor = poll(gateway.url, channel)["cursor"]
    url = f"{gateway.url}/publish/{channel}"
    headers = {**AUTH, "Idempotency-Key": "order-42 retry"}
    first = requests.post(url, json={"data": "once"}, headers=headers, timeout=5)
    again = requests.post(url, json={"data": "once"}, headers=headers, timeout=5)
    other = requests.post(url, json={"data": "twice"}, headers={**AUTH, "Idempotency-Key": "order-43"}, timeout=5)
    assert first.status_code == again.status_code == other.status_code == 202
    assert again.json()["id"] == first.json()["id"] != other.json()["id"]
    events = poll(gateway.url, channel, cursor)["events"]
    assert [e["data"] for e in events] == ["once", "twice"]


def test_idempotency_key_is_per_channel_and_validated(gateway, channel):
    headers = {**AUTH, "Idempotency-Key": "same"}
    a = requests.post(f"{gateway.url}/publish/{channel}", data="a", headers=headers, timeout=5)
    b = requests.post(f"{gateway.url}/publish/{channel}.b", data="b", headers=headers, timeout=5)
    assert a.status_code == b.status_code == 202
    assert poll(gateway.url, f"{channel}.b", "0-0")["events"][0]["data"] == "b"
    for bad in ("x" * 129, "tab\there"):
        r = requests.post(
            f"{gateway.url}/publish/{channel}", data="c", headers={**AUTH, "Idempotency-Key": bad}, timeout=5
        )
        assert r.status_code == 400 and r.json()["error"] == "invalid_idempotency_key"
