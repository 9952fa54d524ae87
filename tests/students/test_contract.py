"""The contract every registered student keeps: built tiny from its registry entry with the
processor's fields, it runs forward on a collated wind-tunnel batch, back-propagates a finite
loss into its weights, saves with `save_pretrained`, and `students.load` gives back a model
with the same outputs (a draft head, built on its target, reloads onto it with
`load_draft_head`). A newly registered student must add its tiny arguments here."""

from __future__ import annotations

import pytest
import torch

import students
from conftest import TINY_STUDENT
from workbench.build.student import processor_fields
from workbench.metrics import answer_positions, answer_predictions
from workbench.data.llava import LlavaDataset, VLMCollator
from workbench.registry import STUDENTS

ENCODER_FREE = dict(text_hidden=32, text_layers=2, text_heads=2, vision_width=16, patch_size=4, pool=2,
                    max_image_side=32)


def _parts(tmp_path, fields) -> dict:
    """A saved tiny SigLIP and Qwen2 for `llava_from_parts`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipConfig, SiglipModel

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=fields["image_size"], patch_size=fields["patch_size"])
    SiglipModel(SiglipConfig(vision_config=vision, text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50),
    )).save_pretrained(tmp_path / "siglip")
    Qwen2ForCausalLM(Qwen2Config(vocab_size=fields["vocab_size"], hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
                     ).save_pretrained(tmp_path / "lm")
    return {"vision_model": str(tmp_path / "siglip"), "language_model": str(tmp_path / "lm")}


TINY_ARGS = {
    "tiny_llava": lambda tmp_path, fields: dict(TINY_STUDENT),
    "llava_from_parts": _parts,
    "eve": lambda tmp_path, fields: dict(ENCODER_FREE, heads=2),
    "breen": lambda tmp_path, fields: dict(ENCODER_FREE, query_grids=[[2, 2], [1, 1]]),
    "tiny_mmfree_llava": lambda tmp_path, fields: dict(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32,
                                                       text_layers=2),
    # built on its target (the run's teacher); reloads onto it with `load_draft_head`
    "eagle_head": lambda tmp_path, fields: dict(target=_target(fields), init_layer=-1),
}


def _target(fields):
    from students.vlm import tiny_llava

    return tiny_llava(**fields, **TINY_STUDENT).eval()


def _reload(model, folder):
    if getattr(model, "is_draft_head", False):
        from students.eagle import load_draft_head

        return load_draft_head(folder, model.target)
    return students.load(folder)


def test_every_registered_student_has_a_contract_entry():
    assert sorted(TINY_ARGS) == STUDENTS.names()


def _processor_for(model, processor):
    from workbench.build.student import student_processor

    return student_processor(model, processor)


@pytest.mark.parametrize("name", sorted(TINY_ARGS))
def test_registered_student_builds_trains_saves_and_reloads(name, tmp_path, processor, world_dir):
    fields = processor_fields(processor)
    builder = STUDENTS.get(name)
    wanted = getattr(builder, "processor_fields", None)
    fixed = {k: v for k, v in fields.items() if wanted is None or k in wanted}
    torch.manual_seed(0)
    model = STUDENTS.build(name, "student.kwargs", fixed=fixed, **TINY_ARGS[name](tmp_path, fields))
    proc = _processor_for(model, processor)
    samples = [LlavaDataset(world_dir / "train.json")[i] for i in range(3)]
    batch = VLMCollator(proc)(samples)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "image_mask", "ids", "qtypes")}

    model.train()
    logits = model(**inputs).logits
    assert logits.shape[:2] == batch["input_ids"].shape and logits.shape[-1] >= len(proc.tokenizer)
    shifted, labels = logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()
    loss = torch.nn.functional.cross_entropy(shifted.float(), labels, ignore_index=-100)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)

    model.eval()
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_pretrained(tmp_path / "saved")
    proc.save_pretrained(tmp_path / "saved")
    reloaded = _reload(model, tmp_path / "saved").eval()
    with torch.no_grad():
        after = reloaded(**inputs).logits
    torch.testing.assert_close(after, before)

    # held-out scoring: the LM head sees the answer positions only, and picks what full logits pick
    keep = answer_positions(batch["labels"])
    seen = []
    hook = reloaded.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    with torch.no_grad():
        predictions = answer_predictions(reloaded, inputs, batch["labels"])
    hook.remove()
    assert seen == [(int(keep.sum()), seen[0][-1])]
    assert torch.equal(predictions, after[keep].argmax(-1))
