"""FrameFusion (students/reduce.py): the budget arithmetic of METHODS-COMPRESSION §4.2, merge
runs averaged into their heads, identical frames merged to one token per patch, copies at
cost 1/T reproducing the single-frame answer, pruning by the last token's attention,
per-example decisions in a batch, caches of the kept tokens, bad options."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_vlm
from students.errors import ReducerError
from students.hf_cache import output_cache
from students.mod import count_tokens, decoder_layers
from students.reduce import FrameFusion, apply_reducer, framefusion, framefusion_prune_ratio, image_token_scores
from workbench.data.llava import LlavaDataset, VLMCollator

FRAME = 9  # the fixture world: a 3x3 grid of 16-pixel patches, one token per cell


def _model(processor, layers=4):
    return make_tiny_vlm(processor, text_layers=layers, text_kv_heads=1).eval()


def _clip(processor, world_dir, frames: int, record: int = 0):
    """A val record whose one image is shown `frames` times (identical frames)."""
    sample = LlavaDataset(world_dir / "val.json")[record]
    sample["images"] = [sample["images"][0]] * frames
    first = sample["messages"][0]["content"]
    sample["messages"][0]["content"] = [{"type": "image"}] * (frames - 1) + first
    batch = VLMCollator(processor)([sample])
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def test_the_budget_arithmetic_of_the_methods_notes():
    # s = [0.4, 0.2], c = 0.3, L = 28: 1 - (8.4 - 0.6 - 0.48) / (26 * 0.48)
    assert framefusion_prune_ratio([0.4, 0.2], 0.3, 28) == pytest.approx(0.4135, abs=5e-5)
    assert framefusion_prune_ratio([0.4, 0.2], 0.3, 28) == pytest.approx(1 - 7.32 / 12.48, abs=1e-12)
    assert framefusion_prune_ratio([], 0.3, 28) == pytest.approx(0.7)  # nothing merged: prune to the cost
    assert framefusion_prune_ratio([0.9], 0.5, 4) == 0.0  # the merge saved more than the budget asks
    assert framefusion_prune_ratio([0.2] * 4, 0.9, 4) == 0.0  # merged after every layer: none left to prune
    with pytest.raises(ReducerError, match="too small.*at least 1/10"):
        framefusion_prune_ratio([0.0, 0.0], 0.1, 10)  # two full layers spent out of one allowed


def test_merge_runs_average_into_their_head():
    # 3 frames of 2 patch types; patch 0: frames 1 and 2 each copy the one before (a run of two
    # into frame 0's token); patch 1: frame 1 differs, frame 2 copies it (a run into frame 1's)
    d = 4
    e = torch.eye(d)
    rows = {(0, 0): e[0], (0, 1): e[1], (1, 0): e[0] * 1.1, (1, 1): e[2], (2, 0): e[0] * 0.9, (2, 1): e[2] + 0.1 * e[3]}
    text = e[3][None]
    x = torch.cat([text] + [rows[(f, p)][None] for f in range(3) for p in range(2)] + [text])[None]
    image = torch.tensor([[False] + [True] * 6 + [False]])
    fusion = FrameFusion(n_layers=4, frame=2, cost=0.3, sim_th=0.9, ratio_lb=0.1)
    fusion.start(image, torch.ones_like(image))
    out = fusion.merge(x)[0]
    assert fusion.alive[0].tolist() == [True, True, True, False, True, False, False, True]
    assert fusion.sparsity[0] == [pytest.approx(3 / 6)]  # three of six image tokens merged
    torch.testing.assert_close(out[1], (e[0] + 1.1 * e[0] + 0.9 * e[0]) / 3)  # head of patch 0: mean of the run
    torch.testing.assert_close(out[4], (e[2] + e[2] + 0.1 * e[3]) / 2)  # frame 1's patch-1 token heads its run
    torch.testing.assert_close(out[2], e[1])  # frame 0's patch-1 token: nothing merged into it
    assert fusion.merging[0] and not fusion.pending[0]  # half merged: more than ratio_lb, go on


def test_identical_frames_leave_one_token_per_patch_after_layer_0_then_the_budget_prunes(processor, world_dir):
    model = _model(processor)
    framefusion(model, cost=0.3)  # the notes' setting: 2/3 merged stays under the 0.7 bound
    fusion = model._framefusion
    inputs = _clip(processor, world_dir, frames=3)
    image = inputs["input_ids"][0] == processor.image_token_id
    after_layer_0 = {}
    decoder_layers(model)[0].register_forward_hook(lambda *a: after_layer_0.update(alive=fusion.alive.clone()))
    with torch.no_grad():
        model(**inputs)
    first_frame = image & (image.long().cumsum(0) <= FRAME)
    assert torch.equal(after_layer_0["alive"][0] & image, first_frame)  # one token per patch type: frame 1's
    assert fusion.sparsity[0] == [pytest.approx(2 / 3), 0.0]
    # the layer-0 merges spent 2 of 4 layers at a third each; the rest may keep R = (1.2 - 2/3) / (2/3)
    keep = round(FRAME * (1.2 - 2 / 3) / (2 / 3))
    assert int((fusion.alive[0] & image).sum()) == keep == 7


@pytest.mark.parametrize("frames", [2, 4])
def test_copies_at_cost_one_over_T_reproduce_the_single_frame_answer(processor, world_dir, frames):
    # at cost 1/T the budget caps the layer-0 merge at exactly the copies and skips pruning (at
    # the notes' cost 0.3 the budget prunes afterwards, as the test above shows)
    model = _model(processor)
    inputs = _clip(processor, world_dir, frames)
    ids = inputs["input_ids"][0]
    image = ids == processor.image_token_id
    start = int(image.nonzero()[0])
    single = torch.ones_like(image)
    single[start + FRAME:start + frames * FRAME] = False  # frames 2..T removed; the text keeps its positions
    with torch.no_grad():
        expected = model(input_ids=ids[single][None], pixel_values=inputs["pixel_values"][:1],
                         position_ids=torch.arange(len(ids))[single][None]).logits[0, ~image[single]]
        framefusion(model, cost=1 / frames)
        got = model(**inputs).logits[0, ~image]
    assert int(model._framefusion.alive.sum()) == int(single.sum())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_pruning_keeps_the_image_tokens_the_last_token_attends_to_most(processor, world_dir):
    model = _model(processor)
    framefusion(model, cost=0.5)
    fusion = model._framefusion
    inputs = _clip(processor, world_dir, frames=1)  # one frame: nothing merges, the budget prunes after layer 0
    captured = {}
    layer = decoder_layers(model)[0]
    layer.register_forward_pre_hook(lambda m, a, kw: captured.update(h=a[0] if a else kw["hidden_states"],
                                                                     pe=kw["position_embeddings"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
        image = inputs["input_ids"] == processor.image_token_id
        scores = image_token_scores(layer, captured["h"], captured["pe"], torch.ones_like(image), image, "last_token")
    assert fusion.sparsity[0] == [0.0]
    keep = round(FRAME * (1 - framefusion_prune_ratio([0.0], 0.5, 4)))  # R = (2 - 1) / 3
    assert keep == 3
    top = set(scores[0].topk(keep).indices.tolist())
    assert set((fusion.alive[0] & image[0]).nonzero().squeeze(1).tolist()) == top


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A clip world: 3 frames per record, objects moving."""
    from transformers import AutoProcessor

    from workbench.data.windtunnel import WorldConfig, write_windtunnel

    out = write_windtunnel(tmp_path_factory.mktemp("clips") / "w", n_train=2, n_val=4, world=WorldConfig(frames=3))
    return out, AutoProcessor.from_pretrained(out / "processor")


