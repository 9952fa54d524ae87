"""Logit-distillation losses: forward/reverse KL, generalized JSD, TVD and token cross-entropy.

Pure torch, no Lightning and no IO. Masking, dtype, temperature and per-token averaging are
written once in `_divergence_loss`; each divergence is a small per-row function of the two
log-distributions. `sparse_divergence` applies the same row functions to a cached top-k
teacher (K ids + one rest bucket). `losses/divergence.py` wraps them as loss terms.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

RowDivergence = Callable[[Tensor, Tensor], Tensor]


def divergence_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype divergences are computed in: float32, or wider when the inputs are."""
    # bf16/fp16 softmax over a large vocabulary loses the tail mass the divergences live on;
    # float64 inputs (tests) stay float64.
    return torch.promote_types(dtype, torch.float32)


def check_divergence_options(kind: str | None = None, temperature: float = 1.0, beta: float = 0.5,
                             kinds: tuple[str, ...] | None = None) -> None:
    """The one check of a divergence's options, used by the functions here, the fused kernel
    (`kernels.fused_linear_kd`) and the loss terms (`losses/divergence.py`): `kind` one of
    `kinds` (default: the divergences a top-k teacher serves), tau > 0, beta in [0, 1]."""
    kinds = SPARSE_DIVERGENCES if kinds is None else kinds
    if kind is not None and kind not in kinds:
        raise ValueError(f"unknown divergence {kind!r}; valid: {', '.join(kinds)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def _keep_rows(x: Tensor, mask: Tensor | None, event_shape: tuple[int, ...]) -> Tensor:
    """Rows of `x` at kept positions, flattened over the leading dims.

    Args:
        x: (..., *event_shape) tensor.
        mask: (...) bool, True = keep; None keeps every position.
        event_shape: trailing shape of one row, e.g. (V,) for logits or () for targets.
    Returns:
        (N, *event_shape) kept rows, N = number of kept positions.
    """
    if mask is None:
        return x.reshape(-1, *event_shape)
    return x[mask]


def _check_mask(mask: Tensor | None, leading_shape: torch.Size) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool:
        # An integer mask would index rows by value instead of selecting them.
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.shape != leading_shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but logits have leading shape {tuple(leading_shape)}")


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.dim() == 0 or teacher_logits.dim() == 0:
        raise ValueError("logits need a trailing vocabulary dimension, got a 0-d tensor")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student_logits has shape {tuple(student_logits.shape)} but teacher_logits has shape "
            f"{tuple(teacher_logits.shape)}; leading dims must match"
        )
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"teacher has {teacher_logits.shape[-1]} classes, student {student_logits.shape[-1]}")


