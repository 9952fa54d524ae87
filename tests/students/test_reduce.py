"""Training-free reducers (students/reduce.py): the attention scores against the model's own
eager attention weights, identity at keep 1, the kept tokens are the top-scored ones, the
deeper layers' caches hold only them, cached generation equals recomputation, bad specs."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_cached_generation_is_recomputation, make_tiny_vlm, vlm_inputs
from students.hf_cache import output_cache
from students.mod import count_tokens, decoder_layers, kept_count
from students.reduce import (apply_reducer, attention_prune, image_token_scores, kept_image_tokens, parse_reducer,
                             random_prune)


def _capture(layer, captured):
    """What the layer receives: its input hidden states and position embeddings."""
    def hook(module, args, kwargs):
        captured.update(h=args[0] if args else kwargs["hidden_states"], pe=kwargs["position_embeddings"])
    layer.register_forward_pre_hook(hook, with_kwargs=True)


def _model(processor, **kw):
    return make_tiny_vlm(processor, text_layers=4, text_kv_heads=1, **kw).eval()


@pytest.mark.parametrize("queries", ["after_image", "last_token", "text"])
def test_scores_are_the_layers_attention_averaged_over_heads_and_queries(processor, world_dir, queries):
    model = _model(processor)
    model.set_attn_implementation("eager")
    inputs = vlm_inputs(processor, world_dir, left_pad=4)
    captured = {}
    layer = decoder_layers(model)[1]
    _capture(layer, captured)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions[1]  # (b, heads, n, n)
        image = inputs["input_ids"] == processor.image_token_id
        valid = inputs["attention_mask"].bool()
        scores = image_token_scores(layer, captured["h"], captured["pe"], valid, image, queries)
    n = image.shape[1]
    positions = torch.arange(n)
    for b in range(2):
        last_image = int(positions[image[b]].max())
        rows = {"after_image": positions[valid[b] & (positions > last_image)],
                "last_token": positions[valid[b]][-1:],
                "text": positions[valid[b] & ~image[b]]}[queries]
        expected = attentions[b].mean(0)[rows].mean(0)
        torch.testing.assert_close(scores[b][image[b]], expected[image[b]], atol=1e-6, rtol=1e-5)
        assert torch.isinf(scores[b][~image[b]]).all()


def test_keep_1_is_the_unreduced_model_exactly(processor, world_dir):
    inputs = vlm_inputs(processor, world_dir, left_pad=5)
    reduced = _model(processor)
    attention_prune(reduced, layer=1, keep=1.0)
    with torch.no_grad():
        assert torch.equal(reduced(**inputs).logits, _model(processor)(**inputs).logits)


def test_the_deeper_layers_keep_the_top_scored_image_tokens(processor, world_dir):
    model = _model(processor)
    notes = attention_prune(model, layer=1, keep=0.5)
    assert notes["pruned_layers"] == [2, 3]
    inputs = vlm_inputs(processor, world_dir, n=1)
    captured = {}
    layer = decoder_layers(model)[1]
    _capture(layer, captured)
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    image = inputs["input_ids"] == processor.image_token_id
    n, n_image = image.shape[1], int(image.sum())
    kept = kept_count(0.5, n_image)
    assert [entry.keys.shape[-2] for entry in cache.layers] == [n, n, n - n_image + kept, n - n_image + kept]
    scores = image_token_scores(layer, captured["h"], captured["pe"], torch.ones_like(image), image)
    selected = image[0] & (model._mod_state.image_rank[0] < kept)
    assert scores[0][selected].min() >= scores[0][image[0] & ~selected].max()
    assert torch.equal(kept_image_tokens(model)[0], selected)


def test_random_pruning_keeps_the_same_count_drawn_by_its_seed(processor, world_dir):
    inputs = vlm_inputs(processor, world_dir, n=2)
    image = inputs["input_ids"] == processor.image_token_id
    ranks = {}
    for seed in (0, 0, 1):
        model = _model(processor)
        assert random_prune(model, layer=1, keep=0.5, seed=seed)["reducer"] == "random_prune"
        with torch.no_grad():
            cache = output_cache(model(**inputs, use_cache=True))
        rank = model._mod_state.image_rank
        assert sorted(rank[0][image[0]].tolist()) == list(range(int(image[0].sum())))  # a ranking of the image tokens
        n_image = int(image[0].sum())
        assert cache.layers[2].stored() == image.shape[1] - n_image + kept_count(0.5, n_image)
        ranks.setdefault(seed, []).append(rank)
    assert torch.equal(ranks[0][0], ranks[0][1]) and not torch.equal(ranks[0][0], ranks[1][0])


def test_cached_generation_equals_recomputation(processor, world_dir):
    model = _model(processor)
    attention_prune(model, layer=0, keep=0.3, queries="last_token")
    inputs = vlm_inputs(processor, world_dir, left_pad=6)
    assert_cached_generation_is_recomputation(model, inputs, 5, processor.tokenizer.pad_token_id)
    with count_tokens(model) as counter, torch.no_grad():
        model(**inputs)
    assert counter.summary()["image_retention"][:1] == [1.0] and counter.summary()["flops_ratio"] < 1


def test_bad_reducer_specs(processor):
    assert parse_reducer("attention_prune:layer=2,keep=0.25,queries=text") == \
        ("attention_prune", {"layer": 2, "keep": 0.25, "queries": "text"})
    model = _model(processor)
    for spec, match in [("fastv", "unknown reducer"), ("attention_prune:layer", "key=value"),
                        ("attention_prune:ratio=0.5", "no option 'ratio'"), ("attention_prune:layer=3", "0..2"),
                        ("attention_prune:keep=0", r"\(0, 1\]"), ("attention_prune:queries=all", "queries")]:
        with pytest.raises(ValueError, match=match):
            apply_reducer(model, spec)
    apply_reducer(model, "attention_prune")
    with pytest.raises(ValueError, match="routes its tokens already"):
        apply_reducer(model, "attention_prune")


def test_a_per_layer_keep_schedule_prunes_progressively(processor, world_dir):
    model = _model(processor)
    notes = attention_prune(model, layer=0, keep="1/0.5/0.25")
    assert notes["keep"] == [1.0, 0.5, 0.25]
    inputs = vlm_inputs(processor, world_dir, n=1)
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    image = inputs["input_ids"] == processor.image_token_id
    n, n_image = image.shape[1], int(image.sum())
    assert [entry.keys.shape[-2] for entry in cache.layers] == \
        [n, n, n - n_image + kept_count(0.5, n_image), n - n_image + kept_count(0.25, n_image)]
    for keep, match in [("0.5/1/1", "must not increase"), ([0.5, 0.5], "2 fractions for the 3"),
                        ("a/b/c", "fractions separated")]:
        with pytest.raises(ValueError, match=match):
            attention_prune(_model(processor), layer=0, keep=keep)


def test_a_decoder_without_pre_norm_blocks_is_refused_by_name():
    """The MatMul-free LM's layers are not attention blocks: a reducer (and the analyze and bench
    commands, through `workbench.analysis.routable_model`) names the layer and what it lacks."""
    from students.mmfree import MMFreeConfig, MMFreeForCausalLM
    from students.mod import check_routable

    model = MMFreeForCausalLM(MMFreeConfig(vocab_size=40, hidden_size=32, num_hidden_layers=3, pad_token_id=0))
    with pytest.raises(ValueError, match="decoder layer 0 .* has no input_layernorm|decoder layer 0 .* has no self_attn"):
        check_routable(model)
    with pytest.raises(ValueError, match="token routing needs a pre-norm block"):
        attention_prune(model, layer=0, keep=0.5)
