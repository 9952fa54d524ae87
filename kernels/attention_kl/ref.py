"""Torch paths of `attention_kl`: the readable oracle and the memory-flat CPU path.

`attention_kl_naive` builds the full (B, H, N, M) score and probability tensors; it is the test
oracle and the benchmark's naive baseline. `attention_kl_ref` has the public signature and walks
query blocks, saving only per-row log-sum-exps and recomputing each block's scores in backward,
so its peak memory is O(B * H * block * M). The Triton path (`triton.py`) shares the input checks,
the counted-row rule and the autograd Function (`AttentionKLFn`) defined here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

KINDS = ("kl", "ce")
# Values per (B, H, rows, M) block tile of the torch path: 2M float32 = 8 MiB, a few tiles live.
TILE_ELEMENTS = 2**21


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax tails carry the divergence; bf16/fp16 work in float32, float64 (tests) stays float64.
    return torch.promote_types(dtype, torch.float32)


def check_inputs(
    q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor,
    causal: bool, key_mask: Tensor | None, query_mask: Tensor | None, kind: str,
) -> None:
    """Raise ValueError naming the offending tensor when shapes, dtypes or options disagree."""
    named = {"q_s": q_s, "k_s": k_s, "q_t": q_t, "k_t": k_t}
    for name, x in named.items():
        if x.dim() != 4:
            raise ValueError(f"{name} must be (B, H, rows, D), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    for q_name, k_name in (("q_s", "k_s"), ("q_t", "k_t")):
        if named[q_name].dtype != named[k_name].dtype:
            q_dtype, k_dtype = named[q_name].dtype, named[k_name].dtype
            raise ValueError(f"{q_name} is {q_dtype} but {k_name} is {k_dtype}; they must match")
    B, H, N, Ds = q_s.shape
    M = k_s.shape[2]
    Dt = q_t.shape[3]
    expected = {"k_s": (B, H, M, Ds), "q_t": (B, H, N, Dt), "k_t": (B, H, M, Dt)}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(named[name].shape)}, expected {shape} from "
                f"q_s {tuple(q_s.shape)}, k_s {tuple(k_s.shape)} and q_t {tuple(q_t.shape)}"
            )
    if causal and N != M:
        raise ValueError(f"causal=True needs as many queries as keys; q_s has N={N}, k_s has M={M}")
    for name, mask, shape in (("key_mask", key_mask, (B, M)), ("query_mask", query_mask, (B, N))):
        if mask is None:
            continue
        if mask.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor, got dtype {mask.dtype}")
        if tuple(mask.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {shape}")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {', '.join(KINDS)}")


def counted_rows(
    B: int, N: int, M: int, causal: bool, key_mask: Tensor | None, query_mask: Tensor | None, device: torch.device
) -> Tensor:
    """(B, N) bool: rows that enter the mean (query kept and at least one visible key).

    A row with no visible key has no attention distribution, so it is excluded rather than NaN.
    """
    keys = torch.ones(B, M, dtype=torch.bool, device=device) if key_mask is None else key_mask.to(device)
    if causal:
        has_key = keys.cumsum(dim=1)[:, :N] > 0  # (B, N): any visible key among j <= i
    else:
        has_key = keys.any(dim=1, keepdim=True).expand(B, N)  # (B, N)
    return has_key if query_mask is None else has_key & query_mask.to(device)


def _visible(
    key_mask: Tensor | None, causal: bool, rows: Tensor, M: int, device: torch.device
) -> Tensor | None:
    """(B or 1, 1, len(rows), M) bool of visible keys for query rows `rows`, or None when all are."""
    visible = None
    if causal:
        visible = (torch.arange(M, device=device)[None, :] <= rows[:, None])[None, None]  # (1, 1, n, M)
    if key_mask is not None:
        keys = key_mask[:, None, None, :]  # (B, 1, 1, M)
        visible = keys if visible is None else visible & keys
    return visible


def _scores(q: Tensor, k: Tensor, scale: float, visible: Tensor | None) -> Tensor:
    """Scaled scores with hidden keys at -inf: (B, H, n, D) x (B, H, M, D) -> (B, H, n, M)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # (B, H, n, M)
    return scores if visible is None else scores.masked_fill_(~visible, float("-inf"))


