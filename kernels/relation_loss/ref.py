"""Gram-relation distillation loss in torch: the readable oracle and the tiled CPU path.

`relation_loss_naive` materialises both N x N Gram matrices per item (the test oracle and the
benchmark's baseline). `relation_loss_ref` visits them in (tile x tile) blocks inside
`RelationLossFn` and recomputes the blocks in backward, so no N x N matrix ever exists.
`RelationLossFn` and the per-item reduction (`reduce_items`) are shared with `triton.py`, which
runs the same tiles as Triton programs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

KINDS = ("cosine", "mse")
# Floor of ||G_s||_F * ||G_t||_F in the cosine: only an item whose student or teacher features
# are (numerically) all zero reaches it; there the loss is 1 and the gradient -G_t / EPS.
EPS = 1e-12
TILE = 256
# Elements of one (items, tile, tile) block in the ref path: bounds its temporaries (8 MiB in
# fp32) however many items there are.
BLOCK_BUDGET = 1 << 21


def check_inputs(x_s: Tensor, x_t: Tensor, kind: str, mask: Tensor | None) -> None:
    """Raise a ValueError naming the offending argument unless the inputs fit `relation_loss`."""
    if kind not in KINDS:
        raise ValueError(f"relation_loss: kind={kind!r}; expected one of {', '.join(KINDS)}")
    if x_s.dim() != 3 or x_t.dim() != 3:
        raise ValueError(f"relation_loss: x_s and x_t must be (B, N, D); got x_s {tuple(x_s.shape)}, "
                         f"x_t {tuple(x_t.shape)}")
    if x_s.shape[:2] != x_t.shape[:2]:
        raise ValueError(f"relation_loss: x_s {tuple(x_s.shape)} and x_t {tuple(x_t.shape)} must agree on (B, N) "
                         "(the feature widths may differ)")
    if not (x_s.is_floating_point() and x_t.is_floating_point()):
        raise ValueError(f"relation_loss: x_s and x_t must be floating point; got {x_s.dtype}, {x_t.dtype}")
    if x_s.device != x_t.device:
        raise ValueError(f"relation_loss: x_s is on {x_s.device} but x_t on {x_t.device}")
    if mask is not None:
        if mask.shape != x_s.shape[:2]:
            raise ValueError(f"relation_loss: mask has shape {tuple(mask.shape)}; expected (B, N) = "
                             f"{tuple(x_s.shape[:2])} like x_s")
        if mask.dtype != torch.bool:
            raise ValueError(f"relation_loss: mask must be bool (False = token excluded); got {mask.dtype}")
        if mask.device != x_s.device:
            raise ValueError(f"relation_loss: mask is on {mask.device} but x_s on {x_s.device}")


def accumulate_dtype(x_s: Tensor, x_t: Tensor) -> torch.dtype:
    """float64 if either input is float64, else float32 (bf16/fp16 Gram sums overflow and round)."""
    return torch.float64 if torch.float64 in (x_s.dtype, x_t.dtype) else torch.float32


def valid_counts(x_s: Tensor, mask: Tensor | None) -> Tensor:
    """(B,) number of valid tokens n_b per item."""
    if mask is None:
        return torch.full((x_s.shape[0],), x_s.shape[1], device=x_s.device, dtype=torch.int64)
    return mask.sum(-1)


def reduce_items(sums: Tensor, kind: str, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Per-item Frobenius sums -> the scalar loss and the per-item gradient coefficients.

    Args:
        sums: (B, 3) [<G_s, G_t>, ||G_s||^2, ||G_t||^2] for "cosine"; (B, 1) [||G_s - G_t||^2] for "mse".
        kind: "cosine" or "mse".
        counts: (B,) valid tokens per item; items with none are left out of the mean.

    Returns:
        loss: () mean over the items with a valid token (exactly 0 if there is none).
        coef: (B, 2) [alpha, beta] with dloss/dG_s = alpha G_s + beta G_t for each item, so that
            dloss/dX_s = 2 (alpha G_s + beta G_t) X_s (the matrix is symmetric).
    """
    valid = counts > 0  # (B,)
    n_items = valid.sum().clamp(min=1).to(sums.dtype)
    if kind == "cosine":
        s, norm_s, norm_t = sums[:, 0], sums[:, 1].sqrt(), sums[:, 2].sqrt()  # (B,)
        ab = norm_s * norm_t
        above = ab > EPS
        denom = torch.where(above, ab, torch.full_like(ab, EPS))
        per_item = 1 - s / denom
        # d/dG_s [1 - S/(ab)] = S G_s / (a^3 b) - G_t / (ab); below the floor the denominator is constant
        alpha = torch.where(above, s / (denom * sums[:, 1].clamp(min=torch.finfo(sums.dtype).tiny)),
                            torch.zeros_like(s))
        beta = -1 / denom
    else:
        n2 = counts.clamp(min=1).to(sums.dtype).square()
        per_item = sums[:, 0] / n2
        alpha = 2 / n2
        beta = -alpha
    weight = valid.to(sums.dtype) / n_items  # (B,) 1/m for the items in the mean, 0 for skipped ones
    loss = (per_item * weight).sum()
    return loss, torch.stack([alpha * weight, beta * weight], dim=1)


