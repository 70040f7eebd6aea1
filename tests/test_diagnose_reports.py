"""Shared diagnoses: validation and aggregation (pure), the report routes and operator view (in-process
app), the env token and real sockets (live gateway), Redis sharing and outage, and the share buttons in
a real headless Chromium."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway.app import create_app
from gateway.diagnose.reports import (
    MAX_KEPT_BYTES,
    MAX_REPORT_BYTES,
    REPORT_BURST,
    Reports,
    aggregate,
    compact,
    summarize,
    transport_status,
    validate,
)
from gateway.errors import BadRequest
from gateway.state import state
from tests.browser import browser  # noqa: F401 (fixture)
from tests.helpers import Gateway
from tests.redis_server import RedisServer

OP = "op-secret"


def diagnosis(ws: bool = True, sse: str = "ok", lp: bool = True, sp: bool = True, **extra: Any) -> dict[str, Any]:
    def entry(ok: bool, status: str | None = None) -> dict[str, Any]:
        status = status or ("ok" if ok else "broken")
        return {"ok": status == "ok", "status": status, "reason": f"{status} because of a test"}

    transports = {
        "short_poll": entry(sp),
        "long_poll": entry(lp),
        "sse": entry(sse == "ok", sse) | {"buffered": sse == "degraded"},
        "websocket": entry(ws),
    }
    order = [n for n in ("websocket", "sse", "long_poll", "short_poll") if transports[n]["ok"]]
    return {"transports": transports, "recommended": order[0] if order else None} | extra


_clients = iter(range(1, 1_000_000))


def record(d: dict[str, Any], ua: str = "UA", client: str | None = None) -> dict[str, Any]:
    client = client or f"10.0.{next(_clients) // 250}.{next(_clients) % 250}"
    return summarize(validate(d), client=client, forwarded_for="", user_agent=ua, now=1_700_000_000.0)


# -- pure functions ---------------------------------------------------------------------------------
def test_validate_accepts_the_contract_shape_and_keeps_extra_keys() -> None:
    d = diagnosis(path={"client_address": "1.2.3.4"}, summary="Use WebSocket.")
    assert validate(copy.deepcopy(d)) == d


def test_compact_keeps_known_fields_of_known_types_only() -> None:
    d = diagnosis(summary="Use WebSocket." * 100, junk=[[]] * 5000, path={"warnings": ["w" * 5000] * 50, "x": [[]]})
    d["transports"]["sse"] |= {"latency_ms": 12.5, "fix": "f" * 5000, "nested": [[[]]], "findings": ["a", 3]}
    kept = compact(d)
    assert set(kept) == {"transports", "recommended", "summary", "path"}
    assert len(kept["summary"]) == 300 and len(kept["path"]["warnings"]) == 6
    sse = kept["transports"]["sse"]
    assert sse["latency_ms"] == 12.5 and len(sse["fix"]) == 600 and sse["findings"] == ["a"]
    assert "nested" not in sse and "junk" not in kept


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ([1, 2], "diagnosis JSON object"),
        ({"recommended": "sse"}, '"transports"'),
        ({"transports": ["sse"]}, '"transports"'),
        ({"transports": {"carrier_pigeon": {"ok": True}}}, "names none of"),
        ({"transports": {"sse": {"ok": "yes"}}}, "transports.sse"),
        ({"transports": {"sse": True}}, "transports.sse"),
        ({"transports": {"sse": {"ok": True}}, "recommended": "telnet"}, '"recommended"'),
    ],
)
def test_validate_rejects_what_is_not_a_diagnosis(payload: Any, needle: str) -> None:
    with pytest.raises(BadRequest) as info:
        validate(payload)
    assert info.value.status == 400 and info.value.code == "invalid_report"
    assert needle in info.value.detail


def test_transport_status_prefers_the_pages_status_and_derives_one_otherwise() -> None:
    assert transport_status({"ok": False, "status": "degraded"}) == "degraded"
    assert transport_status({"ok": True}) == "ok"
    assert transport_status({"ok": False, "buffered": True}) == "degraded"
    assert transport_status({"ok": False}) == "broken"
    assert transport_status({"ok": True, "status": "bogus"}) == "ok"


def test_aggregate_counts_each_transport_over_the_reports_that_tested_it() -> None:
    reports = [
        record(diagnosis()),
        record(diagnosis(ws=False)),
        record(diagnosis(ws=False, sse="degraded")),
        # A report that did not test WebSocket at all: not in WebSocket's denominator.
        record({"transports": {"short_poll": {"ok": True}, "long_poll": {"ok": False}}, "recommended": "short_poll"}),
        record(diagnosis(ws=False, sse="broken", lp=False, sp=False)),
    ]
    reports[-1]["time"] = 1_700_000_100.0
    summary = aggregate(reports)
    ws, sse, lp, sp = (summary["transports"][n] for n in ("websocket", "sse", "long_poll", "short_poll"))
    assert ws == {"tested": 4, "ok": 1, "degraded": 0, "broken": 3, "share_ok": 0.25}
    assert sse == {"tested": 4, "ok": 2, "degraded": 1, "broken": 1, "share_ok": 0.5}
    assert lp == {"tested": 5, "ok": 3, "degraded": 0, "broken": 2, "share_ok": 0.6}
    assert sp == {"tested": 5, "ok": 4, "degraded": 0, "broken": 1, "share_ok": 0.8}
    assert summary["recommended"] == {"websocket": 1, "sse": 1, "long_poll": 1, "short_poll": 1, "none": 1}
    assert summary["reports"] == 5
    assert (summary["first"], summary["last"]) == (1_700_000_000.0, 1_700_000_100.0)


def test_aggregate_counts_one_vote_per_client_its_newest_report() -> None:
    newest_first = [record(diagnosis(ws=False), client="10.9.9.9")] + [
        record(diagnosis(), client="10.9.9.9") for _ in range(20)
    ]
    newest_first.append(record(diagnosis(), client="10.8.8.8"))
    summary = aggregate(newest_first)
    assert summary["reports"] == 22 and summary["clients"] == 2
    assert summary["transports"]["websocket"] == {"tested": 2, "ok": 1, "degraded": 0, "broken": 1, "share_ok": 0.5}


def test_aggregate_of_nothing_has_no_shares() -> None:
    summary = aggregate([])
    assert summary["reports"] == 0 and summary["first"] is None
    assert all(t["share_ok"] is None and t["tested"] == 0 for t in summary["transports"].values())


# -- the routes, in-process --------------------------------------------------------------------------
def client(**diagnose: Any) -> Any:
    app = create_app({"server": {"operator_token": OP}, "diagnose": {"max_reports": 3} | diagnose})
    return app.test_client()


def listing(c: Any, **kw: Any) -> Any:
    r = c.get("/diagnose/reports?format=json", headers={"Authorization": f"Bearer {OP}"}, **kw)
    assert r.status_code == 200, r.data
    return r.json


def test_submitted_reports_are_listed_newest_first_with_who_sent_them() -> None:
    c = client()
    r = c.post(
        "/diagnose/reports",
        json=diagnosis(ws=False),
        headers={"User-Agent": "Firefox/1", "X-Forwarded-For": "203.0.113.9"},
    )
    assert r.status_code == 201
    assert r.json == {
        "stored": True,
        "shared": False,
        "recommended": "sse",
        "transports": {"websocket": "broken", "sse": "ok", "long_poll": "ok", "short_poll": "ok"},
    }
    c.post("/diagnose/reports", json=diagnosis(), headers={"User-Agent": "Chrome/2"})
    body = listing(c)
    assert [r["user_agent"] for r in body["reports"]] == ["Chrome/2", "Firefox/1"]
    first = body["reports"][1]
    # X-Forwarded-For from an untrusted peer is recorded as sent, but does not name the client.
    assert first["client"] == "127.0.0.1" and first["forwarded_for"] == "203.0.113.9"
    assert first["recommended"] == "sse" and first["diagnosis"] == diagnosis(ws=False)
    # One client, two reports: its newest one is its vote.
    assert body["summary"]["transports"]["websocket"]["share_ok"] == 1.0 and body["summary"]["clients"] == 1
    assert body["source"] == "memory" and body["limit"] == 3


def test_storage_is_bounded_and_drops_the_oldest() -> None:
    c = client()
    for i in range(5):
        assert c.post("/diagnose/reports", json=diagnosis(), headers={"User-Agent": f"UA{i}"}).status_code == 201
    body = listing(c)
    assert [r["user_agent"] for r in body["reports"]] == ["UA4", "UA3", "UA2"]
    assert body["summary"]["reports"] == 3


def test_one_address_cannot_flood_the_store() -> None:
    c = client(max_reports=100)
    codes = [c.post("/diagnose/reports", json=diagnosis()).status_code for _ in range(int(REPORT_BURST) + 1)]
    assert codes[:-1] == [201] * int(REPORT_BURST)
    r = c.post("/diagnose/reports", json=diagnosis())
    assert r.status_code == 429 and r.json["error"] == "too_many_reports"
    # Another address is not affected.
    other = c.post("/diagnose/reports", json=diagnosis(), environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert other.status_code == 201
    assert listing(c)["summary"]["reports"] == int(REPORT_BURST) + 1


def test_the_views_are_paginated_and_count_them_all() -> None:
    c = client()
    for i in range(3):
        c.post("/diagnose/reports", json=diagnosis(), headers={"User-Agent": f"UA{i}"}, environ_base=addr(i))
    page = c.get(f"/diagnose/reports?token={OP}&per_page=2").data.decode()
    assert page.count('<tr class="report">') == 2 and "UA2" in page and "UA0" not in page
    assert "Page 1 of 2" in page and "100% (3 of 3)" in page and f"page=2&amp;per_page=2&amp;token={OP}" in page
    second = c.get(f"/diagnose/reports?token={OP}&per_page=2&page=2").data.decode()
    assert second.count('<tr class="report">') == 1 and "UA0" in second
    body = c.get(f"/diagnose/reports?format=json&token={OP}&per_page=2&page=2").json
    assert [r["user_agent"] for r in body["reports"]] == ["UA0"]
    assert (body["page"], body["pages"], body["total"], body["per_page"]) == (2, 2, 3, 2)
    for query in ("page=0", "per_page=201", "page=x"):
        r = c.get(f"/diagnose/reports?format=json&token={OP}&{query}")
        assert r.status_code == 400 and r.json["error"].startswith("invalid_"), query


def test_reports_are_bounded_in_bytes_of_what_is_kept() -> None:
    """32 KB of `[],[],...` per report used to be kept whole (20x that as Python objects) and
    rendered whole in the views: now a compact copy is kept, bounded in bytes."""
    c = client(max_reports=1000)
    filler = [[]] * ((MAX_REPORT_BYTES - 800) // 6)
    junk = diagnosis(pad=filler) | {"transports": diagnosis()["transports"] | {"x": filler}}
    body = json.dumps(junk, separators=(",", ":"))
    assert MAX_REPORT_BYTES - 1000 < len(body) <= MAX_REPORT_BYTES
    for i in range(60):
        r = c.post("/diagnose/reports", data=body, content_type="application/json", environ_base=addr(i))
        assert r.status_code == 201, r.json
    store = state(c.application).part(Reports)
    assert store.kept_bytes <= 60 * 1500, store.kept_bytes
    raw = c.get("/diagnose/reports?format=json", headers={"Authorization": f"Bearer {OP}"}).data
    assert len(raw) < 100_000, len(raw)
    assert len(c.get(f"/diagnose/reports?token={OP}").data) < 200_000


def test_the_store_drops_the_oldest_past_its_byte_budget() -> None:
    store = Reports(1000, max_bytes=3 * MAX_KEPT_BYTES)
    big = diagnosis(summary="s" * 300, path={"warnings": ["w" * 300] * 6})
    for i in range(50):
        store.add(record(big, ua=f"UA{i}"))
    reports, _ = store.newest_first()
    assert store.kept_bytes <= 3 * MAX_KEPT_BYTES and reports[0]["user_agent"] == "UA49"
    assert 3 <= len(reports) < 50


def test_max_reports_zero_turns_submission_off() -> None:
    r = client(max_reports=0).post("/diagnose/reports", json=diagnosis())
    assert r.status_code == 403 and r.json["error"] == "reports_off"
    assert "diagnose.max_reports" in r.json["detail"]


@pytest.mark.parametrize(
    ("body", "ctype", "status", "code"),
    [
        (b"not json", "application/json", 400, "invalid_json"),
        (b"\xff\xfe", "application/json", 400, "invalid_json"),
        (b"[" * 15000 + b"]" * 15000, "application/json", 400, "invalid_json"),
        (json.dumps({"transports": {"sse": {"ok": 1}}}).encode(), "application/json", 400, "invalid_report"),
        (json.dumps(diagnosis(pad="x" * MAX_REPORT_BYTES)).encode(), "application/json", 413, "too_large"),
    ],
)
def test_bad_submissions_get_a_json_error_and_store_nothing(body: bytes, ctype: str, status: int, code: str) -> None:
    c = client()
    r = c.post("/diagnose/reports", data=body, content_type=ctype)
    assert r.status_code == status and r.json["error"] == code and r.json["detail"]
    assert listing(c)["reports"] == []


def test_operator_view_needs_a_configured_token() -> None:
    c = create_app({}).test_client()
    r = c.get("/diagnose/reports")
    assert r.status_code == 403 and r.json["error"] == "operator_view_off"
    assert "GATEWAY_OPERATOR_TOKEN" in r.json["detail"]
    # Sending reports still works: the operator may turn the view on later (or use Redis).
    assert c.post("/diagnose/reports", json=diagnosis()).status_code == 201


@pytest.mark.parametrize(
    ("headers", "query"),
    [({}, ""), ({"Authorization": "Bearer wrong"}, ""), ({}, "?token=wrong"), ({"Authorization": OP}, "")],
)
def test_operator_view_refuses_a_missing_or_wrong_token(headers: dict[str, str], query: str) -> None:
    r = client().get("/diagnose/reports" + query, headers=headers)
    assert r.status_code == 401 and r.json["error"] == "unauthorized"


def addr(i: int) -> dict[str, str]:
    return {"REMOTE_ADDR": f"192.0.2.{i % 250 + 1}" if i < 250 else f"198.51.100.{i % 250 + 1}"}


def test_operator_page_shows_reports_and_the_share_per_transport() -> None:
    c = client()
    for i, d in enumerate((diagnosis(), diagnosis(ws=False), diagnosis(ws=False, sse="degraded"))):
        c.post("/diagnose/reports", json=d, headers={"User-Agent": "<b>Agent</b>"}, environ_base=addr(i))
    r = c.get(f"/diagnose/reports?token={OP}")
    assert r.status_code == 200 and r.mimetype == "text/html" and r.headers["Cache-Control"] == "no-store"
    page = r.data.decode()
    assert '<tr data-transport="websocket">' in page and "33% (1 of 3)" in page  # WebSocket
    assert "67% (2 of 3)" in page  # SSE: one degraded
    assert page.count('<tr class="report">') == 3
    assert "&lt;b&gt;Agent&lt;/b&gt;" in page and "<b>Agent</b>" not in page  # escaped
    assert f"format=json&amp;token={OP}" in page  # the JSON link keeps the token
    # Content negotiation: Accept picks JSON, ?format=html wins over it, anything else is refused.
    auth = {"Authorization": f"Bearer {OP}"}
    assert c.get("/diagnose/reports", headers=auth | {"Accept": "application/json"}).json["summary"]["reports"] == 3
    assert c.get("/diagnose/reports?format=html", headers=auth | {"Accept": "application/json"}).mimetype == "text/html"
    assert c.get("/diagnose/reports?format=xml", headers=auth).status_code == 400


def test_live_page_validates_its_arguments() -> None:
    c = create_app({"demo": {"channel": "ticks"}}).test_client()
    page = c.get("/diagnose/live").data.decode()
    assert '"channel": "ticks"' in page or '"channel":"ticks"' in page
    assert "gateway-client.js" in page and "live.js" in page
    assert c.get("/diagnose/live?channel=prices&interval=500").status_code == 200
    for query in ("channel=%2Fbad", "interval=5", "interval=nan", "timeout=-1"):
        r = c.get("/diagnose/live?" + query)
        assert r.status_code == 400 and r.json["error"].startswith("invalid_"), query


# -- a real gateway process: the env token, real sockets ---------------------------------------------
def test_env_operator_token_and_reports_over_real_sockets(start_gateway: Any) -> None:
    gw = start_gateway({"diagnose": {"max_reports": 10}}, env={"GATEWAY_OPERATOR_TOKEN": "from-env"})
    r = requests.post(
        gw.url + "/diagnose/reports", json=diagnosis(sse="degraded"), timeout=5, headers={"User-Agent": "pytest-agent"}
    )
    assert r.status_code == 201, r.text
    assert requests.get(gw.url + "/diagnose/reports?token=nope", timeout=5).status_code == 401
    r = requests.get(
        gw.url + "/diagnose/reports",
        headers={"Authorization": "Bearer from-env", "Accept": "application/json"},
        timeout=5,
    )
    assert r.status_code == 200
    (report,) = r.json()["reports"]
    assert report["user_agent"] == "pytest-agent" and report["transports"]["sse"] == "degraded"


# -- Redis: every process sees every report; an outage falls back to memory ---------------------------
@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-reports"))
    yield server
    server.stop()


def test_reports_in_redis_are_shared_between_processes_and_capped(redis_url: RedisServer) -> None:
    one, two = Reports(3, redis_url.url), Reports(3, redis_url.url)
    assert one.add(record(diagnosis(), ua="from-one")) is True
    for i in range(3):
        assert two.add(record(diagnosis(ws=False), ua=f"from-two-{i}")) is True
    for store in (one, two):
        reports, source = store.newest_first()
        assert source == "redis"
        assert [r["user_agent"] for r in reports] == ["from-two-2", "from-two-1", "from-two-0"]
    # Deployments sharing one Redis under different redis.prefix values keep their own reports.
    assert Reports(3, redis_url.url, prefix="other:").newest_first() == ([], "redis")


def test_a_redis_outage_keeps_reports_in_memory(redis_url: RedisServer) -> None:
    redis_url.flush()
    store = Reports(5, redis_url.url)
    store.add(record(diagnosis(), ua="before"))
    redis_url.stop()
    try:
        assert store.add(record(diagnosis(), ua="during")) is False
        reports, source = store.newest_first()
        assert source == "memory" and [r["user_agent"] for r in reports] == ["during", "before"]
    finally:
        redis_url.start()


def test_the_app_shares_reports_through_redis(redis_url: RedisServer) -> None:
    redis_url.flush()
    apps = [create_app({"redis": {"url": redis_url.url}, "server": {"operator_token": OP}}) for _ in range(2)]
    try:
        assert apps[0].test_client().post("/diagnose/reports", json=diagnosis()).json["shared"] is True
        body = listing(apps[1].test_client())
        assert body["source"] == "redis" and len(body["reports"]) == 1
    finally:
        for app in apps:
            state(app).hub.store.close()


# -- the share buttons, in a real browser ------------------------------------------------------------
@pytest.fixture(scope="module")
def share_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway({"server": {"operator_token": OP}}, Path(tmp_path_factory.mktemp("share")))
    yield gw
    gw.stop()


def test_share_buttons_copy_and_send_the_diagnosis(share_gateway: Gateway, chromium: Any) -> None:
    d = diagnosis(ws=False, summary="Use Server-Sent Events.")
    context = chromium.new_context(permissions=["clipboard-read", "clipboard-write"])
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(share_gateway.url + "/healthz")  # any page of the gateway's origin
        page.set_content('<h1>verdict</h1><div id="diagnose-share"></div>')
        page.add_script_tag(url="/static/diagnose-share.js")
        send = page.locator("#diagnose-send")
        assert send.is_disabled() and page.locator("#diagnose-copy").is_disabled()  # no verdict yet
        page.evaluate("d => { window.__diagnosis = d; }", d)
        page.wait_for_function("!document.getElementById('diagnose-send').disabled", timeout=5000)

        page.click("#diagnose-copy")
        page.wait_for_function(
            "document.getElementById('diagnose-share-result').textContent.includes('Copied')", timeout=5000
        )
        assert json.loads(page.evaluate("navigator.clipboard.readText()")) == d

        page.click("#diagnose-send")
        page.wait_for_function(
            "document.getElementById('diagnose-share-result').textContent.startsWith('Sent')", timeout=5000
        )
        assert send.is_disabled()  # one report per run
        r = requests.get(
            share_gateway.url + "/diagnose/reports?format=json", timeout=5, headers={"Authorization": f"Bearer {OP}"}
        )
        (report,) = r.json()["reports"]
        assert report["diagnosis"] == d and "HeadlessChrome" in report["user_agent"]

        # A refused report says why, and the button stays usable.
        page.evaluate("() => { window.__diagnosis = {transports: {sse: {ok: 'maybe'}}}; }")
        page.wait_for_function("!document.getElementById('diagnose-send').disabled", timeout=5000)
        page.click("#diagnose-send")
        page.wait_for_function(
            "document.getElementById('diagnose-share-result').textContent.includes('transports.sse')", timeout=5000
        )
        assert not send.is_disabled()
        assert errors == []
    finally:
        context.close()


def test_a_real_diagnose_run_reaches_the_operator(share_gateway: Gateway, chromium: Any) -> None:
    context = chromium.new_context()
    try:
        page = context.new_page()
        page.goto(share_gateway.url + "/diagnose?hold=1", wait_until="domcontentloaded")
        page.wait_for_function("window.__diagnosis !== undefined", timeout=60_000, polling=200)
        page.click("#diagnose-send")
        page.wait_for_function(
            "document.getElementById('diagnose-share-result').textContent.startsWith('Sent')", timeout=5000
        )
        verdict = page.evaluate("window.__diagnosis")
    finally:
        context.close()
    r = requests.get(share_gateway.url + f"/diagnose/reports?format=json&token={OP}", timeout=5)
    report = r.json()["reports"][0]
    assert report["diagnosis"] == compact(verdict)  # the compact copy of what the page had
    assert report["diagnosis"]["transports"]["sse"]["findings"] == verdict["transports"]["sse"]["findings"]
    assert report["recommended"] == verdict["recommended"]
    assert report["transports"] == {name: verdict["transports"][name]["status"] for name in report["transports"]}
    assert set(report["transports"]) == {"websocket", "sse", "long_poll", "short_poll"}


@pytest.fixture(scope="module")
def chromium(browser: Any) -> Any:  # noqa: F811
    return browser
