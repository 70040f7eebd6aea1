"""`python -m gateway.diagnose URL [--thorough] [--hold S]`: the /diagnose probes from a terminal.

Runs the probe plan of plan.py, the same one the page runs (same channels, helper endpoints,
waits and raw-result schema), with requests and websocket-client, computes the verdict with the
one verdict package, prints the verdict JSON on stdout and a short summary on stderr. Exit
status: 0 when some transport is ok, 1 when none is, 2 when the gateway cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

import requests
import websocket

from gateway.diagnose.plan import PLAN
from gateway.diagnose.verdict import verdict

__all__ = ["main", "run"]

BURST_N, BURST_GAP_MS, PADDING = PLAN["burst"]["n"], PLAN["burst"]["gap_ms"], PLAN["padding_bytes"]
WAIT, TAGS, RETRY = PLAN["waits"], PLAN["tags"], PLAN["retries"]
# --insecure: accept a self-signed certificate (a test proxy, a staging host). Set once by main().
TLS: dict[str, Any] = {"verify": True}


def _sslopt() -> dict[str, Any]:
    return {} if TLS["verify"] else {"cert_reqs": ssl.CERT_NONE, "check_hostname": False}


def _now() -> float:
    return time.monotonic()


def _wait(cond: Callable[[], bool], seconds: float) -> bool:
    end = _now() + seconds
    while not cond() and _now() < end:
        time.sleep(min(0.05, max(0.0, end - _now())))
    return cond()


class Burst:
    """One timed burst requested from the gateway; arrivals are recorded by the listening probe.
    Hook `arrive` up to the listener first, then `send()`: the first event can beat the answer."""

    def __init__(self, base: str, channel: str, n: int, gap_ms: int, delay_ms: int, tag: str) -> None:
        self.n, self.gap_ms, self.delay_ms, self.tag = n, gap_ms, delay_ms, tag
        self.arrivals: list[dict[str, Any]] = []
        self.post_status: int | None = None
        self.post_error: str | None = None
        self.post_ms: int | None = None
        self.t0 = _now()
        self._url, self._params = (
            f"{base}/diagnose/burst",
            {"channel": channel, "n": n, "gap_ms": gap_ms, "delay_ms": delay_ms, "tag": tag},
        )

    def send(self) -> Burst:
        for attempt in range(RETRY["burst_attempts"]):
            self.t0 = _now()  # arrivals count from the request that publishes
            self.post_error = None
            try:
                r = requests.post(self._url, params=self._params, timeout=WAIT["request"], verify=TLS["verify"])
                self.post_ms = round((_now() - self.t0) * 1000)
                self.post_status = r.status_code
                if r.status_code != 202:
                    self.post_error = f"HTTP {r.status_code}"
            except requests.RequestException as exc:
                self.post_error = str(exc)[:200]
                return self
            if self.post_status not in (429, 503):
                return self
            time.sleep((RETRY["burst_backoff_ms"] + RETRY["burst_backoff_step_ms"] * attempt) / 1000)
        return self

    def arrive(self, data: Any) -> bool:
        try:
            d = json.loads(data)
        except (TypeError, ValueError):
            return False
        if not isinstance(d, dict) or d.get("tag") != self.tag or not isinstance(d.get("seq"), int):
            return False
        if all(a["seq"] != d["seq"] for a in self.arrivals):
            at = round((_now() - self.t0) * 1000)
            self.arrivals.append({"seq": d["seq"], "sent_ms": d.get("sent_ms"), "at_ms": at})
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "gap_ms": self.gap_ms,
            "delay_ms": self.delay_ms,
            "arrivals": self.arrivals,
            "post_status": self.post_status,
            "post_ms": self.post_ms,
            "post_error": self.post_error,
        }


_MIN_RTT: list[float] = []  # round trips of quick requests (long polls aside): see verdict/evidence.py


def _get(url: str, timeout: float, **kwargs: Any) -> dict[str, Any]:
    t0 = _now()
    out: dict[str, Any] = {"status": None, "json": None, "ms": None, "error": None}
    try:
        r = requests.get(url, timeout=timeout, verify=TLS["verify"], **kwargs)
        out["status"] = r.status_code
        out["headers"] = r.headers
        try:
            out["json"] = r.json()
        except ValueError:
            pass
    except requests.RequestException as exc:
        out["error"] = type(exc).__name__ + ": " + str(exc)[:160]
    out["ms"] = round((_now() - t0) * 1000)
    if out["status"] is not None and "/longpoll/" not in url:
        _MIN_RTT.append(out["ms"])
    return out


def _poll_record(r: dict[str, Any]) -> dict[str, Any]:
    events = r["json"].get("events") if isinstance(r["json"], dict) else None
    return {
        "status": r["status"],
        "ms": r["ms"],
        "error": r["error"],
        "json": isinstance(events, list),
        "events": len(events) if isinstance(events, list) else None,
    }


def probe_short_poll(base: str, ch: str, rec: dict[str, Any]) -> None:
    first = _get(f"{base}/poll/{ch}", WAIT["request"])
    rec["polls"] = [_poll_record(first)]
    if not (first["status"] == 200 and isinstance(first["json"], dict) and first["json"].get("cursor")):
        rec["error"] = first["error"] or f"HTTP {first['status']}"
        return
    since = f"{base}/poll/{ch}?since={quote(first['json']['cursor'])}"
    # Asked once before the publish: a path that caches answers then replays this empty one.
    rec["polls"].append(_poll_record(_get(since, WAIT["request"])))
    burst = Burst(base, ch, 1, 0, 0, TAGS["short_poll"]).send()
    rec["event_seen"] = False
    t0 = _now()
    for _ in range(PLAN["short_poll"]["polls"]):
        r = _get(since, WAIT["request"])
        rec["polls"].append(_poll_record(r))
        events = r["json"].get("events") if isinstance(r["json"], dict) else None
        if isinstance(events, list) and any(burst.arrive(e.get("data")) for e in events if isinstance(e, dict)):
            rec["event_seen"] = True
            rec["event_latency_ms"] = round((_now() - t0) * 1000)
            break
        time.sleep(PLAN["short_poll"]["pause_ms"] / 1000)
    rec["burst"] = burst.to_json()


def probe_long_poll(base: str, ch: str, rec: dict[str, Any], hold: float, cap: float) -> None:
    hold = max(1.0, min(hold, cap))
    rec["hold_s"] = hold
    deadline, delay_ms = hold + WAIT["hold_slack"], PLAN["long_poll"]["event_delay_ms"]

    def idle() -> None:
        t0, url = _now(), f"{base}/longpoll/{ch}.idle?since=0-0&timeout={hold:g}"
        r = _get(url, deadline)
        events = r["json"].get("events") if isinstance(r["json"], dict) else None
        rec["idle"] = {
            "status": r["status"],
            "error": r["error"],
            "elapsed_s": round(_now() - t0, 3),
            "json": isinstance(events, list),
            "events": len(events) if isinstance(events, list) else None,
        }
        if r["status"] != 200 or not isinstance(events, list):
            return
        # The same URL after a publish: a path that caches answers replays the empty one at once.
        burst = Burst(base, f"{ch}.idle", 1, 0, 0, TAGS["long_poll_repeat"]).send()
        again = _get(url, WAIT["request"])
        events = again["json"].get("events") if isinstance(again["json"], dict) else None
        events = events if isinstance(events, list) else None
        rec["repeat"] = {
            "status": again["status"],
            "error": again["error"],
            "json": events is not None,
            "arrived": any(burst.arrive(e.get("data")) for e in events or [] if isinstance(e, dict)),
            "published": burst.post_status == 202,
        }

    def event() -> None:
        result: dict[str, Any] = {}
        getter = threading.Thread(
            target=lambda: result.update(_get(f"{base}/longpoll/{ch}.event?since=0-0&timeout={hold:g}", deadline))
        )
        getter.start()
        burst = Burst(base, f"{ch}.event", 1, 0, delay_ms, TAGS["long_poll"]).send()
        getter.join(deadline + 5)
        events = result.get("json", {}).get("events") if isinstance(result.get("json"), dict) else None
        arrived = isinstance(events, list) and any(burst.arrive(e.get("data")) for e in events if isinstance(e, dict))
        rec["event"] = {
            "status": result.get("status"),
            "error": result.get("error"),
            "arrived": arrived,
            "json": isinstance(events, list),
            "latency_ms": max(0, burst.arrivals[0]["at_ms"] - delay_ms) if arrived else None,
        }
        rec["burst"] = burst.to_json()
        if not arrived and burst.post_error:
            rec["event"]["error"] = f"publishing the test event failed: {burst.post_error}"

    threads = [threading.Thread(target=idle), threading.Thread(target=event)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(deadline + 10)


class SSEStream:
    """One SSE response read on a thread: timings, events, heartbeats, and when it ended."""

    def __init__(self, url: str, headers: dict[str, str] | None, max_s: float) -> None:
        self.t0 = _now()
        self.events: list[dict[str, str]] = []
        self.handlers: list[Callable[[dict[str, str]], None]] = []
        self.heartbeats = 0
        self.status: int | None = None
        self.content_type: str | None = None
        self.headers_ms: float | None = None
        self.first_byte_ms: float | None = None
        self.last_byte: float | None = None
        self.ended: float | None = None
        self.error: str | None = None
        self.error_code: str | None = None  # the gateway's JSON error code on a refusal
        self._closed_by_us = False
        self._resp: requests.Response | None = None
        self._thread = threading.Thread(target=self._run, args=(url, headers or {}, max_s), daemon=True)
        self._thread.start()

    def _run(self, url: str, headers: dict[str, str], max_s: float) -> None:
        try:
            self._resp = r = requests.get(
                url,
                headers={"Accept": "text/event-stream", **headers},
                stream=True,
                timeout=(10, max_s),
                verify=TLS["verify"],
            )
            self.status, self.content_type = r.status_code, r.headers.get("Content-Type", "")
            self.headers_ms = round((_now() - self.t0) * 1000)
            if r.status_code != 200 or "text/event-stream" not in self.content_type:
                self.error = f"HTTP {r.status_code}" if r.status_code != 200 else "not an event stream"
                try:
                    body = json.loads(r.raw.read(4096))
                    self.error_code = str(body["error"])[:60] if isinstance(body, dict) and "error" in body else None
                except (ValueError, TypeError, OSError):
                    pass
                return
            self._parse(r)
        except Exception as exc:  # noqa: BLE001 - any failure of the path is a result, not a crash
            if not self._closed_by_us:
                self.error = type(exc).__name__ + ": " + str(exc)[:160]
        finally:
            if self.ended is None:
                self.ended = _now()

    def _parse(self, r: requests.Response) -> None:
        buf, ev = b"", {"data": []}
        while True:
            chunk = r.raw.read1(65536)
            if not chunk:
                return
            self.last_byte = _now()
            if self.first_byte_ms is None:
                self.first_byte_ms = round((self.last_byte - self.t0) * 1000)
            buf += chunk
            *lines, buf = buf.replace(b"\r\n", b"\n").split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                if line == "":
                    if ev["data"]:
                        event = {
                            "id": ev.get("id"),
                            "event": ev.get("event") or "message",
                            "data": "\n".join(ev["data"]),
                        }
                        self.events.append(event)
                        for handler in list(self.handlers):
                            handler(event)
                    ev = {"data": []}
                elif line.startswith(":"):
                    self.heartbeats += "heartbeat" in line
                else:
                    field, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if field == "data":
                        ev["data"].append(value)
                    elif field in ("id", "event"):
                        ev[field] = value

    def close(self) -> None:
        """Stop reading now: a reader blocked in read1() holds the response's lock, so shut the
        socket under it first and let close() finish on a side thread."""
        self._closed_by_us = True
        resp = self._resp
        if resp is None:
            return
        sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        threading.Thread(target=resp.close, daemon=True).start()


def _seen(base: str, ch: str) -> list[dict[str, Any]]:
    r = _get(f"{base}/diagnose/seen?channel={quote(ch)}", WAIT["seen"])
    return r["json"].get("requests", []) if isinstance(r["json"], dict) else []


def probe_sse(base: str, ch: str, rec: dict[str, Any], hold: float, heartbeat: Any) -> None:
    rec.update(hold_s=hold, heartbeat_s=heartbeat)
    s = SSEStream(f"{base}/sse/{ch}?since=0-0", None, hold + WAIT["hold_slack"])
    # Time the burst from the stream's opening: a slow first byte is not buffering (see diagnose.js).
    _wait(lambda: s.status is not None or s.ended is not None, WAIT["open"])
    burst = Burst(base, ch, BURST_N, BURST_GAP_MS, 0, TAGS["stream"])
    s.handlers.append(lambda e: burst.arrive(e["data"]))
    burst.send()
    _wait(lambda: len(burst.arrivals) >= BURST_N or s.ended is not None, _burst_s())
    _wait(lambda: s.ended is not None, s.t0 + hold - _now())
    if s.ended is None and burst.arrivals:
        alive = Burst(base, ch, 1, 0, 0, TAGS["alive"])
        s.handlers.append(lambda e: alive.arrive(e["data"]))
        alive.send()
        _wait(lambda: bool(alive.arrivals) or s.ended is not None, WAIT["alive"])
        rec["alive"] = {
            "arrived": bool(alive.arrivals),
            "latency_ms": alive.arrivals[0]["at_ms"] if alive.arrivals else None,
        }
    elif s.ended is not None:
        rec["ended_after_s"] = round(s.ended - s.t0, 3)
        rec["idle_before_end_s"] = round(s.ended - (s.last_byte or s.t0), 3)
    s.close()
    rec.update(
        status=s.status,
        content_type=s.content_type,
        headers_ms=s.headers_ms,
        first_byte_ms=s.first_byte_ms,
        heartbeats=s.heartbeats,
        error=s.error,
        burst=burst.to_json(),
    )
    rec["seen"] = _seen(base, ch)
    with_ids = [e for e in s.events if e.get("id") and e["event"] != "gap"]
    # Resume and padding at once, as the page does (the verdict reads padding only where events
    # were held back).
    padding = threading.Thread(target=lambda: rec.update(padding=_padding(base, f"{ch}.pad")), daemon=True)
    padding.start()
    if with_ids:
        rec["resume"] = _resume(base, ch, with_ids[0]["id"])
    padding.join(_burst_s() + WAIT["padding_slack"] + 5)


def _burst_s() -> float:
    return BURST_N * BURST_GAP_MS / 1000 + WAIT["burst_slack"]


def _padding(base: str, ch: str) -> dict[str, Any]:
    """The burst again over a stream opened with initial padding."""
    p = SSEStream(f"{base}/sse/{ch}?since=0-0&padding={PADDING}", None, _burst_s() + WAIT["padding_slack"])
    _wait(lambda: p.status is not None or p.ended is not None, WAIT["open"])
    pb = Burst(base, ch, BURST_N, BURST_GAP_MS, 0, TAGS["stream"])
    p.handlers.append(lambda e: pb.arrive(e["data"]))
    pb.send()
    _wait(lambda: len(pb.arrivals) >= BURST_N or p.ended is not None, _burst_s())
    p.close()
    return {
        "bytes": PADDING,
        "status": p.status,
        "first_byte_ms": p.first_byte_ms,
        "error": p.error,
        "burst": pb.to_json(),
    }


def _resume(base: str, ch: str, last_id: str) -> dict[str, Any]:
    expect = _get(f"{base}/poll/{ch}?since={quote(last_id)}", WAIT["seen"])
    events = expect["json"].get("events") if isinstance(expect["json"], dict) else None
    want = [e.get("id") for e in events or [] if isinstance(e, dict)]
    s = SSEStream(f"{base}/sse/{ch}", {"Last-Event-ID": last_id}, WAIT["resume"] + 2)
    _wait(lambda: len(s.events) >= len(want) or s.ended is not None, WAIT["resume"])
    s.close()
    got = ["gap" if e["event"] == "gap" else e.get("id") for e in s.events][: len(want)]
    ok = bool(want) and got == want
    out: dict[str, Any] = {"ok": ok, "expected": len(want), "received": len(got), "gap": "gap" in got}
    if not want:
        out["error"] = f"could not list the events to expect ({expect['error'] or 'HTTP ' + str(expect['status'])})"
    elif not ok:
        out["error"] = "got different events than were missed" if got else "no missed events came back"
    return out


def probe_websocket(base: str, ch: str, rec: dict[str, Any], hold: float) -> None:
    rec.update(hold_s=hold, opened=False)
    parts = urlsplit(base)
    url = ("wss://" if parts.scheme == "https" else "ws://") + parts.netloc + parts.path + f"/ws/{ch}"
    ws = websocket.WebSocket(sslopt=_sslopt())
    t0 = _now()
    try:
        ws.connect(url, timeout=WAIT["handshake"], origin=f"{parts.scheme}://{parts.netloc}")
    except Exception as exc:  # noqa: BLE001 - handshake failures are results
        rec["error"] = type(exc).__name__ + ": " + str(exc)[:160]
        status = getattr(exc, "status_code", None)
        if isinstance(status, int):
            rec["handshake_status"] = status
    if ws.connected:
        rec["opened"], rec["open_ms"] = True, round((_now() - t0) * 1000)
        state: dict[str, Any] = {"closed": None, "last": None, "echo": {}, "burst": None}

        def reader() -> None:
            while True:
                try:
                    ws.settimeout(hold + 20)
                    opcode, data = ws.recv_data()
                except Exception:  # noqa: BLE001 - closed or reset: when is what matters
                    break
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    rec["close_code"] = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                    break
                state["last"] = _now()
                try:
                    e = json.loads(data)
                except ValueError:
                    continue
                if isinstance(e, dict) and e.get("event") == "echo" and e.get("data") in state["echo"]:
                    state["echo"][e["data"]]["back"] = _now()
                elif isinstance(e, dict) and e.get("event") == TAGS["stream"] and state["burst"] is not None:
                    state["burst"].arrive(e.get("data"))
            if state["closed"] is None:
                state["closed"] = _now()

        threading.Thread(target=reader, daemon=True).start()

        def echo(label: str, seconds: float) -> dict[str, Any]:
            item = state["echo"][label] = {"sent": _now(), "back": None}
            try:
                ws.send(json.dumps({"event": "echo", "data": label}))
            except Exception:  # noqa: BLE001
                return {"arrived": False, "rtt_ms": None}
            _wait(lambda: item["back"] is not None or state["closed"] is not None, seconds)
            back = item["back"]
            return {"arrived": back is not None, "rtt_ms": round((back - item["sent"]) * 1000) if back else None}

        # Both directions at once: the echo round trip and the server's burst share one deadline.
        state["burst"] = burst = Burst(base, ch, BURST_N, BURST_GAP_MS, 0, TAGS["stream"])
        echoed: dict[str, Any] = {}
        up = threading.Thread(target=lambda: echoed.update(echo("echo-1", WAIT["echo"])), daemon=True)
        up.start()
        burst.send()
        up.join(WAIT["echo"] + 1)
        rec["echo"] = echoed or {"arrived": False, "rtt_ms": None}
        _wait(
            lambda: len(burst.arrivals) >= BURST_N or state["closed"] is not None,
            _burst_s() - (_now() - burst.t0),
        )
        _wait(lambda: state["closed"] is not None, t0 + hold - _now())
        if state["closed"] is None and (rec["echo"]["arrived"] or burst.arrivals):
            rec["alive"] = echo("echo-2", WAIT["alive"])
        if state["closed"] is not None:
            rec["closed_after_s"] = round(state["closed"] - t0, 3)
            rec["idle_before_close_s"] = round(state["closed"] - (state["last"] or t0), 3)
        rec["burst"] = burst.to_json()
        try:
            ws.close()
        except Exception:  # noqa: BLE001
            pass
    rec["seen"] = _seen(base, ch)
    if not rec["opened"]:
        plain = _get(f"{base}/ws/{ch}", WAIT["seen"])
        rec["http_status"] = plain["status"]


def _real_query(token: str, extra: str = "") -> str:
    parts = [x for x in (extra, f"token={quote(token)}" if token else "") if x]
    return "?" + "&".join(parts) if parts else ""


def _answer(r: dict[str, Any]) -> dict[str, Any]:
    body = r["json"]
    code = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), str) else None
    return {"status": r["status"], "error": code or r["error"]}


def probe_real(base: str, real: dict[str, Any], token: str) -> None:
    """What a client of the site gets on a real channel (no probe exemption): the same four
    requests as the page, with the site's own Origin on the WebSocket."""
    ch = PLAN["channels"]["real_prefix"] + secrets.token_hex(8)
    real["channel"] = ch
    real["short_poll"] = _answer(_get(f"{base}/poll/{ch}{_real_query(token)}", WAIT["real"]))
    real["long_poll"] = _answer(_get(f"{base}/longpoll/{ch}{_real_query(token, 'timeout=0')}", WAIT["real"]))
    s = SSEStream(f"{base}/sse/{ch}{_real_query(token)}", None, WAIT["real"])
    _wait(lambda: s.status is not None or s.ended is not None, WAIT["open"])
    s.close()
    real["sse"] = {"status": s.status, "error": s.error_code or (None if s.status == 200 else s.error)}
    parts = urlsplit(base)
    url = ("wss://" if parts.scheme == "https" else "ws://") + parts.netloc + parts.path + f"/ws/{ch}"
    rec: dict[str, Any] = {"opened": False, "close_code": None}
    try:
        ws = websocket.create_connection(
            url + _real_query(token),
            timeout=WAIT["handshake"],
            origin=f"{parts.scheme}://{parts.netloc}",
            sslopt=_sslopt(),
        )
        rec["opened"] = True
        ws.close()
    except Exception as exc:  # noqa: BLE001 - a refused handshake is the result
        rec["error"] = type(exc).__name__ + ": " + str(exc)[:120]
    if not rec["opened"]:
        rec["seen"] = _seen(base, ch)
    real["websocket"] = rec


