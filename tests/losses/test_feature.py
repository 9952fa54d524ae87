"""Feature losses (losses/feature.py): MSE and cosine hints with masks and projectors."""

import torch
from torch import nn

from conftest import fake_inputs
from losses.feature import FeatureTerm, feature_cosine, feature_mse

torch.manual_seed(0)
DOUBLE = dict(dtype=torch.float64)


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
