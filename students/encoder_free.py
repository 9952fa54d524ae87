"""Building blocks of encoder-free VLM students (EVE v1, METHODS.md §6): image patches go
straight into the language model through a light patch tokenizer instead of a vision encoder.

`EVEPatchTokenizer` follows EVE's `VisionTokenizer`: a bias-free patch convolution (kernel =
stride = `patch_size`); local attention that pools each `pool` x `pool` cell (query = the
cell's average, keys / values = its patches, pre-LN, multi-head, output = average + projection
of the attention); a learnable CLS token refined by global attention over every cell token; a
learnable split token appended after each row; and the `mlp2x_gelu` projector into the
language model's width. The sequence is [CLS, row_1 + split, ..., row_h + split], so an image
of any aspect ratio (sides multiples of patch_size * pool) gives 1 + h * (w + 1) tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def eve_token_count(height: int, width: int, patch_size: int, pool: int) -> int:
    """Tokens an image of `height` x `width` pixels becomes: CLS + h rows of (w cells + split)."""
    cell = patch_size * pool
    if height % cell or width % cell:
        raise ValueError(f"image sides {height}x{width} must be multiples of patch_size * pool = {cell}")
    h, w = height // cell, width // cell
    return 1 + h * (w + 1)


class EVEPatchTokenizer(nn.Module):
    """Patch conv -> local attention pooling -> CLS by global attention -> row split tokens -> projector.

    Args:
        width: the tokenizer's channels (EVE: 1024).
        out_dim: the language model's hidden size (the projector's output).
        patch_size: pixels per patch (kernel and stride of the convolution; EVE: 14).
        pool: patches per cell side pooled by local attention (EVE: 2, i.e. 28 px per token).
        heads: attention heads of the local and global attention (EVE: 8).
        in_chans: image channels.
    """

    def __init__(self, width: int, out_dim: int, patch_size: int = 14, pool: int = 2, heads: int = 8,
                 in_chans: int = 3):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.patch_size, self.pool, self.heads = patch_size, pool, heads
        self.patch_embed = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.local_norm = nn.LayerNorm(width)
        self.local_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.global_norm = nn.LayerNorm(width)
        self.global_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.split_token = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.projector = nn.Sequential(nn.Linear(width, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of cells for an image of this size."""
        eve_token_count(height, width, self.patch_size, self.pool)  # checks the sides
        cell = self.patch_size * self.pool
        return height // cell, width // cell

    def cells(self, pixel_values: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, h, w, width): each pool x pool cell of patches, pooled by local attention."""
        b = pixel_values.shape[0]
        h, w = self.grid(*pixel_values.shape[-2:])
        p = self.pool
        x = self.patch_embed(pixel_values)  # (B, width, h*p, w*p)
        d = x.shape[1]
        patches = x.reshape(b, d, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b * h * w, p * p, d)
        query = patches.mean(1, keepdim=True)  # (B*h*w, 1, width): the cell's average
        kv = self.local_norm(patches)
        attn, _ = self.local_attn(self.local_norm(query), kv, kv, need_weights=False)
        return (query + attn).reshape(b, h, w, d)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, C, H, W) images of one size -> (B, 1 + h * (w + 1), out_dim) tokens for the LLM."""
        cells = self.cells(pixel_values)  # (B, h, w, width)
        b, h, w, d = cells.shape
        flat = cells.reshape(b, h * w, d)
        cls = self.cls_token.expand(b, -1, -1)
        keys = self.global_norm(flat)
        refined, _ = self.global_attn(self.global_norm(cls), keys, keys, need_weights=False)
        cls = cls + refined  # (B, 1, width)
        rows = torch.cat([cells, self.split_token.expand(b, h, 1, d)], dim=2)  # (B, h, w + 1, width)
        tokens = torch.cat([cls, rows.reshape(b, h * (w + 1), d)], dim=1)
        return self.projector(tokens)

    def layout(self, height: int, width: int) -> dict[str, Tensor]:
        """Which of an image's tokens are the CLS, the cells and the split tokens (bool masks
        over its 1 + h * (w + 1) tokens) - what EVE's patch-aligning layer keeps (the cells)."""
        h, w = self.grid(height, width)
        kind = torch.ones(h, w + 1, dtype=torch.long)
        kind[:, -1] = 2
        kind = torch.cat([torch.zeros(1, dtype=torch.long), kind.flatten()])
        return {"cls": kind == 0, "cells": kind == 1, "split": kind == 2}


def eve_cells(tokens: Tensor, h: int, w: int) -> Tensor:
    """The (B, h * w, D) cell tokens of a (B, 1 + h * (w + 1), D) EVE image sequence (CLS and
    split tokens dropped), in row order - the positions EVE's alignment loss reads."""
    b, n, d = tokens.shape
    if n != 1 + h * (w + 1):
        raise ValueError(f"{n} tokens are not an EVE sequence of a {h}x{w} grid ({1 + h * (w + 1)})")
    return tokens[:, 1:].reshape(b, h, w + 1, d)[:, :, :w].reshape(b, h * w, d)


def alignment_loss(predicted: Tensor, target: Tensor) -> Tensor:
    """EVE / BREEN feature alignment: mean over images of (1 - mean cosine over patches).

    Args:
        predicted: (B, N, D) student features (after the aligning projection).
        target: (B, N, D) frozen vision-encoder features (detached here).
    """
    cos = F.cosine_similarity(predicted.float(), target.detach().float(), dim=-1)  # (B, N)
    return (1 - cos.mean(-1)).mean()


