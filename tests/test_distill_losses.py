"""Relation, attention and feature losses against direct computations on small hand-built
tensors, their identities, and the fused (hidden-state) path of the logit terms."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losses.attention import attention_map_kl, head_mapping, qkv_relation
from losses.divergence import CrossEntropyTerm, LogitDivergenceTerm, MDistTerm
from losses.inputs import IGNORE_INDEX, LossInputs
from losses.feature import FeatureTerm, feature_cosine, feature_mse
from losses.logit import forward_kl
from losses.relation import (
    RDistTerm,
    hidden_relation,
    image_groups,
    rdist,
    rkd_angle,
    rkd_distance,
)

torch.manual_seed(0)
DOUBLE = dict(dtype=torch.float64)


# ---- relation -------------------------------------------------------------------------------


def direct_rdist(x_s, x_t):
    """1 - cos(vec G_s, vec G_t) for one image, written out."""
    g_s, g_t = x_s @ x_s.T, x_t @ x_t.T
    return 1 - (g_s * g_t).sum() / (g_s.norm() * g_t.norm())


def test_rdist_matches_direct_computation_per_image():
    x_s, x_t = torch.randn(3, 7, 5, **DOUBLE), torch.randn(3, 7, 11, **DOUBLE)  # widths differ
    expected = torch.stack([direct_rdist(x_s[b], x_t[b]) for b in range(3)]).mean()
    torch.testing.assert_close(rdist(x_s, x_t), expected)


def test_rdist_identities():
    x = torch.randn(2, 9, 6, **DOUBLE)
    assert rdist(x, x).abs().item() < 1e-12
    x_t = torch.randn(2, 9, 4, **DOUBLE)
    # a uniform feature scale leaves the Gram matrices' directions unchanged (the method's claim)
    torch.testing.assert_close(rdist(3.7 * x, 0.2 * x_t), rdist(x, x_t))
    q, _ = torch.linalg.qr(torch.randn(6, 6, **DOUBLE))
    torch.testing.assert_close(rdist(x @ q, x_t), rdist(x, x_t))  # rotations of the feature axis too


def test_rdist_masked_images_of_different_sizes():
    x_s, x_t = torch.randn(2, 6, 4, **DOUBLE), torch.randn(2, 6, 5, **DOUBLE)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    expected = (direct_rdist(x_s[0], x_t[0]) + direct_rdist(x_s[1, :3], x_t[1, :3])) / 2
    torch.testing.assert_close(rdist(x_s, x_t, mask), expected)


def test_hidden_relation_is_miniviT_gram_mse():
    h_s, h_t = torch.randn(2, 5, 8, **DOUBLE), torch.randn(2, 5, 3, **DOUBLE)
    n_s, n_t = F.normalize(h_s, dim=-1), F.normalize(h_t, dim=-1)
    expected = 49 * ((n_s @ n_s.transpose(1, 2) - n_t @ n_t.transpose(1, 2)) ** 2).mean()
    torch.testing.assert_close(hidden_relation(h_s, h_t, scale=49.0), expected.float(), rtol=1e-5, atol=1e-6)
    assert hidden_relation(h_s, 5 * h_s).item() < 1e-10  # row normalisation: scale-free


def direct_rkd_distance(e_s, e_t):
    def psi(e):
        d = torch.tensor([[float((e[i] - e[j]).norm()) for j in range(len(e))] for i in range(len(e))], **DOUBLE)
        return d / d[~torch.eye(len(e), dtype=torch.bool)].mean()
    return F.smooth_l1_loss(psi(e_s), psi(e_t))


def direct_rkd_angle(e_s, e_t):
    def cosines(e):
        n = len(e)
        out = torch.zeros(n, n, n, **DOUBLE)
        for i, j, k in itertools.product(range(n), repeat=3):
            a, b = e[i] - e[j], e[k] - e[j]
            if a.norm() > 0 and b.norm() > 0:
                out[j, i, k] = (a @ b) / (a.norm() * b.norm())
        return out
    return F.smooth_l1_loss(cosines(e_s), cosines(e_t))


def test_rkd_losses_match_direct_computation_and_invariances():
    e_s, e_t = torch.randn(5, 4, **DOUBLE), torch.randn(5, 7, **DOUBLE)
    torch.testing.assert_close(rkd_distance(e_s, e_t).double(), direct_rkd_distance(e_s, e_t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rkd_angle(e_s, e_t).double(), direct_rkd_angle(e_s, e_t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rkd_distance(2.5 * e_s, e_t), rkd_distance(e_s, e_t))  # scale
    torch.testing.assert_close(rkd_angle(2.5 * e_s + 1.0, e_t), rkd_angle(e_s, e_t), rtol=1e-5, atol=1e-6)  # + shift
    assert rkd_distance(e_s, 3 * e_s).item() < 1e-6 and rkd_angle(e_s, e_s).item() < 1e-6


def test_image_groups_split_runs_of_image_tokens():
    positions = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    rows = torch.arange(7.0)[:, None]  # one row per image position, row-major
    groups, mask = image_groups(rows, positions)
    assert groups.shape == (3, 3, 1)  # images: sample 0 has two runs, sample 1 one
    assert mask.tolist() == [[True, True, True], [True, True, False], [True, True, False]]
    assert groups[..., 0].tolist() == [[0, 1, 2], [3, 4, 0], [5, 6, 0]]


# ---- attention --------------------------------------------------------------------------------


def direct_attention_kl(q_s, k_s, q_t, k_t, causal=False):
    s = q_s @ k_s.transpose(-1, -2) / math.sqrt(q_s.shape[-1])
    t = q_t @ k_t.transpose(-1, -2) / math.sqrt(q_t.shape[-1])
    if causal:
        future = torch.ones(s.shape[-2:], dtype=torch.bool).triu(1)
        s, t = s.masked_fill(future, float("-inf")), t.masked_fill(future, float("-inf"))
    log_p_s, log_p_t = s.log_softmax(-1), t.log_softmax(-1)
    p_t = log_p_t.exp()
    return torch.where(p_t > 0, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t)).sum(-1).mean()


def test_attention_map_kl_with_head_mapping_and_grouped_keys():
    b, n = 2, 6
    q_s, k_s = torch.randn(b, 2, n, 4, **DOUBLE), torch.randn(b, 1, n, 4, **DOUBLE)  # 2 query heads share 1 key head
    q_t, k_t = torch.randn(b, 4, n, 8, **DOUBLE), torch.randn(b, 4, n, 8, **DOUBLE)
    assert head_mapping(2, 4) == [0, 2]
    expected = direct_attention_kl(q_s, k_s.expand(b, 2, n, 4), q_t[:, [0, 2]], k_t[:, [0, 2]], causal=True)
    torch.testing.assert_close(attention_map_kl(q_s, k_s, q_t, k_t, causal=True), expected)
    expected = direct_attention_kl(q_s, k_s.expand(b, 2, n, 4), q_t[:, [3, 1]], k_t[:, [3, 1]])
    torch.testing.assert_close(attention_map_kl(q_s, k_s, q_t, k_t, head_map=[3, 1]), expected)
    assert attention_map_kl(q_t, k_t, q_t, k_t).abs().item() < 1e-12
    with pytest.raises(ValueError, match="head map"):
        attention_map_kl(q_s, k_s, q_t, k_t, head_map=[0, 9])


def test_qkv_relation_is_the_nine_pair_cross_entropy():
    b, n, heads = 2, 5, 2
    qkv_s = [torch.randn(b, n, 6, **DOUBLE) for _ in range(3)]
    qkv_t = [torch.randn(b, n, 10, **DOUBLE) for _ in range(3)]  # widths differ: relations are N x N

    def relation(x, a, c):
        x = x.view(b, n, heads, c // heads).transpose(1, 2)
        y = a.view(b, n, heads, c // heads).transpose(1, 2)
        return (x @ y.transpose(-1, -2) / math.sqrt(c / heads)).softmax(-1)

    total = 0.0
    for i, j in itertools.product(range(3), repeat=2):
        r_s, r_t = relation(qkv_s[i], qkv_s[j], 6), relation(qkv_t[i], qkv_t[j], 10)
        total = total + (-(r_t * r_s.log()).sum(-1)).mean()
    torch.testing.assert_close(qkv_relation(qkv_s, qkv_t, relation_heads=heads), total / 9)
    kl = qkv_relation(qkv_t, qkv_t, relation_heads=heads, kind="kl")
    assert kl.abs().item() < 1e-12


# ---- feature --------------------------------------------------------------------------------


def test_feature_losses_with_mask_and_projector():
    s, t = torch.randn(2, 4, 3, **DOUBLE), torch.randn(2, 4, 3, **DOUBLE)
    mask = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(feature_mse(s, t, mask).double(), ((s[mask] - t[mask]) ** 2).mean())
    cos = (s[mask] * t[mask]).sum(-1) / (s[mask].norm(dim=-1) * t[mask].norm(dim=-1))
    torch.testing.assert_close(feature_cosine(s, t, mask).double(), (1 - cos).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feature_cosine(4 * t, t), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert feature_mse(s, t, torch.zeros_like(mask)).item() == 0
    term = FeatureTerm("mse", student="a")
    term.bind([("a", "b")], [nn.Linear(3, 5)])
    inputs, _, _ = fake_inputs(student_features={"a": s.float()}, teacher_features={"b": torch.randn(2, 4, 5)})
    value = term(inputs)
    value.backward()
    assert term.projectors[0].weight.grad is not None  # the projector trains with the student


# ---- logit terms: MDist and the fused path -----------------------------------------------------


def fake_inputs(length=9, vocab=23, width=8, fused=False, seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    b = 2
    labels = torch.full((b, length), IGNORE_INDEX)
    labels[0, 5:8] = torch.randint(0, vocab, (3,), generator=g)
    labels[1, 6:] = torch.randint(0, vocab, (length - 6,), generator=g)
    image_mask = torch.zeros(b, length, dtype=torch.bool)
    image_mask[:, 1:4] = True
    head = nn.Linear(width, vocab, bias=True)
    hidden = torch.randn(b, length, width, generator=g, requires_grad=True)
    teacher = torch.randn(b, length, vocab, generator=g)
    common = dict(labels=labels, attention_mask=torch.ones(b, length, dtype=torch.long), image_mask=image_mask,
                  teacher_logits=teacher, **extra)
    if fused:
        return LossInputs(student_logits=None, student_hidden=hidden, student_head=head, **common)
    return LossInputs(student_logits=head(hidden), **common), hidden, head


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


# ---- tapped terms: how they read the features ------------------------------------------------


def test_qkv_term_splits_a_fused_projection_or_reads_three_taps():
    from losses.attention import QKVRelationTerm

    q, k, v = (torch.randn(2, 9, 6) for _ in range(3))
    qt, kt, vt = (torch.randn(2, 9, 4) for _ in range(3))
    expected = qkv_relation((q, k, v), (qt, kt, vt), relation_heads=2)
    fused = QKVRelationTerm(student="blocks.{i}.attn.qkv", relation_heads=2)
    fused.bind([("blocks.0.attn.qkv", "blocks.3.attn.qkv")], [None])
    inputs, _, _ = fake_inputs(student_features={"blocks.0.attn.qkv": torch.cat([q, k, v], -1)},
                               teacher_features={"blocks.3.attn.qkv": torch.cat([qt, kt, vt], -1)})
    torch.testing.assert_close(fused(inputs), expected)
    split = QKVRelationTerm(student="layers.{i}.{p}_proj", relation_heads=2)
    split.bind([("layers.1.{p}_proj", "layers.1.{p}_proj")], [None])
    assert split.expand("layers.1.{p}_proj") == ["layers.1.q_proj", "layers.1.k_proj", "layers.1.v_proj"]
    inputs.student_features = dict(zip(split.expand("layers.1.{p}_proj"), (q, k, v)))
    inputs.teacher_features = dict(zip(split.expand("layers.1.{p}_proj"), (qt, kt, vt)))
    torch.testing.assert_close(split(inputs), expected)


def test_sequence_taps_are_split_into_images_and_masked():
    from losses.relation import HiddenRelationTerm, RDistTapTerm

    inputs, _, _ = fake_inputs()  # image tokens at positions 1..3 of both samples, L = 9
    h_s, h_t = torch.randn(2, 9, 5), torch.randn(2, 9, 7)
    term = RDistTapTerm(student="proj")
    term.bind([("proj", "proj")], [None])
    inputs.student_features, inputs.teacher_features = {"proj": h_s}, {"proj": h_t}
    torch.testing.assert_close(term(inputs), rdist(h_s[:, 1:4], h_t[:, 1:4]))
    hidden = HiddenRelationTerm(student="proj", mask="answer", scale=49.0)
    hidden.bind([("proj", "proj")], [None])
    answer = inputs.position_mask("answer")
    expected = torch.stack([hidden_relation(h_s[b:b + 1, answer[b]], h_t[b:b + 1, answer[b]], scale=49.0)
                            for b in range(2)]).mean()
    torch.testing.assert_close(hidden(inputs), expected)
