"""The processor of encoder-free students (`modeling_encoder_free.py`): images of any aspect
ratio become grids of cells, and each `<image>` in the text becomes as many image tokens as
its image takes - EVE's any-resolution input ("anypixel"), BREEN's queries included.

`EncoderFreeImageProcessor` keeps each image's aspect ratio, scales its longer side down to
`max_side` (never up, unless `upscale`), rounds both sides to whole cells, normalises, and
pads the batch to its largest image with a `pixel_mask` marking each image's valid area.
`EncoderFreeProcessor` pairs it with the language model's tokenizer; both save with
`save_pretrained` and load with `AutoProcessor.from_pretrained` once `students.encoder_free`
is imported (its `__init__` registers them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

from students.encoder_free.configuration_encoder_free import EncoderFreeConfig, image_token_count

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EncoderFreeImageProcessor(BaseImageProcessor):
    """Any-aspect-ratio images -> padded `pixel_values` (N, 3, H, W) + `pixel_mask` (N, H, W).

    Args:
        cell: pixels per image token side (EVE: patch 14 x pool 2 = 28).
        max_side: the longer side is scaled down to at most this (EVE: 672 -> <= 24 x 24 cells).
        upscale: also scale smaller images up to `max_side`.
        image_mean, image_std: normalisation (CLIP's by default, as EVE).
    """

    model_input_names = ["pixel_values", "pixel_mask"]

    def __init__(self, cell: int = 28, max_side: int = 672, upscale: bool = False,
                 image_mean: tuple[float, ...] = CLIP_MEAN, image_std: tuple[float, ...] = CLIP_STD, **kwargs):
        super().__init__(**kwargs)
        if max_side < cell:
            raise ValueError(f"max_side {max_side} is smaller than one cell ({cell} px)")
        self.cell, self.max_side, self.upscale = int(cell), int(max_side), bool(upscale)
        self.image_mean, self.image_std = list(image_mean), list(image_std)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) in pixels an image is resized to: aspect ratio kept, longer side
        at most `max_side`, both sides whole cells (at least one)."""
        longest = max(height, width)
        scale = self.max_side / longest if (longest > self.max_side or self.upscale) else 1.0
        limit = self.max_side // self.cell

        def cells(side: int) -> int:
            return min(limit, max(1, round(side * scale / self.cell)))

        return cells(height) * self.cell, cells(width) * self.cell

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of cells an image of this size becomes."""
        h, w = self.target_size(height, width)
        return h // self.cell, w // self.cell

    def __call__(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors)

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        if isinstance(images, Image.Image):
            images = [images]
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        tensors = []
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(f"expected PIL images, got {type(image).__name__}")
            image = image.convert("RGB")
            h, w = self.target_size(image.height, image.width)
            if (h, w) != (image.height, image.width):
                image = image.resize((w, h), Image.Resampling.BICUBIC)
            x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
            tensors.append((x - mean) / std)
        height = max(t.shape[1] for t in tensors)
        width = max(t.shape[2] for t in tensors)
        pixels = torch.zeros(len(tensors), 3, height, width)
        mask = torch.zeros(len(tensors), height, width, dtype=torch.long)
        for i, t in enumerate(tensors):
            pixels[i, :, : t.shape[1], : t.shape[2]] = t
            mask[i, : t.shape[1], : t.shape[2]] = 1
        return BatchFeature({"pixel_values": pixels, "pixel_mask": mask}, tensor_type=return_tensors)


class EncoderFreeProcessor(ProcessorMixin):
    """Tokenizer + `EncoderFreeImageProcessor`: expands each `<image>` of the text into the
    image tokens its image takes (`image_token_count`: EVE's 1 + h (w + 1) or the linear
    tokenizer's h w, plus the queries), images taken in order across the batch.

    Args:
        image_processor, tokenizer, chat_template: as for any processor.
        image_token: the placeholder in the text (and the token repeated per image token).
        layout: the student's tokenizer, "eve" or "linear".
        num_queries: learnable queries after each image (BREEN: 100).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token: str = "<image>",
                 layout: str = "eve", num_queries: int = 0, **kwargs):
        self.image_token = image_token
        self.layout = layout
        self.num_queries = int(num_queries)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    @classmethod
    def for_model(cls, config: EncoderFreeConfig, tokenizer, chat_template: str | None = None,
                  **image_kwargs: Any) -> EncoderFreeProcessor:
        """The processor that fits a model `config`, around the language model's tokenizer."""
        image_processor = EncoderFreeImageProcessor(cell=config.cell, max_side=config.max_image_side, **image_kwargs)
        image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        return cls(image_processor, tokenizer, chat_template=chat_template, image_token=image_token,
                   layout=config.tokenizer, num_queries=config.num_queries)

    def tokens_per_image(self, image: Image.Image) -> int:
        return image_token_count(self.layout, self.image_processor.grid(image.height, image.width), self.num_queries)

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        if text is None:
            raise ValueError("the processor needs text (with one image placeholder per image)")
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else ([images] if isinstance(images, Image.Image) else list(images))
        placeholders = sum(t.count(self.image_token) for t in texts)
        if placeholders != len(images):
            raise ValueError(f"the text holds {placeholders} {self.image_token} placeholders for {len(images)} images")
        counts = iter([self.tokens_per_image(im) for im in images])
        expanded = []
        for t in texts:
            parts = t.split(self.image_token)
            out = parts[0]
            for part in parts[1:]:
                out += self.image_token * next(counts) + part
            expanded.append(out)
        return_tensors = kwargs.pop("return_tensors", None)
        data = dict(self.tokenizer(expanded, return_tensors=return_tensors, **kwargs))
        if images:
            data.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchFeature(data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return [*self.tokenizer.model_input_names, "pixel_values", "pixel_mask"]

