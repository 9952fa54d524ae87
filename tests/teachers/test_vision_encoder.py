"""Vision-encoder teachers (encoder-free students' feature targets): the chosen layer's patch
features of a VLM's tower, a CLIP / SigLIP model or a bare vision model, frozen; grid pooling."""

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

import students
from teachers.vision_encoder import VisionEncoderTeacher, pool_to_grid
from teachers.errors import TeacherError

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=24,
              patch_size=4)


def _expected(model, pixels, layer, cls):
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
    return hidden[:, 1:] if cls else hidden


@pytest.mark.parametrize("kind", ["clip_vision", "siglip_vision", "clip_dual"])
@pytest.mark.parametrize("layer", [-1, -2])
def test_patch_features_of_the_chosen_layer(tmp_path, kind, layer):
    torch.manual_seed(0)
    if kind == "clip_vision":
        model, cls = CLIPVisionModel(CLIPVisionConfig(**VISION)), True
    elif kind == "siglip_vision":
        model, cls = SiglipVisionModel(SiglipVisionConfig(**VISION)), False
    else:
        model = CLIPModel(CLIPConfig(vision_config=VISION, text_config=dict(hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, vocab_size=50), projection_dim=16))
        cls = True
    model.save_pretrained(tmp_path)
    teacher = VisionEncoderTeacher(str(tmp_path), layer=layer)
    pixels = torch.randn(2, 3, 24, 24)
    feats = teacher(pixels)
    assert feats.shape == (2, 36, 32) and teacher.grid == (6, 6)
    reference = model.vision_model if kind == "clip_dual" else model
    torch.testing.assert_close(feats, _expected(reference.eval(), pixels, layer, cls))
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training


def test_vlm_tower_is_kept_and_the_rest_dropped(tiny_vlm_dir):
    teacher = VisionEncoderTeacher(str(tiny_vlm_dir), layer=-2)
    vlm = students.load(tiny_vlm_dir).eval()
    size = vlm.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size)
    torch.testing.assert_close(teacher(pixels), _expected(vlm.model.vision_tower, pixels, -2, cls=True))
    assert not any("language_model" in n for n, _ in teacher.named_parameters())


def test_pool_to_grid_averages_blocks():
    feats = torch.arange(2 * 36 * 3, dtype=torch.float32).reshape(2, 36, 3)
    pooled = pool_to_grid(feats, (6, 6), (2, 2))  # 3x3 blocks
    maps = feats.reshape(2, 6, 6, 3)
    expected = torch.stack([maps[:, r:r + 3, c:c + 3].mean((1, 2)) for r in (0, 3) for c in (0, 3)], 1)
    torch.testing.assert_close(pooled, expected)
    with pytest.raises(ValueError, match="grid"):
        pool_to_grid(feats, (5, 5), (2, 2))


def test_errors(tmp_path):
    with pytest.raises(TeacherError, match="does not exist"):
        VisionEncoderTeacher(str(tmp_path / "missing"))
    model = CLIPVisionModel(CLIPVisionConfig(**VISION))
    model.save_pretrained(tmp_path / "clip")
    with pytest.raises(TeacherError, match="out of range"):
        VisionEncoderTeacher(str(tmp_path / "clip"), layer=-9)
