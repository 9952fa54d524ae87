"""Benchmarks behind `workbench bench ...`: each measurement runs in a fresh subprocess so its
peak memory is its own. This package holds the shared machinery (memory probes, the worker
launcher, the machine description); `kernels.py` is `workbench bench kernels`.

CPU peak = the peak RSS after the work (VmHWM, the per-process ru_maxrss) minus the RSS just
before it, with the high-water mark reset first, so creating the inputs and warming up do not
count. CUDA peak = torch.cuda.max_memory_allocated after a reset, minus what was allocated before.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass

MIB = 2**20


def rss_bytes() -> int:
    """Resident set size of this process now (from /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS.

    Without it, a peak reached while creating the inputs would hide a smaller peak of the
    work. Linux >= 4.0; elsewhere the mark is left as it is.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak RSS of this process in bytes: VmHWM from /proc/self/status.

    Not ru_maxrss: after fork + exec it still holds the parent's peak (the pre-exec copy's
    high-water mark), so a worker started from a large process (pytest, the CLI with torch
    loaded) would report the parent's size. ru_maxrss is the fallback where /proc is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class WorkerResult:
    """What a worker subprocess printed as its last stdout line (a JSON object), or why it died."""

    data: dict | None
    error: str | None = None


def run_worker(module: str, spec: dict, timeout: float | None = None) -> WorkerResult:
    """Run `python -m <module> --worker <spec as JSON>` in a fresh process and read its result.

    A worker that crashes, is killed (e.g. for memory) or times out comes back as
    `WorkerResult(None, reason)` instead of raising, so the other measurements still run.
    """
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return WorkerResult(None, f"timed out after {timeout:g} s")
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        hint = " (likely out of memory)" if -proc.returncode == signal.SIGKILL else ""
        return WorkerResult(None, f"killed by {name}{hint}")
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        return WorkerResult(None, (lines[-1] if lines else f"exit code {proc.returncode}")[:300])
    try:
        return WorkerResult(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (IndexError, json.JSONDecodeError):
        return WorkerResult(None, f"no result on stdout: {proc.stdout[-200:]!r}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine() -> dict:
    """The machine a benchmark ran on, for its JSON: CPU, cores, RAM, torch, CUDA device, kernel path."""
    import torch

    from kernels import backend

    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "ram_gib": _total_ram_gib(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "kernels_backend": backend(),
    }
