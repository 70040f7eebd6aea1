"""`make bench` / `python -m bench [--quick] [--cases sse-1k,flood*] [--servers gateway,nchan]`.

Churn and soak (`--cases churn-100k,soak-10m`) are opt-in: only an explicit --cases selects them.

Runs each case against a fresh gateway and, when nginx with the Nchan module is installed, a
fresh Nchan; prints one JSON line per case and server, then a table with gateway/Nchan ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cases import Case, long_runs, matrix, quick
from bench.run import run_case
from bench.servers import ROOT, FloorServer, GatewayServer, NchanServer, Server, nchan_module, raise_fd_limit

COLUMNS = [
    ("case", "case", 20),
    ("server", "server", 8),
    ("subs", "subscribers", 6),
    ("deliv", "delivered", 9),
    ("lost", "lost", 6),
    ("dis", "disorder", 4),
    ("p50", "p50_ms", 8),
    ("p99", "p99_ms", 8),
    ("max", "max_ms", 8),
    ("deliv/s", "deliveries_per_s", 8),
    ("cpu µs/d", "cpu_us_per_delivery", 8),
    ("usr µs/d", "user_us_per_delivery", 8),
    ("PSS MB", "peak_pss_mb", 7),
    ("KB/conn", "kb_per_conn_pss", 8),
    ("cli cpu", "client_cpu_max", 7),
]
RATIOS = [
    ("cpu_us_per_delivery", "cpu/deliv"),
    ("user_us_per_delivery", "user cpu/deliv"),
    ("p99_ms", "p99"),
    ("p50_ms", "p50"),
    ("deliveries_per_s", "deliv/s"),
    ("peak_pss_mb", "peak PSS"),
    ("kb_per_conn_pss", "KB/conn"),
]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    cases = quick() if args.quick else matrix(args.messages or 200)
    if args.quick and args.messages:
        cases = [c if c.idle else dataclasses.replace(c, messages=args.messages) for c in cases]
    if args.cases:
        patterns = args.cases.split(",")
        cases = [c for c in cases + long_runs() if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    if args.list:
        for c in cases:
            print(
                f"{c.name:22} {c.transport:5} subscribers={c.subscribers} channels={c.channels} "
                f"rate={c.rate or 'flood'} messages={c.messages}"
            )
        return 0
    if not cases:
        print("no case matches --cases; see --list", file=sys.stderr)
        return 2
    if args.subscribers:
        cases = [
            dataclasses.replace(c, subscribers=args.subscribers, channels=min(c.channels, args.subscribers))
            for c in cases
        ]
    servers = args.servers.split(",")
    module = nchan_module()
    if "nchan" in servers and module is None:
        print("# nchan: not installed (Debian: nginx libnginx-mod-nchan); running the gateway only", file=sys.stderr)
        servers = [s for s in servers if s != "nchan"]
    nofile = raise_fd_limit()
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')} on {platform.node()}: {os.cpu_count()} cpus, "
        f"{platform.python_implementation()} {platform.python_version()}, fd limit {nofile}, "
        f"{args.workers} load workers, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for case in cases:
            for name in servers:
                if case.subscribers + FD_SPARE > nofile:
                    results.append(_too_many_files(name, case, nofile))
                    continue
                if case.long_run and name != "gateway":
                    print(f"# {case.name}: gateway only (no Nchan side by side for churn and soak)", file=sys.stderr)
                    continue
                results.append(_one(name, case, Path(tmp), module, args))
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in results))
    print()
    print(table([r for r in results if not r.get("baseline")]))
    for r in results:
        if r.get("baseline"):
            print(long_run_table(r))
    return 0


FD_SPARE = 1024  # open files a server needs beside its clients' sockets


def _too_many_files(name: str, case: Case, nofile: int) -> dict[str, Any]:
    """A case this machine's open-files limit cannot hold: said, not run (it would only fail)."""
    detail = (
        f"needs {case.subscribers + FD_SPARE} open files per process, the limit is {nofile}; raise the hard "
        "limit (ulimit -Hn, or run as a user with CAP_SYS_RESOURCE: the bench lifts it itself then)"
    )
    result = {"server": name, "case": case.name, "skipped": detail}
    print(json.dumps(result), flush=True)
    print(f"# {case.name} ({name}) not run: {detail}", file=sys.stderr, flush=True)
    return result


