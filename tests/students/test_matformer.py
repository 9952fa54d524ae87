"""MatFormer nesting and Mix'n'Match extraction (students/matformer.py): exactness at full
width, extracted == universal for the same spec, parameter counts, Hugging Face export."""

from __future__ import annotations

import random

import pytest
import timm
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import students
from students.matformer import (
    MatSpec, NestedMLP, active_config, budget_spec, count_params, extract, full_widths, matformerize, nested_mlps,
    parse_spec, set_active, submodel_params,
)


def llama(bias=False):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                        num_attention_heads=4, num_key_value_heads=2, mlp_bias=bias)).eval()


def qwen2():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=5,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=5).eval()


IDS = torch.randint(0, 60, (2, 11), generator=torch.Generator().manual_seed(1))
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def run(model):
    out = model(IMAGES) if isinstance(model, timm.models.VisionTransformer) else model(IDS).logits
    return out.detach()


@pytest.mark.parametrize("build", [llama, qwen2, vit, lambda: llama(bias=True)])
def test_full_width_is_the_original_model(build):
    model = build()
    before, keys = run(model), list(model.state_dict())
    paths = matformerize(model)
    assert len(paths) == len(full_widths(model)) and all(isinstance(model.get_submodule(p), NestedMLP) for p in paths)
    assert list(model.state_dict()) == keys  # same parameter names: checkpoints are unchanged
    torch.testing.assert_close(run(model), before, atol=0, rtol=0)


def random_spec(model, rng, skip=True):
    full = full_widths(model)
    widths = [rng.randint(1, h) for h in full]
    skips = tuple(sorted(rng.sample(range(len(full)), k=rng.randint(1, 2)))) if skip else ()
    return MatSpec(widths, skips)


@pytest.mark.parametrize("build", [llama, qwen2, vit, lambda: llama(bias=True)])
def test_extracted_submodels_equal_the_universal_model(build):
    model = build()
    matformerize(model)
    rng = random.Random(0)
    specs = [parse_spec("uniform:0.25", full_widths(model)), parse_spec("uniform:0.5", full_widths(model), "1-2"),
             random_spec(model, rng, skip=False), random_spec(model, rng), random_spec(model, rng)]
    for spec in specs:
        set_active(model, spec)
        assert active_config(model) == spec
        universal = run(model)
        static = extract(model, spec).eval()
        assert not any(isinstance(m, NestedMLP) for m in static.modules())
        torch.testing.assert_close(run(static), universal, atol=1e-5, rtol=0)
        assert count_params(static) == submodel_params(model, spec)
    set_active(model, MatSpec(full_widths(model)))
    assert active_config(model).skip == ()  # skip hooks are removed again


def test_parameter_formula_for_a_uniform_gated_submodel():
    """full - L * (h - k) * 3 d for a bias-free gated MLP (gate and up rows, down columns)."""
    model = llama()
    matformerize(model)
    full, d, n = count_params(model), 32, 6
    for k in (8, 16, 32):
        assert submodel_params(model, MatSpec([k] * n)) == full - n * (64 - k) * 3 * d


def test_uniform_export_is_a_standard_hugging_face_folder(tmp_path):
    for build in (llama, qwen2):
        model = build()
        matformerize(model)
        spec = parse_spec("uniform:0.25", full_widths(model), "2")
        set_active(model, spec)
        static = extract(model, spec)
        static.save_pretrained(tmp_path / build.__name__)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / build.__name__).eval()
        assert reloaded.config.intermediate_size == full_widths(model)[0] // 4
        assert reloaded.config.num_hidden_layers == len(full_widths(model)) - 1
        torch.testing.assert_close(run(reloaded), run(model), atol=1e-5, rtol=0)
        assert "matformer_granularities" in model.config.to_dict()  # the universal model keeps its own


def test_per_layer_export_and_universal_model_reload_with_students_load(tmp_path):
    model = llama()
    matformerize(model, granularities=(1.0, 0.5))
    model.save_pretrained(tmp_path / "universal")
    universal = students.load(tmp_path / "universal").eval()
    assert len(nested_mlps(universal)) == 6 and universal.matformer_granularities == (1.0, 0.5)
    spec = MatSpec([64, 8, 40, 16, 64, 24], skip=(3,))
    set_active(model, spec)
    set_active(universal, spec)
    torch.testing.assert_close(run(universal), run(model))
    extract(model, spec).save_pretrained(tmp_path / "mix")
    loaded = students.load(tmp_path / "mix").eval()
    assert loaded.config.matformer_widths == [64, 8, 40, 64, 24]
    torch.testing.assert_close(run(loaded), run(model), atol=1e-5, rtol=0)


