"""Helpers shared by the benchmark scripts: the BENCHMARKS.md section writer and the machine line."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_FILE = ROOT / "BENCHMARKS.md"


def replace_section(begin: str, end: str, body: str, path: Path = BENCH_FILE) -> None:
    """Put ``body`` (which starts with ``begin`` and ends with ``end``) in place of the text between those
    markers in ``path``, or append it when the markers are not there yet."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + body + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text, encoding="utf-8")


def machine() -> str:
    """One line naming the machine and the library versions."""
    import torch

    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def publish(lines: list[str], begin: str, end: str, write: bool) -> None:
    """Print a section (``lines`` joined) and, with ``write``, put it in BENCHMARKS.md between its markers."""
    body = "\n".join(lines)
    print(body)
    if write:
        replace_section(begin, end, body)
        print(f"updated {BENCH_FILE}")


def median_seconds(fn, reps: int) -> float:
    """Median wall time of ``reps`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
