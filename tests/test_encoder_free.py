"""EVE's patch tokenizer: token layout at several aspect ratios, locality of the cells,
the CLS token's global view, the split tokens, the alignment loss (issue 8 groundwork)."""

import pytest
import torch

from students.encoder_free import EVEPatchTokenizer, alignment_loss, eve_cells, eve_token_count


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
    cells = eve_cells(base, 2, 3)
    torch.testing.assert_close(cells[0], base[0][layout["cells"]])


def test_sides_must_fit_the_cells():
    with pytest.raises(ValueError, match="multiples"):
        _tok()(torch.randn(1, 3, 20, 16))
    with pytest.raises(ValueError, match="EVE sequence"):
        eve_cells(torch.randn(1, 7, 4), 2, 3)


def test_alignment_loss_closed_form():
    x = torch.randn(3, 5, 8)
    assert alignment_loss(x, 2 * x).abs() < 1e-6  # scale does not matter
    torch.testing.assert_close(alignment_loss(x, -x), torch.tensor(2.0))
    y = torch.randn(3, 5, 8)
    expected = (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).mean(-1)).mean()
    torch.testing.assert_close(alignment_loss(x, y), expected)


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
    alignment_loss(out, torch.randn(2, 6, 8)).backward()
    assert all(h.grad is not None for h in hidden)
    with pytest.raises(ValueError, match="expected 3"):
        pal(hidden[:2])
