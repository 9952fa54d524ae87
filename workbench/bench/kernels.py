"""`workbench bench kernels`: peak memory and time of the fused distillation kernels against
their naive torch baselines, at the issue's real shapes (or shrunk with --quick).

For every op and case, "naive" (`kernels.<op>.ref.<op>_naive`) and "ours" (the public,
dispatching `kernels.<op>.<op>`; with CUDA also `kernels.<op>.triton.<op>_triton` explicitly)
each run forward + backward in a fresh subprocess (`python -m workbench.bench.kernels --worker
JSON`), one at a time. An op whose modules do not import is reported as not available.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from workbench.bench import MIB, machine, peak_rss_bytes, reset_peak_rss, rss_bytes, run_worker
from workbench.errors import WorkbenchError

OPS = ("fused_linear_kd", "attention_kl", "relation_loss")


@dataclass(frozen=True)
class KernelCase:
    """One benchmarked call: its op, name, and shapes at full size, under --quick, and for warm-up."""

    op: str
    name: str
    shape: dict[str, int]
    quick: dict[str, int]
    tiny: dict[str, int]


@dataclass(frozen=True)
class Target:
    """The issue's pass marks for ours / naive (None: no target)."""

    peak_ratio: float | None
    time_ratio: float | None


# Real shapes: Qwen2-0.5B's LM head (H=896, V=151,936) over 4096 tokens; a ViT-B-sized
# attention (12 heads of 64) and its per-head relations over 2304 visual tokens of one image.
_LM = dict(N=4096, V=151_936, H=896)
_LM_QUICK = dict(N=512, V=151_936 // 16, H=896)
_LM_TINY = dict(N=16, V=256, H=32)
CASES = (
    KernelCase("fused_linear_kd", "dense", _LM, _LM_QUICK, _LM_TINY),
    KernelCase("fused_linear_kd", "top-k 64", {**_LM, "K": 64}, {**_LM_QUICK, "K": 64}, {**_LM_TINY, "K": 64}),
    KernelCase("attention_kl", "12 heads x 64", dict(B=1, H=12, N=2304, D=64), dict(B=1, H=12, N=288, D=64),
               dict(B=1, H=2, N=16, D=16)),
    KernelCase("relation_loss", "cosine, 12 heads x 64", dict(B=12, N=2304, D=64), dict(B=12, N=288, D=64),
               dict(B=2, N=16, D=16)),
)
TARGETS = {
    "fused_linear_kd": Target(peak_ratio=0.15, time_ratio=1.5),
    "attention_kl": Target(peak_ratio=1 / 8, time_ratio=None),
    "relation_loss": Target(peak_ratio=1 / 8, time_ratio=None),
}


def _case(op: str, name: str) -> KernelCase:
    for case in CASES:
        if case.op == op and case.name == name:
            return case
    raise KeyError(f"no benchmark case {op} / {name!r}")


# ---- inputs (built inside the worker, before the memory baseline) -------------------------------

def _fused_linear_kd_inputs(case: KernelCase, s: dict[str, int], device: str) -> tuple[tuple, dict]:
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden = torch.randn(s["N"], s["H"], device=device, dtype=dtype).requires_grad_()  # (N, H)
    weight = torch.randn(s["V"], s["H"], device=device, dtype=dtype).mul_(s["H"] ** -0.5).requires_grad_()  # (V, H)
    if "K" not in s:
        teacher = torch.randn(s["N"], s["V"], device=device, dtype=dtype)  # (N, V)
        return (hidden, weight, teacher), {}
    k = s["K"]
    # K distinct ids per row: a random start, then strides of V // K
    start = torch.randint(0, s["V"], (s["N"], 1), device=device)
    ids = (start + torch.arange(k, device=device) * (s["V"] // k)) % s["V"]  # (N, K)
    logp = torch.randn(s["N"], k + 1, device=device).log_softmax(-1)  # (N, K + 1): top-k, then the rest
    return (hidden, weight, None), dict(topk_ids=ids, topk_logp=logp[:, :k].contiguous(),
                                        rest_logp=logp[:, k].contiguous())


def _attention_kl_inputs(case: KernelCase, s: dict[str, int], device: str) -> tuple[tuple, dict]:
    import torch

    shape = (s["B"], s["H"], s["N"], s["D"])
    q_s, k_s = (torch.randn(shape, device=device).requires_grad_() for _ in range(2))  # (B, H, N, D)
    q_t, k_t = (torch.randn(shape, device=device) for _ in range(2))  # (B, H, N, D)
    return (q_s, k_s, q_t, k_t), {}


def _relation_loss_inputs(case: KernelCase, s: dict[str, int], device: str) -> tuple[tuple, dict]:
    import torch

    x_s = torch.randn(s["B"], s["N"], s["D"], device=device).requires_grad_()  # (B, N, D)
    x_t = torch.randn(s["B"], s["N"], s["D"], device=device)  # (B, N, D)
    return (x_s, x_t), dict(kind="cosine")


INPUTS: dict[str, Callable[[KernelCase, dict[str, int], str], tuple[tuple, dict]]] = {
    "fused_linear_kd": _fused_linear_kd_inputs,
    "attention_kl": _attention_kl_inputs,
    "relation_loss": _relation_loss_inputs,
}


def _function(op: str, path: str) -> Callable:
    """naive: `<op>_naive`; ours: the public dispatching `<op>`; triton: `<op>_triton`."""
    module, name = {"naive": (f"kernels.{op}.ref", f"{op}_naive"), "ours": (f"kernels.{op}", op),
                    "triton": (f"kernels.{op}.triton", f"{op}_triton")}[path]
    return getattr(importlib.import_module(module), name)


def unavailable(op: str) -> str | None:
    """Why `op` cannot be benchmarked (its modules do not import), or None if it can."""
    try:
        _function(op, "ours")
        _function(op, "naive")
    except Exception as e:  # any import-time failure of a module being written means "not yet"
        return f"{type(e).__name__}: {e}"
    return None


# ---- the worker: one measurement in a fresh process ---------------------------------------------

def _leaves(args: tuple, kwargs: dict) -> list:
    return [x for x in (*args, *kwargs.values()) if getattr(x, "requires_grad", False)]


def _forward_backward(fn: Callable, args: tuple, kwargs: dict):
    for leaf in _leaves(args, kwargs):
        leaf.grad = None
    loss = fn(*args, **kwargs)
    loss.backward()
    return loss.detach()


def measure(spec: dict) -> dict:
    """Run one measurement in this process; `spec` = {op, case, shape, path, device, repeats, seed}.

    Returns:
        {peak_mib, seconds (best of repeats), loss, backend, device}.
    """
    case = _case(spec["op"], spec["case"])  # a bad spec fails before the slow imports

    import torch

    from kernels import backend

    fn = _function(spec["op"], spec["path"])
    device = spec.get("device", "cpu")
    cuda = device == "cuda"
    torch.manual_seed(spec.get("seed", 0))
    args, kwargs = INPUTS[case.op](case, spec["shape"], device)
    # Warm-up on a tiny shape loads the libraries and (on CUDA) compiles; on CUDA the real shape
    # is run once too, since Triton specialises on it.
    _forward_backward(fn, *INPUTS[case.op](case, case.tiny, device))
    if cuda:
        _forward_backward(fn, args, kwargs)
        for leaf in _leaves(args, kwargs):
            leaf.grad = None
        torch.cuda.synchronize()
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        before = rss_bytes()
    times = []
    for _ in range(max(1, spec.get("repeats", 1))):
        start = time.perf_counter()
        loss = _forward_backward(fn, args, kwargs)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - before
    return {"peak_mib": max(peak, 0) / MIB, "seconds": min(times), "loss": float(loss), "backend": backend(),
            "device": device}


# ---- the driver --------------------------------------------------------------------------------

def parse_ops(text: str) -> list[str]:
    """Comma-separated op names -> list; unknown names are a WorkbenchError."""
    ops = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in ops if name not in OPS]
    if unknown or not ops:
        raise WorkbenchError(f"--ops: unknown kernel op(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(OPS)}")
    return ops


def _ratio(ours: float | None, naive: float | None) -> float | None:
    return ours / naive if ours is not None and naive and naive > 0 else None


def _verdict(ratio: float | None, target: float | None) -> str | None:
    if target is None or ratio is None:
        return None
    return "pass" if ratio <= target else "fail"


def _row(case: KernelCase, shape: dict, path: str, naive: dict, ours: dict, judge: bool = True) -> dict:
    """One table / JSON row: ours (one path) against the naive baseline of the same case.

    The targets are for the real shapes; with judge=False (--quick) no pass/fail is given.
    """
    target = TARGETS[case.op] if judge else Target(None, None)
    peak_ratio = _ratio(ours.get("peak_mib"), naive.get("peak_mib"))
    time_ratio = _ratio(ours.get("seconds"), naive.get("seconds"))
    errors = [f"{who} failed: {r['error']}" for who, r in (("naive", naive), ("ours", ours)) if "error" in r]
    return {
        "op": case.op, "case": case.name, "shape": shape, "path": path,
        "naive_peak_mib": naive.get("peak_mib"), "ours_peak_mib": ours.get("peak_mib"), "peak_ratio": peak_ratio,
        "naive_s": naive.get("seconds"), "ours_s": ours.get("seconds"), "time_ratio": time_ratio,
        "naive_loss": naive.get("loss"), "ours_loss": ours.get("loss"),
        "peak_target": target.peak_ratio, "peak_ok": _verdict(peak_ratio, target.peak_ratio),
        "time_target": target.time_ratio, "time_ok": _verdict(time_ratio, target.time_ratio),
        "status": "; ".join(errors) or "ok",
    }


def bench_kernels(ops: list[str], quick: bool = False, repeats: int = 1, timeout: float | None = None,
                  progress: Callable[[str], None] | None = None) -> list[dict]:
    """Measure every case of `ops`, one subprocess at a time; returns the rows."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = ["ours", "triton"] if device == "cuda" else ["ours"]
    cases = [case for case in CASES if case.op in ops]
    total = sum(1 + len(paths) for case in cases)
    say = progress or (lambda line: None)
    rows, done = [], 0
    for case in cases:
        shape = case.quick if quick else case.shape
        shape_text = " ".join(f"{k}={v}" for k, v in shape.items())
        reason = unavailable(case.op)
        if reason is not None:
            done += 1 + len(paths)
            say(f"[{done}/{total}] {case.op} {case.name}: not available ({reason})")
            rows.append({**_row(case, shape, "-", {}, {}, judge=not quick), "status": f"not available: {reason}"})
            continue
        results = {}
        for path in ["naive", *paths]:
            done += 1
            spec = dict(op=case.op, case=case.name, shape=shape, path=path, device=device, repeats=repeats)
            started = time.perf_counter()
            result = run_worker("workbench.bench.kernels", spec, timeout=timeout)
            results[path] = result.data if result.data is not None else {"error": result.error}
            outcome = (f"failed: {result.error}" if result.data is None else
                       f"{result.data['peak_mib']:.1f} MiB, {result.data['seconds']:.3f} s")
            say(f"[{done}/{total}] {case.op} {case.name} ({shape_text}) {path}: {outcome} "
                f"[{time.perf_counter() - started:.0f} s wall]")
        for path in paths:
            label = f"ours ({results[path].get('backend', '?')})" if path == "ours" else path
            rows.append(_row(case, shape, label, results["naive"], results[path], judge=not quick))
    return rows


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_rows(rows: list[dict], title: str):
    """The rows as a rich Table."""
    from rich.table import Table

    table = Table(title=title)
    for name in ("op", "case", "path", "naive MiB", "ours MiB", "peak ratio", "peak target",
                 "naive s", "ours s", "time ratio", "time target", "status"):
        table.add_column(name, justify="right" if "MiB" in name or name.endswith((" s", "ratio")) else "left")
    for r in rows:
        def target(kind: str) -> str:
            limit, ok = r[f"{kind}_target"], r[f"{kind}_ok"]
            return "-" if limit is None else f"{ok or '?'} (<= {limit:.3g})"

        table.add_row(r["op"], r["case"], r["path"], _fmt(r["naive_peak_mib"], 1), _fmt(r["ours_peak_mib"], 1),
                      _fmt(r["peak_ratio"], 3), target("peak"), _fmt(r["naive_s"], 3), _fmt(r["ours_s"], 3),
                      _fmt(r["time_ratio"], 2), target("time"), r["status"])
    return table


def bench_kernels_command(ops: str, quick: bool = False, repeats: int = 1, json_out: str | None = None,
                          timeout: float | None = None) -> list[dict]:
    """`workbench bench kernels`: measure, print the table, write JSON if asked."""
    from rich.console import Console

    selected = parse_ops(ops)
    if repeats < 1:
        raise WorkbenchError(f"--repeats {repeats}: give at least 1")
    if json_out is not None and Path(json_out).is_dir():
        raise WorkbenchError(f"--json {json_out} is a folder; give a file, e.g. {Path(json_out) / 'kernels.json'}")
    rows = bench_kernels(selected, quick=quick, repeats=repeats, timeout=timeout,
                         progress=lambda line: print(line, file=sys.stderr, flush=True))
    where = machine()
    title = (f"kernels{' (--quick: smoke test, no targets)' if quick else ''} on {where['cuda_device'] or where['cpu']}, "
             f"{where['logical_cores']} cores; best of {repeats}")
    Console(width=None if sys.stdout.isatty() else 200).print(format_rows(rows, title))  # no wrapping in logs
    if json_out is not None:
        out = Path(json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"benchmark": "kernels", "quick": quick, "repeats": repeats, "machine": where,
                                   "targets": {op: asdict(t) for op, t in TARGETS.items()}, "rows": rows}, indent=2))
        print(f"written to {out}")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: `python -m workbench.bench.kernels --worker SPEC_JSON` prints one JSON line."""
    p = argparse.ArgumentParser(prog="python -m workbench.bench.kernels")
    p.add_argument("--worker", required=True, metavar="SPEC_JSON", help="one measurement (see `measure`)")
    args = p.parse_args(argv)
    print(json.dumps(measure(json.loads(args.worker))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