def _divergence_loss(
    row_divergence: RowDivergence,
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    temperature: float,
) -> Tensor:
    """The one place where masking, dtype, temperature and averaging are decided.

    Kept rows are selected before the softmax so that memory scales with the number of kept
    tokens, not with B * L. Both logits are divided by `temperature`, and the divergence is
    multiplied by `temperature**2` so gradient magnitudes stay comparable across temperatures
    (Hinton et al., 2015). The teacher is detached: it never receives gradients.

    Args:
        row_divergence: maps (N, V) student and teacher log-probabilities to (N,) divergences.
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits, same shape.
        mask: (...) bool, True = token counts; None = every token counts.
        temperature: softmax temperature tau > 0.
    Returns:
        Scalar: tau**2 * (sum of per-token divergences over kept tokens) / (number of kept
        tokens). Exactly 0, still attached to the student's graph, when no token is kept.
    """
    check_divergence_options(temperature=temperature)
    _check_logits(student_logits, teacher_logits)
    _check_mask(mask, student_logits.shape[:-1])
    vocab = (student_logits.shape[-1],)
    dtype = divergence_dtype(student_logits.dtype)
    student = _keep_rows(student_logits, mask, vocab).to(dtype)  # (N, V)
    teacher = _keep_rows(teacher_logits.detach(), mask, vocab).to(dtype)  # (N, V)
    if student.shape[0] == 0:
        return student.sum()  # empty sum: an exact 0 whose backward gives zero gradients
    log_p_s = F.log_softmax(student / temperature, dim=-1)  # (N, V)
    log_p_t = F.log_softmax(teacher / temperature, dim=-1)  # (N, V)
    return row_divergence(log_p_s, log_p_t).mean() * temperature**2


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row, with 0 * log 0 = 0.

    Args:
        log_p, log_q: (N, V) log-probabilities.
    Returns:
        (N,) divergences.
    """
    p = log_p.exp()
    # where(), not nan_to_num: classes with p = 0 (e.g. -inf logits) must add 0, not NaN, and
    # zeroing the difference before the product keeps their gradient finite too.
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * log_ratio).sum(-1)


def _jsd_rows(log_p_s: Tensor, log_p_t: Tensor, beta: float) -> Tensor:
    """Generalized JSD per row with mixture M = beta * p_T + (1 - beta) * p_S, 0 < beta < 1.

    Args:
        log_p_s, log_p_t: (N, V) student and teacher log-probabilities.
        beta: mixture weight of the teacher, strictly between 0 and 1.
    Returns:
        (N,) beta * KL(p_T || M) + (1 - beta) * KL(p_S || M).
    """
    # log M by logsumexp: exp() then log() of the mixture underflows for tiny probabilities.
    # Classes neither distribution reaches (both -inf, e.g. a padded vocabulary) add nothing,
    # but logsumexp(-inf, -inf) has a NaN gradient: they enter the mixture as 0 instead.
    neither = torch.isneginf(log_p_s) & torch.isneginf(log_p_t)  # (N, V)
    log_m = torch.logsumexp(
        torch.stack([(log_p_t + math.log(beta)).masked_fill(neither, 0.0),
                     (log_p_s + math.log1p(-beta)).masked_fill(neither, 0.0)]), dim=0
    )  # (N, V)
    return beta * _kl_rows(log_p_t, log_m) + (1 - beta) * _kl_rows(log_p_s, log_m)


# |p_S - p_T| has no derivative where p_S = p_T, and two float32 computations of the same
# logits (another chunking, another kernel) give probabilities that differ by ~1e-6 relative,
# so the sign there is rounding noise of magnitude 0.5 p. Differences within TVD_TIE_RTOL of the
# larger probability count as ties: they add their (tiny) value to the loss and no gradient
# (sign 0, a subgradient at equality). All TVD paths - dense, sparse, fused torch, Triton - share it.
TVD_TIE_RTOL = 1e-4


def _tvd_rows(log_p_s: Tensor, log_p_t: Tensor) -> Tensor:
    """Total variation distance per row: 0.5 * sum_v |p_T - p_S|, in [0, 1]; ties (within
    `TVD_TIE_RTOL`) pass no gradient.

    Args:
        log_p_s, log_p_t: (N, V) student and teacher log-probabilities.
    Returns:
        (N,) distances.
    """
    p_s, p_t = log_p_s.exp(), log_p_t.exp()  # (N, V)
    diff = p_t - p_s
    tie = diff.detach().abs() <= TVD_TIE_RTOL * torch.maximum(p_s, p_t).detach()
    return 0.5 * torch.where(tie, diff.detach(), diff).abs().sum(-1)


def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0
) -> Tensor:
    """Forward KL(p_T || p_S): mean-seeking, the classic KD loss.

    Args:
        student_logits: (..., V) student logits; any leading dims.
        teacher_logits: (..., V) teacher logits (detached internally).
        mask: (...) bool, True = token counts; None = all tokens.
        temperature: tau; p = softmax(logits / tau) and the result is scaled by tau**2.
    Returns:
        Scalar per-token mean over kept tokens (0 when none is kept).
    """
    return _divergence_loss(lambda s, t: _kl_rows(t, s), student_logits, teacher_logits, mask, temperature)


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0
) -> Tensor:
    """Reverse KL(p_S || p_T): mode-seeking (MiniLLM-style).

    Args:
        student_logits: (..., V) student logits; any leading dims.
        teacher_logits: (..., V) teacher logits (detached internally).
        mask: (...) bool, True = token counts; None = all tokens.
        temperature: tau; p = softmax(logits / tau) and the result is scaled by tau**2.
    Returns:
        Scalar per-token mean over kept tokens (0 when none is kept).
    """
    return _divergence_loss(_kl_rows, student_logits, teacher_logits, mask, temperature)


def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> Tensor:
    """Generalized Jensen-Shannon divergence, as in TRL's GKD trainer (`generalized_jsd_loss`).

    With M = beta * p_T + (1 - beta) * p_S, JSD_beta = beta * KL(p_T || M) + (1 - beta) *
    KL(p_S || M); beta = 0.5 is the symmetric JSD. JSD_beta itself tends to 0 at both ends;
    JSD_beta / beta -> KL(p_T || p_S) as beta -> 0 and JSD_beta / (1 - beta) -> KL(p_S || p_T)
    as beta -> 1. Following TRL, exactly beta = 0 returns the forward KL and beta = 1 the
    reverse KL (unscaled, so the value jumps at the endpoints).

    Args:
        student_logits: (..., V) student logits; any leading dims.
        teacher_logits: (..., V) teacher logits (detached internally).
        mask: (...) bool, True = token counts; None = all tokens.
        temperature: tau; p = softmax(logits / tau) and the result is scaled by tau**2.
        beta: teacher weight in the mixture, 0 <= beta <= 1.
    Returns:
        Scalar per-token mean over kept tokens (0 when none is kept).
    """
    check_divergence_options(temperature=temperature, beta=beta)
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, temperature)
    return _divergence_loss(
        lambda s, t: _jsd_rows(s, t, beta), student_logits, teacher_logits, mask, temperature
    )


def tvd(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0
) -> Tensor:
    """Total variation distance 0.5 * sum_v |p_T - p_S| (DistiLLM-style bounded divergence).

    The tau**2 factor is applied here too, like every divergence in this file, so that
    swapping divergences never silently changes the loss scale convention.

    Args:
        student_logits: (..., V) student logits; any leading dims.
        teacher_logits: (..., V) teacher logits (detached internally).
        mask: (...) bool, True = token counts; None = all tokens.
        temperature: tau; p = softmax(logits / tau) and the result is scaled by tau**2.
    Returns:
        Scalar per-token mean over kept tokens (0 when none is kept); at most tau**2.
    """
    return _divergence_loss(_tvd_rows, student_logits, teacher_logits, mask, temperature)


def cross_entropy(student_logits: Tensor, targets: Tensor, mask: Tensor | None = None,
                  label_smoothing: float = 0.0) -> Tensor:
    """Token cross-entropy against integer targets, averaged over kept tokens (no temperature).

    Positions to skip must be removed with `mask`: every kept target must be a valid class id
    (an ignore value such as -100 at a kept position is an error, not a silent skip).

    Args:
        student_logits: (..., V) student logits; any leading dims.
        targets: (...) integer class ids.
        mask: (...) bool, True = token counts; None = all tokens.
        label_smoothing: epsilon; the target is (1 - eps) one-hot + eps uniform, as in
            `F.cross_entropy(label_smoothing=eps)`.
    Returns:
        Scalar per-token mean over kept tokens (0 when none is kept).
    """
    if student_logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"student_logits has shape {tuple(student_logits.shape)} but targets have shape "
            f"{tuple(targets.shape)}; targets must match the leading dims"
        )
    _check_mask(mask, targets.shape)
    logits = _keep_rows(student_logits, mask, (student_logits.shape[-1],))  # (N, V)
    logits = logits.to(divergence_dtype(logits.dtype))
    kept_targets = _keep_rows(targets, mask, ())  # (N,)
    if logits.shape[0] == 0:
        return logits.sum()  # empty sum: an exact 0 whose backward gives zero gradients
    # Written out rather than F.cross_entropy, which would silently zero a kept -100 target
    # while still counting it in the denominator; gather() instead fails on it.
    target_logit = logits.gather(-1, kept_targets.long()[:, None]).squeeze(-1)  # (N,)
    lse = torch.logsumexp(logits, dim=-1)  # (N,)
    nll = lse - target_logit
    if label_smoothing:
        nll = (1 - label_smoothing) * nll + label_smoothing * (lse - logits.mean(-1))
    return nll.mean()


def soft_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0
) -> Tensor:
    """Soft-target cross-entropy -sum_v p_T log p_S at temperature tau, *without* tau**2.

    MiniViT's (Mini-Swin) prediction-logit loss. It equals forward KL / tau**2 plus the
    teacher's entropy, so its gradient is the forward KL's divided by tau**2.

    Args:
        student_logits, teacher_logits: (..., V); mask: (...) bool or None; temperature: tau.
    Returns:
        Scalar mean over kept rows (0 when none is kept).
    """
    def rows(log_p_s: Tensor, log_p_t: Tensor) -> Tensor:
        p_t = log_p_t.exp()
        return -torch.where(p_t > 0, p_t * log_p_s, torch.zeros_like(p_t)).sum(-1)  # 0 * log 0 = 0

    return _divergence_loss(rows, student_logits, teacher_logits, mask, temperature) / temperature**2



SPARSE_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
# Where r (the teacher's mass outside its top-k) rounds to 0 although K < V, the reverse KL
# takes log r at this floor instead of -inf, so very peaked teachers give a finite loss.
_MIN_REST_MASS = 1e-30


def _check_sparse_target(student_logits: Tensor, topk_ids: Tensor, topk_logp: Tensor) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be (N, V), got shape {tuple(student_logits.shape)}")
    n, vocab = student_logits.shape
    if topk_ids.dim() != 2 or topk_ids.shape != topk_logp.shape or topk_ids.shape[0] != n:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_logp {tuple(topk_logp.shape)} must both be (N, K) "
            f"with N = {n} rows like student_logits {tuple(student_logits.shape)}"
        )
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor, got dtype {topk_ids.dtype}")
    k = topk_ids.shape[1]
    if not 0 < k <= vocab:
        raise ValueError(f"top-k size K = {k} must be in [1, V = {vocab}]")
    check_topk_ids(topk_ids, vocab)


def check_topk_ids(topk_ids: Tensor, vocab: int) -> None:
    """Every id lies in [0, V) and the K ids of a row are distinct.

    Args:
        topk_ids: (N, K) integer ids (only the rows that are used).
        vocab: V.
    """
    if topk_ids.numel() == 0:
        return
    low, high = topk_ids.min().item(), topk_ids.max().item()
    if low < 0 or high >= vocab:
        raise ValueError(f"topk_ids must lie in [0, {vocab}), got values in [{low}, {high}]")
    ids = topk_ids.sort(dim=-1).values  # (N, K)
    if (ids[:, 1:] == ids[:, :-1]).any():
        # A repeated id would count its probability twice and make the K + 1 outcomes overlap.
        raise ValueError("topk_ids repeat an id within a row; a top-k target must list K distinct ids")


def _sparse_log_probs(
    student_logits: Tensor, topk_ids: Tensor, topk_logp: Tensor, temperature: float, rest_floor: float,
    rest_logp: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities over K + 1 outcomes: the top-k ids, then the rest.

    The student's rest mass is a logsumexp over its logits outside the top-k ids (set to -inf
    by a scatter), not 1 - sum(p_k): that subtraction cancels catastrophically when the top-k
    holds nearly all the mass, and its gradient p_j / (1 - sum(p_k)) is then unbounded in
    floating point; this form is exact, its gradient bounded, and it keeps one (N, V) tensor
    for backward, like a plain log_softmax.

    Args:
        student_logits: (N, V) student logits in the compute dtype.
        topk_ids: (N, K) distinct token ids per row.
        topk_logp: (N, K) teacher log-probabilities at those ids, at `temperature`.
        temperature: tau applied to the student logits.
        rest_floor: lower bound for the teacher's rest mass r (0 keeps r = 0 as log r = -inf).
        rest_logp: (N,) log r as the teacher computed it (exact), or None to derive
            r = 1 - sum(exp(topk_logp)) here.
    Returns:
        (N, K') student and teacher log-probabilities, K' = K + 1; K' = K when K = V, where
        there is no rest outcome and the teacher's computed rest mass is rounding error.
    """
    ids = topk_ids.long()
    z = student_logits / temperature  # (N, V)
    z_k = z.gather(-1, ids)  # (N, K)
    lse_k = torch.logsumexp(z_k, dim=-1)  # (N,)
    log_t_k = topk_logp.detach().to(z.dtype)  # (N, K)
    if ids.shape[1] == z.shape[1]:
        return z_k - lse_k[:, None], log_t_k
    lse_rest = torch.logsumexp(z.scatter(-1, ids, float("-inf")), dim=-1)  # (N,)
    lse_all = torch.logaddexp(lse_k, lse_rest)  # (N,)
    log_s = torch.cat([z_k, lse_rest[:, None]], dim=-1) - lse_all[:, None]  # (N, K + 1)
    if rest_logp is not None:
        log_rest_t = rest_logp.detach().to(z.dtype)  # (N,)
        if rest_floor > 0:
            log_rest_t = log_rest_t.clamp(min=math.log(rest_floor))
    else:
        rest_t = -torch.expm1(torch.logsumexp(log_t_k, dim=-1))  # (N,) r = 1 - sum_k p_T,k
        log_rest_t = rest_t.clamp(min=rest_floor).log()  # (N,) -inf where r = 0 and no floor
    return log_s, torch.cat([log_t_k, log_rest_t[:, None]], dim=-1)


