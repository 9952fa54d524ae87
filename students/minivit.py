"""MiniViT students: weight-multiplexed DeiT and Swin (Cream/MiniViT), registered with timm.

Consecutive blocks share their heavy weights (qkv, proj, MLP; in Swin also the relative
position bias table) and keep, per application, their own LayerNorms and small "weight
transformations". Every application is its own module under the usual timm path
(`blocks.{i}`, `layers.{s}.blocks.{j}`), so feature taps, `forward_intermediates` and
checkpoints look like timm's; the first application of a group owns the shared tensors and
the others hold `SharedLinear` views of them. Parameter counts (`minivit_params`):

    Mini-DeiT: embed + head + ceil(L / r) * (12 d^2 + 9 d) + L * (4 d + 2 H^2) + 2 d
    Mini-Swin, per stage: ceil(L / r) * (12 d^2 + 9 d + T) + L * (56 d + 2 H^2 + 2 H) (+ patch merging)

(d width, H heads, L blocks, r = `repeat` applications per stored block; 12 d^2 + 9 d are
qkv, proj and the 4x MLP with biases, T = (2w - 1)^2 H the relative-position table; per
application: LN1 + LN2 (4 d), the two head transforms (H x H; Swin's with bias), and in
Swin the local LayerNorm (2 d) and 7x7 depthwise conv with bias (50 d)). With the
registered presets this gives Mini-DeiT-B 44.06 M (DeiT-B 86.57 M) and Mini-Swin-T / S / B
12.00 / 26.46 / 46.44 M.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import Tensor, nn

TRANSFORM_INITS = ("normal", "identity")


class SharedLinear(nn.Module):
    """One application's view of a Linear owned by another block: the same weight and bias,
    its own forward hooks (a tap on it sees this application only). Holds no parameters."""

    def __init__(self, owner: nn.Linear):
        super().__init__()
        object.__setattr__(self, "owner", owner)  # not a submodule: its weights are stored once

    @property
    def weight(self) -> Tensor:
        return self.owner.weight

    @property
    def bias(self) -> Tensor | None:
        return self.owner.bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.owner.weight, self.owner.bias)  # not owner(x): that would fire its hooks

    def extra_repr(self) -> str:
        return f"shares {self.owner.in_features} -> {self.owner.out_features}"


def tie(module: nn.Module, owner: nn.Module, paths: Iterable[str]) -> None:
    """Replace the Linear at each dotted path of `module` by a `SharedLinear` of `owner`'s."""
    for path in paths:
        parent, _, name = path.rpartition(".")
        target = owner.get_submodule(path)
        if isinstance(target, SharedLinear):
            target = target.owner
        setattr(module.get_submodule(parent) if parent else module, name, SharedLinear(target))


def groups(depth: int, repeat: int) -> list[int]:
    """The stored block each of `depth` applications uses: consecutive runs of `repeat`."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    return [i // repeat for i in range(depth)]


def _init_transform(weight: Tensor, how: str) -> None:
    """MiniViT's code initialises the head transforms trunc_normal(0.02); "identity" starts
    them as the plain (untransformed) attention instead."""
    if how == "normal":
        trunc_normal_(weight, std=0.02)
    elif how == "identity":
        with torch.no_grad():
            weight.zero_()
            weight.view(weight.shape[0], weight.shape[1], -1)[:, :, 0].copy_(torch.eye(weight.shape[0]))
    else:
        raise ValueError(f"transform_init must be one of {', '.join(TRANSFORM_INITS)}, got {how!r}")


def _mix_heads(attn: Tensor, mix: nn.Module | None) -> Tensor:
    """(B, H, N, M) -> heads mixed by a 1x1 conv or a Linear over the head axis."""
    if mix is None:
        return attn
    if isinstance(mix, nn.Conv2d):
        return mix(attn)
    return mix(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- Mini-DeiT


class MiniAttention(Attention):
    """timm's Attention with MiniViT's two head transforms (Mini-DeiT code): a bias-free 1x1
    conv over heads on the logits before softmax (`conv_l`) and one on the probabilities
    after it (`conv_w`). With the transforms removed it computes timm's Attention."""

    def __init__(self, dim: int, num_heads: int = 8, **kwargs):
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.conv_l: nn.Module | None = nn.Conv2d(num_heads, num_heads, 1, bias=False)
        self.conv_w: nn.Module | None = nn.Conv2d(num_heads, num_heads, 1, bias=False)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D) each
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
        if attn_mask is not None:
            attn = attn + attn_mask
        attn = _mix_heads(attn, self.conv_l).softmax(dim=-1)
        attn = self.attn_drop(_mix_heads(attn, self.conv_w))
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


