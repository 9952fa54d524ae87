"""EVE's patch tokenizer: token layout at several aspect ratios, locality of the cells,
the CLS token's global view, the split tokens, the alignment loss (issue 8 groundwork)."""

import pytest
import torch

from losses.feature import feature_cosine
from students.encoder_free import EVEPatchTokenizer, cell_positions, eve_token_count


def _tok(**kw):
    torch.manual_seed(0)
    return EVEPatchTokenizer(**{**dict(width=16, out_dim=24, patch_size=4, pool=2, heads=2), **kw}).eval()


@pytest.mark.parametrize("size", [(16, 16), (16, 40), (48, 24)])
def test_token_count_and_gradients_at_any_aspect_ratio(size):
    tok = _tok()
    pixels = torch.randn(2, 3, *size)
    out = tok(pixels)
    h, w = size[0] // 8, size[1] // 8
    assert out.shape == (2, 1 + h * (w + 1), 24) == (2, eve_token_count(*size, 4, 2), 24)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tok.parameters())


def test_layout_cells_are_local_cls_is_global_splits_are_constant():
    tok = _tok()
    pixels = torch.randn(1, 3, 16, 24)  # 2 x 3 cells
    base = tok(pixels)
    changed = pixels.clone()
    changed[..., 8:16, 16:24] += 1.0  # the cell at row 1, column 2
    after = tok(changed)
    layout = tok.layout(16, 24)
    differs = (after - base).abs().amax(-1)[0] > 1e-6  # (N,)
    cell_index = 1 + 1 * (3 + 1) + 2  # CLS, row 0 (3 cells + split), then column 2 of row 1
    assert differs[0] and differs[cell_index]  # the CLS sees everything, the cell itself changes
    assert differs.sum() == 2
    split = base[0][layout["split"]]
    assert layout["split"].sum() == 2 and torch.allclose(split, split[:1].expand_as(split))
    assert layout["cells"].sum() == 6 and layout["cls"].nonzero().tolist() == [[0]]
    assert cell_positions("eve", (2, 3)).tolist() == layout["cells"].nonzero().squeeze(1).tolist() == [1, 2, 3, 5, 6, 7]


def test_sides_must_fit_the_cells():
    with pytest.raises(ValueError, match="multiples"):
        _tok()(torch.randn(1, 3, 20, 16))


def test_alignment_loss_closed_form():
    """EVE / BREEN's alignment loss, mean over images of (1 - mean cosine over patches), is
    `feature_cosine` on (B, N, D) features: every image has N patches."""
    x = torch.randn(3, 5, 8)
    assert feature_cosine(x, 2 * x).abs() < 1e-6  # scale does not matter
    torch.testing.assert_close(feature_cosine(x, -x), torch.tensor(2.0))
    y = torch.randn(3, 5, 8)
    expected = (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).mean(-1)).mean()
    torch.testing.assert_close(feature_cosine(x, y), expected)


def test_patch_aligning_layer_fuses_per_cell():
    from students.encoder_free import PatchAligningLayer, aligned_layers

    assert aligned_layers(33) == list(range(0, 33, 4))  # 9 of a 32-layer LLM's 33 hidden states
    assert aligned_layers(5, every=2) == [0, 2, 4]
    torch.manual_seed(0)
    pal = PatchAligningLayer(llm_dim=12, vision_dim=8, n_layers=3, heads=2)
    hidden = [torch.randn(2, 6, 12, requires_grad=True) for _ in range(3)]
    out = pal(hidden)
    assert out.shape == (2, 6, 8)
    # fusion is per cell: changing cell 4 in a shallow layer changes only cell 4's output
    moved = [h.detach().clone() for h in hidden]
    moved[0][:, 4] += torch.randn(12)  # (a constant shift would vanish in the LayerNorm)
    differs = (pal(moved) - out).abs().amax(-1) > 1e-6
    assert differs[:, 4].all() and differs.sum() == 2
    feature_cosine(out, torch.randn(2, 6, 8)).backward()
    assert all(h.grad is not None for h in hidden)
    with pytest.raises(ValueError, match="expected 3"):
        pal(hidden[:2])


def test_image_experts_route_by_token_type():
    from transformers import LlamaConfig, LlamaForCausalLM

    from students.encoder_free import ImageExpertMLP, add_image_experts, route_image_tokens

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=40)
    reference = LlamaForCausalLM(cfg).eval()
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(reference.state_dict())
    paths = add_image_experts(model)
    assert paths == ["model.layers.0.mlp", "model.layers.1.mlp"]
    layer0 = model.model.layers[0].mlp
    assert isinstance(layer0, ImageExpertMLP)
    assert torch.equal(layer0.image_expert.up_proj.weight, layer0.text_expert.up_proj.weight)  # a copy at init
    ids = torch.randint(0, 40, (2, 7))
    image = torch.zeros(2, 7, dtype=torch.bool)
    image[:, 1:4] = True
    with torch.no_grad():
        for m in model.modules():  # gates open fully: the expert model equals the original
            if isinstance(m, ImageExpertMLP):
                for gate in (m.text_gate, m.image_gate):
                    gate.weight.zero_()
                    gate.bias.fill_(40.0)
        with route_image_tokens(model, image):
            torch.testing.assert_close(model(ids).logits, reference(ids).logits)
        layer0.image_expert.down_proj.weight.mul_(3.0)  # only image tokens go through it
        x = torch.randn(2, 7, 32)
        layer0.image_mask = image
        routed = layer0(x)
        layer0.image_mask = None
        text = layer0(x)
        differs = (routed - text).abs().amax(-1) > 1e-6
        assert torch.equal(differs, image)
    assert all(m.image_mask is None for m in model.modules() if isinstance(m, ImageExpertMLP))
    with torch.no_grad():  # unsaturate the gates so every path gets gradient
        for gate in (layer0.text_gate, layer0.image_gate):
            gate.bias.zero_()
    with route_image_tokens(model, image):
        model(ids).logits.square().mean().backward()
    for name in ("text_expert", "image_expert", "text_gate", "image_gate"):
        grads = [p.grad for p in getattr(layer0, name).parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    with pytest.raises(ValueError, match="already"):
        add_image_experts(model)
