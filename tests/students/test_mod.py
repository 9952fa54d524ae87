"""Mixture-of-depths students (students/mod.py, p-MoD): the progressive-ratio-decay schedule,
identity with the dense model, per-layer caches of the kept tokens, cached generation against
recomputation (left padding included), the router's gradient from skipped tokens, the token
counter's FLOPs and KV proxies, reload and the transform's bad options."""

from __future__ import annotations

import math

import pytest
import torch

import students
import students.mod
from conftest import assert_cached_generation_is_recomputation, make_tiny_vlm, vlm_inputs
from students.hf_cache import output_cache
from students.mod import (ModCacheLayer, count_tokens, decoder_layers, kept_count, mean_retention, mod_transform,
                          prd_ratios, schedule_ratios)


def _mod_student(processor, schedule="prd", seed=0, random_routers=True, **kwargs):
    model = make_tiny_vlm(processor, seed=seed, text_layers=4).eval()
    mod_transform(model, schedule=schedule, **kwargs)
    if random_routers:
        torch.manual_seed(seed + 1)
        for layer in decoder_layers(model):
            if hasattr(layer, "mod_router"):
                torch.nn.init.normal_(layer.mod_router.weight, std=1.0)
    return model


# --------------------------------------------------------------------------- schedules


def test_prd_for_32_layers_is_the_published_schedule():
    ratios = prd_ratios(32)
    assert ratios[:8] == [None] * 8  # s(l) > 0.85: dense
    assert [round(r, 3) for r in ratios[8:12]] == [0.844, 0.806, 0.764, 0.72]
    assert ratios[24:] == [0.15] * 8
    assert prd_ratios(4) == [None, 0.75, 0.25, 0.15] or [None, *[round(r, 12) for r in prd_ratios(4)[1:]]] == \
        [None, 0.75, 0.25, 0.15]


@pytest.mark.parametrize("layers", [4, 8, 12, 16, 32])
def test_prd_mean_retention_is_0_5375_for_any_depth_divisible_by_4(layers):
    assert mean_retention(prd_ratios(layers)) == pytest.approx(0.5375, abs=1e-12)


def test_schedules_and_their_errors():
    assert schedule_ratios("fixed:0.5", 6) == [None, None, 0.5, 0.5, 0.5, None]
    assert schedule_ratios("uniform:1.0", 3) == [1.0, 1.0, 1.0]
    assert schedule_ratios([None, 0.5, 0.25], 3) == [None, 0.5, 0.25]
    for bad, match in [("cosine", "unknown schedule"), ("fixed:half", "not a ratio"), ("uniform:1.5", r"\(0, 1\]"),
                       ([0.5, 0.5], "2 ratios for 3"), (["x", 1, 1], "ratios or null")]:
        with pytest.raises(ValueError, match=match):
            schedule_ratios(bad, 3)
    assert kept_count(0.15, 20) == 3 and kept_count(0.75, 9) == 6


def test_bad_transform_options(processor):
    model = make_tiny_vlm(processor, text_layers=4)
    for kwargs, match in [({"targets": "text"}, "targets"), ({"string_scope": "attention"}, "string_scope"),
                          ({"router": "softmax"}, "router"),
                          ({"schedule": [None] * 4}, "no layer")]:
        with pytest.raises(ValueError, match=match):
            mod_transform(model, **kwargs)


# --------------------------------------------------------------------------- the layer


def test_with_ratio_1_every_layer_is_the_dense_layer_exactly(processor, world_dir):
    dense = make_tiny_vlm(processor, text_layers=4).eval()
    mod = _mod_student(processor, "uniform:1.0", random_routers=False)
    inputs = vlm_inputs(processor, world_dir, left_pad=5)
    with torch.no_grad():
        assert torch.equal(mod(**inputs).logits, dense(**inputs).logits)


def test_at_initialisation_skipped_tokens_pass_through_unchanged(processor, world_dir):
    mod = _mod_student(processor, random_routers=False)
    inputs = vlm_inputs(processor, world_dir)
    with torch.no_grad():
        hidden = mod(**inputs, output_hidden_states=True).hidden_states
    image = inputs["input_ids"] == processor.image_token_id
    n_image = int(image[0].sum())
    for i, ratio in enumerate(prd_ratios(4)[:3]):  # the last hidden state is after the final norm
        if ratio is None:
            continue
        moved = (hidden[i + 1] - hidden[i]).abs().amax(-1)[0][image[0]]  # per image token of example 0
        assert int((moved == 0).sum()) == n_image - kept_count(ratio, n_image)
        assert torch.isfinite(hidden[i + 1]).all()


