"""Logit-distillation losses (`losses/logit.py`) , the logit terms (`losses/divergence.py`) and their weighted sum (`losses/combine.py`).

Reference values are computed independently here with plain Python loops over floats.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from losses.combine import WeightedLoss
from losses.divergence import CrossEntropyTerm, LogitDivergenceTerm
from losses.inputs import IGNORE_INDEX, LossInputs
from losses.logit import TVD_TIE_RTOL, cross_entropy, forward_kl, jsd, reverse_kl, tvd

DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "tvd": tvd}


# ----------------------------------------------------------------------------- references


def ref_softmax(row: list[float], tau: float) -> list[float]:
    top = max(row)
    exps = [math.exp((z - top) / tau) for z in row]
    total = sum(exps)
    return [e / total for e in exps]


def ref_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def ref_divergence(name: str, p_s: list[float], p_t: list[float], beta: float) -> float:
    if name == "forward_kl":
        return ref_kl(p_t, p_s)
    if name == "reverse_kl":
        return ref_kl(p_s, p_t)
    if name == "tvd":
        return 0.5 * sum(abs(t - s) for s, t in zip(p_s, p_t))
    m = [beta * t + (1 - beta) * s for s, t in zip(p_s, p_t)]
    return beta * ref_kl(p_t, m) + (1 - beta) * ref_kl(p_s, m)


def ref_loss(name: str, student, teacher, mask, tau: float = 1.0, beta: float = 0.5) -> float:
    """tau^2 * mean over kept (b, l) of the divergence between softened distributions."""
    total, kept = 0.0, 0
    for b in range(student.shape[0]):
        for l in range(student.shape[1]):
            if mask is None or bool(mask[b, l]):
                p_s = ref_softmax(student[b, l].tolist(), tau)
                p_t = ref_softmax(teacher[b, l].tolist(), tau)
                total += ref_divergence(name, p_s, p_t, beta)
                kept += 1
    return tau**2 * total / kept


def logits(*shape: int, seed: int, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen)).to(dtype)


MASK_2x3 = torch.tensor([[True, False, True], [False, True, True]])


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("mask", [None, MASK_2x3], ids=["all", "masked"])
def test_divergence_matches_hand_computation(name, tau, mask):
    s, t = logits(2, 3, 5, seed=0), logits(2, 3, 5, seed=1)
    kwargs = {"beta": 0.3} if name == "jsd" else {}
    got = DIVERGENCES[name](s, t, mask=mask, temperature=tau, **kwargs)
    want = ref_loss(name, s, t, mask, tau=tau, beta=0.3)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_temperature_is_tau_squared_times_softened_divergence(name):
    s, t, tau = logits(2, 3, 5, seed=2), logits(2, 3, 5, seed=3), 3.0
    softened = DIVERGENCES[name](s / tau, t / tau, temperature=1.0)
    assert DIVERGENCES[name](s, t, temperature=tau).item() == pytest.approx(tau**2 * softened.item(), rel=1e-9)
    assert tau**2 * softened.item() != pytest.approx(softened.item())  # the factor is really applied


def test_float32_inputs_match_float64_reference():
    s, t = logits(2, 3, 5, seed=4, dtype=torch.float32), logits(2, 3, 5, seed=5, dtype=torch.float32)
    for name, fn in DIVERGENCES.items():
        assert fn(s, t).dtype == torch.float32
        assert fn(s, t).item() == pytest.approx(ref_loss(name, s.double(), t.double(), None), rel=1e-4)
    assert forward_kl(s.bfloat16(), t.bfloat16()).dtype == torch.float32  # upcast before softmax


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_identical_distributions_give_zero(name):
    s = logits(2, 3, 5, seed=6)
    assert DIVERGENCES[name](s, s.clone(), temperature=1.7).item() == pytest.approx(0.0, abs=1e-12)


def test_kl_is_nonnegative_per_row():
    s, t = logits(64, 7, seed=7, scale=4.0), logits(64, 7, seed=8, scale=4.0)
    for i in range(64):
        assert forward_kl(s[i], t[i]).item() >= 0.0
        assert reverse_kl(s[i], t[i]).item() >= 0.0


def test_forward_and_reverse_kl_differ():
    s, t = logits(2, 3, 5, seed=9), logits(2, 3, 5, seed=10)
    assert forward_kl(s, t).item() != pytest.approx(reverse_kl(s, t).item(), rel=1e-3)
    assert forward_kl(s, t).item() == pytest.approx(reverse_kl(t, s).item(), rel=1e-12)


def test_jsd_symmetric_at_half():
    s, t = logits(2, 3, 5, seed=11), logits(2, 3, 5, seed=12)
    assert jsd(s, t, beta=0.5).item() == pytest.approx(jsd(t, s, beta=0.5).item(), rel=1e-12)
    assert jsd(s, t, beta=0.2).item() != pytest.approx(jsd(t, s, beta=0.2).item(), rel=1e-3)
    assert jsd(s, t, beta=0.5).item() <= math.log(2)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t = logits(2, 3, 5, seed=13), logits(2, 3, 5, seed=14)
    assert jsd(s, t, beta=0.0, temperature=2.0).item() == pytest.approx(forward_kl(s, t, temperature=2.0).item())
    assert jsd(s, t, beta=1.0, temperature=2.0).item() == pytest.approx(reverse_kl(s, t, temperature=2.0).item())


def test_scaled_jsd_tends_to_kl_near_the_endpoints():
    s, t = logits(2, 3, 5, seed=15, dtype=torch.float32), logits(2, 3, 5, seed=16, dtype=torch.float32)
    eps = 1e-4
    assert (jsd(s, t, beta=eps) / eps).item() == pytest.approx(forward_kl(s, t).item(), rel=1e-2)
    assert (jsd(s, t, beta=1 - eps) / eps).item() == pytest.approx(reverse_kl(s, t).item(), rel=1e-2)


def test_tvd_bounded_and_one_for_disjoint_distributions():
    s, t = logits(32, 6, seed=17, scale=5.0), logits(32, 6, seed=18, scale=5.0)
    for i in range(32):
        assert 0.0 <= tvd(s[i], t[i]).item() <= 1.0
    student = torch.full((4, 6), -50.0, dtype=torch.float64)
    teacher = student.clone()
    student[torch.arange(4), torch.tensor([0, 1, 2, 3])] = 50.0
    teacher[torch.arange(4), torch.tensor([5, 4, 3, 2])] = 50.0
    assert tvd(student, teacher).item() == pytest.approx(1.0, abs=1e-9)


def test_tvd_subgradient_is_zero_at_ties_and_the_sign_elsewhere():
    """d TVD / d s_j = p_j (a_j - sum_k p_k a_k) with a = 0.5 sign(p_S - p_T), and a = 0 where
    the two probabilities agree to within TVD_TIE_RTOL (rounding-level differences)."""
    tau = 2.0
    student = logits(3, 8, seed=21, scale=3.0).requires_grad_(True)  # float64
    p = torch.softmax(student.detach() / tau, -1)
    p[:, :4] *= 1 + 1e-7 * torch.tensor([1.0, -1.0, 2.0, -2.0], dtype=torch.float64)  # ties
    p[:, 4:] = p[:, 4:].roll(1, -1)  # real differences, same total mass
    teacher = tau * p.log()
    tvd(student, teacher, temperature=tau).backward()
    p_s, p_t = (torch.softmax(x.detach() / tau, -1) for x in (student, teacher))
    a = 0.5 * torch.sign(p_s - p_t)
    assert ((p_s - p_t)[:, :4].abs() <= TVD_TIE_RTOL * p_s[:, :4]).all() and a[:, :4].abs().min() == 0.5
    a[:, :4] = 0.0
    expected = tau * p_s * (a - (p_s * a).sum(-1, keepdim=True)) / 3  # tau**2 * (1 / tau), mean over rows
    torch.testing.assert_close(student.grad, expected, atol=1e-12, rtol=1e-10)
    same = logits(3, 8, seed=22).requires_grad_(True)
    tvd(same, same.detach() * (1 + 1e-9)).backward()  # near-equal everywhere: no gradient at all
    assert not same.grad.any()


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_masked_rows_do_not_change_the_loss(name):
    s, t = logits(2, 3, 5, seed=19), logits(2, 3, 5, seed=20)
    before = DIVERGENCES[name](s, t, mask=MASK_2x3)
    s2, t2 = s.clone(), t.clone()
    s2[~MASK_2x3] = logits(2, 5, seed=21, scale=1e4)
    t2[~MASK_2x3] = float("nan")  # rows are selected before any arithmetic
    after = DIVERGENCES[name](s2, t2, mask=MASK_2x3)
    assert after.item() == pytest.approx(before.item(), rel=1e-12)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_masked_value_is_mean_over_kept_rows(name):
    s, t = logits(2, 3, 5, seed=22), logits(2, 3, 5, seed=23)
    per_row = [DIVERGENCES[name](s[b, l], t[b, l]).item() for b, l in MASK_2x3.nonzero().tolist()]
    assert len(per_row) == 4
    assert DIVERGENCES[name](s, t, mask=MASK_2x3).item() == pytest.approx(sum(per_row) / 4, rel=1e-12)


@pytest.mark.parametrize("name", [*DIVERGENCES, "cross_entropy"])
def test_all_masked_gives_exact_zero_and_zero_grads(name):
    s = logits(2, 3, 5, seed=24).requires_grad_()
    mask = torch.zeros(2, 3, dtype=torch.bool)
    if name == "cross_entropy":
        loss = cross_entropy(s, torch.zeros(2, 3, dtype=torch.long), mask)
    else:
        loss = DIVERGENCES[name](s, logits(2, 3, 5, seed=25), mask=mask, temperature=2.0)
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad is not None and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_gradients_reach_the_student_only(name):
    s = logits(2, 3, 5, seed=26).requires_grad_()
    t = logits(2, 3, 5, seed=27).requires_grad_()
    DIVERGENCES[name](s, t, mask=MASK_2x3, temperature=2.0).backward()
    assert t.grad is None
    assert torch.isfinite(s.grad).all()
    assert s.grad[MASK_2x3].abs().sum() > 0
    assert torch.equal(s.grad[~MASK_2x3], torch.zeros(2, 5, dtype=s.dtype))


def test_kl_gradient_matches_closed_form():
    # d/dz_s KL(p_T || p_S) at tau = 1 is (p_S - p_T) / N per kept row.
    s = logits(2, 3, 5, seed=28).requires_grad_()
    t = logits(2, 3, 5, seed=29)
    forward_kl(s, t).backward()
    want = (s.detach().softmax(-1) - t.softmax(-1)) / 6
    torch.testing.assert_close(s.grad, want)


def test_cross_entropy_matches_hand_computation():
    s = logits(2, 3, 5, seed=30)
    targets = torch.tensor([[0, 4, 2], [1, 3, 3]])
    got = cross_entropy(s, targets, MASK_2x3).item()
    want = [-math.log(ref_softmax(s[b, l].tolist(), 1.0)[targets[b, l]]) for b, l in MASK_2x3.nonzero().tolist()]
    assert got == pytest.approx(sum(want) / len(want), rel=1e-12)


# ----------------------------------------------------------------------------- errors


def test_shape_and_vocab_mismatch_raise():
    s = logits(2, 3, 5, seed=31)
    with pytest.raises(ValueError, match=r"\(2, 3, 5\).*\(2, 4, 5\)"):
        forward_kl(s, logits(2, 4, 5, seed=32))
    with pytest.raises(ValueError, match="teacher has 7 classes, student 5"):
        jsd(s, logits(2, 3, 7, seed=33))
    with pytest.raises(ValueError, match="mask"):
        tvd(s, s, mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        tvd(s, s, mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        reverse_kl(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        jsd(s, s, beta=1.5)
    with pytest.raises(ValueError, match="targets"):
        cross_entropy(s, torch.zeros(2, 4, dtype=torch.long))


# ----------------------------------------------------------------------------- combine


def tiny_inputs(with_teacher: bool = True, vocab: int = 9) -> LossInputs:
    """One row of 6 tokens: [pad, bos, <image>, question, answer1, answer2]."""
    return LossInputs(
        student_logits=logits(1, 6, vocab, seed=34),
        labels=torch.tensor([[IGNORE_INDEX] * 4 + [7, 2]]),
        attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]),
        image_mask=torch.tensor([[False, False, True, False, False, False]]),
        teacher_logits=logits(1, 6, vocab, seed=35) if with_teacher else None,
    )


def test_token_mask_shifts_to_prediction_positions():
    inputs = tiny_inputs()
    expected = {
        "answer": [False, False, False, True, True],  # positions 3, 4 predict the answer tokens
        "image": [False, False, True, False, False],
        "all": [False, True, True, True, True],
        "answer+image": [False, False, True, True, True],
    }
    for which, want in expected.items():
        got = inputs.token_mask(which)
        assert got.dtype == torch.bool and got.tolist() == [want], which
    assert inputs.shifted_labels.tolist() == [[IGNORE_INDEX] * 3 + [7, 2]]
    assert torch.equal(inputs.shifted_student_logits, inputs.student_logits[:, :5])
    assert torch.equal(inputs.shifted_teacher_logits, inputs.teacher_logits[:, :5])
    assert tiny_inputs(with_teacher=False).shifted_teacher_logits is None


def test_cross_entropy_term_matches_torch():
    inputs = tiny_inputs()
    want = F.cross_entropy(
        inputs.shifted_student_logits.reshape(-1, 9), inputs.shifted_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert CrossEntropyTerm()(inputs).item() == pytest.approx(want.item(), rel=1e-12)


def test_divergence_term_uses_shift_mask_temperature_and_beta():
    inputs = tiny_inputs()
    term = LogitDivergenceTerm("jsd", temperature=2.0, mask="answer+image", beta=0.3)
    s, t = inputs.student_logits[0], inputs.teacher_logits[0]
    # Prediction positions 2, 3, 4 are kept (see test_token_mask_shifts_to_prediction_positions).
    want = ref_loss("jsd", s[None, 2:5], t[None, 2:5], None, tau=2.0, beta=0.3)
    assert term(inputs).item() == pytest.approx(want, rel=1e-9)


def test_weighted_loss_total_and_log():
    inputs = tiny_inputs()
    inputs.student_logits.requires_grad_()
    ce, kl, tv = CrossEntropyTerm(), LogitDivergenceTerm("forward_kl", temperature=2.0), LogitDivergenceTerm("tvd")
    loss = WeightedLoss({"ce": (0.5, ce), "kd": (2.0, kl), "tvd": (0.0, tv)})
    total, values = loss(inputs)
    assert set(values) == {"ce", "kd"}
    assert values["ce"].item() == pytest.approx(ce(inputs).item())
    assert values["kd"].item() == pytest.approx(kl(inputs).item())
    assert total.item() == pytest.approx(0.5 * ce(inputs).item() + 2.0 * kl(inputs).item(), rel=1e-12)
    assert all(not v.requires_grad for v in values.values())
    total.backward()
    assert inputs.student_logits.grad.abs().sum() > 0
    assert loss.needs_teacher


def test_weighted_loss_needs_teacher_only_for_active_terms():
    ce_only = WeightedLoss({"ce": (1.0, CrossEntropyTerm()), "kd": (0.0, LogitDivergenceTerm("reverse_kl"))})
    assert not ce_only.needs_teacher
    total, values = ce_only(tiny_inputs(with_teacher=False))  # the weight-0 KD term never runs
    assert set(values) == {"ce"} and torch.isfinite(total)
    with pytest.raises(ValueError, match="non-zero"):
        WeightedLoss({"ce": (0.0, CrossEntropyTerm())})


def test_bad_term_arguments_raise():
    with pytest.raises(ValueError, match="answer, image, all, answer\\+image"):
        tiny_inputs().token_mask("question")
    with pytest.raises(ValueError, match="'question'"):
        LogitDivergenceTerm("forward_kl", mask="question")
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd, tvd"):
        LogitDivergenceTerm("kl")
    with pytest.raises(ValueError, match="temperature"):
        LogitDivergenceTerm("jsd", temperature=-1.0)
    with pytest.raises(ValueError, match="beta"):
        LogitDivergenceTerm("jsd", beta=-0.1)
    with pytest.raises(ValueError, match="teacher_logits"):
        LogitDivergenceTerm("forward_kl")(tiny_inputs(with_teacher=False))
    bad = tiny_inputs()
    bad.teacher_logits = logits(1, 6, 7, seed=36)
    with pytest.raises(ValueError, match="teacher has 7 classes, student 9"):
        LogitDivergenceTerm("tvd")(bad)
    with pytest.raises(ValueError, match="labels"):
        LossInputs(logits(1, 6, 9, seed=37), torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 6), torch.zeros(1, 6))


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_a_class_both_sides_rule_out_adds_nothing_and_no_nan_gradient(name):
    """A padded vocabulary masked to -inf in student and teacher: the divergence and its
    gradient equal those over the real classes only, with no NaN anywhere."""
    fn = DIVERGENCES[name]
    s, t = logits(4, 7, seed=31), logits(4, 7, seed=32)
    pad = torch.full((4, 3), float("-inf"), dtype=torch.float64)
    padded = torch.cat([s, pad], -1).requires_grad_(True)
    fn(padded, torch.cat([t, pad], -1), temperature=2.0).backward()
    real = s.clone().requires_grad_(True)
    fn(real, t, temperature=2.0).backward()
    assert torch.isfinite(padded.grad).all()
    torch.testing.assert_close(padded.grad[:, :7], real.grad, atol=1e-12, rtol=1e-10)
    assert not padded.grad[:, 7:].any()
