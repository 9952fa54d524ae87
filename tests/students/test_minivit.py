"""MiniViT students (students/minivit.py): parameter counts, the timm model contract, weight
sharing, parity with timm's unshared models, the head transforms, export and initialisation."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

import students
from students import minivit
from students.minivit import MODELS, SharedLinear, init_from_dense, minivit_params, shared_groups
from workbench.taps import FeatureTaps, TapPoint, layer_taps

# the paper's tables (millions); docs/methods.md §1.4
PAPER_PARAMS = {
    "mini_deit_base_patch16_224": 44.1,
    "mini_swin_tiny_patch4_window7_224": 12.0,
    "mini_swin_small_patch4_window7_224": 26.5,
    "mini_swin_base_patch4_window7_224": 46.4,
    "deit_base_patch16_224": 86.6,
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(name):
    model = timm.create_model(name)
    assert n_params(model) / 1e6 == pytest.approx(PAPER_PARAMS[name], abs=0.3)


def test_mini_deit_tiny_and_small_are_3m_and_11m():
    assert n_params(timm.create_model("mini_deit_tiny_patch16_224")) / 1e6 == pytest.approx(3.0, abs=0.3)
    assert n_params(timm.create_model("mini_deit_small_patch16_224")) / 1e6 == pytest.approx(11.0, abs=0.5)


@pytest.mark.parametrize("name", MODELS)
def test_registered_model_contract_at_224(name):
    """Forward at 224, backward, every parameter gets a finite, non-zero gradient."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, transform_init="identity", drop_path_rate=0.0)  # no dropped branches
    x = torch.randn(1, 3, 224, 224)
    out = model(x)
    assert out.shape == (1, 7) and torch.isfinite(out).all()
    out.square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


def small_deit(**kw):
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=6, num_heads=4, num_classes=5)
    return timm.create_model("mini_deit_tiny_patch16_224", **{**args, **kw})


def small_swin(name="mini_swin_tiny_patch4_window7_224", **kw):
    args = dict(img_size=16, patch_size=2, window_size=4, embed_dim=16, depths=(2, 4), num_heads=(2, 4),
                num_classes=5, repeat=(2, 4))
    return timm.create_model(name, **{**args, **kw})


def test_parameter_formula_for_mini_deit():
    """embed + head + ceil(L / r)(12 d^2 + 9 d) + L(4 d + 2 H^2) + 2 d, with r not dividing L."""
    d, h, depth, r = 32, 4, 6, 4
    model = small_deit(repeat=r)
    embed = 3 * 4 * 4 * d + d + 16 * d  # patch conv + bias + position embedding (no CLS)
    head = d * 5 + 5
    expected = embed + head + math.ceil(depth / r) * (12 * d * d + 9 * d) + depth * (4 * d + 2 * h * h) + 2 * d
    assert n_params(model) == expected
    assert minivit_params(model)["shared"] == math.ceil(depth / r) * (12 * d * d + 9 * d)


def test_parameter_formula_for_mini_swin():
    """Per stage: ceil(L / r)(12 d^2 + 9 d + T) + L(56 d + 2 H^2 + 2 H), plus embedding,
    patch merging, final norm and head; r = 3 does not divide stage 2's 4 blocks."""
    def stage(d, h, depth, r, window):
        table = (2 * window - 1) ** 2 * h
        return math.ceil(depth / r) * (12 * d * d + 9 * d + table) + depth * (56 * d + 2 * h * h + 2 * h)

    embed = 3 * 2 * 2 * 16 + 16 + 2 * 16  # patch conv + bias + its LayerNorm
    merging = 2 * 4 * 16 + 4 * 16 * 32  # LayerNorm(4 d) + Linear(4 d -> 2 d, no bias)
    head = 2 * 32 + 32 * 5 + 5  # final norm + classifier
    expected = embed + stage(16, 2, 2, 2, 4) + merging + stage(32, 4, 4, 3, 4) + head
    assert n_params(small_swin(repeat=(2, 3))) == expected


