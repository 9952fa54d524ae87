"""Loss terms on image-classification batches: one row of class logits per sample, tapped
ViT / Swin features, MiniViT's soft cross-entropy and label smoothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from losses.attention import QKVRelationTerm, qkv_relation
from losses.divergence import CrossEntropyTerm, LogitDivergenceTerm
from losses.inputs import LossInputs
from losses.term import align_tokens
from losses.logit import cross_entropy, forward_kl, soft_cross_entropy
from losses.relation import HiddenRelationTerm, hidden_relation


def batch(b=6, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(b, c, generator=g, dtype=torch.float64), torch.randint(0, c, (b,), generator=g))


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_soft_cross_entropy_is_kl_over_tau_squared_plus_teacher_entropy(tau):
    s, t, _ = batch()
    p_t = F.softmax(t / tau, -1)
    entropy = -(p_t * p_t.log()).sum(-1).mean()
    torch.testing.assert_close(soft_cross_entropy(s, t, None, tau), forward_kl(s, t, None, tau) / tau**2 + entropy)
    by_hand = -(p_t * F.log_softmax(s / tau, -1)).sum(-1).mean()
    torch.testing.assert_close(soft_cross_entropy(s, t, None, tau), by_hand)


def test_soft_cross_entropy_ignores_classes_the_teacher_rules_out():
    s = torch.tensor([[0.0, 1.0, float("-inf")]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, float("-inf")]])
    loss = soft_cross_entropy(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_torch(eps):
    s, _, y = batch()
    torch.testing.assert_close(cross_entropy(s, y, label_smoothing=eps), F.cross_entropy(s, y, label_smoothing=eps))


def test_classification_inputs_feed_ce_and_divergences():
    s, t, y = batch()
    inputs = LossInputs(student_logits=s, labels=y, teacher_logits=t)
    assert inputs.classification
    torch.testing.assert_close(CrossEntropyTerm(0.1)(inputs), F.cross_entropy(s, y, label_smoothing=0.1))
    torch.testing.assert_close(LogitDivergenceTerm("forward_kl", temperature=2.0)(inputs), forward_kl(s, t, None, 2.0))
    torch.testing.assert_close(LogitDivergenceTerm("soft_ce")(inputs), soft_cross_entropy(s, t))
    with pytest.raises(ValueError, match="token sequence"):
        inputs.position_mask("answer")
    with pytest.raises(ValueError, match="one class per sample"):
        LossInputs(student_logits=s, labels=y[:3])


def test_soft_ce_refuses_fused_vlm_logits():
    hidden = torch.randn(1, 4, 8)
    inputs = LossInputs(student_logits=None, labels=torch.full((1, 4), -100), attention_mask=torch.ones(1, 4),
                        image_mask=torch.zeros(1, 4, dtype=torch.bool), student_hidden=hidden,
                        student_head=torch.nn.Linear(8, 11), teacher_logits=torch.randn(1, 4, 11))
    with pytest.raises(ValueError, match="no fused kernel"):
        LogitDivergenceTerm("soft_ce")(inputs)


def test_qkv_relation_drops_a_teacher_class_token():
    """A DeiT teacher has 1 + N tokens, a Mini-DeiT student N: relations compare the patches."""
    torch.manual_seed(0)
    s_qkv, t_qkv = torch.randn(2, 16, 3 * 8), torch.randn(2, 17, 3 * 12)
    term = QKVRelationTerm(student="blocks.{i}.attn.qkv", layers="all")
    term.bind([("s", "t")], [None])
    inputs = LossInputs(student_logits=torch.randn(2, 3), labels=torch.zeros(2, dtype=torch.long),
                        student_features={"s": s_qkv}, teacher_features={"t": t_qkv})
    expected = qkv_relation(s_qkv.chunk(3, -1), t_qkv[:, 1:].chunk(3, -1))
    torch.testing.assert_close(term(inputs), expected)
    a, b = align_tokens(torch.zeros(2, 5, 3), torch.zeros(2, 4, 3))
    assert a.shape[1] == b.shape[1] == 4


def test_hidden_relation_reads_swin_maps_as_token_sets():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 4, 8), torch.randn(2, 4, 4, 16)  # (B, H, W, C) as timm's Swin blocks give
    term = HiddenRelationTerm(student="layers.*.blocks.{i}", scale=16.0)
    term.bind([("s", "t")], [None])
    inputs = LossInputs(student_logits=torch.randn(2, 3), labels=torch.zeros(2, dtype=torch.long),
                        student_features={"s": s}, teacher_features={"t": t})
    torch.testing.assert_close(term(inputs), hidden_relation(s.flatten(1, 2), t.flatten(1, 2), scale=16.0))
