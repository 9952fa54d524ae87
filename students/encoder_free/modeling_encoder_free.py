"""Encoder-free VLM students (EVE v1 and BREEN, docs/methods.md §6-§7): image patches go straight
into the language model through a light patch tokenizer instead of a vision encoder, and a
frozen vision encoder teaches the model, during training only, what it would have seen.

`EncoderFreeForConditionalGeneration` is a Hugging Face model (config `EncoderFreeConfig`,
`model_type` "encoder_free_vlm", registered with the Auto classes by `students.encoder_free`):
a patch tokenizer (EVE's, or BREEN's linear one) whose tokens replace the `<image>` tokens of
any Hugging Face decoder LM, optional learnable queries after each image (BREEN), optional
image experts in every layer (BREEN). EVE's patch-aligning layer is here too; the losses that
read it and BREEN's query targets live in `losses/vision_align.py`.

`EVEPatchTokenizer` follows EVE's `VisionTokenizer`: a bias-free patch convolution (kernel =
stride = `patch_size`); local attention that pools each `pool` x `pool` cell (query = the
cell's average, keys / values = its patches, pre-LN, multi-head, output = average + projection
of the attention); a learnable CLS token refined by global attention over every cell token; a
learnable split token appended after each row; and the `mlp2x_gelu` projector into the
language model's width. The sequence is [CLS, row_1 + split, ..., row_h + split], so an image
of any aspect ratio (sides multiples of patch_size * pool) gives 1 + h * (w + 1) tokens.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from students.encoder_free.configuration_encoder_free import EncoderFreeConfig, cell_grid
from students.hf_cache import CACHE_KWARG, either_cache, output_cache


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
        return cell_grid(height, width, self.patch_size, self.pool)

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


class PatchAligningLayer(nn.Module):
    """EVE's patch-aligning layer (`VisionCompressor`, training only): the language model's
    hidden states at the image's cell positions, taken from several layers, are projected
    per layer (LayerNorm + Linear to the vision width), fused per cell by cross-attention
    (query: the last taken layer; keys / values: the others), and the output is
    Linear(last layer's hidden state) + Linear(fused) - what the alignment loss (1 - cosine,
    `losses.feature.feature_cosine`) compares with the frozen encoder's features.

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
    outputs change from step 0 (docs/methods.md §10.5d); both gates start at PyTorch's Linear init.

    The routing mask is set on the model for one forward with `route_image_tokens`.
    """

    def __init__(self, mlp: nn.Module, hidden: int):
        super().__init__()
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


class LinearPatchTokenizer(nn.Module):
    """BREEN's `--linear_tokenizer`: one bias-free convolution per cell (kernel = stride =
    `patch_size * pool`) and the `mlp2x_gelu` projector - no local / global attention, no
    CLS or split tokens; an image of h x w cells gives h * w tokens in row order.

    The cell is `patch_size * pool` pixels so that the token grid is EVE's (24 x 24 at 672 px,
    the grid BREEN's 64 + 36 queries pool by strides 3 and 4).
    """

    def __init__(self, width: int, out_dim: int, patch_size: int = 14, pool: int = 2, in_chans: int = 3):
        super().__init__()
        self.patch_size, self.pool = patch_size, pool
        cell = patch_size * pool
        self.patch_embed = nn.Conv2d(in_chans, width, kernel_size=cell, stride=cell, bias=False)
        self.projector = nn.Sequential(nn.Linear(width, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return cell_grid(height, width, self.patch_size, self.pool)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, C, H, W) images of one size -> (B, h * w, out_dim)."""
        self.grid(*pixel_values.shape[-2:])
        return self.projector(self.patch_embed(pixel_values).flatten(2).transpose(1, 2))

    def layout(self, height: int, width: int) -> dict[str, Tensor]:
        h, w = self.grid(height, width)
        cells = torch.ones(h * w, dtype=torch.bool)
        return {"cls": ~cells, "cells": cells, "split": ~cells}


def cell_positions(tokenizer: str, grid: tuple[int, int]) -> Tensor:
    """Offsets, within one image's run of tokens, of its h * w cell tokens in row order (what
    EVE's patch-aligning layer reads: CLS and split tokens dropped)."""
    h, w = grid
    if tokenizer == "linear":
        return torch.arange(h * w)
    rows = torch.arange(h)[:, None] * (w + 1) + torch.arange(w)[None, :]
    return 1 + rows.flatten()


