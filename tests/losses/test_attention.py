"""Attention losses (losses/attention.py): attention-map KL with head mapping and grouped
keys, MiniViT's nine-pair Q/K/V relation, against direct computations."""

import itertools
import math

import pytest
import torch

from conftest import fake_inputs
from losses.attention import attention_map_kl, head_mapping, qkv_relation

torch.manual_seed(0)
DOUBLE = dict(dtype=torch.float64)


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
