"""Encoder-free students (EVE, BREEN) as whole models: the forward/backward contract at several
aspect ratios and with mixed sizes in one batch, the processor's image tokens, save/load,
generation, and the vision-feature losses reading exactly the intended positions."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import students
from losses.feature import feature_cosine
from losses.inputs import LossInputs
from losses.vision_align import BREENQueryTerm, EVEAlignmentTerm
from students.encoder_free import (EncoderFreeForConditionalGeneration, EncoderFreeImageProcessor,
                                   EncoderFreeProcessor, breen_student, cell_positions, eve_student, image_runs,
                                   image_token_count)
from teachers.vision_encoder import pool_to_grid

TINY = dict(text_hidden=32, text_layers=2, text_heads=2, vision_width=16, patch_size=4, pool=2, max_image_side=32)


def _ids(processor):
    tok = processor.tokenizer
    return dict(vocab_size=len(tok), image_token_id=processor.image_token_id, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def make(kind, processor, seed=0, **kw):
    torch.manual_seed(seed)
    if kind == "eve":
        model = eve_student(**_ids(processor), heads=2, **{**TINY, **kw})
    else:
        model = breen_student(**_ids(processor), query_grids=[[2, 2], [1, 1]], **{**TINY, **kw})
    return model, EncoderFreeProcessor.for_model(model.config, processor.tokenizer, processor.chat_template)


def _noise(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())


def _batch(proc, sizes, seed=0):
    images = [_noise(h, w, seed + i) for i, (h, w) in enumerate(sizes)]
    texts = ["USER: <image>\nwhat color is the shape ?" if i % 2 else "USER: what is there ?\n<image>"
             for i in range(len(sizes))]
    return proc(text=texts, images=images, padding=True, return_tensors="pt"), images, texts


@pytest.mark.parametrize("kind", ["eve", "breen"])
@pytest.mark.parametrize("sizes", [[(32, 32)], [(16, 32)], [(32, 8), (32, 8)], [(32, 32), (16, 24), (8, 32)]])
def test_forward_backward_at_several_aspect_ratios(kind, sizes, processor):
    model, proc = make(kind, processor)
    enc, images, _ = _batch(proc, sizes)
    grids = [(h // 8, w // 8) for h, w in sizes]
    q = model.config.num_queries
    assert q == (5 if kind == "breen" else 0)
    counts = (enc["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert counts == [image_token_count(model.config.tokenizer, g, q) for g in grids]
    assert model.image_grids(enc["pixel_values"], enc["pixel_mask"]) == grids
    out = model(**enc)
    assert out.logits.shape == (*enc["input_ids"].shape, model.config.text_config.vocab_size)
    out.logits.float().logsumexp(-1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []  # tokenizer, queries, both experts and both gates all take part


@pytest.mark.parametrize("kind", ["eve", "breen"])
def test_mixed_sizes_in_one_batch_equal_each_image_alone(kind, processor):
    """The validity mask: padding of a smaller image never reaches its tokens."""
    model, proc = make(kind, processor)
    model.eval()
    sizes = [(32, 32), (16, 24), (8, 32)]
    enc, images, texts = _batch(proc, sizes)
    with torch.no_grad():
        together = model(**enc).logits
        for i in range(len(sizes)):
            alone = proc(text=[texts[i]], images=[images[i]], return_tensors="pt")
            n = alone["input_ids"].shape[1]
            assert torch.equal(enc["input_ids"][i, :n], alone["input_ids"][0])
            torch.testing.assert_close(together[i, :n], model(**alone).logits[0], atol=2e-5, rtol=1e-4)


def test_image_processor_keeps_aspect_ratio_in_whole_cells():
    ip = EncoderFreeImageProcessor(cell=28, max_side=672)
    assert ip.target_size(336, 336) == (336, 336)  # no upscaling by default
    assert ip.target_size(1000, 500) == (672, 336)  # longer side to 672, ratio kept
    assert ip.grid(1000, 500) == (24, 12)
    assert ip.target_size(10, 3000) == (28, 672)  # at least one cell
    assert EncoderFreeImageProcessor(cell=28, max_side=672, upscale=True).target_size(100, 50) == (672, 336)
    out = ip([_noise(56, 84, 0), _noise(300, 30, 1)])
    assert out["pixel_values"].shape == (2, 3, 308, 84)  # the batch's largest sides
    mask = out["pixel_mask"].bool()
    assert mask[0, :56, :84].all() and mask[0].sum() == 56 * 84
    assert mask[1, :308, :28].all() and mask[1].sum() == 308 * 28
    assert (out["pixel_values"][~mask.unsqueeze(1).expand_as(out["pixel_values"])] == 0).all()


def test_processor_checks_placeholders_and_round_trips(processor, tmp_path):
    _, proc = make("breen", processor)
    with pytest.raises(ValueError, match="2 <image> placeholders for 1 images"):
        proc(text=["<image> <image>"], images=[_noise(8, 8, 0)])
    proc.save_pretrained(tmp_path)
    from transformers import AutoProcessor

    again = AutoProcessor.from_pretrained(tmp_path)
    assert type(again) is EncoderFreeProcessor and again.layout == "linear" and again.num_queries == 5
    a, _, _ = _batch(proc, [(32, 16), (8, 8)])
    b, _, _ = _batch(again, [(32, 16), (8, 8)])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["eve", "breen"])
def test_save_load_round_trip(kind, processor, tmp_path):
    model, proc = make(kind, processor)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded = students.load(tmp_path)
    assert type(loaded) is EncoderFreeForConditionalGeneration
    assert loaded.config.tokenizer == model.config.tokenizer and loaded.config.query_grids == model.config.query_grids
    assert loaded.config.image_experts == (kind == "breen")
    own, back = model.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys() and all(torch.equal(own[k], back[k]) for k in own)
    enc, _, _ = _batch(proc, [(32, 24), (16, 16)])
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).logits, model(**enc).logits)  # float32 rounding at most
        # Loaded weights may sit in the checkpoint's memory map at addresses BLAS does not align
        # to (EVE's global attention: 40 mod 64), and it then sums in another order (~1e-7); in
        # freshly allocated memory the same weights give bit-identical logits.
        for p in loaded.parameters():
            p.data = p.data.clone()
        torch.testing.assert_close(loaded(**enc).logits, model(**enc).logits, atol=0, rtol=0)


def test_language_model_comes_from_a_vlm_folder(processor, tiny_vlm_dir):
    teacher = students.load(tiny_vlm_dir)
    model, _ = make("breen", processor, language_model=str(tiny_vlm_dir))
    lm = teacher.get_decoder().state_dict()
    mine = model.get_decoder().state_dict()
    for key, value in lm.items():
        if ".mlp." in key:  # the FFN is the text expert, and the image expert starts as its copy
            text = key.replace(".mlp.", ".mlp.text_expert.")
            assert torch.equal(mine[text], value) and torch.equal(mine[text.replace("text_expert", "image_expert")], value)
        else:
            assert torch.equal(mine[key], value), key
    assert torch.equal(model.lm_head.weight, teacher.lm_head.weight)
    assert model.config.text_config.hidden_size == 48


@pytest.mark.parametrize("kind", ["eve", "breen"])
def test_generate_with_cache_equals_recompute(kind, processor):
    model, proc = make(kind, processor)
    model.eval()
    enc, _, _ = _batch(proc, [(32, 16)])
    cached = model.generate(**enc, max_new_tokens=5, do_sample=False)
    fresh = model.generate(**enc, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, fresh)
    with torch.no_grad():
        first = model(**enc).logits[0, -1].argmax()
    assert cached[0, enc["input_ids"].shape[1]] == first


def test_image_tokens_must_match_the_images(processor):
    model, proc = make("eve", processor)
    enc, _, _ = _batch(proc, [(32, 32)])
    small = proc.image_processor([_noise(16, 16, 0)], return_tensors="pt")
    with pytest.raises(ValueError, match="runs of image tokens"):
        model(input_ids=enc["input_ids"], **small)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=enc["input_ids"])


def test_image_runs():
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert image_runs(mask) == [(0, 1, 2), (0, 4, 1), (1, 0, 3)]


# -- the alignment losses read exactly the intended positions ---------------------------------


def _hand_built(model, grids, lead=(2, 4), tail=3, vision_dim=8, t_grid=(2, 2), layers=3):
    """Two samples, one image each, `lead` text tokens before the image and `tail` after;
    random hidden states (requiring grad) for `layers` hidden states."""
    q = model.config.num_queries
    lengths = [lead[i] + image_token_count(model.config.tokenizer, g, q) + tail for i, g in enumerate(grids)]
    L = max(lengths)
    image_mask = torch.zeros(2, L, dtype=torch.bool)
    for i, g in enumerate(grids):
        image_mask[i, lead[i]:lead[i] + image_token_count(model.config.tokenizer, g, q)] = True
    d = model.config.text_config.hidden_size
    hidden = tuple(torch.randn(2, L, d, requires_grad=True) for _ in range(layers))
    feats = torch.randn(2, t_grid[0] * t_grid[1], vision_dim)
    inputs = LossInputs(student_logits=torch.zeros(2, L, 5), labels=torch.full((2, L), -100),
                        attention_mask=torch.ones(2, L, dtype=torch.long), image_mask=image_mask,
                        student_hidden_states=hidden, image_grids=list(grids), vision_features=feats,
                        vision_grid=t_grid)
    return inputs, hidden, feats


def test_eve_alignment_reads_the_cell_positions(processor):
    model, _ = make("eve", processor)  # 2 layers -> hidden states 0, 1, 2
    term = EVEAlignmentTerm(every=1, heads=2)
    term.attach(model, SimpleNamespace(feature_teacher=True, width=8))
    assert term.layers == [0, 1, 2]
    grids = [(2, 3), (4, 4)]  # the second is finer than the teacher's 2 x 2: pooled to it
    inputs, hidden, feats = _hand_built(model, grids)
    loss = term(inputs)
    loss.backward()
    expected = 0
    for i, (g, lead) in enumerate(zip(grids, (2, 4))):
        pos = lead + cell_positions("eve", g)
        common = (min(g[0], 2), min(g[1], 2))
        states = [pool_to_grid(h[i:i + 1, pos], g, common) if g != common else h[i:i + 1, pos] for h in hidden]
        expected = expected + feature_cosine(term.pal(states), pool_to_grid(feats[i:i + 1], (2, 2), common))
    torch.testing.assert_close(loss, expected / 2)
    for h in hidden:  # gradient exactly at the cell tokens: not the CLS, the split tokens or the text
        touched = h.grad.abs().sum(-1) > 0
        want = torch.zeros_like(touched)
        for i, (g, lead) in enumerate(zip(grids, (2, 4))):
            want[i, lead + cell_positions("eve", g)] = True
        assert torch.equal(touched, want)


def test_breen_query_loss_reads_the_positions_before_the_queries(processor):
    model, _ = make("breen", processor)  # queries: 2 x 2 then 1 x 1
    term = BREENQueryTerm()
    term.attach(model, SimpleNamespace(feature_teacher=True, width=8))
    assert not any(p.requires_grad for p in term.parameters())  # BREEN's target projection is frozen
    grids = [(2, 3), (3, 1)]
    inputs, hidden, feats = _hand_built(model, grids, t_grid=(4, 4))
    loss = term(inputs)
    loss.backward()
    last = hidden[-1]
    expected = 0
    for i, (g, lead) in enumerate(zip(grids, (2, 4))):
        first_query = lead + g[0] * g[1]  # the linear tokenizer's h * w tokens, then the queries
        pred = last[i:i + 1, first_query - 1:first_query + 4]  # one position before each of the 5 queries
        t4 = term.target_proj(term.target_norm(pool_to_grid(feats[i:i + 1], (4, 4), (2, 2))))
        t1 = term.target_proj(term.target_norm(pool_to_grid(feats[i:i + 1], (4, 4), (1, 1))))
        expected = expected + feature_cosine(pred[:, :4], t4) + feature_cosine(pred[:, 4:], t1)
    torch.testing.assert_close(loss, expected / 2)
    touched = last.grad.abs().sum(-1) > 0
    want = torch.zeros_like(touched)
    want[0, 2 + 6 - 1:2 + 6 + 4] = True  # the last image token and the first four queries
    want[1, 4 + 3 - 1:4 + 3 + 4] = True
    assert torch.equal(touched, want)
    assert all(h.grad is None for h in hidden[:-1])  # only the final hidden state is read


def test_breen_target_projection_is_the_same_in_every_stage(processor):
    model, _ = make("breen", processor)
    a, b = BREENQueryTerm(), BREENQueryTerm()
    torch.manual_seed(1)
    a.attach(model, SimpleNamespace(feature_teacher=True, width=8))
    torch.manual_seed(2)
    b.attach(model, SimpleNamespace(feature_teacher=True, width=8))
    assert torch.equal(a.target_proj.weight, b.target_proj.weight)


def test_terms_refuse_the_wrong_models(processor):
    model, _ = make("eve", processor)
    with pytest.raises(ValueError, match="vision_encoder"):
        EVEAlignmentTerm().attach(model, SimpleNamespace())
    with pytest.raises(ValueError, match="no learnable queries"):
        BREENQueryTerm().attach(model, SimpleNamespace(feature_teacher=True, width=8))
    with pytest.raises(ValueError, match="encoder-free"):
        EVEAlignmentTerm().attach(torch.nn.Linear(2, 2), SimpleNamespace(feature_teacher=True, width=8))
