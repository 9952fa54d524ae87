"""Assertions shared by the kernel tests (tests/test_kernel_*.py).

Imported as `from kernel_utils import assert_close_verbose` (pytest puts tests/kernels/ on sys.path).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Per-dtype (atol, rtol) for a kernel against its float oracle; tests may pass their own.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for `dtype` from `TOLERANCES`."""
    return TOLERANCES[dtype]


def assert_close_verbose(
    name: str,
    actual: Tensor | None,
    expected: Tensor | None,
    atol: float | None = None,
    rtol: float | None = None,
    max_print: int = 5,
) -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise, with a useful message.

    Both tensors are compared in float64 after moving to the CPU; NaNs and infinities must
    sit at the same places. On failure the message names the tensor and gives the max abs
    error, the max relative error, the mismatch count and the first few mismatches.

    Args:
        name: what is compared, e.g. "grad hidden (triton vs oracle)".
        actual: tensor under test.
        expected: reference tensor of the same shape.
        atol, rtol: tolerances; default `TOLERANCES[expected.dtype]`.
        max_print: how many mismatching entries to list.
    """
    assert actual is not None, f"{name}: actual is None"
    assert expected is not None, f"{name}: expected is None"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    default_atol, default_rtol = TOLERANCES.get(expected.dtype, TOLERANCES[torch.float32])
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    both_nonfinite_equal = (~torch.isfinite(a) | ~torch.isfinite(e)) & ((a == e) | (a.isnan() & e.isnan()))
    err = (a - e).abs()
    bad = ~((err <= atol + rtol * e.abs()) | both_nonfinite_equal)
    if not bad.any():
        return
    finite = torch.isfinite(err)
    max_abs = err[finite].max().item() if finite.any() else float("nan")
    rel = err / e.abs().clamp_min(1e-30)
    max_rel = rel[finite].max().item() if finite.any() else float("nan")
    where = bad.nonzero()[:max_print].tolist()
    examples = ", ".join(f"{tuple(i)}: {a[tuple(i)].item():.6g} vs {e[tuple(i)].item():.6g}" for i in where)
    raise AssertionError(
        f"{name}: {int(bad.sum())} / {bad.numel()} mismatches (atol={atol:g}, rtol={rtol:g}); "
        f"max abs error {max_abs:.3g}, max rel error {max_rel:.3g}; first: {examples}"
    )


def spy_dispatch(monkeypatch, op: str) -> list[str]:
    """Record which path `kernels.<op>.<op>` takes ("ref" or "triton"); the real functions still
    run. Also forgets which paths were already announced, so the log line shows again."""
    import importlib

    import kernels

    package = importlib.import_module(f"kernels.{op}")
    triton_module = importlib.import_module(f"kernels.{op}.triton")
    calls: list[str] = []

    def spy(label, real):
        def wrapped(*args, **kwargs):
            calls.append(label)
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(package, f"{op}_ref", spy("ref", getattr(package, f"{op}_ref")))
    monkeypatch.setattr(triton_module, f"{op}_triton", spy("triton", getattr(triton_module, f"{op}_triton")))
    monkeypatch.setattr(kernels, "_announced", set())
    return calls
