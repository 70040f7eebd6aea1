"""Merging the workers' latency histograms and reading percentiles from them."""

from __future__ import annotations

from bench.load import BUCKET_US

__all__ = ["merge", "percentiles"]


def merge(hists: list[dict[int, int]]) -> dict[int, int]:
    total: dict[int, int] = {}
    for hist in hists:
        for bucket, n in hist.items():
            total[int(bucket)] = total.get(int(bucket), 0) + n
    return total


def percentiles(hist: dict[int, int], points: tuple[float, ...] = (50, 95, 99, 100)) -> list[float | None]:
    """Latency in ms at each percentile (the bucket's upper edge); None without samples."""
    count = sum(hist.values())
    if not count:
        return [None for _ in points]
    out: list[float | None] = []
    buckets = sorted(hist.items())
    for p in points:
        want = max(1, round(count * p / 100))
        seen = 0
        for bucket, n in buckets:
            seen += n
            if seen >= want:
                out.append(round((bucket + 1) * BUCKET_US / 1000, 2))
                break
    return out
