"""Weight quantization of students (`students/quantize.py`): the schemes' grids in closed form,
the straight-through estimator, which layers a request quantizes, and the `quantize` transform."""

import pytest
import torch
from conftest import make_tiny_vlm
from torch import nn

from students.quantize import (
    CONFIG_KEY,
    FakeQuantLinear,
    QuantRequest,
    covering_prefixes,
    fake_quantize,
    linear_scopes,
    plan,
    quantize_transform,
    recorded_request,
)


@pytest.fixture(scope="module")
def weight():
    torch.manual_seed(0)
    return torch.randn(64, 128)


def test_int8_is_symmetric_per_output_channel(weight):
    q = fake_quantize(weight, "int8")
    scale = weight.abs().amax(1, keepdim=True) / 127.5  # torchao: absmax maps to the middle of [-128, 127]
    k = q / scale
    assert torch.allclose(k, k.round(), atol=1e-3) and k.min() >= -128.001 and k.max() <= 127.001
    assert ((weight - q).abs() <= scale / 2 + 1e-6).all()


def test_int4_has_at_most_16_levels_per_group_and_rounds_to_nearest(weight):
    q = fake_quantize(weight, "int4", group_size=32).view(64, 4, 32)
    groups = weight.view(64, 4, 32)
    scale = groups.abs().amax(-1, keepdim=True) / 7.5  # symmetric, range [-8, 7]
    k = q / scale
    assert torch.allclose(k, k.round(), atol=1e-3) and k.min() >= -8.001 and k.max() <= 7.001
    assert ((groups - q).abs() <= scale / 2 + 1e-6).all()
    assert max(len(torch.unique(g)) for g in q.reshape(-1, 32)) <= 16
    coarse = fake_quantize(weight, "int4", group_size=128)
    assert (coarse - weight).pow(2).mean() > (q.view(64, 128) - weight).pow(2).mean()  # bigger groups, more error


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_values_are_the_normal_float_code_times_the_block_absmax(weight, double_quant):
    import bitsandbytes.functional as bnbf

    code = bnbf.get_4bit_type("nf4", device="cpu")
    q = fake_quantize(weight, "nf4", double_quant=double_quant).reshape(-1, 64)
    absmax = q.abs().amax(1, keepdim=True)
    on_code = (q / absmax).unsqueeze(-1).sub(code).abs().amin(-1)
    assert on_code.max() < 1e-5
    tolerance = 1e-2 if double_quant else 1e-6  # double quantization stores the absmax in 8 bits
    assert torch.allclose(absmax, weight.reshape(-1, 64).abs().amax(1, keepdim=True), rtol=tolerance)


def test_fake_quant_linear_passes_the_gradient_straight_through(weight):
    torch.manual_seed(1)
    layer = nn.Linear(128, 64)
    layer.weight = nn.Parameter(weight.clone())
    fake = FakeQuantLinear.from_linear(layer, "int4")
    assert fake.weight is layer.weight  # the same parameter, not a copy
    x = torch.randn(5, 128, requires_grad=True)
    fake(x).square().sum().backward()
    wq = fake_quantize(weight, "int4").requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    nn.functional.linear(x2, wq, layer.bias).square().sum().backward()
    assert torch.allclose(fake.weight.grad, wq.grad, atol=1e-5)  # d/dW = d/dQ(W): identity Jacobian
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


@pytest.fixture(scope="module")
def vlm(processor):
    return make_tiny_vlm(processor, text_hidden=64, vision_hidden=64)


def test_scopes_of_a_llava(vlm):
    scopes = linear_scopes(vlm)
    assert scopes["lm_head"] == "lm_head"
    assert scopes["model.multi_modal_projector.linear_1"] == "connector"
    assert scopes["model.vision_tower.encoder.layers.0.mlp.fc1"] == "vision"
    assert scopes["model.language_model.layers.0.self_attn.q_proj"] == "llm"
    layers = len(vlm.model.language_model.layers)
    assert sum(s == "llm" for s in scopes.values()) == 7 * layers


def test_presets_keep_lm_head_and_projector_and_their_own_skips(vlm):
    p = plan(vlm, QuantRequest.from_options(preset="minicpmv_nf4"))
    assert "lm_head" in p.kept and "model.multi_modal_projector.linear_1" in p.kept
    assert all(n.endswith("out_proj") for n in p.kept if "vision_tower" in n)
    assert covering_prefixes(p.kept, list(linear_scopes(vlm)))[-2:] == ["model.multi_modal_projector", "lm_head"]
    tiny = plan(vlm, QuantRequest.from_options(preset="tinygptv_int8"))
    assert set(tiny.layers.values()) == {"llm_int8"} and all(n.startswith("model.language_model") for n in tiny.layers)
    mixed = plan(vlm, QuantRequest.from_options(preset="bluelm_mixed"))
    assert {mixed.layers[n] for n in mixed.layers if "language_model" in n} == {"int4"}
    assert {mixed.layers[n] for n in mixed.layers if "language_model" not in n} == {"int8"}
    head = plan(vlm, QuantRequest.from_options(method="int8", quantize_lm_head=True))
    assert head.layers["lm_head"] == "int8"


@pytest.mark.parametrize("options, words", [
    (dict(preset="int8", method="int8"), "not both"),
    (dict(), "give a preset"),
    (dict(method="int8", scopes=["llm", "eyes"]), "eyes"),
    (dict(preset="bluelm_mixed", scopes=["llm"]), "scopes"),
    (dict(method="int4", group_size=0), "group_size"),
])
def test_bad_requests(options, words):
    with pytest.raises(ValueError, match=words):
        QuantRequest.from_options(**options)


def test_one_backend_per_model():
    request = QuantRequest({"llm": "int4", "vision": "nf4"})
    with pytest.raises(ValueError, match="two backends"):
        request.check()
    with pytest.raises(ValueError, match="8 bits or in 4 bits"):
        QuantRequest({"llm": "nf4", "vision": "llm_int8"}).check()


def test_transform_swaps_layers_keeps_names_and_records_the_request(processor):
    model = make_tiny_vlm(processor, text_hidden=64, vision_hidden=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    note = quantize_transform(model, method="int4", group_size=32)
    assert note["schemes"] == ["int4"] and note["quantized_layers"] > 0
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # latent weights unchanged
    assert isinstance(model.model.language_model.layers[0].mlp.up_proj, FakeQuantLinear)
    assert type(model.lm_head) is nn.Linear
    assert recorded_request(model.config).scopes == {"llm": "int4", "vision": "int4"}
    assert getattr(model.config, CONFIG_KEY)["group_size"] == 32
    ids = torch.tensor([[1, 5, 6, 7]])
    again = make_tiny_vlm(processor, text_hidden=64, vision_hidden=64)
    assert not torch.allclose(model(input_ids=ids).logits, again(input_ids=ids).logits)  # it computes quantized
    with pytest.raises(ValueError, match="weight-only"):
        quantize_transform(again, method="llm_int8")
