"""The benchmark matrix: what each case opens, publishes and measures."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Case", "matrix", "quick", "scaling", "long_runs"]


@dataclass(frozen=True)
class Case:
    name: str
    transport: str  # "sse" | "ws" | "lp" | "mixed" (idle: half SSE, half WebSocket)
    subscribers: int
    channels: int = 1
    rate: float = 20.0  # messages/s over all channels; 0 = flood (as fast as the server answers)
    messages: int = 200
    idle: bool = False  # only open connections and measure memory
    multi: bool = False  # every connection follows all the case's channels (one /sse/a,b,c stream)
    workers: int = 0  # the gateway's server.workers (0: one process); more than one implies Redis
    redis: bool = False  # the gateway on a redis-server of its own (its CPU and memory count too)
    connects: int = 0  # churn: this many connects and disconnects, `subscribers` at a time
    seconds: float = 0  # soak: this long of mixed traffic, `subscribers` client loops

    @property
    def long_run(self) -> bool:
        """Churn and soak: figures of what the gateway keeps, not latency; gateway only."""
        return bool(self.connects or self.seconds)

    @property
    def kind(self) -> str:
        if self.connects:
            return "churn"
        if self.seconds:
            return "soak"
        if self.idle:
            return "idle"
        return "flood" if self.rate == 0 else "rate"


def matrix(messages: int = 200) -> list[Case]:
    cases = []
    for transport in ("sse", "ws", "lp"):
        for n in (1000, 5000, 10000):
            cases.append(Case(f"{transport}-{n // 1000}k", transport, n, messages=messages))
    cases.append(Case("flood-sse-1k", "sse", 1000, rate=0, messages=max(messages * 10, 500)))
    cases.append(Case("flood-ws-1k", "ws", 1000, rate=0, messages=max(messages * 10, 500)))
    # Many channels, few subscribers each: 2,000 channels x 3 SSE subscribers, 200 msg/s in all.
    cases.append(Case("channels-sse-2000x3", "sse", 6000, channels=2000, rate=200, messages=max(messages * 10, 2000)))
    # Many channels on one connection: 1,000 SSE streams each following the same 10 channels.
    cases.append(Case("multi-sse-1kx10", "sse", 1000, channels=10, messages=messages, multi=True))
    cases.append(Case("multi-ws-1kx10", "ws", 1000, channels=10, messages=messages, multi=True))
    cases.append(Case("idle-10k", "mixed", 10000, messages=0, idle=True))
    # Each kind alone: issue 13 asks for Nchan's bytes per idle connection for SSE and for WebSocket.
    cases.append(Case("idle-sse-10k", "sse", 10000, messages=0, idle=True))
    cases.append(Case("idle-ws-10k", "ws", 10000, messages=0, idle=True))
    # One process holding 100,000 idle streams (the bench lifts the open-files limit itself).
    cases.append(Case("idle-100k", "mixed", 100000, messages=0, idle=True))
    cases += scaling(messages)
    return cases


def scaling(messages: int = 200) -> list[Case]:
    """Redis mode beside memory mode, and 1 vs 2 workers on Redis (Nchan runs its usual one worker)."""
    cases = []
    for transport in ("sse", "ws", "lp"):
        cases.append(Case(f"redis-{transport}-1k", transport, 1000, messages=messages, redis=True))
        cases.append(Case(f"workers2-{transport}-1k", transport, 1000, messages=messages, redis=True, workers=2))
    cases.append(Case("workers2-flood-sse-1k", "sse", 1000, rate=0, messages=max(messages * 10, 500), workers=2))
    cases.append(Case("redis-flood-sse-1k", "sse", 1000, rate=0, messages=max(messages * 10, 500), redis=True))
    return cases


def quick() -> list[Case]:
    """A short subset for a quick look (about a minute with Nchan)."""
    return [
        Case("sse-1k", "sse", 1000, messages=60),
        Case("ws-1k", "ws", 1000, messages=60),
        Case("lp-1k", "lp", 1000, messages=60),
        Case("flood-sse-1k", "sse", 1000, rate=0, messages=500),
        Case("idle-2k", "mixed", 2000, messages=0, idle=True),
    ]


def long_runs() -> list[Case]:
    """Opt-in only (`--cases churn-100k,soak-10m`), never in the default matrix: minutes each."""
    return [
        # 100,000 connects and disconnects over poll, long poll, SSE and WebSocket, 200 at a time.
        Case("churn-100k", "all4", 200, channels=50, messages=0, connects=100_000),
        # 10 minutes: 20 msg/s over 20 channels, 300 client loops coming and going on all four.
        Case("soak-10m", "all4", 300, channels=20, rate=20.0, messages=0, seconds=600.0),
        Case("churn-2k", "all4", 50, channels=10, messages=0, connects=2000),  # a smoke-sized churn
        Case("soak-20s", "all4", 30, channels=5, rate=20.0, messages=0, seconds=20.0),  # a smoke-sized soak
    ]
