"""Encoder-free students in the workbench: the EVE and BREEN wind-tunnel recipes end to end on
tiny data (stage-wise trainable sets, the vision losses on in every stage, exported folders
that load with their processor), the encoder-based reference recipe, and the config errors."""

import json

import pytest
import torch

import students
from students.encoder_free import EncoderFreeForConditionalGeneration, EncoderFreeProcessor
from workbench.build.data import load_processor
from workbench.cli import main

EVE = "experiments/windtunnel/eve.yaml"
BREEN = "experiments/windtunnel/breen.yaml"
REFERENCE = "experiments/windtunnel/encoder_based.yaml"
STAGES = ["pre_align", "pretrain", "sft"]


def small(root, teacher, *extra):
    return [f"data.root={root}/data", "data.windtunnel.n_train=48", "data.windtunnel.n_val=16", "data.batch_size=8",
            "data.eval_batch_size=16", "trainer.max_steps=3", "trainer.val_every_n_steps=3",
            "trainer.log_every_n_steps=1", "optim.warmup_steps=1", f"out_root={root}/runs", "stages.teacher=null",
            f"vars.teacher={teacher}", *extra]


def _stages(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["stages"]) == STAGES
    return summary, {name: students.load(run_dir / "stages" / name / "student") for name in STAGES}


def test_eve_recipe_three_stages(tmp_path, tiny_vlm_dir):
    # the tiny teacher's LM has 2 layers: hidden states 0 and 2 feed the aligning layer
    assert main(["run", EVE, *small(tmp_path, tiny_vlm_dir, "loss.align.every=2")]) == 0
    run_dir = tmp_path / "runs" / "windtunnel-eve" / "latest"
    summary, loaded = _stages(run_dir)
    for name in STAGES:  # the alignment loss is on in all three stages, as in EVE's scripts
        assert summary["stages"][name]["final_train"]["train/align"] > 0
        assert isinstance(loaded[name], EncoderFreeForConditionalGeneration)
        assert type(load_processor(run_dir / "stages" / name / "student", "test")) is EncoderFreeProcessor
    teacher = students.load(tiny_vlm_dir).state_dict()
    w1, w2 = loaded["pre_align"].state_dict(), loaded["pretrain"].state_dict()
    for key, value in w1.items():  # stage 1: only the patch tokenizer trains; the LM is the teacher's
        if key.startswith("model.language_model.") or key == "lm_head.weight":
            assert torch.equal(value, teacher[key]), key
    assert not torch.equal(w1["model.vision_tokenizer.patch_embed.weight"],
                           loaded["sft"].state_dict()["model.vision_tokenizer.patch_embed.weight"])
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(w1[key], w2[key])  # stage 2 trains the LM too
    first = summary["stages"]["pre_align"]
    assert first["params"]["student_trainable"] == sum(
        p.numel() for n, p in loaded["pre_align"].named_parameters() if n.startswith("model.vision_tokenizer."))
    assert first["params"]["projectors"] > 0  # the patch-aligning layer trains with it, not exported
    assert not any("pal" in k for k in w1)


def test_the_aligning_layer_carries_over_to_the_next_stage(tmp_path, tiny_vlm_dir):
    argv = small(tmp_path, tiny_vlm_dir, "loss.align.every=2", "stages.sft=null", "stages.pretrain.optim.lr=1e-30")
    assert main(["run", EVE, *argv]) == 0
    run_dir = tmp_path / "runs" / "windtunnel-eve" / "latest"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stages"]["pretrain"]["loss_carried"] == {"from": "pre_align", "terms": ["align"]}

    def pal(stage):
        state = torch.load(run_dir / "stages" / stage / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        return {k: v for k, v in state.items() if k.startswith("loss.terms.align.")}

    first, second = pal("pre_align"), pal("pretrain")
    assert first and first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)  # lr 1e-30 changes nothing: what stage 2 started from


def test_eve_recipe_without_vision_supervision(tmp_path, tiny_vlm_dir):
    argv = small(tmp_path, tiny_vlm_dir, "vars.align=0", "stages.pretrain=null", "stages.sft=null")
    assert main(["run", EVE, *argv]) == 0
    summary = json.loads((tmp_path / "runs" / "windtunnel-eve" / "latest" / "summary.json").read_text())
    assert "train/align" not in summary["stages"]["pre_align"]["final_train"]