def test_shared_weights_are_one_tensor():
    model = small_deit(repeat=3).eval()
    qkv0, qkv1, qkv3 = (model.get_submodule(f"blocks.{i}.attn.qkv") for i in (0, 1, 3))
    assert isinstance(qkv1, SharedLinear) and qkv1.weight is qkv0.weight
    assert not isinstance(qkv3, SharedLinear)  # a new group starts at application 3
    assert "blocks.1.attn.qkv.weight" not in model.state_dict()  # stored once
    taps = FeatureTaps(model, [TapPoint("blocks.1.attn.qkv"), TapPoint("blocks.2.mlp.fc2")], "student")
    x = torch.randn(2, 3, 16, 16)
    with taps.capture() as before:
        model(x)
    with torch.no_grad():
        qkv0.weight.add_(0.5)
        model.blocks[0].mlp.fc2.bias.add_(1.0)
    with taps.capture() as after:
        model(x)
    for key in before:  # applications 1 and 2 see the change made to application 0's weights
        assert not torch.allclose(before[key], after[key])


def test_swin_bias_table_and_mlp_shared_within_a_stage():
    model = small_swin()
    stage = model.layers[1]
    owner = stage.blocks[0]
    for j in (1, 2, 3):
        block = stage.blocks[j]
        assert block.mlp.fc1.weight is owner.mlp.fc1.weight
        assert block.attn._bias_owner is owner.attn
        assert block.norm1.weight is not owner.norm1.weight  # per-application LayerNorms
    groups = shared_groups(model)
    assert groups["layers.1.blocks.0.attn.qkv"] == [f"layers.1.blocks.{j}.attn.qkv" for j in range(4)]
    assert groups["layers.1.blocks.0.attn.relative_position_bias_table"][-1] == \
        "layers.1.blocks.3.attn.relative_position_bias_table"


def test_swin_windows_alternate_per_application():
    model = timm.create_model("mini_swin_tiny_patch4_window7_224")
    shifts = [b.shift_size for b in model.layers[2].blocks]  # one stored block, six applications
    assert shifts == [(0, 0), (3, 3)] * 3
    assert all(b.attn.qkv.weight is model.layers[2].blocks[0].attn.qkv.weight for b in model.layers[2].blocks)


def test_repeat_one_without_transforms_is_timm_vit():
    mini = small_deit(repeat=1, transform=False).eval()
    plain = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=6, num_heads=4, num_classes=5,
                              qkv_bias=True, class_token=False, global_pool="avg").eval()
    plain.load_state_dict(mini.state_dict(), strict=True)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(mini(x), plain(x), atol=1e-5, rtol=1e-5)


