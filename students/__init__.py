"""Student models (pure `nn.Module` code), `load(path)` for exported student folders, and
`create_vision_student` for timm-registered image classifiers (ours included)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn


def is_timm_folder(path: str | Path) -> bool:
    """A folder in timm's hub format: config.json naming an `architecture`, plus weights."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "architecture" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def load(path: str | Path) -> nn.Module:
    """Load an exported student (`config.json` + `model.safetensors`) from a folder: a Hugging
    Face VLM, or a timm image classifier (timm's hub format, as `export_timm` writes it).

    Raises:
        WorkbenchError: the folder, its config or its weights are missing or unreadable.
    """
    from workbench.errors import WorkbenchError

    path = Path(path)
    if not (path / "config.json").is_file():
        raise WorkbenchError(f"student folder {path} has no config.json (not an exported model)")
    try:
        if is_timm_folder(path):
            import timm

            import students.minivit  # noqa: F401 - registers the MiniViT models with timm

            return timm.create_model(f"local-dir:{path.resolve()}", pretrained=True)
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - safetensors, JSON and OS errors all mean "unreadable"
        raise WorkbenchError(f"cannot load the student from {path}: {type(e).__name__}: {e}".splitlines()[0]) from None


def export_timm(model: nn.Module, out: str | Path, class_names: list[str] | None = None,
                preprocess: dict[str, Any] | None = None) -> None:
    """Save a timm model as config.json (architecture, constructor arguments, preprocessing,
    class names) + model.safetensors; `load(out)` and `timm.create_model("local-dir:" + out,
    pretrained=True)` rebuild it.

    Args:
        preprocess: the normalisation the training images had ({"mean", "std", "crop_pct"}),
            recorded in the folder's `pretrained_cfg` for whoever runs the model next.
    """
    from timm.models import save_for_hf

    save_for_hf(model, str(out), safe_serialization=True,
                model_config={"label_names": list(class_names)} if class_names else None,
                data_config=dict(preprocess) if preprocess else None)


def create_vision_student(name: str, num_classes: int, img_size: int, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name)` for the data at hand: its classes, channels and image size.

    Any timm architecture works (e.g. `deit_tiny_patch16_224` as an unshared baseline);
    `students.minivit` registers the Mini-DeiT / Mini-Swin models. `img_size` is passed only
    when it differs from the architecture's default, so convolutional nets need not take it.
    """
    import timm

    import students.minivit  # noqa: F401

    default = timm.get_pretrained_cfg(name)
    size = tuple(default.input_size[1:]) if default is not None else None
    extra = {} if size == (img_size, img_size) else {"img_size": img_size}
    return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **{**extra, **kwargs})
