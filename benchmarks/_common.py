"""Helpers shared by the benchmarks: machine description, targets, JSON and RESULTS.md output.

Every benchmark writes ``benchmarks/results/NAME.json`` with a top-level ``machine`` and a
``targets`` mapping (``{"value", "goal", "op", "unit"}`` per target), and records its latest
figures in its own section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"

Op = Literal[">=", "<="]


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (falls back to :func:`platform.processor`)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    match = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or "unknown")


def memory_gib() -> float | None:
    """Total memory in GiB from ``/proc/meminfo``, if readable."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemTotal:\s*(\d+) kB", text, flags=re.MULTILINE)
    return round(int(match.group(1)) / 2**20, 1) if match else None


def machine_info() -> dict[str, Any]:
    """What the benchmark ran on: CPU, cores, memory and the versions that matter."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "flwr": _package_version("flwr"),
        "ray": _package_version("ray"),
        "numpy": _package_version("numpy"),
    }


def target(value: float, goal: float, op: Op, unit: str) -> dict[str, Any]:
    """One entry of the ``targets`` mapping, with whether the goal is met."""
    met = value >= goal if op == ">=" else value <= goal
    return {"value": float(value), "goal": float(goal), "op": op, "unit": unit, "met": bool(met)}


def write_json(name: str, payload: dict[str, Any], path: Path | None = None) -> Path:
    """Write ``benchmarks/results/NAME.json`` (adding ``machine`` and a timestamp if absent).

    ``path`` writes elsewhere instead (tests use it to leave the recorded results alone).
    """
    payload.setdefault("benchmark", name)
    payload.setdefault("machine", machine_info())
    payload.setdefault("timestamp", datetime.now(UTC).isoformat(timespec="seconds"))
    path = path or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def matmul_peak_gflops(n: int = 2048, threads: int | None = 2, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 ``n × n × n`` matrix-product throughput in GFLOP/s.

    Parameters
    ----------
    n
        Matrix size.
    threads
        ``torch.set_num_threads`` during the measurement (restored afterwards); ``None`` keeps
        the current setting.
    repeats
        Timed products (after one warm-up); the fastest counts.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen)
        b = torch.randn(n, n, generator=gen)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - t0)
        return 2.0 * n**3 / best / 1e9
    finally:
        torch.set_num_threads(before)


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (``/proc/stat``), if readable."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_tree_cpu_seconds(root: int | None = None) -> float | None:
    """CPU seconds (user + system) of process ``root`` (default: this one) and its descendants.

    Only live processes count (Ray's workers, the raylet and the GCS are descendants of the
    process that called ``ray.init``).
    """
    root = os.getpid() if root is None else root
    clk = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    try:
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rindex(")") + 2 :].split()
        parent[pid] = int(rest[1])
        cpu[pid] = (int(rest[11]) + int(rest[12])) / clk
    if root not in cpu:
        return None
    total = 0.0
    for pid, seconds in cpu.items():
        p, depth = pid, 0
        while p not in (0, 1) and p != root and depth < 64:
            p, depth = parent.get(p, 0), depth + 1
        if p == root:
            total += seconds
    return total


class CpuMonitor:
    """How many cores *other* processes kept busy while a block ran (``foreign_cores``).

    System-wide busy time from ``/proc/stat`` minus the CPU time of this process and its live
    descendants (e.g. Ray's workers), divided by the wall time. On a 2-core machine anything
    above ~0.1 means the timing is skewed by other work. Use it as a context manager, or call
    :meth:`start` and :meth:`stop` (stop before descendants exit, or their time counts as
    foreign).
    """

    def __init__(self) -> None:
        self.foreign_cores: float | None = None
        self.wall = 0.0

    def start(self) -> CpuMonitor:
        """Start measuring."""
        self._busy0 = _busy_cpu_seconds()
        self._own0 = process_tree_cpu_seconds()
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> float | None:
        """Stop measuring; return (and keep) ``foreign_cores``."""
        self.wall = time.perf_counter() - self._t0
        busy1 = _busy_cpu_seconds()
        own1 = process_tree_cpu_seconds()
        parts = (self._busy0, busy1, self._own0, own1)
        if all(x is not None for x in parts) and self.wall > 0:
            busy = busy1 - self._busy0  # type: ignore[operator]
            own = own1 - self._own0  # type: ignore[operator]
            self.foreign_cores = max(0.0, (busy - own) / self.wall)
        return self.foreign_cores

    def __enter__(self) -> CpuMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_quiet(max_wait: float, threshold: float = 0.2, window: float = 1.0) -> float | None:
    """Wait (up to ``max_wait`` s) until other processes use fewer than ``threshold`` cores.

    Returns the last measured foreign load (cores), or ``None`` where ``/proc/stat`` is absent.
    """
    deadline = time.perf_counter() + max_wait
    while True:
        with CpuMonitor() as mon:
            time.sleep(window)
        load = mon.foreign_cores
        if load is None or load < threshold or time.perf_counter() >= deadline:
            return load


def machine_line(machine: dict[str, Any]) -> str:
    """One-line description of a machine for RESULTS.md."""
    return (
        f"{machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('memory_gib')} GiB; "
        f"Python {machine.get('python')}, torch {machine.get('torch')}, "
        f"flwr {machine.get('flwr')}, ray {machine.get('ray')}"
    )


def update_results_md(section: str, body: str) -> Path:
    """Replace (or append) the ``## {section}`` section of ``benchmarks/RESULTS.md``.

    Other sections are kept as they are. A section runs from its heading to the next ``## ``
    heading or the end of the file.
    """
    header = (
        "# Benchmark results\n\n"
        "Latest figures of `python -m benchmarks.NAME`, with the machine they ran on.\n"
    )
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else header
    heading = f"## {section}"
    new_section = f"{heading}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        if not text.endswith("\n"):
            text += "\n"
        text = f"{text}\n{new_section}"
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = "".join(lines[end:])
        text = "".join(lines[:start]) + new_section + ("\n" + tail if tail else "")
    RESULTS_MD.write_text(text)
    return RESULTS_MD
