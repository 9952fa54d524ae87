"""Speculative decoding (students/speculative.py): greedy output is the target's token for token
for any draft (random, the target itself with tau = gamma + 1, recurrent and hybrid caches on
either side, a VLM pair); one sampling step's output distribution, by enumeration, is the
target's; measured acceptance matches sum min(p, q); tau matches the independent-acceptance
formula for a draft of constant acceptance; bad requests."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import make_tiny_vlm, vlm_inputs
from students.hybrid import convert
from students.speculative import (SpecStats, accept_probability, distribution, expected_tokens_per_round, residual,
                                  speculative_generate)

VOCAB = 50


def _llama(seed=0, layers=2, hidden=64, vocab=VOCAB):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _greedy(model, ids, steps, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                              eos_token_id=None, pad_token_id=0, **kw)


PROMPT = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_output_is_the_targets_with_a_random_draft(gamma):
    target, draft = _llama(0, layers=3), _llama(1, hidden=32)
    stats = SpecStats()
    out = speculative_generate(target, draft, PROMPT, max_new_tokens=17, gamma=gamma, stats=stats)
    assert torch.equal(out, _greedy(target, PROMPT, 17))
    assert stats.emitted == 17 and stats.target_passes == stats.rounds and stats.accepted < stats.tested
    assert stats.alpha == pytest.approx(stats.alpha_analytic)  # greedy: kept exactly when the argmaxes agree


def test_the_target_as_its_own_draft_accepts_everything():
    target = _llama(0)
    stats = SpecStats()
    out = speculative_generate(target, target, PROMPT, max_new_tokens=15, gamma=4, stats=stats)
    assert torch.equal(out, _greedy(target, PROMPT, 15))
    assert stats.alpha == 1.0 and stats.tau == 5.0 and stats.rounds == 3  # gamma + 1 tokens per target pass


@pytest.mark.parametrize("side", ["draft", "target"])
def test_recurrent_states_are_rolled_back_on_either_side(side):
    hybrid = _llama(2)
    convert(hybrid, "every:2", chunk_size=8)  # Mamba-2 layers: states that cannot be cropped
    plain = _llama(0)
    target, draft = (plain, hybrid) if side == "draft" else (hybrid, plain)
    stats = SpecStats()
    out = speculative_generate(target, draft, PROMPT, max_new_tokens=14, gamma=3, stats=stats)
    assert torch.equal(out, _greedy(target, PROMPT, 14))
    assert stats.replay_passes > 0  # some round was cut short and replayed into the states


def test_a_vlm_pair_reads_the_image_and_decodes_the_targets_output(processor, world_dir):
    target = make_tiny_vlm(processor, seed=0, text_layers=3).eval()
    draft = make_tiny_vlm(processor, seed=1).eval()
    inputs = vlm_inputs(processor, world_dir, n=1)
    stats = SpecStats()
    out = speculative_generate(target, draft, inputs["input_ids"], max_new_tokens=10, gamma=3,
                               pixel_values=inputs["pixel_values"], stats=stats)
    expected = _greedy(target, inputs["input_ids"], 10, pixel_values=inputs["pixel_values"])
    assert torch.equal(out, expected)
    same = SpecStats()
    speculative_generate(target, target, inputs["input_ids"], max_new_tokens=8, gamma=3,
                         pixel_values=inputs["pixel_values"], stats=same)
    assert same.alpha == 1.0  # the draft saw the image exactly as the target did


def test_a_prompt_that_ends_in_image_tokens(processor, world_dir):
    target = make_tiny_vlm(processor, seed=0).eval()
    draft = make_tiny_vlm(processor, seed=1).eval()
    inputs = vlm_inputs(processor, world_dir, n=1)
    image = (inputs["input_ids"][0] == processor.image_token_id).nonzero()
    ids = inputs["input_ids"][:, :int(image[-1]) + 1]  # cut right after the image
    out = speculative_generate(target, draft, ids, max_new_tokens=6, gamma=2, pixel_values=inputs["pixel_values"])
    assert torch.equal(out, _greedy(target, ids, 6, pixel_values=inputs["pixel_values"]))


def test_one_sampling_step_reproduces_the_target_distribution_by_enumeration():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        p = torch.rand(8, generator=generator, dtype=torch.float64) ** 3
        q = torch.rand(8, generator=generator, dtype=torch.float64) ** 3
        if trial % 3 == 0:
            p[:2] = 0  # tokens the target never emits but the draft proposes
        if trial % 3 == 1:
            q[5:] = 0  # tokens only the target can emit
        p, q = p / p.sum(), q / q.sum()
        out = torch.zeros(8, dtype=torch.float64)
        for drafted in range(8):  # the draft proposes `drafted` with q; kept, or replaced from the residual
            keep = accept_probability(p, q, drafted)
            out[drafted] += q[drafted] * keep
            out += q[drafted] * (1 - keep) * residual(p, q)
        torch.testing.assert_close(out, p, atol=1e-6, rtol=0)
    same = torch.full((8,), 1 / 8, dtype=torch.float64)
    torch.testing.assert_close(residual(same, same), same)  # never drawn (q = p accepts all), but defined


def test_acceptance_matches_the_overlap_and_tau_the_formula():
    # a draft of constant overlap: the target's distribution mixed with a uniform one
    target = _llama(0, vocab=8)
    torch.manual_seed(3)
    draft = _llama(0, vocab=8)
    with torch.no_grad():  # the draft's head: half the target's logits, so q is flatter than p everywhere
        draft.lm_head.weight.mul_(0.5)
    stats = SpecStats()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (1, 5), generator=torch.Generator().manual_seed(1))
    for _ in range(8):
        speculative_generate(target, draft, ids, max_new_tokens=60, gamma=3, temperature=1.0, generator=generator,
                             stats=stats)
    n = stats.tested
    assert n > 300
    # each tested proposal is kept with probability sum_v min(p, q) given its context: 4 standard errors
    assert abs(stats.alpha - stats.alpha_analytic) < 4 * (stats.alpha * (1 - stats.alpha) / n) ** 0.5
    full = [k for k in stats.accepted_per_round[:-1]]  # rounds that proposed all gamma tokens
    assert abs((sum(full) / len(full) + 1) - expected_tokens_per_round(stats.alpha, 3)) < 0.25


def test_temperature_and_top_k_shape_both_sides_alike():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    assert torch.equal(distribution(logits, 0.0, None), torch.tensor([1.0, 0, 0, 0]))
    top2 = distribution(logits, 1.0, 2)
    assert top2[2:].sum() == 0 and torch.isclose(top2.sum(), torch.tensor(1.0))
    torch.testing.assert_close(distribution(logits, 2.0, None), (logits / 2).softmax(-1))


def test_eos_ends_the_output_as_the_target_would():
    target, draft = _llama(0), _llama(1, hidden=32)
    free = _greedy(target, PROMPT, 12)
    eos = int(free[0, PROMPT.shape[1] + 4])  # the 5th generated token
    out = speculative_generate(target, draft, PROMPT, max_new_tokens=12, gamma=4, eos_token_id=eos)
    first = (free[0, PROMPT.shape[1]:] == eos).nonzero()[0].item()
    assert torch.equal(out[0], free[0, :PROMPT.shape[1] + first + 1])


@pytest.mark.parametrize("kwargs, words", [
    (dict(input_ids=torch.ones(2, 4, dtype=torch.long)), "batch size 1"),
    (dict(input_ids=torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1]])), "unpadded"),
    (dict(input_ids=torch.ones(1, 4, dtype=torch.long), gamma=0), "gamma"),
])
def test_bad_requests(kwargs, words):
    with pytest.raises(ValueError, match=words):
        speculative_generate(_llama(0), _llama(1), **kwargs)
