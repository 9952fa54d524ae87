"""Fused LM head + logit distillation in torch: the oracle and the memory-flat CPU path.

`fused_linear_kd_naive` materialises the student's (N, V) logits and calls `losses/logit.py`
(the spec). `fused_linear_kd_ref` walks row chunks, computing each chunk's loss and gradients
during the forward pass, so peak memory is O(chunk * V + V * H). The chunk loop, the input
checks, the reduction and the autograd Function (`FusedLinearKDFn`) live here once; `triton.py`
only swaps the per-chunk divergence and the backward scaling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from losses.logit import (
    TVD_TIE_RTOL,
    check_divergence_options,
    check_topk_ids,
    divergence_dtype,
    forward_kl,
    jsd,
    reverse_kl,
    sparse_divergence,
    tvd,
)

REDUCTIONS = ("mean", "sum")
# Default chunk: rows whose float32 logits take about this many bytes.
CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class KDOptions:
    """The non-tensor arguments of `fused_linear_kd`, after validation."""

    kind: str
    temperature: float
    beta: float
    reduction: str
    chunk_size: int


@dataclass(frozen=True)
class TeacherRows:
    """The teacher's targets: dense logits (N, V), or a top-k (N, K) with an optional rest (N,)."""

    logits: Tensor | None = None
    topk_ids: Tensor | None = None
    topk_logp: Tensor | None = None
    rest_logp: Tensor | None = None

    @property
    def sparse(self) -> bool:
        return self.logits is None

    def rows(self, sel: slice | Tensor) -> TeacherRows:
        """The teacher rows at `sel` (a slice or a LongTensor of row indices), detached."""

        def pick(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.detach()[sel]

        return TeacherRows(pick(self.logits), pick(self.topk_ids), pick(self.topk_logp), pick(self.rest_logp))


# Per-chunk divergence: (logits (n, V) in the compute dtype, which it may overwrite, teacher
# rows, options, a row's weight in the reduction, whether to return a gradient)
# -> (sum of the n row values, d(row weight * sum)/d logits (n, V) or None).
ChunkDivergence = Callable[[Tensor, TeacherRows, KDOptions, float, bool], tuple[Tensor, Tensor | None]]
# Backward of a path: (grad_output, then grad_hidden, grad_weight, grad_bias as stored for
# grad_output = 1, each possibly None) -> those gradients times grad_output.
ScaleGrads = Callable[..., tuple[Tensor | None, ...]]


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def check_inputs(
    hidden: Tensor,
    weight: Tensor,
    teacher_logits: Tensor | None,
    topk_ids: Tensor | None,
    topk_logp: Tensor | None,
    rest_logp: Tensor | None,
    bias: Tensor | None,
    labels: Tensor | None,
    kind: str,
    temperature: float,
    beta: float,
    reduction: str,
    chunk_size: int | None,
) -> KDOptions:
    """Validate shapes and options (ValueError naming the tensors); return the options.

    JSD's endpoints become the KL they equal (beta = 0 forward, beta = 1 reverse), as in
    `losses.logit.jsd`, so the kernels only see strict 0 < beta < 1.
    """
    check_divergence_options(kind, temperature, beta)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, H) and weight (V, H); got hidden {_shape(hidden)}, weight {_shape(weight)}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    n, vocab = hidden.shape[0], weight.shape[0]
    if bias is not None and _shape(bias) != (vocab,):
        raise ValueError(f"bias must be (V,) = ({vocab},) like weight {_shape(weight)}, got bias {_shape(bias)}")
    if labels is not None and _shape(labels) != (n,):
        raise ValueError(f"labels must be (N,) = ({n},) like hidden {_shape(hidden)}, got labels {_shape(labels)}")
    _check_teacher(n, vocab, teacher_logits, topk_ids, topk_logp, rest_logp)
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    chunk = chunk_size if chunk_size is not None else max(1, CHUNK_BYTES // (4 * vocab))
    return KDOptions(kind, float(temperature), float(beta), reduction, chunk)


def _check_teacher(
    n: int, vocab: int, teacher_logits: Tensor | None, topk_ids: Tensor | None,
    topk_logp: Tensor | None, rest_logp: Tensor | None,
) -> None:
    sparse_given = topk_ids is not None or topk_logp is not None
    if (teacher_logits is None) == (not sparse_given):
        raise ValueError("give exactly one teacher: teacher_logits (N, V), or topk_ids and topk_logp (N, K)")
    if teacher_logits is not None:
        if rest_logp is not None:
            raise ValueError("rest_logp belongs to a top-k teacher; it cannot go with dense teacher_logits")
        if _shape(teacher_logits) != (n, vocab):
            raise ValueError(
                f"teacher_logits must be (N, V) = ({n}, {vocab}) like hidden (N, H) and weight (V, H), "
                f"got teacher_logits {_shape(teacher_logits)}"
            )
        return
    if topk_ids is None or topk_logp is None:
        raise ValueError("a top-k teacher needs both topk_ids and topk_logp")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or _shape(topk_logp) != _shape(topk_ids):
        raise ValueError(
            f"topk_ids and topk_logp must both be (N, K) with N = {n}; got topk_ids {_shape(topk_ids)}, "
            f"topk_logp {_shape(topk_logp)}"
        )
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor, got dtype {topk_ids.dtype}")
    if not 0 < topk_ids.shape[1] <= vocab:
        raise ValueError(f"top-k size K = {topk_ids.shape[1]} (topk_ids {_shape(topk_ids)}) must be in [1, V = {vocab}]")
    if rest_logp is not None and _shape(rest_logp) != (n,):
        raise ValueError(f"rest_logp must be (N,) = ({n},), got rest_logp {_shape(rest_logp)}")


def _dense_mean(logits: Tensor, teacher: Tensor, mask: Tensor | None, options: KDOptions) -> Tensor:
    """The `losses/logit.py` divergence of `options.kind`: tau**2 * D, a mean over kept rows."""
    tau = options.temperature
    if options.kind == "jsd":
        return jsd(logits, teacher, mask, tau, options.beta)
    divergence = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "tvd": tvd}[options.kind]
    return divergence(logits, teacher, mask, tau)