class PatchAligningLayer(nn.Module):
    """EVE's patch-aligning layer (`VisionCompressor`, training only): the language model's
    hidden states at the image's cell positions, taken from several layers, are projected
    per layer (LayerNorm + Linear to the vision width), fused per cell by cross-attention
    (query: the last taken layer; keys / values: the others), and the output is
    Linear(last layer's hidden state) + Linear(fused) - what `alignment_loss` compares with
    the frozen encoder's features.

    Args:
        llm_dim: the language model's hidden size.
        vision_dim: the vision encoder's feature width.
        n_layers: how many hidden states are taken (EVE: layers L, L-4, ..., 0 -> 9 of 33).
        heads: cross-attention heads (EVE: 8).
    """

    def __init__(self, llm_dim: int, vision_dim: int, n_layers: int, heads: int = 8):
        super().__init__()
        if n_layers < 2:
            raise ValueError("the patch-aligning layer fuses at least two hidden states")
        self.norms = nn.ModuleList([nn.LayerNorm(llm_dim) for _ in range(n_layers)])
        self.projs = nn.ModuleList([nn.Linear(llm_dim, vision_dim) for _ in range(n_layers)])
        self.fuse = nn.MultiheadAttention(vision_dim, heads, batch_first=True)
        self.out_last = nn.Linear(llm_dim, vision_dim)
        self.out_fused = nn.Linear(vision_dim, vision_dim)

    def forward(self, hidden: list[Tensor]) -> Tensor:
        """`hidden`: per taken layer, (B, N, llm_dim) states at the N cell positions, the
        last (deepest) layer last. Returns (B, N, vision_dim)."""
        if len(hidden) != len(self.projs):
            raise ValueError(f"expected {len(self.projs)} hidden states, got {len(hidden)}")
        b, n, _ = hidden[-1].shape
        projected = [proj(norm(h)) for h, norm, proj in zip(hidden, self.norms, self.projs)]  # each (B, N, Dv)
        query = projected[-1].reshape(b * n, 1, -1)
        others = torch.stack(projected[:-1], dim=2).reshape(b * n, len(projected) - 1, -1)  # per cell
        fused, _ = self.fuse(query, others, others, need_weights=False)
        return self.out_last(hidden[-1]) + self.out_fused(fused.reshape(b, n, -1))


def aligned_layers(n_hidden_states: int, every: int = 4) -> list[int]:
    """Which hidden states EVE's aligning layer reads: the last, then every `every`-th one
    down to 0, shallow to deep (33 states of a 32-layer LLM -> 0, 4, ..., 32)."""
    return sorted(range(n_hidden_states - 1, -1, -every))


class ImageExpertMLP(nn.Module):
    """BREEN's image expert: a decoder layer's FFN duplicated, tokens routed by type - image
    and query tokens through `image_expert` (initialised as a copy of the FFN), text through
    `text_expert` (the FFN itself) - and each path's output scaled by its own per-token gate
    sigmoid(Linear(hidden, 1)(x)). As in BREEN's code the text path is gated too, so text
    outputs change from step 0 (METHODS.md §10.5d); both gates start at PyTorch's Linear init.

    The routing mask is set on the model for one forward with `route_image_tokens`.
    """

    def __init__(self, mlp: nn.Module, hidden: int):
        super().__init__()
        import copy

        self.text_expert = mlp
        self.image_expert = copy.deepcopy(mlp)
        self.text_gate = nn.Linear(hidden, 1)
        self.image_gate = nn.Linear(hidden, 1)
        self.image_mask: Tensor | None = None  # (B, L) bool, set by `route_image_tokens`

    def forward(self, x: Tensor) -> Tensor:
        out = self.text_expert(x) * torch.sigmoid(self.text_gate(x))
        mask = self.image_mask
        if mask is None or not mask.any():
            return out
        if mask.shape != x.shape[:2]:
            raise ValueError(f"image routing mask {tuple(mask.shape)} does not match the tokens {tuple(x.shape[:2])}")
        picked = x[mask]  # (M, D)
        image = self.image_expert(picked) * torch.sigmoid(self.image_gate(picked))
        return _place(out, mask, image)


def _place(out: Tensor, mask: Tensor, rows: Tensor) -> Tensor:
    """`out` with the rows at `mask` replaced by `rows` (out of place, autograd-safe)."""
    out = out.clone()
    out[mask] = rows.to(out.dtype)
    return out


def add_image_experts(model: nn.Module) -> list[str]:
    """Give every decoder layer of `model`'s language model a BREEN image expert (in place);
    returns the paths of the new modules."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    hidden = decoder.config.hidden_size
    names = {id(m): n for n, m in model.named_modules()}
    paths = []
    for layer in decoder.layers:
        if isinstance(layer.mlp, ImageExpertMLP):
            raise ValueError("the model already has image experts")
        ref = next(layer.mlp.parameters())
        layer.mlp = ImageExpertMLP(layer.mlp, hidden).to(device=ref.device, dtype=ref.dtype)
        paths.append(names[id(layer)] + ".mlp")
    return paths


class route_image_tokens:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Within the block, the model's image experts take the tokens where `image_mask` (B, L) is True."""

    def __init__(self, model: nn.Module, image_mask: Tensor):
        self.experts = [m for m in model.modules() if isinstance(m, ImageExpertMLP)]
        self.mask = image_mask.bool()

    def __enter__(self):
        for m in self.experts:
            m.image_mask = self.mask
        return self

    def __exit__(self, *exc):
        for m in self.experts:
            m.image_mask = None
        return False
