"""Ternary weights: BitNet b1.58's BitLinear and the `ternary` student transform.

Quantizers (BitNet b1.58 training FAQ; matmulfreellm `ops/bitnet.py` computes the same):

- weights, absmean: gamma = max(mean |W|, 1e-5) per tensor (BitNet) or per group of `g` inputs of
  a row (BitCPM-CANN's group-wise scales); W_q = clamp(round(W / gamma), -1, 1) * gamma;
- activations, per token absmax to 8 bits: s = 127 / max(max_j |x_j|, 1e-5);
  x_q = clamp(round(x * s), -128, 127) / s (BitCPM4 is weight-only: `act_bits=None`);
- straight-through estimator: forward with the quantized values, backward as the identity
  (x + stopgrad(Q(x) - x)).

BitLinear: y = linear(Q_a(norm(x)), Q_w(W)) with the norm an RMSNorm inside the layer
(`norm="inside"`, eps 1e-8 as matmulfreellm; the `bitnet_faq` and `mmfree` placements) or none
(`norm="none"`, the `bitnet_2b4t` inference layout, whose norms sit in the block). Ternary
values pack four to a byte (`pack_ternary` / `unpack_ternary`, from `kernels.ternary`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kernels.ternary.ref import pack as pack_ternary  # noqa: F401 - codes four to a byte, re-exported
from kernels.ternary.ref import quantize_per_token
from kernels.ternary.ref import unpack as unpack_ternary  # noqa: F401

EPS = 1e-5
NORMS = ("inside", "none")
# where the norms go (METHODS-COMPRESSION 5.2): the layer's own RMSNorm, and the block's pre-norms
PLACEMENTS = ("mmfree", "bitnet_faq", "bitnet_2b4t")
SUBLN = ("o_proj", "down_proj")  # bitnet_2b4t: RMSNorm before the attention output and FFN down projections
CONFIG_KEY = "workbench_ternary"


def _groups(w: Tensor, group: int | None) -> Tensor:
    """(out, in) -> (out, in // group, group), or (1, 1, numel) per tensor."""
    if group is None:
        return w.reshape(1, 1, -1)
    if w.shape[-1] % group:
        raise ValueError(f"group {group} does not divide the {w.shape[-1]} inputs")
    return w.reshape(w.shape[0], -1, group)


def ternary_codes(w: Tensor, group: int | None = None) -> tuple[Tensor, Tensor]:
    """(codes in {-1, 0, 1} as int8, shaped like `w`; scales gamma, one per tensor or per group)."""
    g = _groups(w, group)
    gamma = g.abs().mean(-1, keepdim=True).clamp(min=EPS)
    codes = (g / gamma).round().clamp(-1, 1)
    return codes.reshape(w.shape).to(torch.int8), gamma.squeeze(-1)


def ternary_weight(w: Tensor, group: int | None = None) -> Tensor:
    """Q_w(W): the ternary weight the layer computes with (values in {-gamma, 0, +gamma})."""
    codes, gamma = ternary_codes(w, group)
    return (_groups(codes.to(w.dtype), group) * gamma.unsqueeze(-1)).reshape(w.shape)


def quantize_activations(x: Tensor, bits: int = 8) -> Tensor:
    """Q_a(x): per-token (last-dim row) absmax quantization to `bits`, back in x's dtype."""
    q, scale = quantize_per_token(x, bits)
    return q / scale


class BitLinear(nn.Linear):
    """A Linear layer with ternary weights and (optionally) 8-bit per-token activations,
    trained through straight-through estimators on its latent full-precision weight.

    Args:
        norm: "inside" (an RMSNorm with a learned weight before the activation quantizer) or "none".
        group: inputs per weight scale (None: one scale per tensor, BitNet b1.58).
        act_bits: activation bits (None: weight-only, BitCPM4).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, norm: str = "inside",
                 group: int | None = None, act_bits: int | None = 8, eps: float = 1e-8, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if norm not in NORMS:
            raise ValueError(f"norm {norm!r}: use one of {NORMS}")
        if group is not None and (group < 1 or in_features % group):
            raise ValueError(f"group {group} does not divide the {in_features} inputs")
        self.group, self.act_bits = group, act_bits
        self.norm = nn.RMSNorm(in_features, eps=eps, device=device, dtype=dtype) if norm == "inside" else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options: Any) -> BitLinear:
        """A BitLinear holding `linear`'s own weight and bias (the latent weights start there)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device,
                    dtype=w.dtype, **options)
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def quantized_weight(self) -> Tensor:
        w = self.weight
        return w + (ternary_weight(w.detach(), self.group) - w.detach()).detach()

    def forward(self, x: Tensor) -> Tensor:
        if self.norm is not None:
            x = self.norm(x)
        if self.act_bits is not None:
            x = x + (quantize_activations(x.detach(), self.act_bits) - x.detach()).detach()
        return nn.functional.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        scale = "tensor" if self.group is None else f"group:{self.group}"
        return f"{super().extra_repr()}, ternary ({scale}), act_bits={self.act_bits}, norm={self.norm is not None}"


