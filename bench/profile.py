"""Optional profiling of the gateway during a case: py-spy (dev-only) samples the server process
while events flow, and a summary prints the hottest frames, by own time and including callees."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

__all__ = ["Profiler", "summarise"]


class Profiler:
    def __init__(self, pid: int, out: Path, seconds: float) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.out = out
        # --nonblocking: sampling must not pause the server it measures; idle greenlet stacks are left out.
        self.proc = subprocess.Popen(
            [
                spy,
                "record",
                "-p",
                str(pid),
                "-d",
                str(max(1, int(seconds))),
                "-r",
                "250",
                "-f",
                "raw",
                "--nonblocking",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> str:
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        return summarise(self.out) if self.out.exists() else "(no profile written)"


def summarise(path: Path, top: int = 18) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if "acquire_with_timeout" in frames[-1] or "Hub.run" in frames[-1]:
            continue  # idle: the threadpool's workers waiting, the loop polling
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "(no busy samples)"
    lines = [f"{total} busy samples; own time:"]
    lines += [f"  {n / total:6.1%}  {frame[:110]}" for frame, n in own.most_common(top)]
    lines.append("including callees:")
    lines += [f"  {n / total:6.1%}  {frame[:110]}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)
