"""Fused kernels for distillation losses, one folder per op (ref.py / triton.py / dispatch).

Dispatch picks Triton on CUDA and the torch reference otherwise; `WB_KERNELS=ref|triton|auto`
forces a path. `backend()` tells which path is active; `workbench doctor` prints it.
"""

from __future__ import annotations

import importlib.util
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