def test_a_batch_decides_per_example_as_each_alone(clips):
    out, processor = clips
    data = LlavaDataset(out / "val.json")
    samples = [data[0], data[1]]
    samples[1]["messages"] = samples[1]["messages"][:2]  # a shorter conversation: padded in the batch
    model = _model(processor)
    framefusion(model, cost=0.3, sim_th=0.5)
    batch = VLMCollator(processor)(samples)
    keys = ("input_ids", "attention_mask", "pixel_values")
    with torch.no_grad():
        together = model(**{k: batch[k] for k in keys}).logits
        alive = model._framefusion.alive.clone()
        for i, sample in enumerate(samples):
            alone = VLMCollator(processor)([sample])
            logits = model(**{k: alone[k] for k in keys}).logits[0]
            n = logits.shape[0]
            torch.testing.assert_close(together[i, :n], logits, atol=1e-5, rtol=1e-5)
            assert torch.equal(alive[i, :n], model._framefusion.alive[0])
    assert int(alive[0].sum()) < int(batch["attention_mask"][0].sum())  # something was reduced


def test_caches_hold_each_layers_tokens_and_the_counter_reports_them(clips):
    out, processor = clips
    model = _model(processor)
    framefusion(model, cost=0.3, sim_th=0.5)
    batch = VLMCollator(processor)([LlavaDataset(out / "val.json")[2]])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    seen = []
    for layer in decoder_layers(model)[1:]:  # tokens each deeper layer's attention sees
        layer.register_forward_pre_hook(lambda *a: seen.append(int(model._framefusion.alive.sum())))
    with torch.no_grad(), count_tokens(model) as counter:
        prefill = model(**inputs, use_cache=True)
    n = inputs["input_ids"].shape[1]
    cache = output_cache(prefill)
    stored = [cache.layers[i].stored() for i in range(4)]
    # layer 0's attention runs after its input merge; the others see what the layer before left
    assert stored[1:] == seen and n > stored[0] >= stored[1] >= int(model._framefusion.alive.sum())
    assert counter.summary()["kv_ratio"] == pytest.approx(sum(stored) / (4 * n))
    assert counter.summary()["flops_ratio"] < 1
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=None,
                                   pad_token_id=processor.tokenizer.pad_token_id)
    assert generated[0, n] == prefill.logits[0, -1].argmax()  # the prefill is the same computation
    assert generated.shape[1] == n + 3


@pytest.mark.parametrize("spec, words", [
    ("framefusion:cost=0", "cost in (0, 1]"),
    ("framefusion:sim_th=2", "sim_th in [-1, 1]"),
    ("framefusion:frames=2", "no option 'frames'"),
])
def test_bad_framefusion_options(processor, spec, words):
    with pytest.raises(ValueError) as info:
        apply_reducer(_model(processor), spec)
    assert words in str(info.value)


def test_a_model_without_a_frame_size_needs_one():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=2))
    with pytest.raises(ValueError, match="frame=N"):
        framefusion(model)
    assert framefusion(model, frame=4)["frame"] == 4