def run(url: str, hold: float, mode: str, token: str = "") -> dict[str, Any]:
    """Run every probe against the gateway at `url` and return the raw results."""
    base = url.rstrip("/")
    _MIN_RTT.clear()
    facts = _get(f"{base}/diagnose/facts", 10)
    headers = facts.get("headers") or {}
    raw: dict[str, Any] = {
        "version": 1,
        "plan_version": PLAN["version"],
        "mode": mode,
        "hold_s": hold,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "facts": facts["json"]
        if isinstance(facts["json"], dict)
        else {"error": facts["error"] or f"HTTP {facts['status']}"},
        "client": {
            "agent": "cli",
            "host": urlsplit(base).netloc,
            "protocol": None,
            "response_headers": {h.lower(): headers[h][:200] for h in ("Server", "Via", "X-Cache") if h in headers},
            "token": bool(token),
        },
        "real": {},
        "probes": {name: {} for name in ("websocket", "sse", "long_poll", "short_poll")},
    }
    if facts["status"] is None:
        raw["unreachable"] = facts["error"]
    gw = raw["facts"].get("gateway") or {}
    ch = PLAN["channels"]["probe_prefix"] + secrets.token_hex(8)
    p, sfx = raw["probes"], PLAN["suffixes"]
    cap = float(gw.get("longpoll_max_timeout_s") or 25)
    jobs = [
        lambda: probe_websocket(base, ch + sfx["websocket"], p["websocket"], hold),
        lambda: probe_sse(base, ch + sfx["sse"], p["sse"], hold, gw.get("sse_heartbeat_s")),
        lambda: probe_long_poll(base, ch + sfx["long_poll"], p["long_poll"], hold, cap),
        lambda: probe_short_poll(base, ch + sfx["short_poll"], p["short_poll"]),
        lambda: probe_real(base, raw["real"], token),
    ]
    threads = [threading.Thread(target=job, daemon=True) for job in jobs]
    for t in threads:
        t.start()
    deadline = _now() + hold + WAIT["run_slack"]  # every probe has its own deadlines; this bounds the run
    for t in threads:
        t.join(max(0.0, deadline - _now()))
    if any(t.is_alive() for t in threads):
        raw["timed_out"] = True
    raw["min_rtt_ms"] = min(_MIN_RTT) if _MIN_RTT else None
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.diagnose",
        description="Probe which transports of a gateway work from here; print the verdict JSON.",
    )
    parser.add_argument("url", help="the gateway's base URL, e.g. https://rt.example.com")
    parser.add_argument("--thorough", action="store_true", help="hold connections for diagnose.thorough_hold_s (110 s)")
    parser.add_argument("--hold", type=float, help="hold time in seconds (1-600), overriding the gateway's setting")
    parser.add_argument("--raw", action="store_true", help="print the raw probe results with the verdict")
    parser.add_argument("--token", default="", help="a subscriber token for the real-channel checks (access control)")
    parser.add_argument("--insecure", action="store_true", help="accept a self-signed TLS certificate")
    args = parser.parse_args(argv)
    if not args.url.startswith(("http://", "https://")):
        parser.error("the URL must start with http:// or https://")
    TLS["verify"] = not args.insecure
    if args.insecure:
        import urllib3

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    gw = _get(args.url.rstrip("/") + "/diagnose/facts", 10)
    if gw["status"] != 200 or not isinstance(gw["json"], dict):
        print(
            f"cannot reach the gateway's /diagnose/facts at {args.url}: {gw['error'] or 'HTTP ' + str(gw['status'])}",
            file=sys.stderr,
        )
        return 2
    settings = gw["json"].get("gateway") or {}
    if args.hold is not None:
        hold, mode = max(1.0, min(600.0, args.hold)), "custom"
    elif args.thorough:
        hold, mode = float(settings.get("thorough_hold_s") or 110), "thorough"
    else:
        hold, mode = float(settings.get("hold_s") or 15), "quick"
    print(f"probing {args.url} (hold {hold:g} s)...", file=sys.stderr)
    raw = run(args.url, hold, mode, args.token)
    result = verdict(raw)
    result["source"] = "cli"
    if args.raw:
        result["raw"] = raw
    print(json.dumps(result, indent=2))
    for name, t in result["transports"].items():
        print(f"  {name:<11} {t['status']:<9} {t['reason']}", file=sys.stderr)
    print(f"recommended: {result['recommended']}", file=sys.stderr)
    return 0 if result["recommended"] else 1


if __name__ == "__main__":
    sys.exit(main())