def test_each_layer_caches_the_text_plus_its_kept_image_tokens(processor, world_dir):
    mod = _mod_student(processor)
    inputs = vlm_inputs(processor, world_dir, n=1)
    with torch.no_grad():
        cache = output_cache(mod(**inputs, use_cache=True))
    n = inputs["input_ids"].shape[1]
    n_image = int((inputs["input_ids"] == processor.image_token_id).sum())
    for layer, ratio in zip(cache.layers, prd_ratios(4)):
        expected = n if ratio is None else n - n_image + kept_count(ratio, n_image)
        assert layer.keys.shape[-2] == expected
        assert isinstance(layer, ModCacheLayer) == (ratio is not None)
        assert layer.get_seq_length() == n  # what positions are computed from


@pytest.mark.parametrize("string_scope", ["mlp", "layer"])
def test_cached_greedy_generation_equals_recomputation_with_left_padding(processor, world_dir, string_scope):
    mod = _mod_student(processor, string_scope=string_scope)
    inputs = vlm_inputs(processor, world_dir, left_pad=7)
    assert_cached_generation_is_recomputation(mod, inputs, 6, processor.tokenizer.pad_token_id)


def test_a_rolled_back_cache_decodes_as_before(processor, world_dir):
    """Speculative decoding crops rejected tokens: generated text can be rolled back; the
    image part of a MoD layer's cache cannot."""
    mod = _mod_student(processor)
    inputs = vlm_inputs(processor, world_dir, n=1)
    with torch.no_grad():
        out = mod(**inputs, use_cache=True)
        cache = output_cache(out)
        before = [layer.keys.shape[-2] for layer in cache.layers]
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
        first = mod(input_ids=token, attention_mask=mask, cache=cache, use_cache=True).logits
        cache.crop(-1)
        assert [layer.keys.shape[-2] for layer in cache.layers] == before
        again = mod(input_ids=token, attention_mask=mask, cache=cache, use_cache=True).logits
        assert torch.equal(first, again)
        with pytest.raises(RuntimeError, match="only roll back"):
            cache.layers[3].crop(-(cache.layers[3].stored() - 1))


def test_skipped_tokens_give_the_router_a_gradient(processor, world_dir):
    mod = _mod_student(processor, random_routers=False)
    inputs = vlm_inputs(processor, world_dir, n=1)
    hidden = mod(**inputs, output_hidden_states=True).hidden_states
    image = (inputs["input_ids"][0] == processor.image_token_id).nonzero().flatten()
    last = image[-1]  # at init the first k image tokens are kept (ties): the last one is skipped in layer 3
    n_image = len(image)
    assert kept_count(0.15, n_image) < n_image
    hidden[4][0, last].sum().backward()  # only through layer 3 (layer index 3 -> hidden_states[4])
    router = decoder_layers(mod)[3].mod_router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- counting


def test_token_counter_proxies(processor, world_dir):
    inputs = vlm_inputs(processor, world_dir, left_pad=5)
    dense = make_tiny_vlm(processor, text_layers=4).eval()
    with count_tokens(dense) as counter, torch.no_grad():
        dense(**inputs)
    assert counter.summary()["flops_ratio"] == 1.0 and counter.summary()["kv_ratio"] == 1.0
    mod = _mod_student(processor)
    with count_tokens(mod) as counter, torch.no_grad():
        mod(**inputs)
        mod.generate(**inputs, max_new_tokens=2, do_sample=False)  # prefill counts, decoding steps do not
    valid = inputs["attention_mask"].sum(1)
    n_image = (inputs["input_ids"] == processor.image_token_id).sum(1)
    layers = decoder_layers(mod)
    d = mod.config.text_config.hidden_size
    weights = sum(p.numel() for name, p in layers[0].named_parameters() if name.endswith("weight") and p.dim() == 2
                  and not name.startswith("mod_router"))
    kept = torch.stack([valid if r is None else valid - n_image + kept_count(r, int(n_image[0])) for r in prd_ratios(4)])

    def flops(n):
        n = n.double()
        return float((n * (2 * weights + d * (n + 1))).sum())

    summary = counter.summary()
    assert summary["tokens"] == 2 * int(valid.sum())
    assert summary["kv_ratio"] == pytest.approx(float(kept.sum()) / (4 * float(valid.sum())), rel=1e-12)
    assert summary["flops_ratio"] == pytest.approx(sum(flops(k) for k in kept) / (4 * flops(valid)), rel=1e-12)
    assert summary["image_retention"][0] == 1.0 and math.isclose(summary["image_retention"][3], 1 / 9)


