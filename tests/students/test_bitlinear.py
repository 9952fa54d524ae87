"""Ternary weights (`students/bitlinear.py`): BitNet b1.58's quantizers against their closed
forms, the straight-through estimator, packing, and the `ternary` transform."""

import math

import pytest
import torch
from conftest import make_tiny_vlm
from torch import nn

from students.bitlinear import (
    BitLinear,
    pack_ternary,
    quantize_activations,
    ternary_codes,
    ternary_weight,
    unpack_ternary,
)
from students.ternary import ternary_transform


def test_gaussian_weights_split_into_thirds_as_the_normal_cdf_says():
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    codes, gamma = ternary_codes(w)
    # gamma = E|W| = sqrt(2/pi); zero iff |W| < gamma / 2: P = erf(gamma / 2 / sqrt(2))
    p_zero = math.erf(math.sqrt(2 / math.pi) / 2 / math.sqrt(2))
    fractions = [(codes == v).float().mean().item() for v in (-1, 0, 1)]
    assert fractions == pytest.approx([(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2], abs=2e-3)  # 0.345, 0.310, 0.345
    assert gamma.item() == pytest.approx(w.abs().mean().item())
    assert ((ternary_weight(w) - w).norm() / w.norm()).item() == pytest.approx(0.51, abs=0.01)
    assert set(torch.unique(ternary_weight(w)).tolist()) == {-gamma.item(), 0.0, gamma.item()}


def test_group_scales_are_the_absmean_of_each_group():
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    codes, gamma = ternary_codes(w, group=32)
    assert gamma.shape == (8, 2)
    assert torch.allclose(gamma, w.reshape(8, 2, 32).abs().mean(-1))
    q = ternary_weight(w, group=32).reshape(8, 2, 32)
    assert torch.allclose(q.abs().amax(-1), gamma)


def test_activations_round_per_token_to_8_bits():
    torch.manual_seed(2)
    x = torch.randn(64, 256) * torch.rand(64, 1) * 10
    q = quantize_activations(x)
    top = x.abs().amax(-1, keepdim=True)
    assert ((q - x).abs() <= top / 254 + 1e-6).all()
    assert torch.allclose(q.abs().amax(-1, keepdim=True), top)  # the row's absmax maps to 127 exactly
    assert ((q - x).norm() / x.norm()).item() < 0.01


def test_pack_round_trip_and_size():
    torch.manual_seed(3)
    for shape in [(3, 5), (64, 128), (7,)]:
        codes = torch.randint(-1, 2, shape, dtype=torch.int8)
        packed = pack_ternary(codes)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(codes.numel() / 4)
        assert torch.equal(unpack_ternary(packed, shape), codes)
    assert 64 * 128 * 2 / pack_ternary(torch.zeros(64, 128)).numel() == 8  # 8x smaller than bf16


def test_straight_through_gradients_are_those_at_the_quantized_values():
    torch.manual_seed(4)
    layer = BitLinear(64, 32, norm="none")
    x = torch.randn(5, 64, requires_grad=True)
    layer(x).square().sum().backward()
    wq = ternary_weight(layer.weight.detach()).requires_grad_()
    xq = quantize_activations(x.detach()).requires_grad_()
    nn.functional.linear(xq, wq).square().sum().backward()
    assert torch.allclose(layer.weight.grad, wq.grad, atol=1e-6)
    assert torch.allclose(x.grad, xq.grad, atol=1e-6)


def test_norm_inside_and_weight_only_options():
    torch.manual_seed(5)
    linear = nn.Linear(64, 32, bias=False)
    x = torch.randn(3, 64)
    inside = BitLinear.from_linear(linear, norm="inside", act_bits=None)
    assert inside.weight is linear.weight and isinstance(inside.norm, nn.RMSNorm)
    expected = nn.functional.linear(inside.norm(x), ternary_weight(linear.weight.detach()))
    assert torch.allclose(inside(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="norm"):
        BitLinear(64, 32, norm="outside")
    with pytest.raises(ValueError, match="group"):
        BitLinear(64, 32, group=48)


def test_ternary_transform_converts_the_language_model_only(processor):
    model = make_tiny_vlm(processor, text_hidden=64, vision_hidden=64)
    note = ternary_transform(model, weight_scale="group:32", act_bits=None)
    layers = len(model.model.language_model.layers)
    assert note["ternary_layers"] == 7 * layers
    assert isinstance(model.model.language_model.layers[0].mlp.down_proj, BitLinear)
    assert type(model.lm_head) is nn.Linear
    assert all(type(m) is nn.Linear for m in model.model.vision_tower.modules() if isinstance(m, nn.Linear))
    assert model.config.workbench_ternary["weight_scale"] == "group:32"
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj.norm, nn.RMSNorm)  # mmfree
    assert not isinstance(model.model.language_model.layers[0].input_layernorm, nn.Identity)
    model(input_ids=torch.tensor([[1, 5, 6]])).logits.sum().backward()
    assert model.model.language_model.layers[0].mlp.down_proj.weight.grad is not None
    for bad, words in [(dict(scopes=["brain"]), "brain"), (dict(weight_scale="row"), "group:"),
                       (dict(skip=["nothing"]), "nothing"), (dict(weight_scale="group:1000"), "group:1000: the group divides .* none of the 14"),
                       (dict(placement="inside"), "placement")]:
        with pytest.raises(ValueError, match=words):
            ternary_transform(make_tiny_vlm(processor, text_hidden=64, vision_hidden=64), **bad)


def test_a_ternary_student_reloads_as_it_trained(processor, tmp_path):
    import students

    model = make_tiny_vlm(processor, text_hidden=64, vision_hidden=64)
    ternary_transform(model, weight_scale="group:32")
    with torch.no_grad():
        model.model.language_model.layers[0].mlp.up_proj.norm.weight.mul_(1.5)  # a trained norm weight
    model.save_pretrained(tmp_path / "t")
    again = students.load(tmp_path / "t")
    assert isinstance(again.model.language_model.layers[1].self_attn.q_proj, BitLinear)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    skeleton = students.skeleton(tmp_path / "t")  # weightless, with the recorded structure
    assert isinstance(skeleton.model.language_model.layers[0].mlp.up_proj, BitLinear)


@pytest.mark.parametrize("placement", ["bitnet_faq", "bitnet_2b4t"])
def test_norm_placements(processor, tmp_path, placement):
    import students

    model = make_tiny_vlm(processor, text_hidden=64, vision_hidden=64)
    ternary_transform(model, placement=placement)
    block = model.model.language_model.layers[0]
    if placement == "bitnet_faq":  # norms inside every BitLinear, the block's pre-norms gone
        assert isinstance(block.input_layernorm, nn.Identity) and isinstance(block.post_attention_layernorm, nn.Identity)
        assert all(layer.norm is not None for layer in model.modules() if isinstance(layer, BitLinear))
        assert not isinstance(model.model.language_model.norm, nn.Identity)  # the final norm stays
    else:  # block norms kept; "subln" before o_proj and down_proj only
        assert not isinstance(block.input_layernorm, nn.Identity)
        assert block.self_attn.o_proj.norm is not None and block.mlp.down_proj.norm is not None
        assert block.self_attn.q_proj.norm is None and block.mlp.up_proj.norm is None
    model.save_pretrained(tmp_path / placement)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(students.load(tmp_path / placement)(input_ids=ids).logits, model(input_ids=ids).logits)


# ---- the packed deployment form -------------------------------------------------------------


def _ternary_vlm(processor, weight_scale, act_bits, placement="mmfree", seed=0):
    model = make_tiny_vlm(processor, seed=seed, text_hidden=64, vision_hidden=64)
    ternary_transform(model, weight_scale=weight_scale, act_bits=act_bits, placement=placement)
    with torch.no_grad():  # trained-looking norm weights and a bias, not the init's ones
        for layer in model.modules():
            if isinstance(layer, BitLinear) and layer.norm is not None:
                layer.norm.weight.uniform_(0.5, 1.5)
    return model.eval()


def _inputs(processor):
    """Two image + text prompts."""
    torch.manual_seed(3)
    size = processor.image_processor.crop_size["height"]
    ids = torch.cat([torch.full((2, (size // processor.patch_size) ** 2), processor.image_token_id),
                     torch.randint(5, 40, (2, 9))], 1)
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, size, size), "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("weight_scale, act_bits, placement", [("tensor", 8, "mmfree"), ("group:32", 8, "bitnet_faq"),
                                                               ("group:32", None, "mmfree"),
                                                               ("tensor", 8, "bitnet_2b4t")])
def test_the_packed_model_computes_the_training_forward(processor, tmp_path, weight_scale, act_bits, placement):
    import students
    from students.bitlinear import PackedBitLinear, pack_model

    model = _ternary_vlm(processor, weight_scale, act_bits, placement)
    inputs = _inputs(processor)
    with torch.no_grad():
        trained = model(**inputs).logits
    layers = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, BitLinear)}
    assert pack_model(model) == len(layers) and model.config.workbench_ternary["packed"]
    for name, numel in layers.items():
        packed = model.get_submodule(name)
        assert isinstance(packed, PackedBitLinear) and packed.weight_packed.numel() == math.ceil(numel / 4)
    model.save_pretrained(tmp_path / "packed")
    again = students.load(tmp_path / "packed")
    assert not any(isinstance(m, BitLinear) for m in again.modules())
    with torch.no_grad():
        for m in (model, again):  # the integer path: packed codes, int8 activations, int32 sums, one rescale
            logits = m(**inputs).logits
            # the goal is 1e-5 relative; BitLinear computes the integer path's sums exactly, so in fp32
            # they agree bit for bit (a fake-quantized x_q / s @ W_q would flip activation roundings)
            assert ((logits - trained).norm() / trained.norm()).item() < 1e-5
            assert torch.equal(logits, trained)
    stored = sum(t.numel() for n, t in again.state_dict().items() if n.endswith("weight_packed"))
    assert stored == sum(math.ceil(n / 4) for n in layers.values())


def test_packed_weights_are_eight_times_smaller_than_bf16_with_per_matrix_scales():
    from students.bitlinear import PackedBitLinear

    layer = BitLinear(512, 256)
    packed = PackedBitLinear.from_bitlinear(layer)
    codes, _ = ternary_codes(layer.weight.detach())
    assert torch.equal(unpack_ternary(packed.weight_packed, (256, 512)), codes)
    stored = packed.weight_packed.numel() + 4 * packed.weight_scale.numel()
    assert 2 * layer.weight.numel() / stored == pytest.approx(8.0, rel=1e-3)


def test_a_folder_exported_before_the_layers_were_recorded_still_loads(processor, tmp_path):
    import json

    import students

    model = _ternary_vlm(processor, "group:32", None, "bitnet_faq")
    model.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("layers", "removed_norms"):  # the record of the first ternary exports
        del config["workbench_ternary"][key]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    again = students.load(tmp_path / "old")
    inputs = _inputs(processor)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, model(**inputs).logits)
