"""Helpers shared by the benchmark scripts: CUDA-event timing, the copy-bandwidth floor, Markdown
tables and the reading of torch profiler traces (GPU activities, per-name totals, idle gaps)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch


def cuda_time_ms(fn: Callable[[], object], *, warmup: int = 5, iters: int = 50) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream, each call timed by events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = (
            torch.cuda.Event(enable_timing=True),
            torch.cuda.Event(enable_timing=True),
        )
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, iters=20)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a Markdown table (pasteable into BENCHMARKS.md)."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines), flush=True)


def device_events(prof: torch.profiler.profile) -> list[Any]:
    """The GPU activities (kernels, copies, memsets) a finished torch profiler recorded, as
    ``FunctionEvent``s: ``name``, ``device_time`` (us), ``time_range.start`` / ``.end`` (us, on the
    clock of the CPU events)."""
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def totals_by_name(
    events: Iterable[Any],
    steps: int,
    time_us: Callable[[Any], float],
    *,
    width: int = 70,
) -> dict[str, tuple[float, float]]:
    """``{name[:width]: (us per step, calls per step)}`` of profiler events over ``steps`` steps,
    each event counting ``time_us(event)`` microseconds (e.g. ``lambda e: e.device_time``)."""
    totals: dict[str, list[float]] = {}
    for e in events:
        entry = totals.setdefault(e.name[:width], [0.0, 0.0])
        entry[0] += time_us(e)
        entry[1] += 1
    return {name: (t / steps, n / steps) for name, (t, n) in totals.items()}


def busy_and_gaps(
    events: Iterable[Any], *, width: int = 50
) -> tuple[float, list[tuple[float, str, str]]]:
    """Microseconds during which at least one of the GPU ``events`` ran (the union of their
    intervals, so overlapping streams count once), and every idle gap between the first and
    the last of them as ``(us, activity before, activity after)``, longest first."""
    busy, gaps = 0.0, []
    end, before = None, ""
    for e in sorted(events, key=lambda e: e.time_range.start):
        start, stop = e.time_range.start, e.time_range.end
        if end is None or start > end:
            if end is not None:
                gaps.append((start - end, before, e.name[:width]))
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
        if stop >= end:
            before = e.name[:width]
    return busy, sorted(gaps, reverse=True)


def print_diff_table(
    what: str,
    labels: tuple[str, str],
    a: Mapping[str, tuple[float, float]],
    b: Mapping[str, tuple[float, float]],
    *,
    top: int = 15,
) -> None:
    """The ``top`` names whose per-step time differs most between two ``totals_by_name``
    results ``a`` and ``b`` (labelled ``labels``): us/step of each, a - b, calls/step of each."""
    none = (0.0, 0.0)
    names = sorted(set(a) | set(b), key=lambda n: -abs(a.get(n, none)[0] - b.get(n, none)[0]))
    rows = []
    for name in names[:top]:
        (ta, ca), (tb, cb) = a.get(name, none), b.get(name, none)
        rows.append([name, f"{ta:.1f}", f"{tb:.1f}", f"{ta - tb:+.1f}", f"{ca:.3g}", f"{cb:.3g}"])  # fmt: skip
    la, lb = labels
    print_table(
        [what, f"{la} us/step", f"{lb} us/step", f"{la} - {lb}", f"{la} calls/step",
         f"{lb} calls/step"],
        rows,
    )  # fmt: skip


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
