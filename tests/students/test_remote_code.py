"""Every kind of exported student loads in a Python process where this project cannot be
imported: stock families with the stock Auto classes, custom ones (EVE / BREEN encoder-free,
attention -> Mamba hybrids, per-layer MatFormer extracts, ternary students trained or packed) with `trust_remote_code=True` from
the code written next to their weights. Logits and greedy generations must equal the
in-project model's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import students
from conftest import REPO, TINY_STUDENT, subprocess_env
from workbench.build.student import processor_fields
from workbench.data.llava import LlavaDataset, VLMCollator
from workbench.registry import STUDENTS

ENCODER_FREE = dict(text_hidden=32, text_layers=2, text_heads=2, vision_width=16, patch_size=4, pool=2,
                    max_image_side=32)

# Runs in the child: our packages raise ImportError, whatever sys.path holds.
CHILD = r'''
import importlib.util, os, sys
repo = os.path.realpath(sys.argv[4])
# the editable install's finder and any path entry holding the repository are gone: our
# packages are "not installed" (transformers probes for a package named `kernels`)
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != repo]
for name in ("students", "workbench", "teachers", "losses", "kernels"):
    spec = importlib.util.find_spec(name)
    assert spec is None or not os.path.realpath(spec.origin or "").startswith(repo), f"{name} is importable"
import torch, transformers
folder, auto, remote = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
inputs = torch.load(f"{folder}/../inputs.pt", weights_only=True)
model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=remote).eval()
processor = transformers.AutoProcessor.from_pretrained(folder, trust_remote_code=remote) if remote else None
with torch.no_grad():
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
torch.save({"logits": logits, "generated": generated, "class": type(model).__name__,
            "processor": type(processor).__name__ if processor is not None else None}, f"{folder}/../child.pt")
'''


def _export(model, processor, tmp_path):
    from workbench.build.student import student_processor

    proc = student_processor(model, processor)
    folder = tmp_path / "export"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    written = students.write_remote_code(model, folder)
    return folder, proc, written


def _batch(proc, world_dir):
    samples = [LlavaDataset(world_dir / "val.json")[i] for i in range(2)]
    batch = VLMCollator(proc)(samples)
    return {k: batch[k] for k in batch if k in ("input_ids", "attention_mask", "pixel_values", "pixel_mask",
                                              "image_sizes")}


def _check_in_child(model, folder, inputs, tmp_path, auto, remote):
    model.eval()
    model.generation_config.eos_token_id = None  # both sides generate their full length
    model.generation_config.save_pretrained(folder)
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    run = subprocess.run([sys.executable, "-c", CHILD, str(folder), auto, "1" if remote else "0", str(REPO)],
                         cwd=tmp_path,
                         env={**subprocess_env(), "HF_MODULES_CACHE": str(tmp_path / "modules"),
                              "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    child = torch.load(tmp_path / "child.pt", weights_only=True)
    torch.testing.assert_close(child["logits"], logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(child["generated"], generated)
    return child


def _tiny(name, processor, tmp_path, **extra):
    fields = processor_fields(processor)
    builder = STUDENTS.get(name)
    wanted = getattr(builder, "processor_fields", None)
    fixed = {k: v for k, v in fields.items() if wanted is None or k in wanted}
    torch.manual_seed(0)
    return STUDENTS.build(name, "student.kwargs", fixed=fixed, **extra)


def test_a_stock_llava_needs_no_remote_code(processor, world_dir, tmp_path):
    model = _tiny("tiny_llava", processor, tmp_path, **TINY_STUDENT)
    folder, proc, written = _export(model, processor, tmp_path)
    assert written == [] and "auto_map" not in json.loads((folder / "config.json").read_text())
    child = _check_in_child(model, folder, _batch(proc, world_dir), tmp_path, "AutoModelForImageTextToText", False)
    assert child["class"] == "LlavaForConditionalGeneration"


@pytest.mark.parametrize("name, extra", [("eve", dict(ENCODER_FREE, heads=2)),
                                         ("breen", dict(ENCODER_FREE, query_grids=[[2, 2], [1, 1]]))])
def test_encoder_free_students_load_with_their_remote_code(name, extra, processor, world_dir, tmp_path):
    model = _tiny(name, processor, tmp_path, **extra)
    folder, proc, written = _export(model, processor, tmp_path)
    assert "modeling_encoder_free.py" in written
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"].startswith("modeling_encoder_free.")
    child = _check_in_child(model, folder, _batch(proc, world_dir), tmp_path, "AutoModelForImageTextToText", True)
    assert child["class"] == "EncoderFreeForConditionalGeneration" and child["processor"] == "EncoderFreeProcessor"


def test_a_mamba_hybrid_loads_with_its_remote_code(processor, world_dir, tmp_path):
    from students.hybrid import convert

    model = _tiny("tiny_llava", processor, tmp_path, **{**TINY_STUDENT, "text_layers": 4})
    assert convert(model, "every:2", chunk_size=8) == [0, 2]
    folder, proc, written = _export(model, processor, tmp_path)
    assert {"modeling_workbench.py", "hybrid.py", "mamba2.py", "ssd_ref.py"} <= set(written)
    child = _check_in_child(model, folder, _batch(proc, world_dir), tmp_path, "AutoModelForImageTextToText", True)
    assert child["class"] == "LlavaForConditionalGeneration" and "modeling_workbench" in json.dumps(
        json.loads((folder / "config.json").read_text())["auto_map"])


def test_a_per_layer_matformer_extract_loads_with_its_remote_code(processor, world_dir, tmp_path):
    from students.matformer import MatSpec, extract, matformerize

    model = _tiny("tiny_llava", processor, tmp_path, **TINY_STUDENT)
    matformerize(model.get_decoder())
    full = model.config.text_config.intermediate_size
    static = extract(model, MatSpec(widths=[full // 4, full // 2], skip=()))
    folder, proc, written = _export(static, processor, tmp_path)
    assert written == ["matformer.py", "modeling_workbench.py"]
    assert json.loads((folder / "config.json").read_text())["text_config"]["matformer_widths"] == [full // 4, full // 2]
    _check_in_child(static, folder, _batch(proc, world_dir), tmp_path, "AutoModelForImageTextToText", True)
    torch.testing.assert_close(students.load(folder).state_dict()["lm_head.weight"], static.lm_head.weight)


@pytest.mark.parametrize("packed, weight_scale, placement", [(False, "tensor", "mmfree"),
                                                             (True, "group:32", "bitnet_faq")])
def test_a_ternary_student_loads_with_its_remote_code(packed, weight_scale, placement, processor, world_dir, tmp_path):
    from students.bitlinear import BitLinear, PackedBitLinear, pack_model
    from students.ternary import ternary_transform

    model = _tiny("tiny_llava", processor, tmp_path, **TINY_STUDENT)
    ternary_transform(model, weight_scale=weight_scale, placement=placement)
    if packed:  # the deployment form: 2-bit codes and scales, the integer path in torch
        pack_model(model)
    folder, proc, written = _export(model, processor, tmp_path)
    assert {"modeling_workbench.py", "bitlinear.py", "ternary_ref.py"} <= set(written)
    _check_in_child(model, folder, _batch(proc, world_dir), tmp_path, "AutoModelForImageTextToText", True)
    assert isinstance(students.load(folder).model.language_model.layers[0].mlp.up_proj,
                      PackedBitLinear if packed else BitLinear)


@pytest.mark.parametrize("packed", [False, True])
def test_a_matmul_free_student_loads_with_its_remote_code(packed, processor, world_dir, tmp_path):
    from students.bitlinear import pack_model

    model = _tiny("tiny_mmfree_llava", processor, tmp_path, vision_hidden=32, vision_layers=1, vision_heads=2,
                  text_hidden=32, text_layers=2)
    if packed:
        pack_model(model)
    folder, proc, written = _export(model, processor, tmp_path)
    assert {"modeling_workbench.py", "mmfree.py", "hgrn_ref.py", "bitlinear.py"} <= set(written)
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoConfig"].startswith("modeling_workbench.")
    _check_in_child(model, folder, _batch(proc, world_dir), tmp_path, "AutoModelForImageTextToText", True)


def test_a_mixture_of_depths_student_loads_with_its_remote_code(processor, world_dir, tmp_path):
    """Routers, per-layer kept-token caches and all: logits and cached greedy decoding equal."""
    from students.mod import decoder_layers, mod_transform

    model = _tiny("tiny_llava", processor, tmp_path, **{**TINY_STUDENT, "text_layers": 4})
    assert mod_transform(model)["mod_layers"] == [1, 2, 3]
    torch.manual_seed(1)
    for layer in decoder_layers(model)[1:]:
        torch.nn.init.normal_(layer.mod_router.weight)
    folder, proc, written = _export(model, processor, tmp_path)
    assert {"modeling_workbench.py", "mod.py", "hf_cache.py"} <= set(written)
    child = _check_in_child(model, folder, _batch(proc, world_dir), tmp_path, "AutoModelForImageTextToText", True)
    assert child["class"] == "LlavaForConditionalGeneration"


# A draft head: the stock target from its folder, the head with its remote code, attached.
HEAD_CHILD = CHILD.split("import torch, transformers")[0] + r'''
import torch, transformers
target_dir, head_dir = sys.argv[1], sys.argv[2]
inputs = torch.load(f"{head_dir}/../inputs.pt", weights_only=True)
target = transformers.AutoModelForImageTextToText.from_pretrained(target_dir).eval()
head = transformers.AutoModel.from_pretrained(head_dir, trust_remote_code=True).eval().attach(target)
with torch.no_grad():
    logits = head(**inputs).logits
torch.save({"logits": logits, "class": type(head).__name__, "module": type(head).__module__},
           f"{head_dir}/../child.pt")
'''


def test_a_draft_head_loads_with_its_remote_code_and_drafts_for_the_stock_target(processor, world_dir, tmp_path):
    from students.eagle import EagleDraft

    target = _tiny("tiny_llava", processor, tmp_path, **TINY_STUDENT).eval()
    target_dir, proc, _ = _export(target, processor, tmp_path)
    torch.manual_seed(1)
    head = EagleDraft.from_target(target).eval()
    head_dir = tmp_path / "head"
    head.save_pretrained(head_dir)
    assert sorted(students.write_remote_code(head, head_dir)) == ["eagle.py", "hf_cache.py"]
    assert json.loads((head_dir / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "eagle.EagleConfig", "AutoModel": "eagle.EagleDraft"}
    inputs = _batch(proc, world_dir)
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        logits = head(**inputs).logits
    run = subprocess.run([sys.executable, "-c", HEAD_CHILD, str(target_dir), str(head_dir), "-", str(REPO)],
                         cwd=tmp_path, env={**subprocess_env(), "HF_MODULES_CACHE": str(tmp_path / "modules"),
                                            "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    child = torch.load(tmp_path / "child.pt", weights_only=True)
    assert child["class"] == "EagleDraft" and not child["module"].startswith("students")
    torch.testing.assert_close(child["logits"], logits, atol=1e-5, rtol=1e-5)
