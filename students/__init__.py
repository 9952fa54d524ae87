"""Student models (pure `nn.Module` code) and `load(path)` for exported student folders."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def load(path: str | Path) -> nn.Module:
    """Load an exported student (`config.json` + `model.safetensors`) from a folder.

    Raises:
        WorkbenchError: the folder, its config or its weights are missing or unreadable.
    """
    from transformers import AutoModelForImageTextToText

    from workbench.errors import WorkbenchError

    path = Path(path)
    if not (path / "config.json").is_file():
        raise WorkbenchError(f"student folder {path} has no config.json (not an exported model)")
    try:
        return AutoModelForImageTextToText.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - safetensors, JSON and OS errors all mean "unreadable"
        raise WorkbenchError(f"cannot load the student from {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