def _row_values(scores_s: Tensor, scores_t: Tensor, lse_s: Tensor, lse_t: Tensor, kind: str) -> Tensor:
    """Per-row KL or CE from scores and their row log-sum-exps: (B, H, n, M) -> (B, H, n)."""
    logp_s = scores_s - lse_s[..., None]  # (B, H, n, M)
    logp_t = scores_t - lse_t[..., None]  # (B, H, n, M)
    p_t = logp_t.exp()
    terms = p_t * (logp_t - logp_s) if kind == "kl" else -p_t * logp_s
    # 0 log 0 = 0: hidden keys (-inf - -inf) and underflowed teacher entries contribute nothing.
    return torch.where(p_t > 0, terms, 0.0).sum(dim=-1)


def _default_scales(Ds: int, Dt: int, scale_s: float | None, scale_t: float | None) -> tuple[float, float]:
    return (Ds**-0.5 if scale_s is None else float(scale_s), Dt**-0.5 if scale_t is None else float(scale_t))


def attention_kl_naive(
    q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, *,
    scale_s: float | None = None, scale_t: float | None = None, causal: bool = False,
    key_mask: Tensor | None = None, query_mask: Tensor | None = None, kind: str = "kl",
) -> Tensor:
    """Attention-distribution KL/CE with every (B, H, N, M) tensor materialised; the oracle.

    Args:
        q_s: (B, H, N, Ds) student queries.
        k_s: (B, H, M, Ds) student keys.
        q_t: (B, H, N, Dt) teacher queries (detached).
        k_t: (B, H, M, Dt) teacher keys (detached).
        scale_s: student score scale, default Ds ** -0.5.
        scale_t: teacher score scale, default Dt ** -0.5.
        causal: query i sees keys j <= i (needs N == M).
        key_mask: (B, M) bool, False = padding key, hidden from both distributions.
        query_mask: (B, N) bool, False = row left out of the mean.
        kind: "kl" for sum_j p_t log(p_t / p_s), "ce" for -sum_j p_t log p_s.

    Returns:
        Scalar mean of the per-row value over counted rows (b, h, i); 0 when none is counted.
    """
    check_inputs(q_s, k_s, q_t, k_t, causal, key_mask, query_mask, kind)
    B, H, N, Ds = q_s.shape
    M, Dt = k_s.shape[2], q_t.shape[3]
    scale_s, scale_t = _default_scales(Ds, Dt, scale_s, scale_t)
    dtype = compute_dtype(q_s.dtype)
    visible = _visible(key_mask, causal, torch.arange(N, device=q_s.device), M, q_s.device)
    scores_s = _scores(q_s.to(dtype), k_s.to(dtype), scale_s, visible)  # (B, H, N, M)
    scores_t = _scores(q_t.detach().to(dtype), k_t.detach().to(dtype), scale_t, visible)  # (B, H, N, M)
    counted = counted_rows(B, N, M, causal, key_mask, query_mask, q_s.device)[:, None, :].expand(B, H, N)
    # Rows without a visible key are all -inf; a dummy 0 row keeps them finite (they are not counted).
    scores_s = scores_s.masked_fill(~counted[..., None], 0.0)
    scores_t = scores_t.masked_fill(~counted[..., None], 0.0)
    rows = _row_values(scores_s, scores_t, scores_s.logsumexp(-1), scores_t.logsumexp(-1), kind)  # (B, H, N)
    return torch.where(counted, rows, 0.0).sum() / counted.sum().clamp(min=1)


# The two paths of `AttentionKLFn` (functools.partial binds their block sizes):
# forward (q_s, k_s, q_t, k_t, scale_s, scale_t, causal, key_mask, counted (B, N), kind)
#     -> (sum of the counted rows' values, lse_s (B, H, N), lse_t (B, H, N));
# backward (q_s, k_s, q_t, k_t, lse_s, lse_t, counted, grad_scale, scale_s, scale_t, causal, key_mask)
#     -> (dq_s, dk_s), for d(loss)/d(student score) = grad_scale * (p_s - p_t) on counted rows.
AttentionKLForward = Callable[..., tuple[Tensor, Tensor, Tensor]]
AttentionKLBackward = Callable[..., tuple[Tensor, Tensor]]


