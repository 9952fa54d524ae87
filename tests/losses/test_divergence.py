"""The logit terms (losses/divergence.py): MDist, and the fused (hidden-state) path of every
logit term equal to the materialised one, reading teacher rows only where a term needs them."""

import pytest
import torch

from conftest import fake_inputs
from losses.divergence import CrossEntropyTerm, LogitDivergenceTerm, MDistTerm
from losses.inputs import IGNORE_INDEX, LossInputs
from losses.logit import forward_kl
from losses.relation import RDistTerm

torch.manual_seed(0)


def test_mdist_is_answer_kl_plus_image_kl():
    inputs, _, _ = fake_inputs()
    expected = (forward_kl(inputs.shifted_student_logits, inputs.shifted_teacher_logits, inputs.token_mask("answer"))
                + forward_kl(inputs.shifted_student_logits, inputs.shifted_teacher_logits, inputs.token_mask("image")))
    torch.testing.assert_close(MDistTerm()(inputs), expected)
    same = LossInputs(student_logits=inputs.teacher_logits, labels=inputs.labels,
                      attention_mask=inputs.attention_mask, image_mask=inputs.image_mask,
                      teacher_logits=inputs.teacher_logits)
    assert MDistTerm()(same).abs().item() < 1e-6


@pytest.mark.parametrize("make_term", [
    CrossEntropyTerm, MDistTerm, RDistTerm,
    lambda: LogitDivergenceTerm("jsd", temperature=2.0, mask="answer+image", beta=0.3),
    lambda: LogitDivergenceTerm("reverse_kl", mask="all"),
], ids=["ce", "mdist", "rdist", "jsd", "reverse_kl"])
def test_fused_path_equals_materialised_logits(make_term):
    term = make_term()
    dense, hidden, head = fake_inputs()
    expected = term(dense)
    grads = torch.autograd.grad(expected, [hidden, head.weight, head.bias])
    fused = LossInputs(student_logits=None, student_hidden=hidden, student_head=head, labels=dense.labels,
                       attention_mask=dense.attention_mask, image_mask=dense.image_mask,
                       teacher_logits=dense.teacher_logits)
    value = term(fused)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(value, [hidden, head.weight, head.bias]), grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    keep = term.teacher_positions(dense)
    if keep is None:  # reads no teacher logits (CE)
        assert not term.needs_teacher
        return
    # the teacher asked for the rows this term reads, and nothing else
    assert 0 < int(keep.sum()) < keep.numel()
    fused.teacher_logits, fused.teacher_keep = dense.teacher_logits[keep], keep
    torch.testing.assert_close(term(fused), expected, rtol=1e-5, atol=1e-6)
    fused.teacher_logits, fused.teacher_keep = dense.teacher_logits[keep & ~dense.image_mask], keep & ~dense.image_mask
    with pytest.raises(ValueError, match="not asked for"):
        term(fused)


def test_teacher_rows_are_the_union_of_what_the_terms_read():
    from losses.combine import WeightedLoss

    dense, _, _ = fake_inputs()
    loss = WeightedLoss({"ce": (1.0, CrossEntropyTerm()), "kd": (1.0, LogitDivergenceTerm("forward_kl")),
                         "rdist": (1.0, RDistTerm())})
    expected = dense.position_mask("answer") | dense.image_mask
    assert torch.equal(loss.teacher_logit_positions(dense), expected)


def test_fused_sparse_cache_path_equals_materialised_logits():
    dense, hidden, head = fake_inputs()
    labelled = dense.labels != IGNORE_INDEX
    teacher_rows = torch.cat([dense.teacher_logits[:, :1], dense.teacher_logits[:, :-1]], 1)[labelled]  # predicts labels[t]
    logp = (teacher_rows / 2.0).log_softmax(-1)
    top = logp.topk(5, dim=-1)
    rest = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-7))
    dense.teacher_logits = None
    dense.teacher_topk = (top.indices, top.values, rest)
    term = LogitDivergenceTerm("forward_kl", temperature=2.0)
    expected = term(dense)
    fused = LossInputs(student_logits=None, student_hidden=hidden, student_head=head, labels=dense.labels,
                       attention_mask=dense.attention_mask, image_mask=dense.image_mask, teacher_topk=dense.teacher_topk)
    torch.testing.assert_close(term(fused), expected, rtol=1e-5, atol=1e-6)
