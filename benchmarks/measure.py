"""Wall seconds and peak anonymous memory (``RssAnon``) of a child process, for benchmarks.

Peak ``RssAnon`` is sampled from ``/proc/<pid>/status`` while the child runs: it is the
memory the process itself allocated. Max RSS (``ru_maxrss``, ``VmHWM``) also counts the
file-backed pages of memmapped caches and OOF arrays, page cache the kernel can drop, and
is not what limits a machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_rss_anon: int  # bytes
    stdout: str

    @property
    def peak_mb(self) -> float:
        return self.peak_rss_anon / 2**20

    @property
    def last_json(self) -> dict:
        """The JSON object a benchmark child printed as its last line."""
        return json.loads(self.stdout.strip().splitlines()[-1])


def peak_rss_anon(child: subprocess.Popen, every: float = 0.01) -> int:
    """Peak ``RssAnon`` of a running child (and its descendants) in bytes, until it exits."""
    peak = 0
    while child.poll() is None:
        peak = max(peak, sum(_rss_anon(pid) for pid in _family(child.pid)))
        time.sleep(every)
    child.wait()
    return peak


def run_measured(command: list[str], env: dict | None = None, cwd: Path | None = None) -> Measured:
    """Run ``command`` (stderr passes through), measuring wall time and peak ``RssAnon``."""
    started = time.perf_counter()
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, cwd=cwd
    ) as child:
        peak = peak_rss_anon(child)
        stdout = child.stdout.read() if child.stdout else ""
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({child.returncode}):\n{stdout[-2000:]}")
    return Measured(time.perf_counter() - started, peak, stdout)


def ek_command(*args) -> list[str]:
    return [sys.executable, "-m", "ensemble_kit.cli", *map(str, args)]


def load_note() -> str:
    load = os.getloadavg()
    return f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} CPUs"


def _rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _family(pid: int) -> list[int]:
    """``pid`` and its descendants (worker pools count toward a command's memory)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        todo += [int(c) for c in children]
    return found
