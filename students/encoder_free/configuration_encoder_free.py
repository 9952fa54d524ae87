"""The configuration of encoder-free VLM students (EVE v1, BREEN; docs/methods.md §6-§7) and the
pure arithmetic of their image layout: cells of `patch_size * pool` pixels, and how many image
tokens an image of h x w cells takes. The processor and the model both read it; it imports
neither.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

TOKENIZERS = ("eve", "linear")


def cell_grid(height: int, width: int, patch_size: int, pool: int) -> tuple[int, int]:
    """(rows, columns) of `patch_size * pool`-pixel cells of an image; its sides must be whole cells."""
    cell = patch_size * pool
    if height % cell or width % cell:
        raise ValueError(f"image sides {height}x{width} must be multiples of patch_size * pool = {cell}")
    return height // cell, width // cell


def eve_token_count(height: int, width: int, patch_size: int, pool: int) -> int:
    """Tokens an image of `height` x `width` pixels becomes: CLS + h rows of (w cells + split)."""
    h, w = cell_grid(height, width, patch_size, pool)
    return 1 + h * (w + 1)


def image_token_count(tokenizer: str, grid: tuple[int, int], num_queries: int = 0) -> int:
    """Tokens one image of `grid` = (h, w) cells takes in the sequence: EVE's 1 + h (w + 1)
    or the linear tokenizer's h w, plus the learnable queries that follow it."""
    h, w = grid
    if tokenizer == "eve":
        return 1 + h * (w + 1) + num_queries
    if tokenizer == "linear":
        return h * w + num_queries
    raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")


class EncoderFreeConfig(PreTrainedConfig):
    """An encoder-free VLM: a patch tokenizer in front of the decoder LM `text_config` describes.

    Fields:
        tokenizer: "eve" (conv, local attention cells, CLS, row split tokens) or "linear" (BREEN).
        vision_width: channels of the tokenizer (EVE: 1024).
        patch_size, pool: pixels per patch and patches per cell side; a token covers
            `patch_size * pool` pixels (EVE: 14 x 2 = 28).
        heads: heads of the EVE tokenizer's local and global attention.
        max_image_side: the processor scales longer sides down to this (672: at most 24 x 24 cells).
        image_token_id: the `<image>` token the processor repeats once per image token.
        query_grids: BREEN's learnable queries, one group per target grid, e.g. [[8, 8], [6, 6]]
            (64 + 36 for strides 3 and 4 of a 24 x 24 encoder grid); placed after each image.
        image_experts: BREEN's image expert (a duplicated FFN) in every decoder layer.
    """

    model_type = "encoder_free_vlm"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    tokenizer: str = "eve"
    vision_width: int = 1024
    patch_size: int = 14
    pool: int = 2
    heads: int = 8
    in_chans: int = 3
    max_image_side: int = 672
    image_token_id: int = 32000
    query_grids: list | None = None
    image_experts: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        if self.query_grids:
            self.query_grids = [[int(a), int(b)] for a, b in self.query_grids]
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    @property
    def cell(self) -> int:
        return self.patch_size * self.pool

    @property
    def num_queries(self) -> int:
        return sum(a * b for a, b in self.query_grids or [])