def sparse_divergence(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logp: Tensor,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    rest_logp: Tensor | None = None,
) -> Tensor:
    """A divergence against a cached top-k teacher, with the missing mass as its own outcome.

    Both distributions are coarse-grained to K + 1 outcomes: the teacher's K ids and one
    "everything else" bucket, holding r = 1 - sum(exp(topk_logp)) (clamped at 0) for the
    teacher and the student's probability outside the K ids. A bucket with r = 0 adds nothing
    to the forward KL, JSD or TVD; the reverse KL, which would be infinite there, takes r at
    1e-30 instead. By the data-processing inequality the result is at most the dense
    divergence, and equals it when K = V. Conventions match the dense functions above: the
    student is softened by tau, the result is multiplied by tau**2, JSD's beta is the teacher's
    mixture weight (beta = 0 is the forward KL, beta = 1 the reverse KL), and the arithmetic
    runs in at least float32.

    Args:
        student_logits: (N, V) student logits (gradients flow to these).
        topk_ids: (N, K) integer ids of the teacher's top-k tokens, distinct within a row.
        topk_logp: (N, K) teacher log-probabilities at those ids: log_softmax(teacher_logits /
            tau) over the full vocabulary, then top-k. Detached internally.
        kind: "forward_kl", "reverse_kl", "jsd" or "tvd".
        temperature: tau > 0; must be the temperature `topk_logp` was computed at.
        beta: teacher weight in the JSD mixture, 0 <= beta <= 1; used by "jsd" only.
        rest_logp: (N,) log of the teacher's mass outside its top-k, as cached (exact even
            when that mass is tiny); None derives it as log(1 - sum(exp(topk_logp))).
    Returns:
        (N,) per-row divergences times tau**2, in the compute dtype (float32 or wider).
    """
    check_divergence_options(kind, temperature, beta)
    _check_sparse_target(student_logits, topk_ids, topk_logp)
    if kind == "jsd" and beta in (0.0, 1.0):  # the endpoints, as in the dense `jsd`
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    student = student_logits.to(divergence_dtype(student_logits.dtype))  # (N, V)
    rest_floor = _MIN_REST_MASS if kind == "reverse_kl" else 0.0
    log_s, log_t = _sparse_log_probs(student, topk_ids, topk_logp, temperature, rest_floor, rest_logp)  # (N, K + 1)
    if kind == "forward_kl":
        rows = _kl_rows(log_t, log_s)
    elif kind == "reverse_kl":
        rows = _kl_rows(log_s, log_t)
    elif kind == "jsd":
        rows = _jsd_rows(log_s, log_t, beta)
    else:
        rows = _tvd_rows(log_s, log_t)
    return rows * temperature**2