def _row_dot(x: Tensor, y: Tensor) -> Tensor:
    """sum_v x * y per row, (n, V) x2 -> (n,), as a batched matmul: no (n, V) product is stored."""
    return torch.bmm(x[:, None, :], y[:, :, None]).view(-1)


def _kl_rows(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row with 0 * log 0 = 0, as losses.logit._kl_rows: (n, V) x3 -> (n,)."""
    log_ratio = (log_p - log_q).masked_fill_(p == 0, 0.0)  # (n, V); p = 0 with log p = -inf is not NaN
    return _row_dot(p, log_ratio)


def dense_chunk_divergence(
    logits: Tensor, teacher: Tensor, options: KDOptions, row_weight: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """A chunk's summed divergence against dense teacher logits and d/d logits, in closed form.

    With s = z / tau, p_S = softmax(s) and the row value tau**2 * D, the gradient wrt z is
    tau * dD/ds. dD/ds is p_S - p_T for the forward KL, and p_S * (a - sum_v p_S a) otherwise
    (the softmax chain rule), with a = dD/dp_S up to a constant: log p_S - log p_T (reverse
    KL), (1 - beta) log(p_S / M) (JSD, M = beta p_T + (1 - beta) p_S), 0.5 sign(p_S - p_T)
    (TVD; 0 at ties, `losses.logit.TVD_TIE_RTOL`). The logits buffer turns into log p_S, then p_S, then the gradient in place, so
    about four (n, V) buffers are alive at once where autograd through losses/logit.py would
    keep about fifteen; the tests check these forms against that autograd (the oracle).

    Args:
        logits: (n, V) student logits in the compute dtype; overwritten (it becomes the gradient).
        teacher: (n, V) teacher logits, any float dtype.
        options: validated options (kind never "jsd" at beta 0 or 1).
        row_weight: the reduction's weight of a row (1 / kept rows for "mean", 1 for "sum").
        need_grad: False skips the gradient.
    Returns:
        Scalar sum of the n row values tau**2 * D, and (n, V) d(row_weight * sum)/d logits or None.
    """
    tau, beta, kind = options.temperature, options.beta, options.kind
    log_ps = logits.div_(tau)  # (n, V) the caller's buffer, reused
    log_ps -= log_ps.logsumexp(-1, keepdim=True)
    log_pt = teacher.to(log_ps.dtype, copy=True).div_(tau)  # (n, V)
    log_pt -= log_pt.logsumexp(-1, keepdim=True)
    if kind == "forward_kl":
        pt = log_pt.exp()  # (n, V)
        rows = _kl_rows(pt, log_pt, log_ps)  # (n,)
        del log_pt
        grad = log_ps.exp_().sub_(pt)
    elif kind == "reverse_kl":
        a = log_ps - log_pt  # (n, V)
        del log_pt
        ps = log_ps.exp_()  # (n, V)
        a.masked_fill_(ps == 0, 0.0)  # 0 * log 0 = 0
        rows = centre = _row_dot(ps, a)  # (n,) the KL is also the centring sum
        grad = ps.mul_(a.sub_(centre[:, None]))
    elif kind == "jsd":
        # log M by logaddexp: the mixture itself underflows for tiny probabilities
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))  # (n, V)
        kl_t = _kl_rows(log_pt.exp(), log_pt, log_m)  # (n,) KL(p_T || M)
        del log_pt
        a = log_m.neg_().add_(log_ps)  # (n, V) log(p_S / M), in log M's buffer
        ps = log_ps.exp_()  # (n, V)
        a.masked_fill_(ps == 0, 0.0)
        kl_s = _row_dot(ps, a)  # (n,) KL(p_S || M)
        rows = beta * kl_t + (1 - beta) * kl_s
        grad = ps.mul_(a.sub_(kl_s[:, None]).mul_(1 - beta))  # a = (1 - beta) log(p_S / M), centre (1 - beta) KL
    else:
        pt = log_pt.exp_()  # (n, V)
        ps = log_ps.exp_()  # (n, V)
        diff = ps - pt  # (n, V)
        tie = diff.abs() <= torch.maximum(pt, ps, out=pt).mul_(TVD_TIE_RTOL)  # (n, V) rounding-level differences
        del pt, log_pt
        rows = 0.5 * torch.linalg.vector_norm(diff, ord=1, dim=-1)  # (n,)
        a = diff.sign_().masked_fill_(tie, 0.0).mul_(0.5)  # (n, V) sign 0 at ties (losses.logit)
        del tie
        # p_S * a, its row sum, then minus p_S * sum - autograd's order: the centring sum of +-0.5 p
        # terms cancels, and a pairwise sum keeps it ~5x more precise in float32 than `_row_dot`
        grad = a.mul_(ps)  # (n, V)
        grad.sub_(ps.mul_(grad.sum(-1, keepdim=True)))
    total = rows.sum() * tau**2
    return total, grad.mul_(tau * row_weight) if need_grad else None


def sparse_compact_divergence(
    s_k: Tensor, lse_rest: Tensor | None, teacher: TeacherRows, options: KDOptions, row_weight: float,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The K + 1 outcome divergence from the student's top-k logits and its rest log-sum-exp.

    The student's K + 1 log-probabilities depend on its logits only through s_k = z_k / tau
    and lse_rest = logsumexp of z / tau over the other ids. So `sparse_divergence` on the
    compact (n, K + 1) tensor [s_k, lse_rest] with ids 0..K-1 at temperature 1 does the same
    arithmetic as on the full row, and autograd on that small tensor gives the gradients.

    Args:
        s_k: (n, K) tempered student logits at the teacher's top-k ids.
        lse_rest: (n,) tempered log-sum-exp over the other ids; None when K = V.
        teacher: the chunk's teacher rows (top-k log-probs at tau, optional rest).
        options: validated options.
        row_weight: the reduction's weight of a row.
        need_grad: False skips the gradients.
    Returns:
        Scalar sum of row values tau**2 * D; d(row_weight * sum)/d s_k (n, K) and
        d/d lse_rest (n,) (None without need_grad, or for lse_rest when K = V).
    """
    n, k = s_k.shape
    compact = s_k if lse_rest is None else torch.cat([s_k, lse_rest[:, None]], dim=1)  # (n, K[+1])
    ids = torch.arange(k, device=s_k.device).expand(n, k)  # (n, K)
    with torch.enable_grad():
        compact = compact.detach().requires_grad_(need_grad)
        rows = sparse_divergence(
            compact, ids, teacher.topk_logp, options.kind, 1.0, options.beta, teacher.rest_logp
        )  # (n,)
        total = rows.sum() * options.temperature**2
        if not need_grad:
            return total.detach(), None, None
        (grad,) = torch.autograd.grad(total * row_weight, compact)  # (n, K[+1])
    return total.detach(), grad[:, :k], None if lse_rest is None else grad[:, k]


def sparse_chunk_divergence(
    logits: Tensor, teacher: TeacherRows, options: KDOptions, row_weight: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """A chunk's summed divergence against a top-k teacher and d/d logits.

    Via `sparse_compact_divergence`. d lse_rest / d z_j = softmax over the non-top-k ids / tau,
    so the rest bucket's gradient spreads over those ids; the K top-k gradients are scattered
    to their ids.

    Args:
        logits: (n, V) student logits in the compute dtype; overwritten (it becomes the gradient).
        teacher: the chunk's teacher rows, ids already validated.
        options, row_weight, need_grad: as for `dense_chunk_divergence`.
    Returns:
        Scalar sum of the n row values, and (n, V) d(row_weight * sum)/d logits or None.
    """
    tau = options.temperature
    ids = teacher.topk_ids.long()  # (n, K)
    s = logits.div_(tau)  # (n, V) the caller's buffer, reused
    s_k = s.gather(1, ids)  # (n, K)
    lse_rest = None
    if ids.shape[1] < s.shape[1]:
        lse_rest = s.scatter_(1, ids, float("-inf")).logsumexp(-1)  # (n,) over the non-top-k ids
    total, grad_k, grad_rest = sparse_compact_divergence(s_k, lse_rest, teacher, options, row_weight, need_grad)
    if not need_grad:
        return total, None
    if lse_rest is not None:  # exp(-inf) = 0 leaves the top-k ids at 0 until the scatter
        s.sub_(lse_rest[:, None]).exp_().mul_(grad_rest[:, None] / tau)
    return total, s.scatter_(1, ids, grad_k / tau)


def torch_chunk_divergence(
    logits: Tensor, teacher: TeacherRows, options: KDOptions, row_weight: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Per-chunk divergence of the torch path (see `ChunkDivergence`)."""
    if teacher.sparse:
        return sparse_chunk_divergence(logits, teacher, options, row_weight, need_grad)
    return dense_chunk_divergence(logits, teacher.logits, options, row_weight, need_grad)


def chunked_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher: TeacherRows,
    labels: Tensor | None,
    ignore_index: int,
    options: KDOptions,
    needs_grad: tuple[bool, bool, bool],
    chunk_divergence: ChunkDivergence,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loss and gradients of hidden, weight and bias, one chunk of kept rows at a time.

    Per chunk: logits = h @ W.T + b in the inputs' dtype, upcast to the compute dtype, then
    `chunk_divergence` gives the chunk loss and g = d loss / d logits; g @ W is the chunk's
    grad_hidden, g.T @ h and g.sum(0) accumulate into grad_weight and grad_bias (float32 or
    wider, since bf16 accumulation over many chunks drifts). Nothing of size N * V is alive.

    Args:
        hidden: (N, H). weight: (V, H). bias: (V,) or None.
        teacher: the teacher's rows (all N).
        labels: (N,) or None; rows with labels == ignore_index are skipped.
        ignore_index: the label value of skipped rows.
        options: validated options.
        needs_grad: whether hidden, weight, bias need gradients.
        chunk_divergence: the per-chunk divergence (torch or Triton).
    Returns:
        Scalar loss in the compute dtype, then grad_hidden (N, H), grad_weight (V, H),
        grad_bias (V,) in their inputs' dtypes (None where not needed), for grad_output = 1.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    matmul_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if bias is not None:
        matmul_dtype = torch.promote_types(matmul_dtype, bias.dtype)
    compute_dtype = divergence_dtype(matmul_dtype)
    w = weight.detach().to(matmul_dtype)  # (V, H)
    b = None if bias is None else bias.detach().to(matmul_dtype)  # (V,)
    kept = None if labels is None else (labels != ignore_index).nonzero().squeeze(1)  # (M,)
    n_kept = n if kept is None else kept.numel()
    if teacher.sparse:
        check_topk_ids(teacher.topk_ids if kept is None else teacher.topk_ids[kept], vocab)
    need_h, need_w, need_b = needs_grad
    need_b = need_b and bias is not None
    grad_h = torch.zeros_like(hidden) if need_h else None  # (N, H); ignored rows stay 0
    grad_w = torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device) if need_w else None  # (V, H)
    grad_b = torch.zeros(vocab, dtype=compute_dtype, device=weight.device) if need_b else None  # (V,)
    loss = torch.zeros((), dtype=compute_dtype, device=hidden.device)
    row_weight = 1.0 / max(n_kept, 1) if options.reduction == "mean" else 1.0
    any_grad = need_h or need_w or need_b
    for start in range(0, n_kept, options.chunk_size):
        stop = min(start + options.chunk_size, n_kept)
        sel = slice(start, stop) if kept is None else kept[start:stop]
        h = hidden.detach()[sel].to(matmul_dtype)  # (n, H)
        # upcast at once so the inputs'-dtype logits are freed before the divergence runs
        logits = (h @ w.T if b is None else torch.addmm(b, h, w.T)).to(compute_dtype)  # (n, V)
        chunk_loss, g = chunk_divergence(logits, teacher.rows(sel), options, row_weight, any_grad)
        del logits  # both paths write g into this buffer; g keeps it alive until the matmuls
        loss += chunk_loss
        if g is None:
            continue
        if grad_b is not None:
            grad_b += g.sum(0)
        g = g.to(matmul_dtype)  # (n, V); the matmuls run in the inputs' dtype, like the forward
        if grad_h is not None:
            grad_h[sel] = (g @ w).to(grad_h.dtype)
        if grad_w is not None:
            if grad_w.dtype == g.dtype:
                grad_w.addmm_(g.T, h)  # no (V, H) temporary
            else:
                grad_w += g.T @ h
    if options.reduction == "mean" and n_kept > 0:
        loss = loss / n_kept
    grad_w = None if grad_w is None else grad_w.to(weight.dtype)
    grad_b = None if grad_b is None else grad_b.to(bias.dtype)
    return loss, grad_h, grad_w, grad_b


def scale_grads(grad_output: Tensor, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
    """The stored grad_output = 1 gradients times the actual (scalar) grad_output."""
    # A 0-d grad_output keeps its precision in the product (no rounding of 1.7 to bf16 first).
    return tuple(None if g is None else g * grad_output for g in grads)


class FusedLinearKDFn(torch.autograd.Function):
    """Computes loss and input gradients in forward (`chunked_forward` with the path's per-chunk
    divergence); backward only scales them by grad_output (with the path's `scale`).

    The torch path passes `torch_chunk_divergence` and `scale_grads`; the Triton path its
    kernels' `triton_chunk_divergence` and `fused_linear_kd_bwd`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_logits, topk_ids, topk_logp, rest_logp, labels,
                ignore_index, options, grad_enabled, chunk_divergence: ChunkDivergence, scale: ScaleGrads):
        teacher = TeacherRows(teacher_logits, topk_ids, topk_logp, rest_logp)
        needs = tuple(grad_enabled and need for need in ctx.needs_input_grad[:3])
        loss, *grads = chunked_forward(
            hidden, weight, bias, teacher, labels, ignore_index, options, needs, chunk_divergence
        )
        ctx.save_for_backward(*grads)
        ctx.scale = scale
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return *ctx.scale(grad_output, *ctx.saved_tensors), *([None] * 10)


def fused_linear_kd_ref(
    hidden: Tensor,
    weight: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    topk_ids: Tensor | None = None,
    topk_logp: Tensor | None = None,
    rest_logp: Tensor | None = None,
    bias: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """Chunked torch path of `kernels.fused_linear_kd.fused_linear_kd` (same arguments and result).

    Holds one chunk of (chunk_size, V) logits and a few buffers of that size at a time; the
    gradients wrt the chunk logits are closed forms (dense) or autograd on the (n, K + 1)
    outcomes (top-k). See `kernels.fused_linear_kd.fused_linear_kd` for the arguments.

    Returns:
        Scalar loss in the compute dtype (float32, or float64 for float64 inputs).
    """
    options = check_inputs(
        hidden, weight, teacher_logits, topk_ids, topk_logp, rest_logp, bias, labels,
        kind, temperature, beta, reduction, chunk_size,
    )
    return FusedLinearKDFn.apply(
        hidden, weight, bias, teacher_logits, topk_ids, topk_logp, rest_logp, labels,
        ignore_index, options, torch.is_grad_enabled(), torch_chunk_divergence, scale_grads,
    )


def fused_linear_kd_naive(
    hidden: Tensor,
    weight: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    topk_ids: Tensor | None = None,
    topk_logp: Tensor | None = None,
    rest_logp: Tensor | None = None,
    bias: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """The oracle: full (N, V) student logits, then the `losses/logit.py` function of `kind`.

    `chunk_size` is accepted for a matching signature and ignored. Memory is O(N * V) plus
    autograd's saved activations; this is the "naive torch" baseline of the benchmark.

    Returns:
        Scalar loss in the compute dtype.
    """
    options = check_inputs(
        hidden, weight, teacher_logits, topk_ids, topk_logp, rest_logp, bias, labels,
        kind, temperature, beta, reduction, chunk_size,
    )
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T  # (N, V)
    if bias is not None:
        logits = logits + bias
    mask = None if labels is None else labels != ignore_index  # (N,)
    n_kept = logits.shape[0] if mask is None else int(mask.sum())
    if teacher_logits is not None:
        loss = _dense_mean(logits, teacher_logits, mask, options)  # exact 0 when no row is kept
        return loss * n_kept if options.reduction == "sum" else loss
    keep = slice(None) if mask is None else mask
    if n_kept == 0:
        return logits[keep].to(divergence_dtype(logits.dtype)).sum()  # exact 0, attached to the graph
    rest = None if rest_logp is None else rest_logp[keep]
    rows = sparse_divergence(logits[keep], topk_ids[keep], topk_logp[keep], kind, temperature, beta, rest)  # (M,)
    return rows.mean() if options.reduction == "mean" else rows.sum()
