"""Fused kernels, one folder per op (ref.py / triton.py / dispatch): the distillation losses, the
SSD scan of the Mamba-2 students (`ssd/`, whose native path is mamba-ssm's fused scan), the
integer path of ternary layers (`ternary/`) and the MLGRU recurrence of the MatMul-free LM
(`hgrn/`, torch only so far).

Dispatch picks the native path on CUDA and the torch reference otherwise; `WB_KERNELS=ref|triton|auto`
forces a path. `backend()` tells which path is active; `workbench doctor` prints it. Each op logs
its path once (`announce`) under the "kernels" logger.
"""

from __future__ import annotations

import importlib.util
import logging
import os

BACKENDS = ("auto", "ref", "triton")


def requested_backend() -> str:
    """The `WB_KERNELS` setting (default "auto"); an unknown value is an error."""
    value = os.environ.get("WB_KERNELS", "auto").strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"WB_KERNELS={value!r}; expected one of {', '.join(BACKENDS)}")
    return value


def backend() -> str:
    """The kernel path in use: "triton" (CUDA + Triton, or forced) or "ref" (torch)."""
    value = requested_backend()
    if value != "auto":
        return value
    import torch

    has_triton = importlib.util.find_spec("triton") is not None
    return "triton" if torch.cuda.is_available() and has_triton else "ref"


_log = logging.getLogger("kernels")
_announced: set[tuple[str, str]] = set()


def announce(op: str, path: str) -> None:
    """Log "`op`: using the `path` path" the first time `op` takes `path`."""
    if (op, path) not in _announced:
        _announced.add((op, path))
        _log.info("%s: using the %s path", op, path)


def use_triton(op: str, tensor) -> bool:
    """Whether `op` runs its Triton path on tensors like `tensor`; the choice is logged once per op.

    Triton when `backend()` says so and the tensor is on CUDA. With CUDA present but CPU
    tensors, "auto" falls back to torch; a forced `WB_KERNELS=triton` on CPU tensors runs in
    Triton's interpreter, which must be on (`TRITON_INTERPRET=1` before triton is imported),
    else it is an error rather than a crash inside the Triton runtime.
    """
    triton = backend() == "triton" and (tensor.is_cuda or requested_backend() == "triton")
    if triton and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{op}: WB_KERNELS=triton with CPU tensors needs TRITON_INTERPRET=1 (set before triton is "
            "imported); use WB_KERNELS=ref or auto for the torch path, or move the tensors to CUDA"
        )
    announce(op, "triton" if triton else "torch (ref)")
    return triton