def parse_weight_scale(weight_scale: str) -> int | None:
    """"tensor" -> None; "group:g" -> g."""
    if weight_scale == "tensor":
        return None
    kind, _, size = weight_scale.partition(":")
    if kind != "group" or not size.isdigit() or int(size) < 1:
        raise ValueError(f"weight_scale {weight_scale!r}: use 'tensor' or 'group:<size>', e.g. group:32")
    return int(size)


def ternary_transform(student: nn.Module, scopes: list[str] | None = None, skip: list[str] | None = None,
                      placement: str = "mmfree", weight_scale: str = "tensor", act_bits: int | None = 8,
                      quantize_lm_head: bool = False) -> dict[str, Any]:
    """The `ternary` student transform: the Linear layers of `scopes` (default the language
    model: embeddings, `lm_head` and the vision tower stay full precision) become BitLinear,
    in place, starting from their weights. `skip` as in `students.quantize` (globs on full
    names or module prefixes, each must match). Returns notes for the run's summary.

    `placement` says where the norms go: `mmfree` (matmulfreellm's code: an RMSNorm inside
    every BitLinear, the block's pre-norms kept), `bitnet_faq` (the BitNet training FAQ: norms
    inside, the decoder blocks' pre-norms removed), `bitnet_2b4t` (BitNet b1.58 2B4T's inference
    layout: block pre-norms kept, no norm inside except the "subln" RMSNorm before `o_proj` and
    `down_proj`).

    Raises:
        ValueError: an unknown scope, norm or weight scale, a pattern matching nothing, or a
            group that divides no layer.
    """
    from students.quantize import SCOPES, linear_scopes, matches

    chosen = list(scopes or ["llm"]) + (["lm_head"] if quantize_lm_head else [])
    bad = [s for s in chosen if s not in SCOPES]
    if bad:
        raise ValueError(f"unknown scope {bad[0]!r}; scopes: {', '.join(SCOPES)}")
    if act_bits is not None and not 2 <= act_bits <= 16:
        raise ValueError(f"act_bits must be between 2 and 16 (or null for weight-only), got {act_bits}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r}: use one of {', '.join(PLACEMENTS)}")
    group = parse_weight_scale(weight_scale)
    names = linear_scopes(student)
    for pattern in skip or []:
        if not any(matches(pattern, n) for n in names):
            raise ValueError(f"skip pattern {pattern!r} matches no Linear layer")
    modules = dict(student.named_modules())
    already = [n for n in names if isinstance(modules[n], BitLinear)]
    if already:  # a ternary student loaded from its folder keeps its layers
        return {"ternary_layers": len(already), "kept_layers": len(names) - len(already), "already_ternary": True}
    picked = [n for n, s in names.items() if s in chosen and not any(matches(p, n) for p in skip or [])
              and (group is None or modules[n].in_features % group == 0)]
    if not picked:
        raise ValueError(f"no Linear layer to make ternary (scopes {chosen}, weight_scale {weight_scale})")
    for name in picked:
        parent, _, child = name.rpartition(".")
        inside = placement != "bitnet_2b4t" or child in SUBLN
        layer = BitLinear.from_linear(modules[name], norm="inside" if inside else "none", group=group,
                                      act_bits=act_bits)
        setattr(student.get_submodule(parent) if parent else student, child, layer)
    removed = _remove_block_norms(student) if placement == "bitnet_faq" else 0
    config = getattr(student, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, {"scopes": chosen, "skip": list(skip or []), "placement": placement,
                                     "weight_scale": weight_scale, "act_bits": act_bits})
    return {"ternary_layers": len(picked), "kept_layers": len(names) - len(picked), "placement": placement,
            "weight_scale": weight_scale, "act_bits": act_bits, **({"removed_norms": removed} if removed else {})}


def _remove_block_norms(student: nn.Module) -> int:
    """The BitNet FAQ's layout: the decoder blocks' pre-norms go (BitLinear normalises its own
    input); the final norm before the LM head stays."""
    count = 0
    for block in student.get_decoder().layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            if isinstance(getattr(block, name, None), nn.Module) and not isinstance(getattr(block, name), nn.Identity):
                setattr(block, name, nn.Identity())
                count += 1
    if not count:
        raise ValueError("placement bitnet_faq: the decoder blocks have no input_layernorm / "
                         "post_attention_layernorm to remove")
    return count