class MiniVisionTransformer(VisionTransformer):
    """Mini-DeiT: a timm VisionTransformer whose consecutive blocks share weights.

    Follows the public Mini-DeiT code: `repeat` consecutive applications share qkv, proj and
    the MLP; each keeps its LayerNorms, drop-path rate and attention transforms; no CLS token
    (global average pooling, then `fc_norm`). The code's image relative position encoding
    (iRPE on keys) is not implemented: absolute position embeddings are used (the iRPE
    tables are a few thousand parameters and are excluded from the counts in the paper's
    comparison). The code has no MLP transformation in Mini-DeiT.

    Args:
        repeat: applications per stored block (1 = no sharing, `depth` = one block for all).
        transform: add the per-application attention transforms.
        transform_init: "normal" (the code's trunc_normal(0.02)) or "identity".
        **kwargs: VisionTransformer arguments (depth, embed_dim, num_heads, ...).
    """

    def __init__(self, repeat: int = 2, transform: bool = True, transform_init: str = "normal", **kwargs):
        kwargs.setdefault("class_token", False)
        kwargs.setdefault("global_pool", "avg")
        super().__init__(attn_layer=MiniAttention, **kwargs)
        self.repeat = repeat
        for i, owner in enumerate(groups(len(self.blocks), repeat)):
            block = self.blocks[i]
            if transform:
                _init_transform(block.attn.conv_l.weight, transform_init)
                _init_transform(block.attn.conv_w.weight, transform_init)
            else:
                block.attn.conv_l = block.attn.conv_w = None
            if i != owner * repeat:
                tie(block, self.blocks[owner * repeat], ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))


# --------------------------------------------------------------------------- Mini-Swin


