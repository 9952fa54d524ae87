"""Mamba-2 mixer: the layer around the SSD scan of `kernels/ssd/` (chunk-wise in torch, a
recurrent step for decoding, mamba-ssm's fused chunk scan on CUDA when the `cuda` extra is installed).

Per head h the state-space recurrence (docs/methods.md §3) is

    h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t B_t^T        (P x N state)
    y_t = h_t C_t + D x_t

with dt_t = softplus(dt_raw_t + dt_bias) and A = -exp(A_log) a scalar per head. Written out,
y = (L o C B^T) (dt x) with the causal decay mask L_ts = exp(sum_{r=s+1..t} dt_r A): the
attention form with C <-> Q, B <-> K, x <-> V, which is why MaTVLM and mmMamba can start a
Mamba layer from an attention layer's projections (`students/hybrid.py`).

The scan itself (`x` (B, L, H, P), `dt` (B, L, H), `A` (H,), `B`/`C` (B, L, H, N), optional
initial state (B, H, P, N) -> y (B, L, H, P) and the final state) is `kernels.ssd.ssd_scan`
(torch `ssd_chunked` or mamba-ssm's fused scan); decoding one token uses `kernels.ssd.ssd_step`.

`Mamba2Mixer` is the layer: in_proj -> [z, x, B, C, dt]; depthwise causal conv + SiLU over
[x, B, C]; the scan; D skip; gated RMSNorm; out_proj. x and B may have fewer heads than the
scan (`n_x_heads`, `n_b_groups`; repeated across heads like grouped-query attention) and C
its own groups (`n_c_groups`) - MaTVLM's layout, where x/B come from W_V/W_K with the
teacher's KV heads and C from W_Q with all its heads. `layout="split"` keeps one Linear per
part (z_proj, x_proj, B_proj, C_proj, dt_proj) so a training stage can freeze some of them
(mmMamba's stage 1 trains the new parameters and not the inherited Q/K/V).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.ssd import compute_dtype, ssd_scan, ssd_step


@dataclass
class Mamba2Config:
    """Sizes and options of one `Mamba2Mixer` (saved with converted models, so plain data).

    Defaults follow mamba-ssm's Mamba2 (docs/methods.md §3) except where noted.
    """

    d_model: int
    n_heads: int
    head_dim: int  # P
    d_state: int = 128  # N
    n_x_heads: int | None = None  # heads of x before the repeat (default n_heads)
    n_b_groups: int = 1  # groups of B (repeated across heads)
    n_c_groups: int = 1  # groups of C
    d_conv: int = 4
    conv_bias: bool = True
    chunk_size: int = 256
    gate: bool = True  # z branch: y * SiLU(z) around the norm
    norm_before_gate: bool = False  # mamba: norm(y * silu(z)); mmMamba: norm(y) * silu(z)
    norm_group_size: int | None = None  # RMSNorm over groups of this many channels (None = all of d_inner)
    use_D: bool = True
    bias: bool = False  # in_proj bias
    out_bias: bool = False
    layout: str = "fused"  # fused: one in_proj; split: z_proj, x_proj, B_proj, C_proj, dt_proj
    A_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_x_heads is None:
            self.n_x_heads = self.n_heads
        for name in ("n_x_heads", "n_b_groups", "n_c_groups"):
            if self.n_heads % getattr(self, name):
                raise ValueError(f"Mamba2Config: n_heads={self.n_heads} is not a multiple of {name}={getattr(self, name)}")
        if self.d_conv < 2:
            raise ValueError(f"Mamba2Config: d_conv must be >= 2, got {self.d_conv}")
        if self.layout not in ("fused", "split"):
            raise ValueError(f"Mamba2Config: layout must be fused or split, got {self.layout!r}")
        if self.norm_group_size is not None and self.d_inner % self.norm_group_size:
            raise ValueError(f"Mamba2Config: d_inner={self.d_inner} is not a multiple of norm_group_size")
        self.A_init_range = tuple(self.A_init_range)

    @property
    def d_inner(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def parts(self) -> dict[str, int]:
        """Output widths of the input projection, in order [z, x, B, C, dt]."""
        return {"z": self.d_inner if self.gate else 0, "x": self.n_x_heads * self.head_dim,
                "B": self.n_b_groups * self.d_state, "C": self.n_c_groups * self.d_state, "dt": self.n_heads}

    @property
    def conv_dim(self) -> int:
        return self.parts["x"] + self.parts["B"] + self.parts["C"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["A_init_range"] = list(d["A_init_range"])
        return d


class GatedRMSNorm(nn.Module):
    """RMSNorm of y, gated by SiLU(z) before (mamba's default) or after (mmMamba) the norm,
    over groups of `group_size` channels (None = the whole width)."""

    def __init__(self, dim: int, group_size: int | None = None, norm_before_gate: bool = False, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size or dim
        self.norm_before_gate = norm_before_gate
        self.eps = eps

    def forward(self, y: Tensor, z: Tensor | None = None) -> Tensor:
        dtype, f = y.dtype, compute_dtype(y)
        y = y.to(f)
        if z is not None and not self.norm_before_gate:
            y = y * F.silu(z.to(f))
        shape = y.shape
        g = y.reshape(*shape[:-1], -1, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        y = g.reshape(shape) * self.weight.to(f)
        if z is not None and self.norm_before_gate:
            y = y * F.silu(z.to(f))
        return y.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, norm_before_gate={self.norm_before_gate}"


@dataclass
class Mamba2State:
    """What a Mamba layer carries between decoding calls: a fixed size, whatever the context."""

    conv: Tensor  # (B, conv_dim, d_conv - 1): the last inputs of the causal conv
    ssm: Tensor  # (B, H, P, N)


class Mamba2Mixer(nn.Module):
    """The Mamba-2 token mixer (see the module docstring); `forward(u, state)` maps (B, L, D)
    to (B, L, D), continuing from `state` when given and returning the new one."""

    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.config = c = config
        parts = c.parts
        if c.layout == "fused":
            self.in_proj = nn.Linear(c.d_model, sum(parts.values()), bias=c.bias)
        else:
            for name, width in parts.items():
                if width:
                    setattr(self, f"{name}_proj", nn.Linear(c.d_model, width, bias=c.bias))
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.d_conv, groups=c.conv_dim, padding=c.d_conv - 1,
                                bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(c.n_heads))
        self.A_log = nn.Parameter(torch.empty(c.n_heads))
        self.D = nn.Parameter(torch.ones(c.n_heads)) if c.use_D else None
        self.norm = GatedRMSNorm(c.d_inner, c.norm_group_size, c.norm_before_gate, c.norm_eps)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.out_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """mamba-ssm's init of the SSM parameters: dt_bias = softplus^-1 of a log-uniform
        dt in [dt_min, dt_max] (floored), A_log = log U[A_init_range], D = 1."""
        c = self.config
        dt = torch.exp(torch.rand(c.n_heads) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.empty(c.n_heads).uniform_(*c.A_init_range)))
        if self.D is not None:
            self.D.fill_(1.0)

    def projection(self, part: str) -> tuple[Tensor, Tensor | None]:
        """The (weight, bias) rows of the input projection that produce `part` (z, x, B, C,
        dt): views, so they can be written in place (conversion from attention)."""
        c = self.config
        if c.layout == "split":
            proj = getattr(self, f"{part}_proj")
            return proj.weight, proj.bias
        start = 0
        for name, width in c.parts.items():
            if name == part:
                bias = self.in_proj.bias[start:start + width] if self.in_proj.bias is not None else None
                return self.in_proj.weight[start:start + width], bias
            start += width
        raise KeyError(part)

    def _project(self, u: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        c = self.config
        if c.layout == "fused":
            z, x, b, cc, dt = torch.split(self.in_proj(u), list(c.parts.values()), dim=-1)
            return (z if c.gate else None), torch.cat([x, b, cc], dim=-1), dt
        z = self.z_proj(u) if c.gate else None
        return z, torch.cat([self.x_proj(u), self.B_proj(u), self.C_proj(u)], dim=-1), self.dt_proj(u)

    def _conv(self, xbc: Tensor, conv_state: Tensor | None) -> tuple[Tensor, Tensor]:
        """Depthwise causal conv + SiLU over (B, L, conv_dim), continuing from `conv_state`."""
        k = self.config.d_conv
        xbc = xbc.transpose(1, 2)  # (B, conv_dim, L)
        length = xbc.shape[-1]
        if conv_state is None:
            conv_state = xbc.new_zeros(xbc.shape[0], xbc.shape[1], k - 1)
        full = torch.cat([conv_state.to(xbc.dtype), xbc], dim=-1)  # (B, conv_dim, k - 1 + L)
        out = F.conv1d(full, self.conv1d.weight, self.conv1d.bias, groups=full.shape[1])  # (B, conv_dim, L)
        return F.silu(out[..., -length:]).transpose(1, 2), full[..., -(k - 1):]

    def forward(self, u: Tensor, state: Mamba2State | None = None, pre_out: bool = False
                ) -> tuple[Tensor, Mamba2State]:
        """Args:
            u: (B, L, D) hidden states.
            state: the state after the tokens before `u` (decoding), or None.
            pre_out: return the normalised, gated mixer output before out_proj (B, L, d_inner).
        Returns:
            (B, L, D) output (or the pre-out_proj tensor), and the state after the last token.
        """
        c = self.config
        b, length, _ = u.shape
        z, xbc, dt = self._project(u)
        xbc, conv_state = self._conv(xbc, state.conv if state is not None else None)
        x, bb, cc = torch.split(xbc, [c.parts["x"], c.parts["B"], c.parts["C"]], dim=-1)
        h = c.n_heads
        x = x.reshape(b, length, c.n_x_heads, c.head_dim).repeat_interleave(h // c.n_x_heads, dim=2)
        bb = bb.reshape(b, length, c.n_b_groups, c.d_state).repeat_interleave(h // c.n_b_groups, dim=2)
        cc = cc.reshape(b, length, c.n_c_groups, c.d_state).repeat_interleave(h // c.n_c_groups, dim=2)
        f = compute_dtype(u)  # float32 for half-precision models
        dt = F.softplus(dt.to(f) + self.dt_bias.to(f))  # (B, L, H)
        A = -torch.exp(self.A_log.to(f))  # (H,)
        initial = state.ssm if state is not None else None
        if length == 1 and initial is not None:
            y, ssm = ssd_step(initial, x[:, 0], dt[:, 0], A, bb[:, 0], cc[:, 0])
            y = y[:, None]
        else:
            y, ssm = ssd_scan(x, dt, A, bb, cc, c.chunk_size, initial)
        y = y.to(u.dtype)
        if self.D is not None:
            y = y + x * self.D.to(u.dtype)[:, None]
        y = self.norm(y.reshape(b, length, c.d_inner), z)
        new_state = Mamba2State(conv_state, ssm)
        return (y if pre_out else self.out_proj(y)), new_state

    def extra_repr(self) -> str:
        c = self.config
        return (f"heads={c.n_heads}, head_dim={c.head_dim}, d_state={c.d_state}, x_heads={c.n_x_heads}, "
                f"B_groups={c.n_b_groups}, C_groups={c.n_c_groups}, chunk={c.chunk_size}, layout={c.layout}")