def _one(name: str, case: Case, tmp: Path, module: str | None, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"{case.name}-{name}-", dir=tmp))
    server: Server | None = None
    started = time.monotonic()
    try:
        if name == "gateway":
            server = GatewayServer(
                workdir, args.gateway_toml, args.gateway_root, case.workers, case.redis, keepalives=case.long_run
            )
        elif name in ("floor", "floor-greenlets"):
            server = FloorServer(workdir, greenlets=name == "floor-greenlets")
        else:
            server = NchanServer(workdir, module or "")
        result = run_case(server, case, args.workers, args.pad, args.profile)
    except Exception as exc:  # one failed case must not stop the rest of the matrix
        result = {"server": name, "case": case.name, "error": f"{type(exc).__name__}: {exc}"}
        if server is not None:
            result["server_log"] = server.log()[-500:]
    finally:
        if server is not None:
            server.stop()
    result["seconds"] = round(time.monotonic() - started, 1)
    profile = result.pop("profile", None)
    print(json.dumps(result), flush=True)
    if profile:
        print(f"# profile of the gateway in {case.name}:\n{profile}", file=sys.stderr, flush=True)
    if result.get("client_saturated"):
        print(
            f"# warning: a load worker used {result['client_cpu_max']:.0%} of a core in {case.name} "
            f"({name}): the client may be the bottleneck",
            file=sys.stderr,
            flush=True,
        )
    return result


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value)


def table(results: list[dict[str, Any]]) -> str:
    """The results as a fixed-width table, with gateway/Nchan ratio rows where both ran."""
    lines = [" ".join(f"{title:>{width}}" for title, _, width in COLUMNS)]
    by_case: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        by_case.setdefault(r["case"], {})[r["server"]] = r
        if "error" in r:
            lines.append(f"{r['case']:>20} {r['server']:>8} ERROR {r['error']}")
            continue
        if "skipped" in r:
            lines.append(f"{r['case']:>20} {r['server']:>8} NOT RUN {r['skipped']}")
            continue
        lines.append(" ".join(f"{_fmt(r.get(key)):>{width}}" for _, key, width in COLUMNS))
    ratio_lines = []
    for case, servers in by_case.items():
        nchan = servers.get("nchan")
        for name, ours in servers.items():  # the gateway, and the floors (bench/floor.py) if run
            if name == "nchan" or not nchan or any(k in ours or k in nchan for k in ("error", "skipped")):
                continue
            parts = []
            for key, label in RATIOS:
                a, b = ours.get(key), nchan.get(key)
                if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
                    parts.append(f"{label} {a / b:.2f}x")
            ratio_lines.append(f"{case:>20}  {name}/nchan: " + ", ".join(parts))
    if ratio_lines:
        lines += ["", "ratios (below 1.0 = gateway lower; for deliv/s higher is better):"] + ratio_lines
    return "\n".join(lines)


def long_run_table(r: dict[str, Any]) -> str:
    """Baseline, peak and final figures of a churn or soak case, one row each."""
    keys = ("rss_mb", "pss_mb", "fds", "greenlets", "connections")
    lines = [f"\n{r['case']} ({r['server']}): " + " ".join(f"{k:>11}" for k in keys)]
    for point in ("baseline", "peak", "final"):
        lines.append(
            f"{point:>{len(r['case']) + len(r['server']) + 4}} "
            + " ".join(f"{_fmt(r[point].get(k)):>11}" for k in keys)
        )
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a short subset (1k subscribers, fewer messages)")
    p.add_argument("--cases", default="", help="comma-separated names or globs (see --list), e.g. 'sse-*,flood*'")
    p.add_argument(
        "--servers",
        default="gateway,nchan",
        help="gateway, nchan, floor, floor-greenlets (bench/floor.py: long poll only); default: gateway,nchan",
    )
    p.add_argument("--messages", type=int, default=0, help="messages per 20 msg/s case (default 200 = 10 s)")
    p.add_argument("--subscribers", type=int, default=0, help="override every selected case's subscriber count")
    p.add_argument("--workers", type=int, default=2, help="load generator processes (default 2)")
    p.add_argument("--pad", type=int, default=40, help="extra payload bytes per message (default 40)")
    p.add_argument("--gateway-toml", default="", help="extra TOML appended to the gateway's bench config")
    p.add_argument(
        "--gateway-root",
        type=Path,
        default=ROOT,
        help="the gateway checkout to run (default: this one), e.g. a `git archive` of main to compare",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="sample the gateway with py-spy during each case; raw stacks go to this folder",
    )
    p.add_argument("--out", default="", help="also write the JSON lines to this file")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