class MiniWindowAttention(WindowAttention):
    """timm's WindowAttention with Mini-Swin's head transforms: Linear(H, H) with bias over the
    head axis on the logits (after the relative-position bias, before mask and softmax) and on
    the probabilities. The bias table may belong to another application (`share_bias_with`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.proj_l: nn.Module | None = nn.Linear(self.num_heads, self.num_heads)
        self.proj_w: nn.Module | None = nn.Linear(self.num_heads, self.num_heads)
        self._bias_owner: WindowAttention | None = None

    def share_bias_with(self, owner: WindowAttention) -> None:
        del self.relative_position_bias_table
        object.__setattr__(self, "_bias_owner", owner)

    def _get_rel_pos_bias(self) -> Tensor:
        source = self._bias_owner if self._bias_owner is not None else self
        table = source.relative_position_bias_table  # ((2w-1)^2, H)
        bias = table[self.relative_position_index.view(-1)].view(self.window_area, self.window_area, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, H, N, N)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        B_, N, C = x.shape  # (windows * B, N, C)
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B_, H, N, D)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self._get_rel_pos_bias()
        attn = _mix_heads(attn, self.proj_l)
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(_mix_heads(attn.softmax(dim=-1), self.proj_w))
        x = (attn @ v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


class MiniSwinBlock(SwinTransformerBlock):
    """One application of a Mini-Swin block: own LayerNorms, head transforms and (optionally)
    the "FFN transformation" of the code: after the attention residual the stream is replaced
    by LayerNorm(x) (`norm_local`), then x + DWConv7x7(x) (`local_conv`), then the shared MLP."""

    def __init__(self, *, transform_heads: bool = True, transform_ffn: bool = True, **kwargs):
        super().__init__(**kwargs)
        attn = self.attn
        self.attn = MiniWindowAttention(
            self.dim, num_heads=attn.num_heads, window_size=attn.window_size, qkv_bias=attn.qkv.bias is not None,
            attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p)
        if not transform_heads:
            self.attn.proj_l = self.attn.proj_w = None
        self.norm_local = nn.LayerNorm(self.dim) if transform_ffn else None
        self.local_conv = nn.Conv2d(self.dim, self.dim, 7, padding=3, groups=self.dim) if transform_ffn else None

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape  # timm's Swin blocks are NHWC
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        if self.local_conv is not None:
            x = self.norm_local(x)  # replaces the stream, as the code does
            x = x + self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


def _block_kwargs(block: SwinTransformerBlock) -> dict:
    """The constructor arguments of a timm Swin block, read back from the block."""
    drop_path = block.drop_path1.drop_prob if hasattr(block.drop_path1, "drop_prob") else 0.0
    return dict(dim=block.dim, input_resolution=block.input_resolution, num_heads=block.attn.num_heads,
                window_size=block.window_size,
                shift_size=block.target_shift_size, always_partition=block.always_partition,
                dynamic_mask=block.dynamic_mask, mlp_ratio=block.mlp_ratio, qkv_bias=block.attn.qkv.bias is not None,
                proj_drop=block.attn.proj_drop.p, attn_drop=block.attn.attn_drop.p, drop_path=drop_path)


class MiniSwinTransformer(SwinTransformer):
    """Mini-Swin: a timm SwinTransformer whose blocks share weights within each stage.

    Follows the public Mini-Swin code (`--is_sep_layernorm --is_transform_heads
    --is_transform_ffn`): within a stage, `repeat` consecutive applications share qkv, proj,
    the relative-position bias table and the MLP; each application has its own LayerNorms,
    head transforms and FFN transformation; shifted and unshifted windows alternate per
    application. Mini-Swin-T shares stage 3's six blocks into one (repeat 2, 2, 6, 2);
    Small and Base share pairs (2, 2, 2, 2).

    Args:
        repeat: applications per stored block, one int for every stage or one per stage.
        transform_heads, transform_ffn: the per-application transformations.
        transform_init: "normal" (trunc_normal(0.02) on the head transforms) or "identity".
        **kwargs: SwinTransformer arguments (embed_dim, depths, num_heads, window_size, ...).
    """

    def __init__(self, repeat: int | Sequence[int] = 2, transform_heads: bool = True, transform_ffn: bool = True,
                 transform_init: str = "normal", **kwargs):
        super().__init__(**kwargs)
        repeats = [repeat] * len(self.layers) if isinstance(repeat, int) else list(repeat)
        if len(repeats) != len(self.layers):
            raise ValueError(f"repeat has {len(repeats)} entries for {len(self.layers)} stages")
        self.repeat = repeats
        for stage, r in zip(self.layers, repeats):
            blocks = [MiniSwinBlock(transform_heads=transform_heads, transform_ffn=transform_ffn, **_block_kwargs(b),
                                    norm_layer=type(b.norm1)) for b in stage.blocks]
            for name, module in nn.ModuleList(blocks).named_modules():
                if isinstance(module, nn.Linear) and not name.endswith(("proj_l", "proj_w")):  # timm's Swin init
                    trunc_normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias) if module.bias is not None else None
            for i, owner in enumerate(groups(len(blocks), r)):
                attn = blocks[i].attn
                if attn.proj_l is not None:
                    for mix in (attn.proj_l, attn.proj_w):
                        _init_transform(mix.weight, transform_init)
                        nn.init.zeros_(mix.bias)
                if i != owner * r:
                    tie(blocks[i], blocks[owner * r], ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
                    attn.share_bias_with(blocks[owner * r].attn)
            stage.blocks = nn.Sequential(*blocks)
# --------------------------------------------------------------------------- counting


def minivit_params(model: nn.Module) -> dict[str, int]:
    """Stored parameters of a model, split into shared (multiplexed) and the rest."""
    owners = {id(m.owner): m.owner for m in model.modules() if isinstance(m, SharedLinear)}
    owned = sum(p.numel() for m in owners.values() for p in m.parameters(recurse=False))
    tables = {id(m._bias_owner): m._bias_owner for m in model.modules() if getattr(m, "_bias_owner", None) is not None}
    owned += sum(m.relative_position_bias_table.numel() for m in tables.values())
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "shared": owned, "other": total - owned}


def shared_groups(model: nn.Module) -> dict[str, list[str]]:
    """Stored tensor-holding module (or bias table) path -> the paths of every application
    that uses it, the owner first; e.g. "blocks.0.attn.qkv" -> [..., "blocks.1.attn.qkv"]."""
    names = {id(m): n for n, m in model.named_modules()}
    groups: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, SharedLinear):
            owner = names[id(module.owner)]
            groups.setdefault(owner, [owner]).append(name)
        if getattr(module, "_bias_owner", None) is not None:
            owner = names[id(module._bias_owner)] + ".relative_position_bias_table"
            groups.setdefault(owner, [owner]).append(f"{name}.relative_position_bias_table")
    return groups


@torch.no_grad()
def init_from_dense(student: nn.Module, state: dict[str, Tensor], reduce: str = "first") -> dict[str, int]:
    """Initialise a multiplexed student from an unshared model of the same shape (e.g.
    Mini-DeiT-B from DeiT-B): every tensor with the same name and shape is copied; a shared
    weight takes its first application's counterpart ("first") or the mean over all its
    applications ("mean"). A teacher position embedding with extra prefix (class) tokens
    gives its patch rows.

    Returns:
        {"copied": tensors set, "averaged": of those, means over a group, "kept": left as they were}.
    """
    if reduce not in ("first", "mean"):
        raise ValueError(f"reduce must be 'first' or 'mean', got {reduce!r}")
    groups = shared_groups(student) if reduce == "mean" else {}
    own = student.state_dict()
    copied = averaged = 0
    for key, tensor in own.items():
        module, _, leaf = key.rpartition(".")
        sources = [f"{p}.{leaf}" for p in groups[module]] if module in groups else groups.get(key, [key])
        values = [state.get(k) for k in sources]
        if key == "pos_embed" and values[0] is not None and values[0].dim() == 3 and values[0].shape[1] > tensor.shape[1]:
            values = [values[0][:, -tensor.shape[1]:]]  # drop the teacher's class / distillation tokens
        if any(v is None or v.shape != tensor.shape for v in values):
            continue
        tensor.copy_(torch.stack([v.to(tensor.dtype) for v in values]).mean(0))
        copied += 1
        averaged += len(values) > 1
    if not copied:
        raise ValueError("the teacher shares no tensor name and shape with the student")
    return {"copied": copied, "averaged": averaged, "kept": len(own) - copied}


# --------------------------------------------------------------------------- registry


def _cfg(**kwargs) -> dict:
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "patch_embed.proj", "classifier": "head", **kwargs}


def _mini_deit(variant: str, pretrained: bool, **kwargs) -> MiniVisionTransformer:
    from timm.models import build_model_with_cfg

    args = dict(patch_size=16, depth=12, qkv_bias=True, repeat=2)
    return build_model_with_cfg(MiniVisionTransformer, variant, pretrained, **{**args, **kwargs})


def _mini_swin(variant: str, pretrained: bool, **kwargs) -> MiniSwinTransformer:
    from timm.models import build_model_with_cfg

    return build_model_with_cfg(MiniSwinTransformer, variant, pretrained, feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **kwargs)


# timm's register_model reads the defining module's `default_cfgs` (no hub weights: pretrained=False)
default_cfgs = generate_default_cfgs({
    **{f"mini_deit_{s}_patch16_224": _cfg() for s in ("tiny", "small", "base")},
    **{f"mini_swin_{s}_patch4_window7_224": _cfg(crop_pct=0.9, first_conv="patch_embed.proj")
       for s in ("tiny", "small", "base")},
})


@register_model
def mini_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> MiniVisionTransformer:
    return _mini_deit("mini_deit_tiny_patch16_224", pretrained, **{"embed_dim": 192, "num_heads": 3, **kwargs})


@register_model
def mini_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> MiniVisionTransformer:
    return _mini_deit("mini_deit_small_patch16_224", pretrained, **{"embed_dim": 384, "num_heads": 6, **kwargs})


@register_model
def mini_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> MiniVisionTransformer:
    return _mini_deit("mini_deit_base_patch16_224", pretrained, **{"embed_dim": 768, "num_heads": 12, **kwargs})


@register_model
def mini_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> MiniSwinTransformer:
    args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                repeat=(2, 2, 6, 2))
    return _mini_swin("mini_swin_tiny_patch4_window7_224", pretrained, **{**args, **kwargs})


@register_model
def mini_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs) -> MiniSwinTransformer:
    args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                repeat=(2, 2, 2, 2))
    return _mini_swin("mini_swin_small_patch4_window7_224", pretrained, **{**args, **kwargs})


@register_model
def mini_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> MiniSwinTransformer:
    args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                repeat=(2, 2, 2, 2))
    return _mini_swin("mini_swin_base_patch4_window7_224", pretrained, **{**args, **kwargs})


MODELS = tuple(f"mini_{a}" for a in ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
                                    "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
                                    "swin_base_patch4_window7_224"))
