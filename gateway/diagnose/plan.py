"""The one probe plan: what the /diagnose page (static/diagnose.js) and the CLI
(`python -m gateway.diagnose`) both run, and the raw-result schema both send to the one verdict.

The page gets PLAN as JSON in its template; the CLI imports it. Change a number here and both
change. Nothing here imports Flask.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PLAN", "PROBE_PREFIX", "REAL_PREFIX", "RAW_SCHEMA", "unknown_fields"]

# Probe channels: fresh, under this prefix, exempt from the origin rule (the page must measure
# the path, not the policy) and published to by the gateway's own bursts.
PROBE_PREFIX = "diag."
# A channel nobody uses, under no exemption: what a real page of the site gets on a real
# channel through this path (the gateway's origin rule; with access control on, authorization).
REAL_PREFIX = "probe-real."

PLAN: dict[str, Any] = {
    "version": 2,
    "channels": {"probe_prefix": PROBE_PREFIX, "real_prefix": REAL_PREFIX},
    # The timed burst over each stream: n events gap_ms apart, published by the gateway.
    "burst": {"n": 5, "gap_ms": 300},
    # Bytes of initial SSE padding tried where events were held back.
    "padding_bytes": 2048,
    # Event names of the bursts, so a probe knows its own events.
    "tags": {
        "short_poll": "sp",
        "long_poll": "lp",
        "long_poll_repeat": "lprep",
        "stream": "burst",
        "alive": "alive",
    },
    "short_poll": {"polls": 8, "pause_ms": 250},
    "long_poll": {"event_delay_ms": 1000},
    # Deadlines and waits, in seconds.
    "waits": {
        "request": 8,  # one plain request
        "facts": 8,
        "open": 4,  # a stream's headers, before its burst is timed anyway
        "handshake": 10,  # a WebSocket handshake
        "echo": 5,  # the first WebSocket echo
        "alive": 3,  # the check after the hold that a stream still delivers
        "burst_slack": 3,  # beyond n * gap_ms for a burst to arrive
        "hold_slack": 15,  # beyond the hold for a held request or stream to end by itself
        "padding_slack": 12,
        "resume": 4,
        "seen": 5,
        "real": 5,  # each real-channel check
        "run_slack": 45,  # beyond the hold for the whole run
    },
    # When the burst endpoint is busy (429/503: many people behind one address), wait and retry.
    "retries": {"burst_attempts": 4, "burst_backoff_ms": 1000, "burst_backoff_step_ms": 500},
    # A first byte later than this after the headers is a held-back stream.
    "late_first_byte_ms": 1500,
    # Channel suffixes per probe, after "<probe_prefix><nonce>".
    "suffixes": {"websocket": ".ws", "sse": ".sse", "long_poll": ".lp", "short_poll": ".sp"},
}

# The raw results both clients send: every field the verdict may read, and nothing else. A
# nested dict describes an object's fields; a list of one dict, a list of such objects; None,
# a value the verdict reads as it is.
_BURST: dict[str, Any] = {
    "n": None,
    "gap_ms": None,
    "delay_ms": None,
    "arrivals": [{"seq": None, "sent_ms": None, "at_ms": None}],
    "post_status": None,
    "post_ms": None,
    "post_error": None,
}
_SEEN = [
    {
        "transport": None,
        "http_version": None,
        "upgrade": None,
        "connection": None,
        "websocket_key": None,
        "via": None,
        "origin": None,
        "host": None,
        "t_ms": None,
        "status": None,
        "error": None,
    }
]
_ANSWER = {"status": None, "error": None, "json": None, "events": None}
_REAL_CHECK = {"status": None, "error": None, "opened": None, "close_code": None, "seen": _SEEN}
RAW_SCHEMA: dict[str, Any] = {
    "version": None,
    "mode": None,
    "hold_s": None,
    "started": None,
    "timed_out": None,
    "unreachable": None,
    "error": None,
    "min_rtt_ms": None,
    "plan_version": None,
    "facts": None,  # the gateway's own /diagnose/facts answer, passed back as it came
    "client": {
        "agent": None,
        "user_agent": None,
        "host": None,
        "secure": None,
        "protocol": None,
        "response_headers": None,
        "token": None,
    },
    "real": {
        "channel": None,
        "short_poll": _REAL_CHECK,
        "long_poll": _REAL_CHECK,
        "sse": _REAL_CHECK,
        "websocket": _REAL_CHECK,
    },
    "probes": {
        "short_poll": {
            "polls": [{"status": None, "ms": None, "error": None, "json": None, "events": None}],
            "event_seen": None,
            "event_latency_ms": None,
            "burst": _BURST,
            "error": None,
        },
        "long_poll": {
            "hold_s": None,
            "idle": {**_ANSWER, "elapsed_s": None},
            "event": {"status": None, "error": None, "arrived": None, "json": None, "latency_ms": None},
            "repeat": {"status": None, "error": None, "json": None, "arrived": None, "published": None},
            "burst": _BURST,  # the event published during the hold (for the timeline)
            "error": None,
        },
        "sse": {
            "hold_s": None,
            "heartbeat_s": None,
            "status": None,
            "content_type": None,
            "headers_ms": None,
            "first_byte_ms": None,
            "heartbeats": None,
            "error": None,
            "burst": _BURST,
            "alive": {"arrived": None, "latency_ms": None},
            "ended_after_s": None,
            "idle_before_end_s": None,
            "seen": _SEEN,
            "resume": {"ok": None, "expected": None, "received": None, "gap": None, "error": None},
            "padding": {"bytes": None, "status": None, "first_byte_ms": None, "error": None, "burst": _BURST},
        },
        "websocket": {
            "hold_s": None,
            "opened": None,
            "open_ms": None,
            "error": None,
            "handshake_status": None,
            "close_code": None,
            "close_reason": None,
            "echo": {"arrived": None, "rtt_ms": None},
            "alive": {"arrived": None, "rtt_ms": None},
            "burst": _BURST,
            "closed_after_s": None,
            "idle_before_close_s": None,
            "seen": _SEEN,
            "http_status": None,
            "http_error": None,
        },
    },
}


def unknown_fields(raw: Any, schema: Any = RAW_SCHEMA, where: str = "") -> list[str]:
    """Paths of fields in `raw` that the schema does not name (a client drifting from the plan)."""
    out: list[str] = []
    if isinstance(schema, dict) and isinstance(raw, dict):
        for key, value in raw.items():
            if key not in schema:
                out.append(f"{where}{key}")
            else:
                out += unknown_fields(value, schema[key], f"{where}{key}.")
    elif isinstance(schema, list) and isinstance(raw, list):
        for i, item in enumerate(raw):
            out += unknown_fields(item, schema[0], f"{where}{i}.")
    return out
