"""EAGLE-style draft heads (students/eagle.py) and speculative decoding with them.

Closed form: for a one-layer target, a head whose layer and norm are the target's and whose fc
passes the token embedding through *is* the target, so its teacher-forced logits equal the
target's and it is accepted every time (tau = gamma + 1). Any head, random ones included,
decodes losslessly (text prompts, images in the middle, prompts ending in image tokens). The
features a trainer hands the head through teacher taps are the ones the head computes itself;
a saved head holds only its own weights and reloads onto its target."""

import pytest
import torch
from safetensors.torch import load_file

from losses.feature import feature_smooth_l1
from students.eagle import EagleDraft, is_draft_head_folder, load_draft_head
from students.speculative import SpecStats, speculative_generate
from students.vlm import tiny_llava
from workbench.taps import FeatureTaps, TapPoint

IMAGE = 3
PROMPTS = {"text": [1, 5, 6, 7, 8], "image-inside": [1] + [IMAGE] * 4 + [5, 6], "image-last": [1, 5] + [IMAGE] * 4}


def target(text_model="llama", layers=2, seed=0):
    torch.manual_seed(seed)
    return tiny_llava(vocab_size=50, image_token_id=IMAGE, pad_token_id=0, text_model=text_model, text_hidden=64,
                      text_layers=layers, text_heads=4, image_size=32, vision_hidden=32, vision_heads=2).eval()


def inputs(name):
    ids = torch.tensor([PROMPTS[name]])
    torch.manual_seed(1)
    return ids, ({"pixel_values": torch.randn(1, 3, 32, 32)} if IMAGE in PROMPTS[name] else {})


def greedy(model, ids, extra, n=16):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0, **extra)


def exact_head(t):
    """fc = [I, 0]: the head reads the token embedding alone, through the target's only layer."""
    head = EagleDraft.from_target(t, init_layer=0)
    d = t.config.text_config.hidden_size
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.bias.zero_()
        head.fc.weight[:, :d] = torch.eye(d)
    return head


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_a_head_that_is_the_one_layer_target_matches_it_and_is_always_accepted(name):
    t = target(layers=1)
    head = exact_head(t)
    ids, extra = inputs(name)
    reference = greedy(t, ids, extra)
    with torch.no_grad():
        mask = torch.ones_like(reference)
        ours = head(reference, mask, **extra).logits
        theirs = t(input_ids=reference, attention_mask=mask, **extra).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    stats = SpecStats()
    out = speculative_generate(t, head, ids, max_new_tokens=16, gamma=3, stats=stats, **extra)
    assert torch.equal(out, reference)
    assert stats.alpha == 1.0 and stats.alpha_analytic == pytest.approx(1.0)
    # 16 tokens in rounds of 4; a prompt that ends in image tokens first takes one target-only round
    assert stats.rounds == (5 if name == "image-last" else 4)
    assert stats.tau == pytest.approx(16 / stats.rounds)
    sampled = SpecStats()
    speculative_generate(t, head, ids, max_new_tokens=8, gamma=3, temperature=1.0, stats=sampled,
                         generator=torch.Generator().manual_seed(0), **extra)
    assert sampled.alpha == 1.0 and sampled.alpha_analytic == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("text_model", ["llama", "qwen2"])
@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_any_head_decodes_exactly_the_target_greedy_output(text_model, name):
    t = target(text_model)
    head = EagleDraft.from_target(t)  # random layer: rarely accepted
    ids, extra = inputs(name)
    stats = SpecStats()
    out = speculative_generate(t, head, ids, max_new_tokens=16, gamma=4, stats=stats, **extra)
    assert torch.equal(out, greedy(t, ids, extra))
    assert stats.emitted == 16 and stats.replay_passes == 0


def test_the_features_a_trainer_taps_are_the_ones_the_head_computes_itself():
    t = target()
    head = EagleDraft.from_target(t, init_layer=-1)
    assert head.teacher_reads == {"target_hidden": "model.language_model.norm",
                                  "target_embeds": "model.language_model.layers.0:input"}
    ids, extra = inputs("image-inside")
    mask = torch.ones_like(ids)
    taps = FeatureTaps(t, [TapPoint.parse(p) for p in head.teacher_reads.values()], "teacher")
    with torch.no_grad(), taps.capture() as found:
        t(input_ids=ids, attention_mask=mask, **extra)
        given = {k: found[TapPoint.parse(v)] for k, v in head.teacher_reads.items()}
        tapped = head(ids, mask, **given).logits
        alone = head(ids, mask, **extra).logits
    torch.testing.assert_close(tapped, alone)
    # at image positions the head reads the visual embeddings the target read (MSD decoupling):
    # changing the picture changes the head's output there even with the features held fixed
    with torch.no_grad():
        other = dict(given, target_embeds=given["target_embeds"] + 1.0)
        moved = head(ids, mask, **other).logits
    image = ids[0] == IMAGE
    assert not torch.allclose(moved[0, image], tapped[0, image])
    first = int(image.nonzero()[0])  # text before the picture reads token embeddings and attends to no image
    assert torch.equal(moved[0, :first], tapped[0, :first])


def test_a_saved_head_holds_only_its_own_weights_and_reloads_onto_its_target(tmp_path):
    t = target()
    head = EagleDraft.from_target(t, init_layer=1)
    head.save_pretrained(tmp_path)
    assert is_draft_head_folder(tmp_path) and not is_draft_head_folder(tmp_path / "missing")
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert keys and all(k.startswith(("fc.", "model.layers.0.", "model.norm.")) for k in keys)
    ids, extra = inputs("image-inside")
    again = load_draft_head(tmp_path, t)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, **extra).logits, head(ids, **extra).logits)
    with pytest.raises(ValueError, match="hidden states are"):
        EagleDraft.from_pretrained(tmp_path).attach(tiny_llava(vocab_size=50, image_token_id=IMAGE, pad_token_id=0,
                                                               text_hidden=32, image_size=32))
    with pytest.raises(ValueError, match="not a layer of the target"):
        EagleDraft.from_target(t, init_layer=2)


def test_feature_smooth_l1_is_huber_with_beta_one():
    s = torch.tensor([[0.0, 0.0], [3.0, 0.5]])
    t = torch.tensor([[0.2, -2.0], [0.0, 0.0]])
    # |d| < 1: d^2 / 2, else |d| - 1/2, averaged over kept rows x channels
    assert float(feature_smooth_l1(s, t)) == pytest.approx((0.02 + 1.5 + 2.5 + 0.125) / 4)
    assert float(feature_smooth_l1(s, t, torch.tensor([False, True]))) == pytest.approx((2.5 + 0.125) / 2)


def test_a_head_drafts_for_a_text_model_and_for_a_hybrid_whose_states_are_replayed():
    from transformers import LlamaConfig, LlamaForCausalLM

    from students.hybrid import convert

    torch.manual_seed(2)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=40, max_position_embeddings=256, pad_token_id=0)
    text = LlamaForCausalLM(cfg).eval()
    hybrid = LlamaForCausalLM(cfg).eval()
    convert(hybrid, "every:2", chunk_size=8)  # a Mamba-2 layer: its state is restored and replayed
    prompt = torch.randint(3, 40, (1, 7), generator=torch.Generator().manual_seed(5))
    for t in (text, hybrid):
        head = EagleDraft.from_target(t, init_layer=-1)
        stats = SpecStats()
        out = speculative_generate(t, head, prompt, max_new_tokens=14, gamma=3, stats=stats)
        assert torch.equal(out, greedy(t, prompt, {}, n=14))
        assert (stats.replay_passes > 0) == (t is hybrid)