def test_language_model_inside_a_vlm_is_nested_alone():
    from students.vlm import tiny_llava

    vlm = tiny_llava(vocab_size=40, image_token_id=39, pad_token_id=0, bos_token_id=1, eos_token_id=2, image_size=32,
                     patch_size=16, vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=3,
                     text_heads=2).eval()
    paths = matformerize(vlm.model.language_model)
    assert len(paths) == 3 and all(p.startswith("layers.") for p in paths)
    assert not any(isinstance(m, NestedMLP) for m in vlm.model.vision_tower.modules())
    spec = MatSpec([16, 64, 32], skip=(1,))
    spec = MatSpec([min(w, h) for w, h in zip(spec.widths, full_widths(vlm))], spec.skip)
    set_active(vlm, spec)
    ids = torch.tensor([[1, 39, 39, 39, 39, 5, 6, 7]])  # 2x2 patches: four image tokens
    inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), attention_mask=torch.ones_like(ids))
    universal = vlm(**inputs).logits
    static = extract(vlm, spec).eval()
    torch.testing.assert_close(static(**inputs).logits, universal, atol=1e-5, rtol=0)
    assert static.config.text_config.num_hidden_layers == 2


def test_uniform_vlm_export_loads_with_the_vlm_auto_class(tmp_path):
    from transformers import AutoModelForImageTextToText

    from students.vlm import tiny_llava

    vlm = tiny_llava(vocab_size=40, image_token_id=39, pad_token_id=0, bos_token_id=1, eos_token_id=2, image_size=32,
                     patch_size=16, vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=3,
                     text_heads=2).eval()
    matformerize(vlm.model.language_model)
    spec = parse_spec("uniform:0.25", full_widths(vlm), "2")
    set_active(vlm, spec)
    extract(vlm, spec).save_pretrained(tmp_path / "q")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "q").eval()
    assert loaded.config.text_config.intermediate_size == full_widths(vlm)[0] // 4
    ids = torch.tensor([[1, 39, 39, 39, 39, 5, 6, 7]])
    inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), attention_mask=torch.ones_like(ids))
    torch.testing.assert_close(loaded(**inputs).logits, vlm(**inputs).logits, atol=1e-5, rtol=0)


def test_parse_spec_and_its_errors():
    full = [64, 64, 64, 64]
    assert parse_spec("uniform:0.5", full).widths == [32] * 4
    assert parse_spec("widths:0.25,16,1.0,64", full, "1, 3").widths == [16, 16, 64, 64]
    assert parse_spec("widths:1,1,0.5,64", full).widths == [1, 1, 32, 64]  # a whole number is units: 1 is one
    for bad in ("widths:2.7,16,16,16", "widths:x,16,16,16", "widths:-1,16,16,16", "widths:1.5,16,16,16"):
        with pytest.raises(ValueError, match="neither a whole number of hidden units nor a fraction"):
            parse_spec(bad, full)
    with pytest.raises(ValueError, match="at least 1 hidden unit"):
        parse_spec("widths:0,16,16,16", full)
    assert parse_spec("uniform:1", full, "0-2").skip == (0, 1, 2)
    for text, skip, message in (("uniform:1.5", None, "fraction"), ("widths:1,2", None, "2 widths for 4"),
                                ("half", None, "uniform:"), ("uniform:0.5", "9", "4 layers"),
                                ("uniform:0.5", "a-b", "not an index")):
        with pytest.raises(ValueError, match=message):
            parse_spec(text, full, skip)


def test_budget_spec_fits_and_widens_deep_layers_first():
    model = llama()
    matformerize(model)
    for budget in (26_000, 31_000, 40_000, count_params(model)):
        spec = budget_spec(model, budget)
        used = submodel_params(model, spec)
        assert used <= budget and budget - used < 3 * 32  # less than one more hidden unit is left
        assert spec.widths == sorted(spec.widths)  # never narrower deeper
    assert budget_spec(model, count_params(model)).widths == full_widths(model)
    skipped = budget_spec(model, 25_000, skip=(5,))
    assert skipped.skip == (5,) and submodel_params(model, skipped) <= 25_000
    with pytest.raises(ValueError, match="below the smallest"):
        budget_spec(model, 1000)


def test_bad_specs_and_models_fail_clearly():
    model = llama()
    with pytest.raises(ValueError, match="matformerize"):
        set_active(model, MatSpec([1] * 6))
    matformerize(model)
    with pytest.raises(ValueError, match="outside 1..64"):
        set_active(model, MatSpec([65] + [64] * 5))
    with pytest.raises(ValueError, match="every layer"):
        extract(model, MatSpec([64] * 6, skip=tuple(range(6))))
    with pytest.raises(ValueError, match="no MLP"):
        matformerize(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="granularities"):
        matformerize(llama(), granularities=(0.5, 0.25))
    normed = timm.layers.Mlp(8, 16, norm_layer=torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="normalises"):
        NestedMLP(normed)
