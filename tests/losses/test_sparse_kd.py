"""Sparse top-k divergences (`losses.logit.sparse_divergence`) and their use in `LogitDivergenceTerm`.

The oracle is an explicit (K + 1)-outcome reference written with plain torch ops in float64,
differentiated by autograd; the dense divergences in `losses/logit.py` are the K = V limit.
"""

from __future__ import annotations

import pytest
import torch

from losses.divergence import LogitDivergenceTerm
from losses.inputs import IGNORE_INDEX, LossInputs
from losses.logit import forward_kl, jsd, reverse_kl, sparse_divergence, tvd

KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd")
DENSE = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "tvd": tvd}
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=1e-6)}


def logits(*shape: int, seed: int, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen)).to(dtype)


def topk_target(teacher_logits: torch.Tensor, k: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What a cache stores: top-k of log_softmax(teacher / tau) over the full vocabulary."""
    logp, ids = torch.log_softmax(teacher_logits.double() / tau, dim=-1).topk(k, dim=-1)
    return ids, logp


def dense_rows(kind: str, s: torch.Tensor, t: torch.Tensor, tau: float, beta: float) -> torch.Tensor:
    """(N,) dense divergences, one call per row."""
    extra = {"beta": beta} if kind == "jsd" else {}
    return torch.stack([DENSE[kind](s[i], t[i], temperature=tau, **extra) for i in range(s.shape[0])])


def reference_rows(kind: str, s: torch.Tensor, ids, logp, tau: float, beta: float) -> torch.Tensor:
    """(N,) divergences between explicit (K + 1)-outcome distributions, rest = 1 - sum(top-k)."""
    p_s = torch.softmax(s.double() / tau, dim=-1).gather(-1, ids)  # (N, K)
    p_t = logp.double().exp()  # (N, K)
    p_s = torch.cat([p_s, 1 - p_s.sum(-1, keepdim=True)], dim=-1)  # (N, K + 1)
    p_t = torch.cat([p_t, (1 - p_t.sum(-1, keepdim=True)).clamp(min=0)], dim=-1)  # (N, K + 1)

    def kl(p, q):
        return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)

    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        rows = kl(p_t, p_s)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        rows = kl(p_s, p_t)
    elif kind == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        rows = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    else:
        rows = 0.5 * (p_t - p_s).abs().sum(-1)
    return rows * tau**2


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, dtype=torch.float64) -> None:
    """assert_close that names the tensor and prints the max error and mismatch count."""
    tol = TOLERANCE[dtype]
    got, want = got.double(), want.double()
    bad = ~torch.isclose(got, want, **tol)
    assert not bad.any(), (
        f"{name}: {int(bad.sum())}/{bad.numel()} mismatched, max abs error {(got - want).abs().max().item():.3g}"
    )


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau,beta", [(1.0, 0.5), (2.5, 0.3), (0.7, 0.0), (1.3, 1.0)])
def test_full_vocabulary_equals_dense(kind, tau, beta):
    s, t = logits(6, 11, seed=0), logits(6, 11, seed=1, scale=3.0)
    ids, logp = topk_target(t, 11, tau)
    got = sparse_divergence(s, ids, logp, kind, temperature=tau, beta=beta)
    assert got.shape == (6,)
    assert_close(f"{kind} rows", got, dense_rows(kind, s, t, tau, beta))


@pytest.mark.parametrize("kind", KINDS)
def test_row_order_of_ids_does_not_matter(kind):
    s, t = logits(5, 13, seed=2), logits(5, 13, seed=3)
    ids, logp = topk_target(t, 6, 1.5)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    a = sparse_divergence(s, ids, logp, kind, temperature=1.5, beta=0.4)
    b = sparse_divergence(s, ids[:, perm], logp[:, perm], kind, temperature=1.5, beta=0.4)
    assert_close(kind, a, b)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("k", [1, 3, 8, 14])
def test_top_k_is_at_most_dense_data_processing(kind, k):
    s, t = logits(32, 17, seed=4, scale=3.0), logits(32, 17, seed=5, scale=3.0)
    for tau, beta in [(1.0, 0.5), (2.0, 0.2), (0.5, 0.9)]:
        ids, logp = topk_target(t, k, tau)
        sparse = sparse_divergence(s, ids, logp, kind, temperature=tau, beta=beta)
        dense = dense_rows(kind, s, t, tau, beta)
        assert (sparse >= -1e-12).all()
        # With K = V - 1 the two are equal and the rounding of the implicit r decides the sign.
        assert (sparse <= dense + 1e-12).all(), f"{kind} K={k} tau={tau}: {(sparse - dense).max().item():.3g}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau,beta", [(1.0, 0.5), (2.0, 0.25), (1.0, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_and_gradients_match_k_plus_one_reference(kind, tau, beta, dtype):
    n, v, k = 7, 37, 5  # odd shapes
    s = logits(n, v, seed=6, dtype=dtype).requires_grad_()
    s_ref = s.detach().double().requires_grad_()
    ids, logp = topk_target(logits(n, v, seed=7, scale=2.5), k, tau)
    logp = logp.to(torch.float32 if dtype == torch.float32 else torch.float64)
    upstream = logits(n, seed=8, scale=1.0) + 1.5  # grad_output != 1, different per row

    got = sparse_divergence(s, ids, logp, kind, temperature=tau, beta=beta)
    want = reference_rows(kind, s_ref, ids, logp, tau, beta)
    assert got.dtype == dtype
    assert_close(f"{kind} value", got, want, dtype)
    (got * upstream.to(dtype)).sum().backward()
    (want * upstream).sum().backward()
    assert_close(f"{kind} grad student_logits", s.grad, s_ref.grad, dtype)


def test_int32_ids_and_low_precision_student_accumulate_in_float32():
    s, t = logits(7, 37, seed=9, dtype=torch.bfloat16), logits(7, 37, seed=10)
    ids, logp = topk_target(t, 5, 1.0)
    got = sparse_divergence(s, ids.int(), logp.float(), "forward_kl")
    assert got.dtype == torch.float32
    want = reference_rows("forward_kl", s.double(), ids, logp, 1.0, 0.5)
    assert_close("bf16 forward_kl", got, want, torch.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_zero_rest_mass_and_peaked_rows_stay_finite(kind, beta):
    v, k = 9, 3
    teacher = torch.full((4, v), -1e4, dtype=torch.float64)
    teacher[:, 0] = 0.0  # all mass on id 0: top-k holds it exactly, r = 0
    ids, logp = topk_target(teacher, k, 1.0)
    logp[1] = torch.tensor([-1e-30, -80.0, -90.0])  # sums to a hair above 1: r < 0 before clamping
    logp[2] = torch.tensor([-0.6931471805599453, -0.6931471805599453, -80.0])  # r rounds to 0
    student = logits(4, v, seed=11).requires_grad_()
    with torch.no_grad():
        student[3] = -30.0
        student[3, 0] = 30.0  # a peaked student as well
    rows = sparse_divergence(student, ids, logp, kind, beta=beta)
    assert torch.isfinite(rows).all(), rows
    rows.sum().backward()
    assert torch.isfinite(student.grad).all()
    if kind in ("forward_kl", "tvd"):
        # With r = 0 the bucket contributes exactly nothing to the forward KL / TVD.
        want = reference_rows(kind, student.detach(), ids, logp, 1.0, beta)
        assert_close(kind, rows.detach(), want)


def test_float32_peaked_teacher_has_finite_bounded_gradient():
    # A float32 teacher whose top-k holds all but rounding error of the mass, and a student
    # that puts almost none outside the top-k: gradients stay bounded like the dense ones.
    teacher = logits(8, 50, seed=12, scale=1.0, dtype=torch.float32)
    teacher[:, :4] += 40.0
    ids, logp = topk_target(teacher.float(), 4, 1.0)
    student = teacher.clone().requires_grad_()
    for kind in KINDS:
        student.grad = None
        sparse_divergence(student, ids, logp.float(), kind).sum().backward()
        assert torch.isfinite(student.grad).all() and student.grad.abs().max() < 10, kind


def test_empty_batch_gives_empty_rows():
    s = logits(0, 10, seed=13).requires_grad_()
    rows = sparse_divergence(s, torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4), "jsd")
    assert rows.shape == (0,)
    rows.sum().backward()
    assert s.grad.shape == (0, 10)


def test_bad_sparse_targets_raise():
    s = logits(3, 6, seed=14)
    ids, logp = topk_target(logits(3, 6, seed=15), 2, 1.0)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        sparse_divergence(s, ids, logp, "kl")
    with pytest.raises(ValueError, match="distinct"):
        sparse_divergence(s, torch.tensor([[1, 1], [0, 2], [3, 4]]), logp, "tvd")
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        sparse_divergence(s, torch.tensor([[1, 6], [0, 2], [3, 4]]), logp, "tvd")
    with pytest.raises(ValueError, match="K = 7"):
        sparse_divergence(s, torch.zeros(3, 7, dtype=torch.long), torch.zeros(3, 7), "tvd")
    with pytest.raises(ValueError, match="N = 3"):
        sparse_divergence(s, ids[:2], logp[:2], "tvd")
    with pytest.raises(ValueError, match="integer"):
        sparse_divergence(s, ids.double(), logp, "tvd")
    with pytest.raises(ValueError, match="temperature"):
        sparse_divergence(s, ids, logp, "tvd", temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        sparse_divergence(s, ids, logp, "jsd", beta=1.5)


# ----------------------------------------------------------------------------- LossInputs / term


def batch(b: int = 3, length: int = 9, vocab: int = 23) -> tuple[LossInputs, torch.Tensor]:
    """A batch with IGNORE labels in varied places (one label at t = 0) and its teacher logits."""
    labels = torch.randint(0, vocab, (b, length), generator=torch.Generator().manual_seed(16))
    labels[0, :4] = IGNORE_INDEX
    labels[1, 1::2] = IGNORE_INDEX  # labels[1, 0] is kept: nothing predicts it
    labels[2, :] = IGNORE_INDEX
    labels[2, 6] = 5
    inputs = LossInputs(
        student_logits=logits(b, length, vocab, seed=17).requires_grad_(),
        labels=labels,
        attention_mask=torch.ones(b, length, dtype=torch.long),
        image_mask=torch.zeros(b, length, dtype=torch.bool),
    )
    return inputs, logits(b, length, vocab, seed=18, scale=3.0)


def sparse_from_dense(labels: torch.Tensor, teacher: torch.Tensor, k: int, tau: float):
    """One cache row per label (row-major), from the teacher's prediction of that label."""
    rows = []
    for b, t in (labels != IGNORE_INDEX).nonzero().tolist():
        # A label at t = 0 gets an arbitrary row: nothing predicts it and it must be dropped.
        rows.append(teacher[b, t - 1] if t > 0 else torch.full_like(teacher[b, 0], float("nan")))
    ids, logp = topk_target(torch.stack(rows), k, tau)
    return ids, logp


@pytest.mark.parametrize("kind,tau,beta", [("forward_kl", 1.0, 0.5), ("reverse_kl", 2.0, 0.5),
                                           ("jsd", 1.5, 0.3), ("tvd", 1.0, 0.5)])
def test_term_with_full_vocabulary_cache_matches_dense_path(kind, tau, beta):
    dense_inputs, teacher = batch()
    term = LogitDivergenceTerm(kind, temperature=tau, mask="answer", beta=beta)
    dense_inputs.teacher_logits = teacher
    want = term(dense_inputs)
    want.backward()

    sparse_inputs, _ = batch()
    sparse_inputs.teacher_topk = sparse_from_dense(sparse_inputs.labels, teacher, 23, tau)
    sparse_inputs.__post_init__()
    got = term(sparse_inputs)
    got.backward()
    assert_close(f"{kind} loss", got.detach(), want.detach())
    assert_close(f"{kind} grad student_logits", sparse_inputs.student_logits.grad, dense_inputs.student_logits.grad)
    assert sparse_inputs.student_logits.grad[2, 5].abs().sum() > 0  # the row predicting labels[2, 6]


def test_sparse_rows_align_with_answer_mask():
    inputs, teacher = batch()
    ids, logp = sparse_from_dense(inputs.labels, teacher, 4, 1.0)
    inputs.teacher_topk = (ids, logp)
    kept_ids, kept_logp, kept_rest = inputs.sparse_teacher_rows()
    assert kept_rest is None
    mask = inputs.token_mask("answer")
    assert kept_ids.shape == (int(mask.sum()), 4)
    assert torch.isfinite(kept_logp).all()  # the NaN row of the t = 0 label was dropped
    torch.testing.assert_close(kept_ids, teacher[:, :-1][mask].topk(4, dim=-1).indices)


def test_term_with_top_k_cache_is_below_dense_and_needs_answer_mask():
    inputs, teacher = batch()
    inputs.teacher_topk = sparse_from_dense(inputs.labels, teacher, 5, 2.0)
    sparse = LogitDivergenceTerm("forward_kl", temperature=2.0)(inputs)
    inputs.teacher_logits = teacher  # dense logits, when present, take precedence
    dense = LogitDivergenceTerm("forward_kl", temperature=2.0)(inputs)
    assert 0 < sparse.item() < dense.item()
    inputs.teacher_logits = None
    with pytest.raises(ValueError, match="mask='answer'"):
        LogitDivergenceTerm("forward_kl", mask="answer+image")(inputs)


def test_term_with_no_labels_gives_zero_with_graph():
    inputs, _ = batch()
    inputs.labels[:] = IGNORE_INDEX
    inputs.teacher_topk = (torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4))
    loss = LogitDivergenceTerm("jsd")(inputs)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(inputs.student_logits.grad, torch.zeros_like(inputs.student_logits))


