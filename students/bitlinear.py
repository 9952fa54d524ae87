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

PackedBitLinear is the deployment form: the codes packed four to a byte and the scales, as
buffers, computed by the integer path of `kernels.ternary` (int8 activations, int32
accumulation per weight group, one rescale) - in fp32 the same outputs, bit for bit, as the
BitLinear it was packed from (whose forward computes the same integer sums). `pack_model` turns a trained ternary student into it;
`restore_ternary` rebuilds either form from the layer list a config records (`CONFIG_KEY`),
before the weights load. This file imports only torch and the kernel, so an exported folder
carries a copy of it (`students.remote_code`); the transform that chooses the layers is
`students.ternary`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from kernels.ternary import ternary_linear
from kernels.ternary.ref import grouped_product
from kernels.ternary.ref import pack as pack_ternary
from kernels.ternary.ref import quantize_per_token
from kernels.ternary.ref import unpack as unpack_ternary  # noqa: F401 - re-exported

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


class _TernarySTE(torch.autograd.Function):
    """W -> Q_w(W) exactly; backward: the identity (straight-through)."""

    @staticmethod
    def forward(ctx, w: Tensor, group: int | None) -> Tensor:
        return ternary_weight(w, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _CodesSTE(torch.autograd.Function):
    """W -> (codes as W's dtype, scales gamma); backward: the straight-through estimator of
    W~ = codes * gamma (dL/dW = dL/dW~ = dL/dcodes / gamma)."""

    @staticmethod
    def forward(ctx, w: Tensor, group: int | None):
        codes, gamma = ternary_codes(w, group)
        ctx.group = group
        ctx.save_for_backward(gamma)
        ctx.mark_non_differentiable(gamma)
        return codes.to(w.dtype), gamma

    @staticmethod
    def backward(ctx, grad_codes: Tensor, _):
        (gamma,) = ctx.saved_tensors
        return (_groups(grad_codes, ctx.group) / gamma.unsqueeze(-1)).reshape(grad_codes.shape), None


class _ActCodesSTE(torch.autograd.Function):
    """x -> (per-token integers q as x's dtype, scales s), x ~ q / s; backward: the straight-through
    estimator of x~ = q / s (dL/dx = dL/dx~ = s * dL/dq)."""

    @staticmethod
    def forward(ctx, x: Tensor, bits: int):
        q, scale = quantize_per_token(x, bits)
        ctx.save_for_backward(scale)
        ctx.mark_non_differentiable(scale)
        return q, scale

    @staticmethod
    def backward(ctx, grad_q: Tensor, _):
        (scale,) = ctx.saved_tensors
        return grad_q * scale, None


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
        """Q_w(W), with the straight-through gradient to the latent weight."""
        return _TernarySTE.apply(self.weight, self.group)

    def forward(self, x: Tensor) -> Tensor:
        """linear(Q_a(x), Q_w(W)); with activation quantization computed as the integer path
        does (integer sums per weight group, then the weight and token scales), so the
        packed layer reproduces it bit for bit in fp32."""
        if self.norm is not None:
            x = self.norm(x)
        if self.act_bits is None:
            return nn.functional.linear(x, self.quantized_weight(), self.bias)
        q, scale = _ActCodesSTE.apply(x, self.act_bits)
        codes, gamma = _CodesSTE.apply(self.weight, self.group)
        y = grouped_product(q.reshape(-1, self.in_features), codes, gamma, self.group) / scale.reshape(-1, 1)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

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


class PackedBitLinear(nn.Module):
    """A BitLinear as deployed: its codes packed four to a byte (`weight_packed`, uint8) and its
    absmean scales (`weight_scale`, fp32: (1, 1) per tensor or (out, in // group)), computed
    by the integer path of `kernels.ternary` after the layer's RMSNorm. Forward only."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, norm: str = "inside",
                 group: int | None = None, act_bits: int | None = 8, eps: float = 1e-8, device=None, dtype=None):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm {norm!r}: use one of {NORMS}")
        self.in_features, self.out_features, self.group, self.act_bits = in_features, out_features, group, act_bits
        scales = (1, 1) if group is None else (out_features, in_features // group)
        self.register_buffer("weight_packed", torch.zeros(math.ceil(in_features * out_features / 4),
                                                          dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(scales, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.norm = nn.RMSNorm(in_features, eps=eps, device=device, dtype=dtype) if norm == "inside" else None

    @classmethod
    @torch.no_grad()
    def from_bitlinear(cls, layer: BitLinear) -> PackedBitLinear:
        w = layer.weight
        packed = cls(layer.in_features, layer.out_features, bias=layer.bias is not None,
                     norm="inside" if layer.norm is not None else "none", group=layer.group, act_bits=layer.act_bits,
                     eps=layer.norm.eps if layer.norm is not None else 1e-8, device=w.device, dtype=w.dtype)
        codes, gamma = ternary_codes(w.detach().float(), layer.group)
        packed.weight_packed.copy_(pack_ternary(codes))
        packed.weight_scale.copy_(gamma.reshape(packed.weight_scale.shape))
        if layer.bias is not None:
            packed.bias.copy_(layer.bias)
        if layer.norm is not None:
            packed.norm.load_state_dict(layer.norm.state_dict())
        return packed

    def forward(self, x: Tensor) -> Tensor:
        if self.norm is not None:
            x = self.norm(x)
        y = ternary_linear(x, self.weight_packed, self.weight_scale, self.out_features, self.group, self.act_bits)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        scale = "tensor" if self.group is None else f"group:{self.group}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"packed ternary ({scale}), act_bits={self.act_bits}, norm={self.norm is not None}")


def pack_model(model: nn.Module) -> int:
    """Every BitLinear of `model` becomes its PackedBitLinear, in place, and the config's
    record says so (`packed`); returns the number of layers packed."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BitLinear)]
    for name, layer in layers:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, PackedBitLinear.from_bitlinear(layer))
    spec = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if spec is not None:
        spec["packed"] = True
    return len(layers)


def restore_ternary(model: nn.Module, spec: dict[str, Any]) -> None:
    """Rebuild the ternary layers a config records (`spec`: "layers" {name: "inside" | "none"},
    "weight_scale", "act_bits", "removed_norms", "packed") in a freshly built model, before
    its weights load: Linear layers become BitLinear (holding their weights) or, when packed,
    PackedBitLinear (BitLinear ones too); the removed block norms become Identity."""
    group = parse_weight_scale(spec.get("weight_scale", "tensor"))
    packed = bool(spec.get("packed"))
    for name, norm in spec["layers"].items():
        old = model.get_submodule(name)
        if isinstance(old, PackedBitLinear) or (isinstance(old, BitLinear) and not packed):
            continue
        options = dict(norm=norm, group=group, act_bits=spec.get("act_bits"))
        if packed:
            w = old.weight
            new = PackedBitLinear(old.in_features, old.out_features, bias=old.bias is not None, device=w.device,
                                  dtype=w.dtype, **options)
        else:
            new = BitLinear.from_linear(old, **options)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    for name in spec.get("removed_norms", []):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())