def test_repeat_one_without_transforms_is_timm_swin():
    mini = small_swin(repeat=1, transform_heads=False, transform_ffn=False).eval()
    plain = SwinTransformer(img_size=16, patch_size=2, window_size=4, embed_dim=16, depths=(2, 4),
                            num_heads=(2, 4), num_classes=5).eval()
    plain.load_state_dict(mini.state_dict(), strict=True)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(mini(x), plain(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", [small_deit, small_swin])
def test_identity_head_transforms_change_nothing(build):
    """Identity head maps reproduce the untransformed attention exactly (the wiring test)."""
    kw = {"transform_ffn": False} if build is small_swin else {}
    off = build(transform_heads=False, **kw) if build is small_swin else build(transform=False)
    on = build(transform_init="identity", **kw)
    state = {k: v for k, v in on.state_dict().items() if not any(t in k for t in ("conv_", "proj_l", "proj_w"))}
    off.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(on.eval()(x), off.eval()(x), atol=1e-5, rtol=1e-5)


def test_mini_attention_matches_a_hand_written_reference():
    """A' = W_w softmax(W_l (q k^T / sqrt(d))) mixing heads, then A' v and the output proj."""
    torch.manual_seed(0)
    attn = small_deit().blocks[0].attn.eval()
    torch.nn.init.normal_(attn.conv_l.weight)
    torch.nn.init.normal_(attn.conv_w.weight)
    x = torch.randn(2, 16, 32)
    q, k, v = attn.qkv(x).view(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)  # (B, H, N, D)
    logits = q @ k.transpose(-1, -2) / math.sqrt(8)
    w_l, w_w = attn.conv_l.weight[:, :, 0, 0], attn.conv_w.weight[:, :, 0, 0]
    probs = torch.einsum("gh,bhnm->bgnm", w_l, logits).softmax(-1)
    mixed = torch.einsum("gh,bhnm->bgnm", w_w, probs)
    expected = attn.proj((mixed @ v).transpose(1, 2).reshape(2, 16, 32))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_swin_ffn_transformation_replaces_the_stream():
    """x <- LN_local(x); x <- x + DWConv7x7(x); then the MLP residual, as the Mini-Swin code does."""
    torch.manual_seed(0)
    block = small_swin().layers[0].blocks[0].eval()
    x = torch.randn(2, 8, 8, 16)
    h = x + block._attn(block.norm1(x))
    h = block.norm_local(h)
    h = h + block.local_conv(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    h = h + block.mlp(block.norm2(h))
    torch.testing.assert_close(block(x), h, atol=1e-5, rtol=1e-5)


def test_taps_fire_once_per_application_and_flatten_swin_stages():
    model = small_swin()
    taps = layer_taps(model, "layers.*.blocks.{i}.attn.qkv")
    assert taps == [f"layers.0.blocks.{j}.attn.qkv" for j in range(2)] + \
        [f"layers.1.blocks.{j}.attn.qkv" for j in range(4)]
    points = [TapPoint(t) for t in taps]
    with FeatureTaps(model, points, "student").capture() as found:
        model(torch.randn(2, 3, 16, 16))
    shapes = [tuple(found[p].shape) for p in points]
    assert shapes[:2] == [(2 * 4, 16, 48)] * 2  # 8x8 map, four 4x4 windows per image, width 16
    assert shapes[2:] == [(2, 16, 96)] * 4  # 4x4 map: one window, width 32
    assert not torch.equal(found[points[2]], found[points[3]])  # each application's own input


def test_export_and_load_round_trip(tmp_path):
    model = small_swin().eval()
    students.export_timm(model, tmp_path / "s", class_names=list("abcde"))
    loaded = students.load(tmp_path / "s").eval()
    assert type(loaded) is type(model) and n_params(loaded) == n_params(model)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded.layers[1].blocks[2].mlp.fc1.weight is loaded.layers[1].blocks[0].mlp.fc1.weight


@pytest.mark.parametrize("reduce", ["first", "mean"])
def test_init_from_dense_teacher(reduce):
    """Mini-DeiT from a same-shaped DeiT with a class token: shared weights from the group's
    first application (or its mean), position embedding without the class row."""
    teacher = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=6,
                                num_heads=4, num_classes=5)
    state = teacher.state_dict()
    student = small_deit(repeat=2)
    counts = init_from_dense(student, state, reduce=reduce)
    w = student.blocks[2].attn.qkv.weight
    if reduce == "first":
        torch.testing.assert_close(w, state["blocks.2.attn.qkv.weight"])
        assert counts["averaged"] == 0
    else:
        torch.testing.assert_close(w, (state["blocks.2.attn.qkv.weight"] + state["blocks.3.attn.qkv.weight"]) / 2)
        assert counts["averaged"] == 3 * 8  # 3 groups x (qkv, proj, fc1, fc2) x (weight, bias)
    torch.testing.assert_close(student.blocks[3].norm1.weight, state["blocks.3.norm1.weight"])
    torch.testing.assert_close(student.pos_embed, state["pos_embed"][:, 1:])
    assert counts["kept"] > 0  # the attention transforms and fc_norm have no counterpart
    with pytest.raises(ValueError, match="shares no tensor"):
        init_from_dense(student, {"unrelated": torch.zeros(1)})


def test_unknown_repeat_and_transform_init_fail():
    with pytest.raises(ValueError, match="repeat"):
        small_deit(repeat=0)
    with pytest.raises(ValueError, match="transform_init"):
        small_deit(transform_init="zeros")
    with pytest.raises(ValueError, match="stages"):
        small_swin(repeat=(1, 2, 3))


def test_module_exposes_the_six_presets():
    assert set(MODELS) <= set(timm.list_models("mini_*"))
    assert minivit.MiniVisionTransformer.__doc__ and "iRPE" in minivit.MiniVisionTransformer.__doc__
