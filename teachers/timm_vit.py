"""A frozen timm image classifier as teacher (DeiT, Swin, RegNetY, ... or a model we trained).

`workbench/build/teacher.py` creates a `TimmTeacher` from `teacher.*` config keys; the online
target (`workbench/targets/online.py`) calls it under no_grad for class logits, and feature taps (`workbench/taps.py`) read Q/K/V
projections or block outputs inside `TimmTeacher.model` by timm module path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from teachers.hf_vlm import DTYPES, TeacherOutput
from teachers.errors import TeacherError

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_NESTED_KEYS = ("model_ema", "model", "state_dict")  # how DeiT / Swin / Lightning checkpoints wrap weights


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Weights from a safetensors file, or a torch checkpoint read with `weights_only=True`
    (never unpickling code); unwraps {"model": ...} / {"state_dict": ...} and DDP's "module."."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated files, unpickling refusal, bad headers
        raise TeacherError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    for key in _NESTED_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise TeacherError(f"checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_timm(path: str, model: str | None = None, **kwargs: Any) -> nn.Module:
    """A timm model from a folder (timm hub format), a weights file + architecture name, or a
    timm name with pretrained weights from the hub.

    Args:
        path: a folder with config.json (e.g. a student this workbench exported), a
            checkpoint file (`.safetensors`, `.pth`, ...; needs `model`), or a timm model name
            such as "deit_base_patch16_224.fb_in1k" (downloads; fails offline).
        model: timm architecture of a checkpoint file.
        **kwargs: `timm.create_model` arguments (num_classes, img_size, ...).
    """
    import timm

    import students
    import students.minivit  # noqa: F401 - our architectures are timm names too

    p = Path(path)
    if p.is_dir():
        if kwargs:
            raise TeacherError(f"teacher.kwargs cannot change the model saved in {p}; remove them")
        return students.load(p)
    if p.suffix in CHECKPOINT_SUFFIXES or p.exists():
        if not p.is_file():
            raise TeacherError(f"config key 'teacher.path': checkpoint {p} does not exist")
        if not model:
            raise TeacherError(f"config key 'teacher.model' must name the timm architecture of checkpoint {p}")
        net = _create(model, pretrained=False, **kwargs)
        result = net.load_state_dict(read_state_dict(p), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise TeacherError(
                f"checkpoint {p} does not fit {model}: missing {result.missing_keys[:3]}, unexpected "
                f"{result.unexpected_keys[:3]} (set teacher.kwargs such as num_classes to match it)")
        return net
    if model:
        raise TeacherError(f"config key 'teacher.path': {path} is neither a folder nor a checkpoint file")
    if not timm.is_model(path.split(".")[0]):
        raise TeacherError(f"config key 'teacher.path': {path!r} is not a folder, a checkpoint file or a timm model")
    return _create(path, pretrained=True, **kwargs)


def _create(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        why = "download its weights" if pretrained else "build it"
        raise TeacherError(f"cannot {why} for timm model {name!r}: {type(e).__name__}: {e}".splitlines()[0]
                             + ("; without the hub, give teacher.path as a local checkpoint and teacher.model"
                                if pretrained else "")) from None


class TimmTeacher(nn.Module):
    """A frozen timm classifier: eval mode always, no trainable parameters, class logits out.

    Args:
        path, model, kwargs: see `load_timm`.
        dtype: "float32", "bfloat16" or "float16".
    """

    def __init__(self, path: str, model: str | None = None, dtype: str = "float32",
                 kwargs: dict[str, Any] | None = None):
        super().__init__()
        if dtype not in DTYPES or dtype == "auto":
            raise TeacherError(f"config key 'teacher.dtype' is {dtype!r}; use float32, bfloat16 or float16")
        self.model = load_timm(path, model, **(kwargs or {})).to(DTYPES[dtype])
        self.model.eval().requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def train(self, mode: bool = True) -> TimmTeacher:
        return self  # always eval: dropout and drop-path off

    def forward(self, x: Tensor) -> TeacherOutput:
        """(B, C, H, W) images -> TeacherOutput with (B, num_classes) float32 logits."""
        dtype = next(self.model.parameters()).dtype
        return TeacherOutput(logits=self.model(x.to(dtype)).float())
