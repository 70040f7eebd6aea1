"""The verdict (gateway/diagnose/verdict/) on raw probe results recorded from real runs (headless
Chromium through real nginx, see test_diagnose_browser.py) and on synthetic patterns of hostile
paths. Its sentences; test_diagnose_findings.py asserts the finding codes."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.diagnose.verdict import analyse_burst, verdict

RECORDED = json.loads((Path(__file__).parent / "test_diagnose_recorded.json").read_text())


def recorded(name: str) -> dict[str, Any]:
    return copy.deepcopy(RECORDED[name])


def spaced_burst(gap: int = 300, n: int = 5, latency: int = 40, spread: int | None = None) -> dict[str, Any]:
    """A burst whose arrivals keep the send spacing (spread=None) or are squeezed into `spread` ms."""
    arrivals = []
    for seq in range(n):
        offset = seq * gap if spread is None else seq * spread // max(1, n - 1)
        arrivals.append({"seq": seq, "sent_ms": 1_000_000 + seq * gap, "at_ms": latency + offset})
    return {"n": n, "gap_ms": gap, "delay_ms": 0, "arrivals": arrivals}


def check_contract_shape(v: dict[str, Any]) -> None:
    assert set(v["transports"]) == {"short_poll", "long_poll", "sse", "websocket"}
    for t in v["transports"].values():
        assert isinstance(t["ok"], bool)
        assert t["status"] in ("ok", "degraded", "broken")
        assert t["ok"] == (t["status"] == "ok")
        assert isinstance(t["reason"], str) and t["reason"]
    assert isinstance(v["transports"]["sse"]["buffered"], bool)
    ok = [n for n in ("websocket", "sse", "long_poll", "short_poll") if v["transports"][n]["ok"]]
    assert v["recommended"] == (ok[0] if ok else None)
    json.dumps(v)  # plain data


# -- recorded runs -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["direct", "realtime", "buffered_http11"])
def test_recorded_clean_paths_all_ok(name: str) -> None:
    v = verdict(recorded(name))
    check_contract_shape(v)
    assert all(t["ok"] for t in v["transports"].values()), v
    assert v["transports"]["sse"]["buffered"] is False
    assert v["recommended"] == "websocket"


def test_recorded_nginx_without_upgrade_breaks_only_websocket() -> None:
    v = verdict(recorded("no_upgrade"))
    check_contract_shape(v)
    ws = v["transports"]["websocket"]
    assert ws["status"] == "broken"
    assert "Upgrade" in ws["reason"] and "proxy_set_header Upgrade" in ws["fix"]
    assert all(v["transports"][n]["ok"] for n in ("sse", "long_poll", "short_poll"))
    assert v["recommended"] == "sse"
    assert v["path"]["proxy"] is True and v["path"]["hop_http_version"] == "HTTP/1.0"


def test_recorded_nginx_buffering_reports_sse_buffered() -> None:
    v = verdict(recorded("buffered"))
    check_contract_shape(v)
    sse = v["transports"]["sse"]
    assert sse["buffered"] is True and sse["ok"] is False
    assert "buffer" in sse["reason"] and "proxy_buffering off" in sse["fix"]
    assert sse["works_with_padding"] is False
    assert v["transports"]["long_poll"]["ok"] and v["transports"]["short_poll"]["ok"]
    assert v["recommended"] == "long_poll"


def test_recorded_nginx_read_timeout_reports_cuts_with_the_limit() -> None:
    raw = recorded("timeout5")
    v = verdict(raw)
    check_contract_shape(v)
    lp, sse, ws = (v["transports"][n] for n in ("long_poll", "sse", "websocket"))
    assert lp["status"] == "degraded" and 4 <= lp["cut_after_s"] <= 6.5 and "~5 s" in lp["reason"]
    assert "504" in lp["reason"] and "proxy_read_timeout" in lp["fix"]
    for t in (sse, ws):
        assert t["ok"] is False and t["status"] == "degraded"
        assert 4 <= t["idle_limit_s"] <= 6.5 and "~5 s after the last traffic" in t["reason"]
    assert 4 <= v["path"]["idle_limit_s"] <= 6.5
    assert v["recommended"] == "short_poll"


# -- synthetic patterns --------------------------------------------------------------------------


def test_bunched_burst_is_buffered_and_padding_that_helps_is_reported() -> None:
    raw = recorded("direct")
    sse = raw["probes"]["sse"]
    sse["burst"] = spaced_burst(spread=20, latency=1300)
    sse["padding"] = {"bytes": 2048, "status": 200, "first_byte_ms": 5, "burst": spaced_burst()}
    t = verdict(raw)["transports"]["sse"]
    assert t["buffered"] is True and t["ok"] is False and t["status"] == "degraded"
    assert t["works_with_padding"] is True and "works with padding" in t["reason"]
    assert "padding_bytes = 2048" in t["fix"]


def test_analyse_burst_keeps_or_loses_spacing() -> None:
    assert analyse_burst(spaced_burst())["bunched"] is False
    squeezed = analyse_burst(spaced_burst(spread=100))
    assert squeezed["bunched"] is True and squeezed["received"] == 5
    empty = analyse_burst({"n": 5, "gap_ms": 300, "arrivals": []})
    assert (empty["received"], empty["expected"], empty["bunched"]) == (0, 5, False)
    assert analyse_burst("garbage")["received"] == 0


def test_websocket_that_opens_but_relays_nothing() -> None:
    raw = recorded("direct")
    ws = raw["probes"]["websocket"]
    ws["echo"] = {"arrived": False, "rtt_ms": None}
    ws["burst"] = {"n": 5, "gap_ms": 300, "delay_ms": 0, "arrivals": []}
    ws["alive"] = {"arrived": False, "rtt_ms": None}
    t = verdict(raw)["transports"]["websocket"]
    assert t["status"] == "broken" and "nothing arrives" in t["reason"]


def test_websocket_refused_by_origin_check_explains_host_rewrite() -> None:
    raw = recorded("direct")
    raw["probes"]["websocket"] = {
        "hold_s": 3,
        "opened": False,
        "close_code": 1006,
        "seen": [
            {
                "transport": "websocket",
                "http_version": "HTTP/1.1",
                "upgrade": "websocket",
                "connection": "upgrade",
                "origin": "http://example.test:8080",
                "host": "backend:5000",
                "status": 403,
                "error": "origin_not_allowed",
            }
        ],
    }
    t = verdict(raw)["transports"]["websocket"]
    assert t["status"] == "broken" and t["findings"] == ["ws.origin_refused"]
    assert "proxy_set_header Host $host;" in t["fix"] and "server.allowed_origins" in t["fix"]


def test_websocket_blocked_before_the_gateway() -> None:
    raw = recorded("direct")
    raw["probes"]["websocket"] = {"hold_s": 3, "opened": False, "seen": [], "http_status": 403}
    t = verdict(raw)["transports"]["websocket"]
    assert t["status"] == "broken" and "never reached the gateway" in t["reason"] and "HTTP 403" in t["reason"]


def test_cached_short_poll_is_broken() -> None:
    raw = recorded("direct")
    raw["probes"]["short_poll"]["event_seen"] = False
    t = verdict(raw)["transports"]["short_poll"]
    assert t["status"] == "broken" and "cached" in t["reason"]


def test_long_poll_reset_and_html_error_pages() -> None:
    raw = recorded("direct")
    lp = raw["probes"]["long_poll"]
    lp["idle"] = {"status": None, "error": "TypeError: Failed to fetch", "elapsed_s": 9.8, "json": False}
    t = verdict(raw)["transports"]["long_poll"]
    assert t["status"] == "degraded" and t["cut_after_s"] == 9.8 and "~10 s" in t["reason"]
    lp["event"] = {"status": 502, "arrived": False, "json": False}
    t = verdict(raw)["transports"]["long_poll"]
    assert t["status"] == "broken" and "502" in t["reason"]


def test_long_poll_that_never_answers_is_not_called_cut() -> None:
    raw = recorded("direct")
    hold = raw["probes"]["long_poll"]["hold_s"]
    raw["probes"]["long_poll"]["idle"] = {
        "status": None,
        "error": "no answer before the deadline",
        "elapsed_s": hold + 15,
        "json": False,
    }
    t = verdict(raw)["transports"]["long_poll"]
    assert t["status"] == "degraded" and "never got its answer" in t["reason"] and t["cut_after_s"] is None


def test_sse_answered_by_something_else() -> None:
    raw = recorded("direct")
    raw["probes"]["sse"].update(status=200, content_type="text/html; charset=utf-8")
    t = verdict(raw)["transports"]["sse"]
    assert t["status"] == "broken" and "text/html" in t["reason"]


def test_sse_resume_failure_is_a_note_not_a_downgrade() -> None:
    # Live events still flow promptly, so the contract's ok holds; the note and fix say what to change.
    raw = recorded("direct")
    raw["probes"]["sse"]["resume"] = {"ok": False, "expected": 4, "received": 0, "error": "no missed events came back"}
    t = verdict(raw)["transports"]["sse"]
    assert t["ok"] is True and "Last-Event-ID" in t["reason"] and "Last-Event-ID" in t["fix"]
    assert t["notes"]


def test_lost_events_degrade() -> None:
    raw = recorded("direct")
    raw["probes"]["sse"]["burst"] = spaced_burst(n=5)
    raw["probes"]["sse"]["burst"]["arrivals"] = raw["probes"]["sse"]["burst"]["arrivals"][:3]
    raw["probes"]["websocket"]["burst"] = copy.deepcopy(raw["probes"]["sse"]["burst"])
    v = verdict(raw)
    for name in ("sse", "websocket"):
        assert v["transports"][name]["status"] == "degraded" and "3 of 5" in v["transports"][name]["reason"]


def test_stream_that_goes_silent_after_idle() -> None:
    raw = recorded("direct")
    raw["probes"]["sse"]["alive"] = {"arrived": False, "latency_ms": None}
    raw["probes"]["websocket"]["alive"] = {"arrived": False, "rtt_ms": None}
    v = verdict(raw)
    assert v["transports"]["sse"]["status"] == "degraded" and "silent" in v["transports"]["sse"]["reason"]
    assert v["transports"]["websocket"]["status"] == "degraded"
    assert v["recommended"] == "long_poll"


def test_heroku_is_recognised_and_its_limits_applied() -> None:
    raw = recorded("direct")
    raw["facts"]["platform"] = "heroku"
    raw["facts"]["headers"] = {"Via": "1.1 vegur", "X-Forwarded-For": "203.0.113.9"}
    v = verdict(raw)
    assert v["path"]["platform"] == "heroku" and v["path"]["platform_limits"]["idle_s"] == 55
    assert any("55 s" in w for w in v["path"]["warnings"])
    assert any("HTTP/1.1" in w for w in v["path"]["warnings"])
    assert not any("set it below" in w for w in v["path"]["warnings"])  # the defaults fit Heroku
    raw["facts"]["gateway"].update(sse_heartbeat_s=60, longpoll_max_timeout_s=40)
    warnings = verdict(raw)["path"]["warnings"]
    assert any("sse.heartbeat_s is 60 s" in w for w in warnings)
    assert any("poll.longpoll_max_timeout_s is 40 s" in w and "below 30" in w for w in warnings)


@pytest.mark.parametrize("raw", [{}, {"probes": None}, {"probes": {"sse": "x", "websocket": [1]}}, [], "nonsense"])
def test_malformed_results_never_raise(raw: Any) -> None:
    v = verdict(raw)
    check_contract_shape(v)
    assert v["recommended"] is None
    assert all(t["status"] == "broken" for t in v["transports"].values())


def test_garbled_field_types_read_as_no_evidence() -> None:
    raw = recorded("direct")
    raw["probes"]["sse"]["burst"] = {"n": "five", "arrivals": [{"seq": "a"}, None, 3]}
    raw["probes"]["long_poll"]["hold_s"] = "long"
    raw["probes"]["websocket"]["echo"] = "yes"
    v = verdict(raw)
    check_contract_shape(v)
    assert v["transports"]["sse"]["ok"] is False


def test_slow_link_is_not_called_slow_twice() -> None:
    # 600 ms each way: the publish request takes 600 ms to reach the gateway, the event 600 ms back.
    burst = spaced_burst(latency=1200)
    assert analyse_burst(burst, one_way_ms=600)["first_latency_ms"] == 600
    raw = recorded("direct")
    raw["min_rtt_ms"] = 1200
    raw["probes"]["long_poll"]["event"]["latency_ms"] = 1800
    raw["probes"]["sse"]["burst"] = burst
    v = verdict(raw)
    assert v["transports"]["long_poll"]["latency_ms"] == 1200 and v["transports"]["long_poll"]["ok"]
    assert v["transports"]["sse"]["latency_ms"] == 600 and v["transports"]["sse"]["ok"]


def test_websocket_handshake_refused_after_arriving_with_upgrade() -> None:
    raw = recorded("direct")
    raw["probes"]["websocket"] = {
        "hold_s": 3,
        "opened": False,
        "seen": [
            {
                "transport": "websocket",
                "http_version": "HTTP/1.1",
                "upgrade": "websocket",
                "connection": "Upgrade",
                "status": 400,
                "error": "bad_request",
            }
        ],
    }
    t = verdict(raw)["transports"]["websocket"]
    assert t["status"] == "broken" and "HTTP 400" in t["reason"] and "altered" in t["reason"]


def test_a_refused_test_publisher_is_not_blamed_on_the_path() -> None:
    raw = recorded("direct")
    refused = {"n": 5, "gap_ms": 300, "delay_ms": 0, "arrivals": [], "post_status": 429, "post_error": "HTTP 429"}
    raw["probes"]["sse"]["burst"] = copy.deepcopy(refused)
    raw["probes"]["short_poll"]["burst"] = copy.deepcopy(refused)
    raw["probes"]["short_poll"]["event_seen"] = False
    raw["probes"]["websocket"]["burst"] = copy.deepcopy(refused)
    v = verdict(raw)
    for name in ("sse", "short_poll"):
        assert "could not be tested" in v["transports"][name]["reason"] and "429" in v["transports"][name]["reason"]
    assert v["transports"]["sse"]["buffered"] is False
    assert v["transports"]["websocket"]["ok"] is True  # the echo proved both directions


def test_long_poll_replaying_a_cached_answer_is_broken() -> None:
    """Recorded through tests/hostile.py's caching proxy: the same long-poll URL asked again
    after a publish came back at once with the old, empty answer."""
    raw = recorded("direct")
    raw["probes"]["long_poll"]["repeat"] = {"status": 200, "json": True, "arrived": False, "published": True}
    v = verdict(raw)
    check_contract_shape(v)
    t = v["transports"]["long_poll"]
    assert t["status"] == "broken" and "caches /longpoll/" in t["reason"] and "no-store" in t["fix"]


@pytest.mark.parametrize(
    "repeat",
    [
        {"status": 200, "json": True, "arrived": True, "published": True},  # a clean path
        {"status": 200, "json": True, "arrived": False, "published": False},  # the publisher was busy: no evidence
        {"status": None, "json": False, "arrived": False, "published": True, "error": "no answer"},  # not a cache
    ],
)
def test_long_poll_repeat_without_evidence_of_a_cache_stays_ok(repeat: dict[str, Any]) -> None:
    raw = recorded("direct")
    raw["probes"]["long_poll"]["repeat"] = repeat
    assert verdict(raw)["transports"]["long_poll"]["status"] == "ok"


def test_websocket_answered_by_the_path_itself() -> None:
    """A 101 the gateway never saw (recorded through tests/hostile.py's fake_101 proxy)."""
    raw = recorded("direct")
    raw["probes"]["websocket"] = {
        "hold_s": 3,
        "opened": True,
        "open_ms": 11,
        "close_code": 1006,
        "echo": {"arrived": False, "rtt_ms": None},
        "closed_after_s": 0.206,
        "idle_before_close_s": 0.206,
        "burst": {"n": 5, "gap_ms": 300, "delay_ms": 0, "arrivals": [], "post_status": 202},
        "seen": [],
    }
    t = verdict(raw)["transports"]["websocket"]
    assert t["status"] == "broken" and "never received this handshake" in t["reason"] and "~0.2 s" in t["reason"]
    # The gateway did see it (the blackhole case): the old explanation stands.
    raw["probes"]["websocket"]["seen"] = [{"transport": "websocket", "status": 101, "upgrade": "websocket"}]
    t = verdict(raw)["transports"]["websocket"]
    assert t["status"] == "broken" and "never received" not in t["reason"]


def _cut_run(lp: float, sse: tuple[float, float], ws: tuple[float, float]) -> dict[str, Any]:
    """A run whose long poll was cut after `lp` s and whose streams were cut after (total, idle) s."""
    raw = recorded("direct")
    p = raw["probes"]
    p["long_poll"]["hold_s"] = p["sse"]["hold_s"] = p["websocket"]["hold_s"] = 8
    p["long_poll"]["idle"] = {"status": 504, "json": False, "elapsed_s": lp, "error": None}
    p["sse"].pop("alive", None)
    p["websocket"].pop("alive", None)
    p["sse"].update(ended_after_s=sse[0], idle_before_end_s=sse[1])
    p["websocket"].update(closed_after_s=ws[0], idle_before_close_s=ws[1])
    return raw


def test_connection_lifetime_cap_is_not_called_an_idle_timeout() -> None:
    """Every connection closed ~4 s after opening although the streams had traffic at ~1.5 s
    (tests/hostile.py "lifetime"): heartbeats would not help, so they are not advised."""
    v = verdict(_cut_run(4.0, (4.1, 2.6), (4.0, 2.7)))
    check_contract_shape(v)
    assert v["path"]["lifetime_limit_s"] == 4.0 and v["path"]["idle_limit_s"] is None
    assert any("busy or not" in w for w in v["path"]["warnings"])
    for name in ("sse", "websocket"):
        t = v["transports"][name]
        assert t["status"] == "degraded" and "busy or not" in t["reason"] and "do not help" in t["fix"], t
    assert "maximum connection lifetime" in v["transports"]["long_poll"]["fix"]


def test_idle_timeout_is_not_called_a_lifetime_cap() -> None:
    """nginx proxy_read_timeout 5s as recorded: the busy streams outlived the idle long poll."""
    v = verdict(_cut_run(5.0, (6.3, 5.0), (6.0, 4.7)))
    assert "lifetime_limit_s" not in v["path"] and v["path"]["idle_limit_s"] == 4.7
    assert "heartbeat_s below" in v["transports"]["sse"]["fix"]


def test_event_stream_ended_at_once_is_not_an_idle_timeout() -> None:
    """Recorded through tests/hostile.py "end_sse": headers, then the end, no byte of the stream."""
    raw = recorded("direct")
    sse = raw["probes"]["sse"]
    for key in ("alive", "resume", "padding"):
        sse.pop(key, None)
    sse.update(ended_after_s=0.06, idle_before_end_s=0.06, first_byte_ms=None, heartbeats=0, error="network error")
    sse["burst"] = {"n": 5, "gap_ms": 300, "delay_ms": 0, "arrivals": [], "post_status": None}
    t = verdict(raw)["transports"]["sse"]
    assert t["status"] == "broken" and "right after it opened" in t["reason"], t
    assert "heartbeat_s" not in t["fix"] and "text/event-stream" in t["fix"]
    # A stream that got its first bytes and was closed later is still read as a cut.
    sse.update(hold_s=8, ended_after_s=4.5, idle_before_end_s=4.4, first_byte_ms=60)
    t = verdict(raw)["transports"]["sse"]
    assert "closed after ~4 s" in t["reason"] and "heartbeat_s" in t["fix"], t
