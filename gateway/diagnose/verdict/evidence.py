"""Evidence: the raw probe results, parsed once. Input comes from browsers on hostile networks:
anything missing or of the wrong type reads as "no evidence" here, so the rules never see a
value they did not expect."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Evidence", "RealCheck", "parse", "analyse_burst", "num", "obj", "SLOW_MS"]

TRANSPORTS = ("short_poll", "long_poll", "sse", "websocket")
SLOW_MS = 1500.0  # an event later than this after it was sent is not "prompt"
BUNCHED_RATIO = 0.5  # arrivals squeezed into under half the send spread were held back and released together
SQUEEZED = 0.25  # two events arriving this much closer together than they were sent came out of one buffer
CUT_SLACK_S = 1.0  # a hold that ends this much before its time was cut by the path


def num(value: Any) -> float | None:
    """A finite number, else None (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value and value not in (float("inf"), float("-inf")) else None


def obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def text(value: Any, limit: int = 200) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def records(value: Any) -> list[dict[str, Any]]:
    """A list of objects (anything else in it dropped)."""
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


def analyse_burst(burst: Any, one_way_ms: float = 0.0) -> dict[str, Any]:
    """A timed burst: how many arrived, how late the first, and whether arrivals kept the send
    spacing or came bunched together (held back by a buffer and released at once)."""
    burst = obj(burst)
    expected = int(num(burst.get("n")) or 0)
    arrivals = []
    for item in records(burst.get("arrivals")):
        at, sent, seq = num(item.get("at_ms")), num(item.get("sent_ms")), num(item.get("seq"))
        if at is not None and seq is not None:
            arrivals.append((seq, at, sent))
    arrivals.sort()
    out: dict[str, Any] = {"received": len(arrivals), "expected": expected, "bunched": False}
    # Whether the gateway took the request to publish it (absent in older results: assume so).
    status = burst.get("post_status", 202)
    out["published"] = bool(arrivals) or status == 202
    if not out["published"]:
        out["publish_error"] = str(burst.get("post_error") or f"HTTP {status}")[:120]
    if not arrivals:
        return out
    gap_ms = num(burst.get("gap_ms")) or 0.0
    delay_ms = num(burst.get("delay_ms")) or 0.0
    # Latency of the first: arrival minus when it was due (request sent + delay + seq * gap), less
    # the publish request's own way there, so a slow link is not called slow twice.
    first_seq, first_at, _ = arrivals[0]
    late = one_way_ms + queued_ms(burst, one_way_ms)
    out["first_latency_ms"] = round(max(0.0, first_at - delay_ms - first_seq * gap_ms - late), 1)
    if len(arrivals) >= 3:
        sent = [s for _, _, s in arrivals if s is not None]
        send_spread = (max(sent) - min(sent)) if len(sent) == len(arrivals) else (arrivals[-1][0] - first_seq) * gap_ms
        arrive_spread = arrivals[-1][1] - first_at
        out["send_spread_ms"] = round(send_spread, 1)
        out["arrival_spread_ms"] = round(arrive_spread, 1)
        # Or most of them released together, a later flush letting the rest out: a buffer whose
        # flush fell inside the burst spreads the whole, but not the events between flushes.
        steps = list(zip(arrivals, arrivals[1:], strict=False))
        squeezed = sum(
            1 for a, b in steps if a[2] is not None and b[2] is not None and b[1] - a[1] < SQUEEZED * (b[2] - a[2])
        )
        out["bunched"] = send_spread >= 400 and (
            arrive_spread < BUNCHED_RATIO * send_spread or 2 * squeezed > len(steps)
        )
    return out


def queued_ms(burst: Any, one_way_ms: float) -> float:
    """How much longer than the path's quickest round trip the publish request took: time it
    waited (a busy machine, a queue at the gateway) before the burst was even scheduled, which is
    not the transport's latency. Only with a known round trip."""
    post_ms = num(obj(burst).get("post_ms"))
    if post_ms is None or one_way_ms <= 0:
        return 0.0
    return max(0.0, post_ms - 2 * one_way_ms)


def cut(ended_after: Any, hold: float) -> float | None:
    """When a held connection ended, if that was early enough to be the path's doing."""
    ended = num(ended_after)
    if ended is not None and ended < hold - CUT_SLACK_S:
        return round(ended, 1)
    return None


@dataclass
class RealCheck:
    """One transport's request on a real (non-probe) channel: what the gateway answered."""

    status: int | None = None  # HTTP status (for a WebSocket: what the gateway recorded)
    error: str | None = None  # the gateway's error code, or the client's error text
    opened: bool | None = None  # WebSocket only
    origin: str | None = None
    host: str | None = None

    @property
    def refused(self) -> bool:
        if self.opened is True:
            return False
        return isinstance(self.status, int) and not 200 <= self.status < 300 and self.status != 101


def _real(value: Any) -> RealCheck | None:
    value = obj(value)
    if not value:
        return None
    check = RealCheck(error=text(value.get("error"), 80))
    status = value.get("status")
    check.status = status if isinstance(status, int) and not isinstance(status, bool) else None
    if "opened" in value:
        check.opened = value.get("opened") is True
        seen = [r for r in records(value.get("seen")) if r.get("transport") == "websocket"]
        if not check.opened and seen:
            last = seen[-1]
            status = last.get("status")
            check.status = status if isinstance(status, int) and not isinstance(status, bool) else check.status
            check.error = text(last.get("error"), 80) or check.error
            check.origin, check.host = text(last.get("origin"), 80), text(last.get("host"), 80)
    return check


@dataclass
class Evidence:
    probes: dict[str, dict[str, Any]]
    real: dict[str, RealCheck | None]
    facts: dict[str, Any]
    gateway: dict[str, Any]
    client: dict[str, Any]
    mode: str | None
    hold_s: float | None
    token_sent: bool
    ctx: dict[str, Any] = field(default_factory=dict)


def parse(raw: Any) -> Evidence:
    raw = obj(raw)
    probes = obj(raw.get("probes"))
    facts = obj(raw.get("facts"))
    gateway = obj(facts.get("gateway"))
    client = obj(raw.get("client"))
    real = obj(raw.get("real"))
    # Half the quickest round trip of the run: the way there of a request on this path. The
    # quickest, not each request's own, because a buffering path delays answers, not requests.
    base_rtt = num(raw.get("min_rtt_ms"))
    ctx = {
        "one_way_ms": min(base_rtt / 2, 2000.0) if base_rtt and base_rtt > 0 else 0.0,
        "sse_heartbeat_s": num(gateway.get("sse_heartbeat_s")),
        "websocket_ping_s": num(gateway.get("websocket_ping_s")),
        "longpoll_max_timeout_s": num(gateway.get("longpoll_max_timeout_s")),
        "thorough_hold_s": num(gateway.get("thorough_hold_s")),
    }
    return Evidence(
        probes={name: obj(probes.get(name)) for name in TRANSPORTS},
        real={name: _real(real.get(name)) for name in TRANSPORTS},
        facts=facts,
        gateway=gateway,
        client=client,
        mode=text(raw.get("mode"), 16),
        hold_s=num(raw.get("hold_s")),
        token_sent=client.get("token") is True,
        ctx=ctx,
    )
