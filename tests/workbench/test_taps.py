"""Feature taps: hooks by module path, layer mappings, projectors, and Q/K from HF attention."""

import pytest
import torch
from torch import nn

from conftest import make_tiny_vlm
from workbench.data import VLMCollator
from workbench.data.llava import LlavaDataset
from workbench.errors import WorkbenchError
from workbench.batch import model_inputs
from workbench.taps import FeatureTaps, Projector, TapPoint, get_module, layer_pairs, make_projector, num_layers


@pytest.fixture(scope="module")
def batch(world_dir, processor):
    data = LlavaDataset(world_dir / "train.json")
    return model_inputs(VLMCollator(processor)([data[0], data[1], data[2]]))


@pytest.mark.parametrize("n_s, n_t, mapping, expected", [
    (2, 4, "uniform", [(0, 1), (1, 3)]),
    (3, 12, "uniform", [(0, 3), (1, 7), (2, 11)]),
    (4, 4, "all", [(0, 0), (1, 1), (2, 2), (3, 3)]),
    (6, 12, "last:2", [(4, 10), (5, 11)]),
    (6, 24, [[5, 23], [-2, 21], [0, 0]], [(5, 23), (4, 21), (0, 0)]),
])
def test_layer_pairs(n_s, n_t, mapping, expected):
    assert layer_pairs(n_s, n_t, mapping) == expected


@pytest.mark.parametrize("mapping, message", [
    ("all", "equal depths"), ("last:5", "K must be"), ("every", "not valid"), ([[0, 9]], "out of range"),
    ([[0]], "not a \\[student, teacher\\] pair"), ([], "empty"),
])
def test_layer_pairs_errors(mapping, message):
    with pytest.raises(WorkbenchError, match=message):
        layer_pairs(2, 4, mapping)


def test_output_and_input_taps_equal_what_the_model_computes(processor, batch):
    model = make_tiny_vlm(processor).eval()
    points = [TapPoint.parse(p) for p in ("model.language_model.layers.0", "model.multi_modal_projector:input",
                                            "model.multi_modal_projector", "model.language_model")]
    taps = FeatureTaps(model, points, "student")

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    with torch.no_grad():
        model(**batch, output_hidden_states=True)  # transformers adds its own recording hooks on first use
    before = hooks()
    with torch.no_grad(), taps.capture() as found:
        assert hooks() == before + 4
        out = model(**batch, output_hidden_states=True)
    hidden = out.hidden_states
    torch.testing.assert_close(found[points[0]], hidden[1])  # layer 0's output = hidden state 1
    torch.testing.assert_close(model.lm_head(found[points[3]]), out.logits)  # the decoder output is the head's input
    torch.testing.assert_close(model.model.multi_modal_projector(found[points[1]]), found[points[2]])
    image_tokens = batch["input_ids"] == processor.image_token_id
    torch.testing.assert_close(found[points[2]].reshape(-1, found[points[2]].shape[-1]), hidden[0][image_tokens])
    # hooks exist only inside capture()
    assert hooks() == before


def test_qk_tap_reproduces_eager_attention(processor, batch):
    model = make_tiny_vlm(processor).eval()
    reference = make_tiny_vlm(processor).eval()
    reference.set_attn_implementation("eager")
    point = TapPoint.parse("model.language_model.layers.1.self_attn:qk")
    taps = FeatureTaps(model, [point], "student")
    with torch.no_grad(), taps.capture() as found:
        logits = model(**batch).logits
        ref = reference(**batch, output_attentions=True)
    qk = found[point]
    assert qk.causal and qk.query.shape == (3, 2, batch["input_ids"].shape[1], 16)
    scores = qk.query @ qk.key.transpose(-1, -2) * qk.scaling  # (B, H, L, L)
    n = scores.shape[-1]
    keep = torch.ones(n, n, dtype=torch.bool).tril() & batch["attention_mask"].bool()[:, None, None, :]
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    rows = batch["attention_mask"].bool()  # padding rows differ by convention only
    torch.testing.assert_close(probs.transpose(1, 2)[rows], ref.attentions[1].transpose(1, 2)[rows], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[rows], ref.logits[rows], atol=1e-5, rtol=0)  # rerouting changes nothing


def test_bad_paths_are_short_errors(processor):
    model = make_tiny_vlm(processor)
    with pytest.raises(WorkbenchError, match="no module 'layer' under model.language_model.*Did you mean: 'layers'"):
        get_module(model, "model.language_model.layer.0")
    with pytest.raises(WorkbenchError, match="unknown site 'out'"):
        TapPoint.parse("model:out")
    with pytest.raises(WorkbenchError, match="not a Hugging Face attention module"):
        FeatureTaps(model, [TapPoint.parse("model.multi_modal_projector.linear_1:qk")])
    assert num_layers(model, "model.language_model.layers.{i}") == 2
    with pytest.raises(WorkbenchError, match="not a ModuleList"):
        num_layers(model, "model.language_model.norm.{i}")


def test_projectors():
    assert make_projector("auto", 8, 8) is None
    p = make_projector("auto", 8, 12)
    assert isinstance(p, Projector) and p(torch.zeros(2, 3, 8)).shape == (2, 3, 12)
    assert isinstance(make_projector("linear", 8, 8), nn.Module)
    with pytest.raises(WorkbenchError, match="student width 8 != teacher width 12"):
        make_projector("none", 8, 12)
