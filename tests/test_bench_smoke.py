"""The benchmark runs end to end: a tiny SSE and long-poll case against a real gateway, checked
for delivery (no timing asserted: benchmarks never run in `make test`)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT


def _bench(tmp_path, *args: str, timeout: float = 120) -> list[dict]:
    """`python -m bench ARGS` with 6 subscribers, 8 messages and one load worker: its result lines."""
    out_file = tmp_path / "results.jsonl"
    out = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--subscribers", "6", "--messages", "8", "--workers", "1"]
        + ["--out", str(out_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out_file.read_text().splitlines()]


def test_bench_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and "--quick" in out.stdout


def test_a_tiny_case_delivers_every_event_in_order(tmp_path):
    results = _bench(tmp_path, "--quick", "--cases", "sse-1k,ws-1k,lp-1k", "--servers", "gateway")
    assert [r["case"] for r in results] == ["sse-1k", "ws-1k", "lp-1k"]
    for r in results:
        assert "error" not in r, r
        assert r["connected"] == 6 and r["expected"] == 48, r
        assert r["delivered"] == 48 and r["lost"] == 0 and r["disorder"] == 0, r
        assert r["cpu_us_per_delivery"] is not None and r["peak_pss_mb"] > 0, r
        assert 0 <= r["user_us_per_delivery"] <= r["cpu_us_per_delivery"], r  # user time apart from the kernel's
    lp = results[-1]
    assert 1 <= lp["events_per_answer"] <= 8 and "events_per_answer" not in results[0], lp  # long poll only


def test_redis_and_two_worker_cases_deliver_every_event_in_order(tmp_path):
    """The scaling cases: the gateway on its own redis-server, with 1 and with 2 workers."""
    cases = "redis-lp-1k,workers2-sse-1k,workers2-ws-1k"
    results = _bench(tmp_path, "--cases", cases, "--servers", "gateway", timeout=240)
    assert sorted(r["case"] for r in results) == sorted(cases.split(","))
    for r in results:
        assert "error" not in r, r
        assert r["delivered"] == 48 and r["lost"] == 0 and r["disorder"] == 0, r
        assert r["server_cpu_s"] > 0 and r["peak_pss_mb"] > 0, r


def test_churn_and_soak_are_opt_in():
    """The long runs never join the default matrix; an explicit --cases selects them."""

    def listed(*args: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-m", "bench", "--list", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        return [line.split()[0] for line in out.stdout.splitlines()]

    default = listed()
    assert default and not any(c.startswith(("churn", "soak")) for c in default)
    assert listed("--cases", "churn-100k,soak-10m") == ["churn-100k", "soak-10m"]


def test_the_long_poll_floors_deliver_every_event_in_order(tmp_path):
    """bench/floor.py, both shapes: a measuring stick is only one if it does the same work."""
    results = _bench(tmp_path, "--cases", "lp-1k", "--servers", "floor,floor-greenlets")
    assert [r["server"] for r in results] == ["floor", "floor-greenlets"]
    for r in results:
        assert "error" not in r, r
        assert r["connected"] == 6 and r["delivered"] == 48 and r["lost"] == 0 and r["disorder"] == 0, r