def relation_loss_naive(x_s: Tensor, x_t: Tensor, *, kind: str = "cosine", mask: Tensor | None = None) -> Tensor:
    """The definition, written out: both (B, N, N) Gram matrices in full, gradients by autograd.

    Args:
        x_s: (B, N, Ds) student features; gradients flow here.
        x_t: (B, N, Dt) teacher features; detached.
        kind: "cosine" (mean_b 1 - cos(vec G_s, vec G_t)) or "mse" (mean_b ||G_s - G_t||_F^2 / n_b^2).
        mask: (B, N) bool, False drops the token's row and column of G; None keeps all.

    Returns:
        () the loss, in float32 (float64 if an input is float64).
    """
    check_inputs(x_s, x_t, kind, mask)
    acc = accumulate_dtype(x_s, x_t)
    xs, xt = x_s.to(acc), x_t.detach().to(acc)  # (B, N, Ds), (B, N, Dt)
    if mask is not None:
        keep = mask.to(acc)[..., None]  # (B, N, 1)
        xs, xt = xs * keep, xt * keep  # a zero row drops the token's row and column of G
    g_s = xs @ xs.mT  # (B, N, N)
    g_t = xt @ xt.mT  # (B, N, N)
    counts = valid_counts(x_s, mask)
    valid = counts > 0
    if kind == "cosine":
        ab = torch.linalg.vector_norm(g_s, dim=(-2, -1)) * torch.linalg.vector_norm(g_t, dim=(-2, -1))  # (B,)
        per_item = 1 - (g_s * g_t).sum((-2, -1)) / ab.clamp(min=EPS)
    else:
        per_item = (g_s - g_t).square().sum((-2, -1)) / counts.clamp(min=1).to(acc).square()
    return (per_item * valid).sum() / valid.sum().clamp(min=1)