def test_loss_inputs_reject_misaligned_sparse_target():
    inputs, teacher = batch()
    ids, logp = sparse_from_dense(inputs.labels, teacher, 4, 1.0)
    n_labels = int((inputs.labels != IGNORE_INDEX).sum())
    with pytest.raises(ValueError, match=f"{n_labels} labels"):
        LossInputs(inputs.student_logits, inputs.labels, inputs.attention_mask, inputs.image_mask,
                   teacher_topk=(ids[1:], logp[1:]))
    with pytest.raises(ValueError, match="topk_ids"):
        LossInputs(inputs.student_logits, inputs.labels, inputs.attention_mask, inputs.image_mask,
                   teacher_topk=ids)
    with pytest.raises(ValueError, match="teacher_logits or teacher_topk"):
        LogitDivergenceTerm("tvd")(inputs)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_cached_rest_mass_matches_the_float64_coarse_grained_divergence(kind):
    """With the teacher's exact remaining mass (as the cache stores it), the sparse divergence
    equals the (K+1)-outcome divergence computed in float64, even for a very peaked teacher
    whose 1 - sum(top-k) rounds to 0 in float32."""
    torch.manual_seed(0)
    n, v, k, tau = 6, 41, 3, 1.0
    student = torch.randn(n, v, dtype=torch.float32)
    teacher = torch.randn(n, v, dtype=torch.float64)
    teacher[:, 0] += 40.0  # rest mass ~1e-16: lost to float32 rounding when derived
    logp_t = torch.log_softmax(teacher / tau, -1)
    vals, ids = logp_t.topk(k, -1)
    rest = torch.logsumexp(logp_t.scatter(-1, ids, float("-inf")), -1)
    got = sparse_divergence(student, ids, vals.float(), kind, tau, 0.5, rest_logp=rest.float())
    logp_s = torch.log_softmax(student.double() / tau, -1)
    s_k = logp_s.gather(-1, ids)
    s_rest = torch.logsumexp(logp_s.scatter(-1, ids, float("-inf")), -1)
    log_s = torch.cat([s_k, s_rest[:, None]], -1)
    log_t = torch.cat([vals, rest[:, None]], -1)
    p_s, p_t = log_s.exp(), log_t.exp()
    if kind == "forward_kl":
        ref = (p_t * (log_t - log_s)).sum(-1)
    elif kind == "reverse_kl":
        ref = (p_s * (log_s - log_t)).sum(-1)
    elif kind == "jsd":
        log_m = torch.log(0.5 * p_s + 0.5 * p_t)
        ref = 0.5 * (p_t * (log_t - log_m)).sum(-1) + 0.5 * (p_s * (log_s - log_m)).sum(-1)
    else:
        ref = 0.5 * (p_s - p_t).abs().sum(-1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
