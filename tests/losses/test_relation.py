"""Relation losses (losses/relation.py): RDist per image, MiniViT's Gram relation, RKD, the
splitting of sequence taps into images, against direct computations and their identities."""

import itertools

import torch
import torch.nn.functional as F

from conftest import fake_inputs
from losses.relation import hidden_relation, image_groups, rdist, rkd_angle, rkd_distance

torch.manual_seed(0)
DOUBLE = dict(dtype=torch.float64)


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