def test_breen_recipe_three_stages(tmp_path, tiny_vlm_dir):
    assert main(["run", BREEN, *small(tmp_path, tiny_vlm_dir)]) == 0
    run_dir = tmp_path / "runs" / "windtunnel-breen" / "latest"
    summary, loaded = _stages(run_dir)
    for name in STAGES:
        assert summary["stages"][name]["final_train"]["train/query"] > 0
    assert loaded["sft"].config.query_grids == [[2, 2], [1, 1]] and loaded["sft"].config.image_experts
    w1, w2 = loaded["pre_align"].state_dict(), loaded["pretrain"].state_dict()
    teacher = students.load(tiny_vlm_dir).state_dict()
    layer = "model.language_model.layers.0."
    assert torch.equal(w1[layer + "self_attn.q_proj.weight"], teacher[layer + "self_attn.q_proj.weight"])
    assert torch.equal(w1[layer + "mlp.text_expert.up_proj.weight"], teacher[layer + "mlp.up_proj.weight"])
    assert not torch.equal(w1[layer + "mlp.image_expert.up_proj.weight"], teacher[layer + "mlp.up_proj.weight"])
    # BREEN's stage-1 whitelist leaves the queries at their random init (docs/methods.md §10.5b); stage 2 trains them
    whitelist = ("model.vision_tokenizer.", ".mlp.image_expert.", ".mlp.image_gate.", ".mlp.text_gate.")
    trained = sum(p.numel() for n, p in loaded["pre_align"].named_parameters() if any(w in n for w in whitelist))
    assert summary["stages"]["pre_align"]["params"]["student_trainable"] == trained  # no queries among them
    assert summary["stages"]["pretrain"]["params"]["student_trainable"] == sum(p.numel() for p in w2.values())
    assert not torch.equal(w1["model.queries"], w2["model.queries"])


def test_encoder_based_reference_recipe(tmp_path, tiny_vlm_dir):
    assert main(["run", REFERENCE, *small(tmp_path, tiny_vlm_dir, "stages.pretrain=null", "stages.sft=null",
                                          "data.windtunnel.grid=3")]) == 0
    run_dir = tmp_path / "runs" / "windtunnel-encoder-based" / "latest"
    model = students.load(run_dir / "stages" / "pre_align" / "student").state_dict()
    teacher = students.load(tiny_vlm_dir).state_dict()
    changed = {k for k in model if not torch.equal(model[k], teacher[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)


@pytest.mark.parametrize("extra, message", [
    (["teacher.type=hf_vlm"], "loss.align"),  # a VLM teacher gives logits, not image features
    (["loss.kl.type=forward_kl"], "read teacher logits"),
    (["stages.pre_align=null", "stages.sft=null", "stages.pretrain.student.path={teacher}"], "encoder-free"),
    (["teacher.cache=auto"], "teacher.cache"),
    (["loss.align.every=4"], "lower 'every'"),
    (["stages.pre_align.student.kwargs.heads=5"], "not a multiple of heads"),
])
def test_config_errors(tmp_path, tiny_vlm_dir, capsys, extra, message):
    argv = small(tmp_path, tiny_vlm_dir, "loss.align.every=2", *(e.format(teacher=tiny_vlm_dir) for e in extra))
    capsys.readouterr()
    assert main(["run", EVE, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("recipe, kwargs", [
    ("experiments/eve.yaml", "{language_model: '%s', vision_width: 16, patch_size: 8, pool: 2, heads: 2, max_image_side: 48}"),
    ("experiments/breen.yaml", "{language_model: '%s', vision_width: 16, patch_size: 8, pool: 2, max_image_side: 48, "
                               "query_grids: [[3, 3], [1, 1]]}"),
])
def test_real_size_recipes_build_and_train_their_first_stage(tmp_path, tiny_vlm_dir, world_dir, recipe, kwargs):
    """The real recipes' structure with tiny stand-ins: the tiny VLM as LLM and as 'CLIP', the
    wind tunnel's processor and data; one GPU's worth of trainer settings."""
    argv = [f"vars.llm={tiny_vlm_dir}", f"vars.clip={tiny_vlm_dir}", f"vars.processor={world_dir / 'processor'}",
            f"vars.captions={world_dir / 'train.json'}", f"vars.blip3_4m={world_dir / 'train.json'}",
            f"vars.images={world_dir}", f"data.val={world_dir / 'val.json'}", "data.limit_train=16", "data.batch_size=4",
            "data.num_workers=0",
            "trainer.devices=1", "trainer.strategy=auto", "trainer.precision=32-true", "trainer.max_steps=2",
            "trainer.val_every_n_steps=2", "trainer.accumulate_grad_batches=1", "optim.warmup_steps=1",
            "teacher.dtype=float32", f"out_root={tmp_path}/runs", "stages.pretrain=null", "stages.sft=null",
            f"stages.pre_align.student.kwargs={kwargs % tiny_vlm_dir}", "loss.align.every=2"]
    if "breen" in recipe:
        argv = [a for a in argv if not a.startswith("loss.align")]
    assert main(["run", recipe, *argv]) == 0
    name = "eve" if "eve" in recipe else "breen"
    summary = json.loads((tmp_path / "runs" / name / "latest" / "summary.json").read_text())
    term = "train/align" if name == "eve" else "train/query"
    assert summary["stages"]["pre_align"]["final_train"][term] > 0


def test_cache_teacher_refuses_a_vision_encoder(tmp_path, tiny_vlm_dir, capsys):
    capsys.readouterr()
    argv = small(tmp_path, tiny_vlm_dir)
    assert main(["cache-teacher", EVE, *argv, "--stage", "pre_align"]) == 2
    assert "nothing to cache" in capsys.readouterr().err