class AttentionKLFn(torch.autograd.Function):
    """Forward saves the inputs and per-row lse's only; backward recomputes the score tiles.

    The mean over counted rows and the upstream gradient are handled here once; `fwd` and `bwd`
    are the torch block loop (`attention_kl_fwd_ref`/`attention_kl_bwd_ref`) or the Triton
    launchers (`triton.py`).
    """

    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, scale_s, scale_t, causal, key_mask, query_mask, kind,
                fwd: AttentionKLForward, bwd: AttentionKLBackward):
        B, H, N, _ = q_s.shape
        counted = counted_rows(B, N, k_s.shape[2], causal, key_mask, query_mask, q_s.device)  # (B, N)
        total, lse_s, lse_t = fwd(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, key_mask, counted, kind)
        n_rows = counted.sum() * H
        ctx.save_for_backward(q_s, k_s, q_t, k_t, key_mask, counted, lse_s, lse_t)
        ctx.config = (scale_s, scale_t, causal, n_rows, bwd)
        return total / n_rows.clamp(min=1)

    @staticmethod
    def backward(ctx, grad_out):
        q_s, k_s, q_t, k_t, key_mask, counted, lse_s, lse_t = ctx.saved_tensors
        scale_s, scale_t, causal, n_rows, bwd = ctx.config
        # d(row value)/d(student score_ij) = p_s - p_t for both kinds, since sum_j p_t = 1; the
        # mean and score = scale_s * q k^T contribute one scalar factor.
        grad_scale = scale_s * grad_out.to(lse_s.dtype) / n_rows.clamp(min=1)
        dq_s, dk_s = bwd(q_s, k_s, q_t, k_t, lse_s, lse_t, counted, grad_scale, scale_s, scale_t, causal, key_mask)
        return dq_s, dk_s, *([None] * 10)