def grids_from_mask(pixel_mask: Tensor, cell: int) -> list[tuple[int, int]]:
    """Each image's (rows, columns) of cells from its (N, H, W) validity mask (the valid area
    is the top-left rectangle the processor filled)."""
    grids = []
    for m in pixel_mask.bool():
        rows, cols = int(m.any(1).sum()), int(m.any(0).sum())
        if rows % cell or cols % cell or rows == 0 or cols == 0:
            raise ValueError(f"an image's valid area {rows}x{cols} px is not a whole number of {cell}-px cells")
        grids.append((rows // cell, cols // cell))
    return grids


class EncoderFreeBackbone(nn.Module):
    """The language model, the patch tokenizer and (BREEN) the learnable queries."""

    def __init__(self, config: EncoderFreeConfig):
        super().__init__()
        text = config.text_config
        self.language_model = AutoModel.from_config(text)
        if config.tokenizer == "eve":
            self.vision_tokenizer = EVEPatchTokenizer(config.vision_width, text.hidden_size, config.patch_size,
                                                      config.pool, config.heads, config.in_chans)
        else:
            self.vision_tokenizer = LinearPatchTokenizer(config.vision_width, text.hidden_size, config.patch_size,
                                                         config.pool, config.in_chans)
        n = config.num_queries
        self.queries = nn.Parameter(torch.randn(n, text.hidden_size)) if n else None
        if config.image_experts:
            add_image_experts(self.language_model)


class EncoderFreeForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """Patch tokenizer -> (queries) -> decoder LM -> LM head; no vision encoder.

    `forward` takes the processor's `input_ids` (one `<image>` token per image token),
    `pixel_values` (N, C, H, W) padded to the batch's largest image and `pixel_mask` (N, H, W)
    marking each image's valid area; the i-th image's tokens fill the i-th run of image tokens.
    """

    config_class = EncoderFreeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: EncoderFreeConfig):
        super().__init__(config)
        self.model = EncoderFreeBackbone(config)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        from transformers import initialization as init

        if isinstance(module, EVEPatchTokenizer):
            std = module.cls_token.shape[-1] ** -0.5
            init.normal_(module.cls_token, std=std)
            init.normal_(module.split_token, std=std)
        elif isinstance(module, EncoderFreeBackbone) and module.queries is not None:
            init.normal_(module.queries, std=1.0)  # BREEN: torch.randn
        elif isinstance(module, nn.MultiheadAttention):
            module._reset_parameters()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def image_grids(self, pixel_values: Tensor, pixel_mask: Tensor | None = None) -> list[tuple[int, int]]:
        """Each image's (rows, columns) of cells."""
        if pixel_mask is None:
            return [self.model.vision_tokenizer.grid(*pixel_values.shape[-2:])] * pixel_values.shape[0]
        return grids_from_mask(pixel_mask, self.config.cell)

    def image_embeddings(self, pixel_values: Tensor, pixel_mask: Tensor | None = None) -> list[Tensor]:
        """Per image, the (n_i, hidden) embeddings its run of image tokens takes: its tokenizer
        tokens (from its valid area only) followed by the queries. Images of one size share a
        tokenizer call."""
        grids = self.image_grids(pixel_values, pixel_mask)
        cell = self.config.cell
        dtype = self.model.vision_tokenizer.projector[0].weight.dtype
        out: list[Tensor | None] = [None] * len(grids)
        for grid in dict.fromkeys(grids):
            idx = [i for i, g in enumerate(grids) if g == grid]
            pixels = pixel_values[idx, :, : grid[0] * cell, : grid[1] * cell].to(dtype)
            tokens = self.model.vision_tokenizer(pixels)
            if self.model.queries is not None:
                tokens = torch.cat([tokens, self.model.queries.to(tokens.dtype).expand(len(idx), -1, -1)], dim=1)
            for j, i in enumerate(idx):
                out[i] = tokens[j]
        return out

    def _merge_images(self, input_ids: Tensor, embeds: Tensor, pixel_values: Tensor,
                      pixel_mask: Tensor | None) -> Tensor:
        image_mask = input_ids == self.config.image_token_id
        images = self.image_embeddings(pixel_values, pixel_mask)
        runs = image_runs(image_mask)
        if len(runs) != len(images) or any(n != len(t) for (_, _, n), t in zip(runs, images)):
            raise ValueError(
                f"the text holds {len(runs)} runs of image tokens of lengths {[n for _, _, n in runs]} but the "
                f"{len(images)} images make {[len(t) for t in images]} tokens; build the inputs with the model's processor"
            )
        return embeds.masked_scatter(image_mask[..., None], torch.cat(images).to(embeds.dtype))

    def forward(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                pixel_mask: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache=None, inputs_embeds: Tensor | None = None,
                labels: Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | Tensor = 0, past_key_values=None, **kwargs) -> CausalLMOutputWithPast:
        cache = either_cache(cache, past_key_values)  # transformers >= 5.24 passes `cache`
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        routed = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        if input_ids is not None:
            routed = input_ids == self.config.image_token_id
            if pixel_values is not None and routed.any():
                inputs_embeds = self._merge_images(input_ids, inputs_embeds, pixel_values, pixel_mask)
            elif routed.any() and (cache is None or cache.get_seq_length() == 0):
                raise ValueError("the inputs hold image tokens but no pixel_values were given")
        with route_image_tokens(self, routed):
            outputs = self.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                                position_ids=position_ids, use_cache=use_cache,
                                                **{CACHE_KWARG: cache}, **kwargs)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions, **{CACHE_KWARG: output_cache(outputs)})


def image_runs(image_mask: Tensor) -> list[tuple[int, int, int]]:
    """(sample, start, length) of each maximal run of image tokens in a (B, L) mask, in
    batch order - one run per image."""
    m = image_mask.bool().int()
    edges = torch.diff(torch.nn.functional.pad(m, (1, 1)), dim=1)  # +1 at a run's start, -1 after its end
    starts, ends = (edges == 1).nonzero().tolist(), (edges == -1).nonzero().tolist()
    return [(b, s, e - s) for (b, s), (_, e) in zip(starts, ends)]
