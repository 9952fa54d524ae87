"""Vision-feature supervision of encoder-free students (docs/methods.md §6.2, §7.2): the language
model's hidden states at image positions are aligned, by 1 - cosine, with the patch features
of a frozen vision encoder (`teachers/vision_encoder.py`) on the same images.

- `EVEAlignmentTerm` (loss type `eve_alignment`): hidden states of layers L, L-4, ..., 0 at
  each image's cell positions (CLS and split tokens dropped) -> EVE's patch-aligning layer
  -> 1 - cos against the encoder's features; both sides average-pooled to the coarser grid.
- `BREENQueryTerm` (loss type `breen_query`): the final hidden state one position before
  each learnable query (the label shift of BREEN's code) -> 1 - cos against the encoder's
  features pooled to each query group's grid and mapped by a LayerNorm + Linear to the LM's
  width; the first group's queries read the first target, and so on.

Both are averaged over images and divided by the batch's samples, so samples without an
image add zero, as in EVE's code. They need the student's hidden states
(`needs_hidden_states`) and the vision teacher's features (`needs_vision_features`), and
are given the models once built (`attach`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from losses.feature import feature_cosine
from losses.term import LossTerm
from students.encoder_free import (EncoderFreeForConditionalGeneration, PatchAligningLayer, aligned_layers,
                                   cell_positions, image_runs)
from teachers.vision_encoder import pool_to_grid


def _pool(x: Tensor, grid: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """(B, h*w, D) on `grid` -> (B, h'*w', D) on `target` (identity when equal)."""
    return x if tuple(grid) == tuple(target) else pool_to_grid(x, grid, target)


class VisionAlignTerm(LossTerm):
    """Common checks of the vision-feature terms."""

    needs_teacher = True  # the vision encoder must run
    needs_dense_teacher = True  # features, not a logit cache
    needs_hidden_states = True
    needs_vision_features = True
    carries_state = True  # a recipe's next stage continues from this stage's trained state

    def attach(self, student: nn.Module, teacher: nn.Module) -> None:
        if not isinstance(student, EncoderFreeForConditionalGeneration):
            raise ValueError(f"reads an encoder-free student's image positions; the student is a "
                             f"{type(student).__name__} (use student.type eve or breen)")
        if not getattr(teacher, "feature_teacher", False):
            raise ValueError("aligns with a vision encoder's features: set teacher.type to vision_encoder")
        self.config = student.config

    def _runs(self, inputs) -> list[tuple[int, int, int]]:
        if inputs.student_hidden_states is None or inputs.vision_features is None or inputs.image_grids is None:
            raise ValueError("needs the student's hidden states, its image grids and the vision teacher's features")
        runs = image_runs(inputs.image_mask)
        if len(runs) != len(inputs.image_grids) or len(runs) != inputs.vision_features.shape[0]:
            raise ValueError(f"{len(runs)} image-token runs, {len(inputs.image_grids)} image grids and "
                             f"{inputs.vision_features.shape[0]} teacher feature maps: they must match")
        return runs


class EVEAlignmentTerm(VisionAlignTerm):
    """EVE's patch-aligning loss.

    Args:
        every: the aligning layer reads hidden states L, L - every, ..., down to 0 (EVE: 4).
        heads: cross-attention heads of the aligning layer (EVE: 8).
    """

    def __init__(self, every: int = 4, heads: int | None = None):
        super().__init__()
        heads = 8 if heads is None else heads
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be a positive integer (the aligning layer's attention heads), got {heads!r}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every, self.heads = every, heads
        self.layers: list[int] = []
        self.pal: PatchAligningLayer | None = None

    def attach(self, student: nn.Module, teacher: nn.Module) -> None:
        super().attach(student, teacher)
        text = student.config.text_config
        self.layers = aligned_layers(text.num_hidden_layers + 1, self.every)
        if len(self.layers) < 2:
            raise ValueError(f"a {text.num_hidden_layers}-layer LM with every={self.every} gives one hidden state; "
                             "the aligning layer fuses at least two (lower 'every')")
        if teacher.width % self.heads:
            raise ValueError(f"the vision encoder's width {teacher.width} is not a multiple of heads={self.heads}")
        ref = next(student.parameters())
        self.pal = PatchAligningLayer(text.hidden_size, teacher.width, len(self.layers), self.heads).to(ref.device)

    def forward(self, inputs) -> Tensor:
        runs = self._runs(inputs)
        hidden = inputs.student_hidden_states
        t_grid = tuple(inputs.vision_grid)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, grid in enumerate(inputs.image_grids):
            groups.setdefault(tuple(grid), []).append(i)
        total = hidden[-1].new_zeros((), dtype=torch.float32)
        for grid, idx in groups.items():
            common = (min(grid[0], t_grid[0]), min(grid[1], t_grid[1]))
            offsets = cell_positions(self.config.tokenizer, grid).to(hidden[0].device)
            rows = torch.tensor([runs[i][0] for i in idx], device=offsets.device)
            cols = torch.stack([runs[i][1] + offsets for i in idx])  # (n, h*w)
            states = [_pool(hidden[layer][rows[:, None], cols], grid, common) for layer in self.layers]
            predicted = self.pal([s.to(self.pal.out_last.weight.dtype) for s in states])
            target = _pool(inputs.vision_features[idx].to(predicted.dtype), t_grid, common)
            total = total + feature_cosine(predicted, target) * len(idx)
        return total / inputs.labels.shape[0]


class BREENQueryTerm(VisionAlignTerm):
    """BREEN's query supervision: the final hidden state before each query (label shift) against
    the vision encoder's features pooled to the query group's grid, through LayerNorm + Linear
    to the LM's width. As in BREEN's code that projection is frozen (its name holds "clip",
    which every stage excludes; docs/methods.md §10.5a): a fixed random map, drawn from `seed` so
    that every stage of a recipe uses the same one.

    Args:
        seed: seed of the frozen target projection.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed
        self.target_norm: nn.LayerNorm | None = None
        self.target_proj: nn.Linear | None = None

    def attach(self, student: nn.Module, teacher: nn.Module) -> None:
        super().attach(student, teacher)
        if not student.config.query_grids:
            raise ValueError("the student has no learnable queries (student.kwargs.query_grids)")
        hidden = student.config.text_config.hidden_size
        self.target_norm = nn.LayerNorm(teacher.width)
        self.target_proj = nn.Linear(teacher.width, hidden)
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():  # nn.Linear's default init, from a fixed generator
            bound = teacher.width ** -0.5
            self.target_proj.weight.copy_(torch.empty_like(self.target_proj.weight).uniform_(-bound, bound, generator=g))
            self.target_proj.bias.copy_(torch.empty_like(self.target_proj.bias).uniform_(-bound, bound, generator=g))
        ref = next(student.parameters())
        self.target_norm.to(ref.device).requires_grad_(False)
        self.target_proj.to(ref.device).requires_grad_(False)

    def predictor_positions(self, inputs) -> list[tuple[int, Tensor]]:
        """Per image: (sample, positions of the states that predict its queries) - the position
        before each query, so the first query is predicted from the image's last token."""
        q = self.config.num_queries
        out = []
        for b, start, n in self._runs(inputs):
            first = start + n - q
            out.append((b, torch.arange(first - 1, first + q - 1)))
        return out

    def forward(self, inputs) -> Tensor:
        last = inputs.student_hidden_states[-1]
        where = self.predictor_positions(inputs)
        rows = torch.tensor([b for b, _ in where], device=last.device)
        cols = torch.stack([p for _, p in where]).to(last.device)
        predicted = last[rows[:, None], cols]  # (N, Q, hidden)
        features = inputs.vision_features.to(self.target_proj.weight.dtype)
        total, start = last.new_zeros((), dtype=torch.float32), 0
        for h, w in self.config.query_grids:
            target = self.target_proj(self.target_norm(pool_to_grid(features, tuple(inputs.vision_grid), (h, w))))
            total = total + feature_cosine(predicted[:, start:start + h * w], target) * len(where)
            start += h * w
        return total / inputs.labels.shape[0]

