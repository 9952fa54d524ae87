"""kernels/ternary: the integer path of BitLinear (packed 2-bit weights, int8 activations,
int32 accumulation) against the fake-quantized training forward, in torch and in Triton (under
the interpreter on CPU)."""

import pytest
import torch
from kernel_utils import assert_close_verbose

from kernels.ternary import ternary_linear, ternary_linear_ref
from students.bitlinear import BitLinear, pack_ternary, ternary_codes


def _layer(in_features, out_features, group, act_bits, seed=0):
    torch.manual_seed(seed)
    layer = BitLinear(in_features, out_features, norm="none", group=group, act_bits=act_bits)
    codes, gamma = ternary_codes(layer.weight.detach(), group)
    return layer, pack_ternary(codes), gamma


@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("act_bits", [8, None])
def test_reference_integer_path_equals_the_training_forward(group, act_bits):
    layer, packed, gamma = _layer(128, 48, group, act_bits)
    x = torch.randn(2, 7, 128)
    with torch.no_grad():
        expected = layer(x)
    y = ternary_linear_ref(x, packed, gamma, 48, group, act_bits)
    assert ((y - expected).abs().max() / expected.abs().max()) < 1e-5


@pytest.mark.parametrize("group, in_features, out_features, rows", [(None, 64, 40, 5), (32, 96, 33, 19)])
def test_triton_kernel_equals_the_reference(monkeypatch, group, in_features, out_features, rows):
    pytest.importorskip("triton")
    import kernels.ternary.triton as native

    monkeypatch.setenv("WB_KERNELS", "triton")
    calls = []
    kernel = native.ternary_linear_triton
    monkeypatch.setattr(native, "ternary_linear_triton", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    layer, packed, gamma = _layer(in_features, out_features, group, 8, seed=1)
    x = torch.randn(rows, in_features)
    y = ternary_linear(x, packed, gamma, out_features, group)
    assert_close_verbose("ternary gemm (triton vs ref)", y, ternary_linear_ref(x, packed, gamma, out_features, group),
                         atol=1e-5, rtol=1e-5)
    assert calls == [1]  # the Triton program ran (the interpreter on CPU)
    with torch.no_grad():
        expected = layer(x)
    assert ((y - expected).abs().max() / expected.abs().max()) < 1e-5
