"""Frozen vision encoders as feature teachers for encoder-free students (docs/methods.md §6-§7):
the vision tower of a Hugging Face VLM, a CLIP / SigLIP dual encoder's image side, or a bare
CLIP / SigLIP vision model, loaded from a folder or the hub, returning one layer's patch
features. EVE aligns its patch-aligning layer with CLIP's penultimate layer (`layer=-2`),
BREEN its queries with the last one (`layer=-1`), both pooled to a coarser grid
(`pool_to_grid`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from students.vlm import vision_tower
from teachers.hf_vlm import DTYPES, _load, _resolve_path
from teachers.errors import TeacherError

_VISION_ONLY = ("clip_vision_model", "siglip_vision_model", "siglip2_vision_model")
_DUAL = ("clip", "siglip", "siglip2")


def pool_to_grid(features: Tensor, grid: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """Average-pool (B, h*w, D) patch features laid out row by row on `grid` = (h, w) to
    `target` = (h', w') cells (adaptive pooling: 24x24 -> 8x8 averages 3x3 blocks)."""
    b, n, d = features.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} patch features do not fill a {h}x{w} grid")
    maps = features.transpose(1, 2).reshape(b, d, h, w)
    return F.adaptive_avg_pool2d(maps, target).flatten(2).transpose(1, 2)  # (B, h'*w', D)


class VisionEncoderTeacher(nn.Module):
    """A frozen vision encoder that returns the patch features of one layer.

    `preprocess` turns PIL images into its input: each whole image resized to the encoder's
    square size (no crop, so every part of what the student sees has a teacher feature),
    normalised with the folder's image-processor statistics.

    Args:
        path: a folder saved with `save_pretrained` or a hub id: a VLM (its vision tower is
            kept, the rest dropped), a CLIP / SigLIP model (its vision side), or a CLIP /
            SigLIP vision model.
        layer: which hidden state: -1 the last layer's output, -2 the penultimate (EVE's
            `mm_vision_select_layer -2`), 0 the embeddings.
        dtype: "float32", "bfloat16", "float16" or "auto".
        revision, trust_remote_code: as for the VLM teacher (remote code off by default).
    """

    def __init__(self, path: str, layer: int = -2, dtype: str = "float32", revision: str | None = None,
                 trust_remote_code: bool = False):
        super().__init__()
        if dtype not in DTYPES:
            raise TeacherError(f"teacher.dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        path = _resolve_path(path)
        hub = dict(revision=revision, trust_remote_code=trust_remote_code)
        config = _load(path, AutoConfig.from_pretrained, "config", **hub)
        kind = getattr(config, "model_type", "")
        if kind in _VISION_ONLY:
            encoder = _load(path, AutoModel.from_pretrained, "model", dtype=DTYPES[dtype], **hub)
        elif kind in _DUAL:
            encoder = _load(path, AutoModel.from_pretrained, "model", dtype=DTYPES[dtype], **hub).vision_model
        elif getattr(config, "vision_config", None) is not None:
            vlm = _load(path, AutoModelForImageTextToText.from_pretrained, "model", dtype=DTYPES[dtype], **hub)
            try:
                encoder = vision_tower(vlm)
            except ValueError as e:
                raise TeacherError(f"teacher.path {path}: {e}") from None
            del vlm
        else:
            raise TeacherError(f"teacher.path {path}: a {kind or 'model'} has no vision encoder "
                                 "(give a VLM, a CLIP / SigLIP model or a vision model)")
        self.encoder = encoder.requires_grad_(False)
        vision = encoder.config
        self.patch_size = vision.patch_size
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)
        layers = vision.num_hidden_layers
        if not -(layers + 1) <= layer <= layers:
            raise TeacherError(f"teacher layer {layer} is out of range for a {layers}-layer vision encoder")
        self.layer = layer
        self.width = vision.hidden_size
        self.image_size = vision.image_size
        self.path = path
        self.mean, self.std = _normalisation(path, kind, hub)
        self.eval()

    feature_teacher = True  # returns patch features, not logits

    def preprocess(self, images) -> Tensor:
        """PIL images -> (N, 3, S, S) pixel values at the encoder's image size."""
        import numpy as np
        from PIL import Image

        size = self.image_size
        out = torch.empty(len(images), 3, size, size)
        for i, image in enumerate(images):
            image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            out[i] = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (out - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)

    def train(self, mode: bool = True) -> VisionEncoderTeacher:
        """Stay in eval mode whatever is asked."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) images at the encoder's size -> (B, grid_h * grid_w, D) patch features
        of `layer`, row by row, without a class token."""
        dtype = next(self.encoder.parameters()).dtype
        out = self.encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        hidden = out.hidden_states[self.layer]  # (B, N, D)
        patches = self.grid[0] * self.grid[1]
        extra = hidden.shape[1] - patches
        if extra < 0 or extra > 1:
            side = math.isqrt(hidden.shape[1])
            raise RuntimeError(f"the encoder returned {hidden.shape[1]} tokens for a {self.grid} grid "
                               f"(images of another size? ~{side}x{side})")
        return hidden[:, extra:]  # CLIP puts a class token first; SigLIP has none

    def pooled(self, pixel_values: Tensor, target: tuple[int, int]) -> Tensor:
        """`forward` average-pooled to a `target` grid (EVE: the student's grid; BREEN: 8x8 and 6x6)."""
        return pool_to_grid(self(pixel_values), self.grid, target)


_CLIP_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _normalisation(path: str, kind: str, hub: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image mean / std of the folder's image processor; without one, CLIP's statistics
    (SigLIP's 0.5 / 0.5 for SigLIP models)."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(path, **hub)
        return tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        if kind.startswith("siglip"):
            return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        return _CLIP_STATS