def attention_kl_fwd_ref(
    q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, scale_s: float, scale_t: float, causal: bool,
    key_mask: Tensor | None, counted: Tensor, kind: str, block_rows: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Query-block loop keeping per-row lse's only; see `AttentionKLForward`.

    Block tensors are updated in place so that only two or three (B, H, block, M) tiles are live.
    """
    B, H, N, _ = q_s.shape
    dtype = compute_dtype(q_s.dtype)
    lse_s = q_s.new_zeros(B, H, N, dtype=dtype)
    lse_t = q_s.new_zeros(B, H, N, dtype=dtype)
    total = q_s.new_zeros((), dtype=dtype)
    for start in range(0, N, block_rows):
        stop = min(start + block_rows, N)
        s_s, s_t = _block_scores(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, key_mask, start, stop, dtype)
        lse_s[:, :, start:stop] = _finite_lse(s_s)
        lse_t[:, :, start:stop] = _finite_lse(s_t)
        logp_s = s_s.sub_(lse_s[:, :, start:stop, None])  # (B, H, n, m)
        logp_t = s_t.sub_(lse_t[:, :, start:stop, None])  # (B, H, n, m)
        p_t = logp_t.exp()  # (B, H, n, m)
        terms = logp_t.sub_(logp_s) if kind == "kl" else logp_s.neg_()
        terms = terms.mul_(p_t).masked_fill_(p_t == 0, 0.0)  # 0 log 0 = 0, hidden keys included
        total += terms.sum(dim=-1).masked_fill_(~counted[:, None, start:stop], 0.0).sum()
    return total, lse_s, lse_t


def attention_kl_bwd_ref(
    q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, lse_s: Tensor, lse_t: Tensor, counted: Tensor,
    grad_scale: Tensor, scale_s: float, scale_t: float, causal: bool, key_mask: Tensor | None, block_rows: int,
) -> tuple[Tensor, Tensor]:
    """dq_s and dk_s block by block, each block's scores recomputed; see `AttentionKLBackward`."""
    dtype = lse_s.dtype
    N = q_s.shape[2]
    row_weight = counted.to(dtype) * grad_scale  # (B, N)
    dq_s = torch.zeros_like(q_s, dtype=dtype)
    dk_s = torch.zeros_like(k_s, dtype=dtype)
    k_s_c = k_s.to(dtype)
    for start in range(0, N, block_rows):
        stop = min(start + block_rows, N)
        s_s, s_t = _block_scores(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, key_mask, start, stop, dtype)
        p_s = s_s.sub_(lse_s[:, :, start:stop, None]).exp_()  # (B, H, n, m)
        p_t = s_t.sub_(lse_t[:, :, start:stop, None]).exp_()  # (B, H, n, m)
        grad_scores = p_s.sub_(p_t).mul_(row_weight[:, None, start:stop, None])  # (B, H, n, m)
        keys = _block_keys(causal, stop, k_s.shape[2])
        dq_s[:, :, start:stop] = grad_scores @ k_s_c[:, :, keys]  # (B, H, n, Ds)
        dk_s[:, :, keys] += grad_scores.transpose(-1, -2) @ q_s[:, :, start:stop].to(dtype)  # (B, H, m, Ds)
    return dq_s.to(q_s.dtype), dk_s.to(k_s.dtype)


def _finite_lse(scores: Tensor) -> Tensor:
    """Row log-sum-exp, 0 for rows with no visible key (all -inf) so later exp() stays finite."""
    lse = scores.logsumexp(dim=-1)  # (B, H, n)
    return lse.masked_fill_(lse == float("-inf"), 0.0)


def _block_scores(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, key_mask, start, stop, dtype) -> tuple[Tensor, Tensor]:
    """Student and teacher scores of query rows start:stop, two (B, H, n, m) tensors, hidden keys -inf.

    Causal rows before `stop` see no key at or past it, so only the first m = stop keys are
    scored (m = M otherwise); callers slice keys with `_block_keys` to match.
    """
    keys = _block_keys(causal, stop, k_s.shape[2])
    mask = None if key_mask is None else key_mask[:, keys]
    visible = _visible(mask, causal, torch.arange(start, stop, device=q_s.device), keys.stop, q_s.device)
    s_s = _scores(q_s[:, :, start:stop].to(dtype), k_s[:, :, keys].to(dtype), scale_s, visible)  # (B, H, n, m)
    s_t = _scores(q_t[:, :, start:stop].to(dtype), k_t[:, :, keys].to(dtype), scale_t, visible)  # (B, H, n, m)
    return s_s, s_t


def _block_keys(causal: bool, stop: int, M: int) -> slice:
    return slice(0, stop if causal else M)


def default_block_rows(B: int, H: int, M: int) -> int:
    """Query rows per block so one (B, H, rows, M) tile holds about TILE_ELEMENTS values."""
    return max(16, TILE_ELEMENTS // max(1, B * H * M))


def attention_kl_ref(
    q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, *,
    scale_s: float | None = None, scale_t: float | None = None, causal: bool = False,
    key_mask: Tensor | None = None, query_mask: Tensor | None = None, kind: str = "kl",
    block_rows: int | None = None,
) -> Tensor:
    """Memory-flat torch path of `attention_kl` (same arguments), `block_rows` query rows at a time.

    Peak memory is about three (B, H, block_rows, M) tiles in forward and in backward, plus the
    (B, H, M, Ds) dk_s accumulator. The default block keeps a tile near 8 MiB of float32
    (75 rows at B=1, H=12, M=2304; never fewer than 16), so the peak does not grow with N.
    """
    check_inputs(q_s, k_s, q_t, k_t, causal, key_mask, query_mask, kind)
    B, H, N, Ds = q_s.shape
    M, Dt = k_s.shape[2], q_t.shape[3]
    scale_s, scale_t = _default_scales(Ds, Dt, scale_s, scale_t)
    block_rows = default_block_rows(B, H, M) if block_rows is None else block_rows
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    return AttentionKLFn.apply(
        q_s, k_s, q_t.detach(), k_t.detach(), scale_s, scale_t, causal, key_mask, query_mask, kind,
        partial(attention_kl_fwd_ref, block_rows=block_rows), partial(attention_kl_bwd_ref, block_rows=block_rows),
    )
