"""What this machine offers and which code paths are active: versions, CUDA, Triton,
mamba-ssm, bitsandbytes, kernel backend. Written to each run's env.json and printed by
`workbench doctor`."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import subprocess
from pathlib import Path

from workbench.errors import WorkbenchError

PACKAGES = ("torch", "pytorch-lightning", "transformers", "timm", "omegaconf", "safetensors", "tokenizers",
            "accelerate", "bitsandbytes", "torchao", "triton", "mamba-ssm", "distill-workbench")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_kernels_package() -> None:
    """Fail clearly when another top-level `kernels` package shadows ours.

    Hugging Face's `kernels` (a hard dependency of transformers from 5.25, optional before)
    installs a package of the same name; the one found first wins and the other vanishes.
    """
    spec = importlib.util.find_spec("kernels")
    ours = Path(__file__).resolve().parent.parent / "kernels"
    origin = Path(spec.origin).resolve().parent if spec is not None and spec.origin else None
    if origin != ours:
        raise WorkbenchError(
            f"`import kernels` finds {origin or 'nothing'}, not distill-workbench's {ours}: another package named "
            "`kernels` (Hugging Face's, which transformers >= 5.25 requires) is installed; `pip uninstall kernels` "
            "and keep transformers < 5.25 (pyproject.toml's bound)"
        )


def git_commit(path: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path or Path.cwd(), capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _mamba_ssm_status(has_cuda: bool) -> str:
    if _version("mamba-ssm") is None:
        return "not installed (optional extra [cuda]); using the torch SSD path"
    if not has_cuda:
        return "installed, unusable without CUDA; using the torch SSD path"
    from kernels.ssd import scan_backend

    return "installed: the fused chunk scan runs CUDA tensors" if scan_backend() == "mamba_ssm" else \
        "installed but not importable (or WB_KERNELS=ref); using the torch SSD path"


def environment() -> dict:
    """Versions and active paths, JSON-serialisable."""
    import torch

    from kernels import backend

    has_cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "cuda": {
            "available": has_cuda,
            "version": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if has_cuda else [],
        },
        "cpu_threads": torch.get_num_threads(),
        "triton": _version("triton") is not None,
        "bitsandbytes": _version("bitsandbytes") is not None and _version("accelerate") is not None,
        "mamba_ssm": _mamba_ssm_status(has_cuda),
        "kernels": backend(),
        "git_commit": git_commit(Path(__file__).resolve().parent),
    }
