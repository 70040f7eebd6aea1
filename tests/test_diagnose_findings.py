"""The verdict's findings (codes, not English) on raw results recorded from real runs, the
real-channel rules, the config lines offered for cuts, and the one plan's raw-result schema."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.diagnose.plan import PLAN, RAW_SCHEMA, unknown_fields
from gateway.diagnose.verdict import findings, verdict
from gateway.diagnose.verdict.advice import ADVICE, PATH_ADVICE

RECORDED = json.loads((Path(__file__).parent / "test_diagnose_recorded.json").read_text())


def recorded(name: str) -> dict[str, Any]:
    return copy.deepcopy(RECORDED[name])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("direct", {"websocket": ["ws.ok"], "long_poll": ["lp.ok"], "short_poll": ["sp.ok"]}),
        ("no_upgrade", {"websocket": ["ws.http10"], "sse": ["sse.ok", "sse.resume_ok"]}),
        ("buffered", {"sse": ["sse.headers_held", "sse.padding_useless"], "websocket": ["ws.http10"]}),
        ("timeout5", {"long_poll": ["lp.cut"], "sse": ["sse.cut"], "websocket": ["ws.cut"]}),
        ("host_rewrite", {"websocket": ["real.origin_refused"], "sse": ["sse.ok", "sse.resume_ok"]}),
        ("realtime_real_checks", {"websocket": ["ws.ok"], "sse": ["sse.ok", "sse.resume_ok"]}),
        (
            "tls_http2",
            {"websocket": ["ws.ok"], "sse": ["sse.ok", "sse.resume_ok"], "path": ["path.http2", "path.short_hold"]},
        ),
        (
            "haproxy_thorough_4s",
            {"long_poll": ["lp.cut"], "sse": ["sse.cut"], "websocket": ["ws.cut"], "path": ["path.six_connections"]},
        ),
    ],
)
def test_recorded_runs_have_these_findings(name: str, expected: dict[str, list[str]]) -> None:
    got = findings(verdict(recorded(name)))
    for transport, codes in expected.items():
        assert got[transport] == codes, (transport, got)


def test_recorded_host_rewrite_recommends_what_really_works() -> None:
    v = verdict(recorded("host_rewrite"))
    assert v["recommended"] == "sse" and v["transports"]["websocket"]["real_status"] == 403
    assert "path.host_rewritten" in v["path"]["findings"]
    # The same run without its real-channel checks (an older page): inferred nothing, WebSocket ok.
    raw = recorded("host_rewrite")
    del raw["real"]
    assert verdict(raw)["recommended"] == "websocket"


def real(status: int | None, error: str | None = None, ws: bool = False) -> dict[str, Any]:
    if ws:
        seen = [{"transport": "websocket", "status": status, "error": error, "origin": "https://app.example"}]
        return {"opened": False, "close_code": 1006, "seen": seen}
    return {"status": status, "error": error}


def with_real(**checks: dict[str, Any]) -> dict[str, Any]:
    raw = recorded("direct")
    raw["real"] = {"channel": "probe-real.x", **checks}
    return raw


def test_a_401_on_real_channels_is_not_ok_and_says_send_a_token() -> None:
    raw = with_real(
        short_poll=real(401, "unauthorized"),
        long_poll=real(401, "unauthorized"),
        sse=real(401, "unauthorized"),
        websocket=real(401, "unauthorized", ws=True),
    )
    v = verdict(raw)
    for t in v["transports"].values():
        assert t["ok"] is False and t["status"] == "degraded" and t["findings"][-1] == "real.unauthorized", t
        assert "token" in t["fix"]
    assert v["recommended"] is None and v["fallback"] == "websocket"
    raw["client"]["token"] = True
    assert "not accepted" in verdict(raw)["transports"]["sse"]["reason"]


def test_a_403_forbidden_and_other_refusals_on_real_channels() -> None:
    v = verdict(with_real(sse=real(403, "forbidden"), short_poll=real(503, "busy"), websocket={"opened": True}))
    assert v["transports"]["sse"]["findings"][-1] == "real.forbidden"
    assert v["transports"]["short_poll"]["findings"][-1] == "real.refused"
    assert v["transports"]["websocket"]["ok"] is True and v["recommended"] == "websocket"


def test_origin_refusal_on_a_real_channel_names_both_remedies() -> None:
    t = verdict(with_real(websocket=real(403, "origin_not_allowed", ws=True)))["transports"]["websocket"]
    assert t["findings"] == ["real.origin_refused"] and t["status"] == "broken"
    assert "proxy_set_header Host $host;" in t["fix"] and 'allowed_origins = ["https://app.example"]' in t["fix"]


def test_a_transport_already_broken_keeps_its_own_finding() -> None:
    raw = recorded("no_upgrade")
    raw["real"] = {"websocket": real(403, "origin_not_allowed", ws=True)}
    assert findings(verdict(raw))["websocket"] == ["ws.http10"]


@pytest.mark.parametrize(
    "junk", [None, [], "x", {"websocket": "x"}, {"websocket": {"opened": "yes", "seen": [1, None, {"status": "x"}]}}]
)
def test_malformed_real_checks_are_no_evidence(junk: Any) -> None:
    raw = recorded("direct")
    raw["real"] = junk
    assert verdict(raw)["recommended"] == "websocket"


def test_cuts_offer_the_exact_config_lines() -> None:
    v = verdict(recorded("timeout5"))
    t = v["transports"]
    assert t["sse"]["config"] == "[sse]\nheartbeat_s = 2", t["sse"]
    assert t["websocket"]["config"] == "[websocket]\nping_s = 2"
    assert t["long_poll"]["config"] == "[poll]\nlongpoll_max_timeout_s = 4\nlongpoll_default_timeout_s = 4"
    assert "[sse]\nheartbeat_s = 2" in t["sse"]["fix"] and "longpoll_max_timeout_s = 4" in t["long_poll"]["fix"]


def test_a_short_run_that_saw_no_cut_says_longer_limits_would_not_show() -> None:
    v = verdict(recorded("direct"))
    assert "path.short_hold" in v["path"]["findings"] and "thorough" in v["path"]["warnings"][-1]
    raw = recorded("direct")
    raw["mode"] = "thorough"
    assert "path.short_hold" not in verdict(raw)["path"]["findings"]


def test_http2_pages_get_no_six_connection_warning() -> None:
    raw = recorded("direct")
    raw["client"].update(protocol="h2", secure=True)
    path = verdict(raw)["path"]
    assert "path.six_connections" not in path["findings"] and "path.http2" in path["findings"]
    assert path["http2"] is True and path["on_http2_connection"] == ["short_poll", "long_poll", "sse"]


def test_every_finding_has_advice_and_the_verdict_needs_no_flask() -> None:
    for name in RECORDED:
        v = verdict(recorded(name))
        for t in v["transports"].values():
            assert t["findings"] and all(code in ADVICE for code in t["findings"]), t
        assert all(code in PATH_ADVICE for code in v["path"]["findings"])
    import subprocess

    probe = "import sys, gateway.diagnose.verdict; print([m for m in sys.modules if m.startswith('flask')])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", ["host_rewrite", "realtime_real_checks", "tls_http2", "haproxy_thorough_4s"])
def test_the_pages_raw_results_follow_the_plans_schema(name: str) -> None:
    raw = recorded(name)
    assert raw["plan_version"] == PLAN["version"]
    assert unknown_fields(raw) == []


def test_unknown_fields_names_drift() -> None:
    assert unknown_fields({"probes": {"sse": {"burst": {"n": 1, "extra": 2}}}, "x": 1}) == [
        "probes.sse.burst.extra",
        "x",
    ]
    assert set(RAW_SCHEMA["probes"]) == {"short_poll", "long_poll", "sse", "websocket"}


def test_a_flush_inside_the_burst_is_still_bunching() -> None:
    """Recorded through a proxy releasing data every 2 s: four frames let out together, the last at
    the next flush. The whole spread looks wide, but the frames between flushes were held back."""
    from gateway.diagnose.verdict import analyse_burst

    sent = 1_796_186_270_559
    arrivals = [(0, 2004), (1, 2004), (2, 2005), (3, 2005), (4, 4166)]
    burst = {"n": 5, "gap_ms": 300, "delay_ms": 0, "post_status": 202}
    burst["arrivals"] = [{"seq": q, "sent_ms": sent + 300 * q, "at_ms": at} for q, at in arrivals]
    assert analyse_burst(burst)["bunched"] is True
    spaced = dict(burst, arrivals=[{"seq": q, "sent_ms": sent + 300 * q, "at_ms": 40 + 300 * q} for q in range(5)])
    assert analyse_burst(spaced)["bunched"] is False


def test_platform_limits_come_with_the_config_lines() -> None:
    raw = recorded("direct")
    raw["facts"]["platform"] = "heroku"
    raw["facts"]["gateway"].update(sse_heartbeat_s=60, longpoll_max_timeout_s=40)
    path = verdict(raw)["path"]
    assert path["findings"].count("path.platform_setting") == 2
    assert any(w.endswith("[sse]\nheartbeat_s = 27") for w in path["warnings"]), path["warnings"]
    assert any("[poll]\nlongpoll_max_timeout_s = 29" in w for w in path["warnings"]), path["warnings"]


def test_a_publish_request_that_waited_is_not_the_transports_latency() -> None:
    """Recorded on a loaded machine: the long poll's publish request took 1.2 s (the path's round
    trip is 14 ms), so its event came 1.5 s late; the transport itself delivered at once."""
    raw = recorded("direct")
    raw["min_rtt_ms"] = 14
    lp = raw["probes"]["long_poll"]
    lp["event"]["latency_ms"] = 1534
    lp["burst"] = {"n": 1, "gap_ms": 0, "delay_ms": 1000, "post_status": 202, "post_ms": 1201}
    lp["burst"]["arrivals"] = [{"seq": 0, "sent_ms": 1796187646463, "at_ms": 2534}]
    t = verdict(raw)["transports"]["long_poll"]
    assert t["findings"] == ["lp.ok"] and t["latency_ms"] < 400, t
    del lp["burst"]["post_ms"]  # without the publish's own timing: slow, as measured
    assert verdict(raw)["transports"]["long_poll"]["findings"] == ["lp.slow"]