def _item_slices(batch: int, tile: int):
    """Consecutive item ranges whose (items, tile, tile) blocks stay within BLOCK_BUDGET."""
    step = max(1, BLOCK_BUDGET // (tile * tile))
    return [slice(b, min(b + step, batch)) for b in range(0, batch, step)]


def _tile_pairs(n: int, tile: int):
    """Upper-triangle tile pairs (rows i, columns j) of an n x n matrix; j's tiles start at i's."""
    starts = range(0, n, tile)
    return [(slice(i, i + tile), slice(j, j + tile), i == j) for i in starts for j in starts if j >= i]


def _frobenius(a: Tensor, b: Tensor) -> Tensor:
    """(b,) per-item <a, b>_F of two (b, T, T) blocks."""
    return torch.linalg.vecdot(a.flatten(1), b.flatten(1))


def _masked(x: Tensor, mask: Tensor | None, acc: torch.dtype) -> Tensor:
    """x in the accumulation dtype with excluded tokens' rows zeroed (so they vanish from G)."""
    x = x.to(acc)
    return x * mask.to(acc)[..., None] if mask is not None else x


class RelationLossFn(torch.autograd.Function):
    """Forward: per-item Frobenius sums, then `reduce_items`; backward: dX_s from the per-item
    coefficients, the Gram tiles recomputed.

    `fwd` (x_s, x_t, mask, kind) -> sums (B, 3) or (B, 1) and `bwd` (x_s, x_t, mask, coef (B, 2))
    -> dX_s (B, N, Ds) are the torch tiles (`relation_loss_fwd_ref`/`relation_loss_bwd_ref`) or
    the Triton launchers (`triton.py`), their tile size bound with functools.partial.
    """

    @staticmethod
    def forward(ctx, x_s: Tensor, x_t: Tensor, mask: Tensor | None, kind: str,
                fwd: Callable[..., Tensor], bwd: Callable[..., Tensor]) -> Tensor:
        loss, coef = reduce_items(fwd(x_s, x_t, mask, kind), kind, valid_counts(x_s, mask))
        ctx.save_for_backward(x_s, x_t, mask, coef)
        ctx.bwd = bwd
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_s, x_t, mask, coef = ctx.saved_tensors
        return ctx.bwd(x_s, x_t, mask, coef * grad.to(coef.dtype)), None, None, None, None, None


def relation_loss_fwd_ref(x_s: Tensor, x_t: Tensor, mask: Tensor | None, kind: str, tile: int) -> Tensor:
    """Per-item Frobenius sums (B, 3) ((B, 1) for "mse"), tile by tile, in the accumulation dtype.

    G is symmetric, so only tiles with j >= i are visited: an off-diagonal tile stands for its
    transpose too (weight 2 in the sums).
    """
    acc = accumulate_dtype(x_s, x_t)
    batch, n, _ = x_s.shape
    sums = torch.zeros(batch, 3 if kind == "cosine" else 1, device=x_s.device, dtype=acc)
    pairs = _tile_pairs(n, tile)
    for items in _item_slices(batch, tile):
        m = mask[items] if mask is not None else None
        xs, xt = _masked(x_s[items], m, acc), _masked(x_t[items], m, acc)  # (b, N, Ds), (b, N, Dt)
        for i, j, diagonal in pairs:
            weight = 1.0 if diagonal else 2.0
            g_s = xs[:, i] @ xs[:, j].mT  # (b, T, T)
            g_t = xt[:, i] @ xt[:, j].mT  # (b, T, T)
            if kind == "cosine":
                sums[items, 0] += weight * _frobenius(g_s, g_t)
                sums[items, 1] += weight * _frobenius(g_s, g_s)
                sums[items, 2] += weight * _frobenius(g_t, g_t)
            else:
                diff = g_s.sub_(g_t)
                sums[items, 0] += weight * _frobenius(diff, diff)
    return sums


def relation_loss_bwd_ref(x_s: Tensor, x_t: Tensor, mask: Tensor | None, coef: Tensor, tile: int) -> Tensor:
    """dX_s = 2 (alpha G_s + beta G_t) X_s (B, N, Ds) in x_s's dtype, for coef (B, 2) = [alpha, beta]
    (upstream gradient included); each upper-triangle tile also stands for its transpose."""
    acc = coef.dtype
    coef = 2 * coef  # (B, 2); the 2 of dX_s = 2 D X_s folded in
    batch, n, width = x_s.shape
    dx = torch.zeros(batch, n, width, device=x_s.device, dtype=acc)  # (B, N, Ds)
    pairs = _tile_pairs(n, tile)
    for items in _item_slices(batch, tile):
        m = mask[items] if mask is not None else None
        xs, xt = _masked(x_s[items], m, acc), _masked(x_t[items], m, acc)
        alpha, beta = coef[items, 0, None, None], coef[items, 1, None, None]  # (b, 1, 1)
        for i, j, diagonal in pairs:
            g_s = xs[:, i] @ xs[:, j].mT  # (b, T, T)
            d = g_s.mul_(alpha).addcmul_(xt[:, i] @ xt[:, j].mT, beta)  # (b, T, T) tile of 2 dL/dG_s
            dx[items, i] += d @ xs[:, j]  # (b, T, Ds); bmm into a fresh block, as baddbmm_ on a
            if not diagonal:  # strided view of dx falls back to one addmm per item
                dx[items, j] += d.mT @ xs[:, i]
    # excluded tokens' rows of G are zero, so their rows of dx are zero too
    return dx.to(x_s.dtype)


def relation_loss_ref(
    x_s: Tensor, x_t: Tensor, *, kind: str = "cosine", mask: Tensor | None = None, tile: int = TILE
) -> Tensor:
    """Gram-relation loss in (tile x tile) blocks: memory O(items * tile^2 + B N D), never N x N.

    Args:
        x_s: (B, N, Ds) student features; gradients flow here.
        x_t: (B, N, Dt) teacher features; detached.
        kind: "cosine" or "mse", as in `relation_loss_naive`.
        mask: (B, N) bool, False drops the token's row and column of G; None keeps all.
        tile: rows and columns of G per block.

    Returns:
        () the loss, in float32 (float64 if an input is float64).
    """
    check_inputs(x_s, x_t, kind, mask)
    if tile < 1:
        raise ValueError(f"relation_loss_ref: tile={tile}; must be >= 1")
    return RelationLossFn.apply(x_s, x_t.detach(), mask, kind, partial(relation_loss_fwd_ref, tile=tile),
                                partial(relation_loss_bwd_ref, tile=tile))