def test_a_mod_student_reloads_with_its_routers(processor, world_dir, tmp_path):
    mod = _mod_student(processor, schedule=[None, 0.5, None, 0.25])
    mod.save_pretrained(tmp_path / "m")
    again = students.load(tmp_path / "m").eval()
    assert [type(layer).__name__ for layer in decoder_layers(again)] == \
        ["LlamaDecoderLayer", "ModLlamaDecoderLayer", "LlamaDecoderLayer", "ModLlamaDecoderLayer"]
    inputs = vlm_inputs(processor, world_dir)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, mod(**inputs).logits)
    assert mod_transform(again)["already_mod"]


# --------------------------------------------------------------------------- gamma-MoD


def _gamma_student(processor, schedule="uniform:0.5", seed=0):
    model = make_tiny_vlm(processor, seed=seed, text_layers=4).eval()
    mod_transform(model, schedule=schedule, router="gamma")
    return model


def test_the_shared_gamma_router_adds_2d_parameters_once(processor, tmp_path):
    dense = make_tiny_vlm(processor, text_layers=4)
    model = _gamma_student(processor)
    d = model.config.text_config.hidden_size
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in dense.parameters()) == 2 * d
    routers = {id(layer._mod_shared) for layer in decoder_layers(model)}
    assert len(routers) == 1 and [k for k in model.state_dict() if "mod_router" in k] == \
        ["model.language_model.mod_router.weight"]
    assert schedule_ratios("arank_mod:0.5", 8) == [None, None, None, 0.5, 0.5, 0.5, 0.5, None]


def test_gamma_keeps_every_text_token_and_learns_its_selection(processor, world_dir):
    model = _gamma_student(processor).train()
    inputs = vlm_inputs(processor, world_dir, left_pad=5)
    captured = []
    shared = decoder_layers(model)[0]._mod_shared
    shared.register_forward_hook(lambda m, a, out: captured.append(out))
    model(**inputs)
    image = inputs["input_ids"] == processor.image_token_id
    valid = inputs["attention_mask"].bool()
    expected = 0.0
    for logits in captured:  # one per MoD layer, in order: the kept set is the text + the top half by p
        p = logits.softmax(-1)[..., 1]
        keep = valid & ~image
        for b in range(2):
            top = p[b].masked_fill(~image[b], -1).argsort(descending=True, stable=True)[:kept_count(0.5, 9)]
            keep[b, top] = True
        expected = expected + torch.nn.functional.cross_entropy(logits[valid], keep[valid].long())
    loss = students.mod.aux_losses(model)["mod_router"]
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert shared.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        cache = output_cache(model(**vlm_inputs(processor, world_dir, n=1), use_cache=True))
    n = cache.layers[0].get_seq_length()
    assert [layer.keys.shape[-2] for layer in cache.layers] == [n - 9 + kept_count(0.5, 9)] * 4  # all text kept


def test_gamma_cached_generation_equals_recomputation_and_reloads(processor, world_dir, tmp_path):
    model = _gamma_student(processor)
    inputs = vlm_inputs(processor, world_dir, left_pad=7)
    assert_cached_generation_is_recomputation(model, inputs, 4, processor.tokenizer.pad_token_id)
    model.save_pretrained(tmp_path / "g")
    again = students.load(tmp_path / "g").eval()
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, model(**inputs).logits)


def test_gamma_threshold_routing_at_inference(processor, world_dir):
    """In eval mode a threshold keeps the image tokens whose p exceeds it (gamma-MoD: 0.005);
    training routes by top-k whatever the threshold."""
    inputs = vlm_inputs(processor, world_dir, n=1)
    n_image = int((inputs["input_ids"] == processor.image_token_id).sum())
    for threshold, kept in ((0.0, n_image), (0.999999, 0)):
        model = make_tiny_vlm(processor, text_layers=4).eval()
        mod_transform(model, schedule="uniform:0.5", router="gamma", threshold=threshold)
        with count_tokens(model) as counter, torch.no_grad():
            model(**inputs)
        assert counter.summary()["image_retention"] == [kept / n_image] * 4
        model.train()
        with count_tokens(model) as counter, torch.no_grad():
            model(**inputs)
        assert counter.summary()["image_retention"] == [kept_count(0.5, n_image) / n_image] * 4
    with pytest.raises(ValueError, match="gamma-MoD's"):
        mod_transform(make_tiny_vlm(processor, text_layers=4), threshold=0.005)
