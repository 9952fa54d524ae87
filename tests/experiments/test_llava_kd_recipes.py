"""LLaVA-KD end to end: students assembled from pretrained parts, tapped loss terms with
projectors in a real run, fused logits, and the three-stage wind-tunnel recipe."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_run_args as tiny
from workbench.cli import main

RECIPE = "experiments/windtunnel/llava_kd.yaml"


def test_llava_from_parts_keeps_the_pretrained_weights(tmp_path, processor):
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipConfig, SiglipModel

    import students
    from students.vlm import llava_from_parts
    from workbench.build.student import processor_fields

    fields = processor_fields(processor)
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=fields["image_size"], patch_size=fields["patch_size"])
    siglip = SiglipModel(SiglipConfig(vision_config=vision, text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)))
    siglip.save_pretrained(tmp_path / "siglip")
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=fields["vocab_size"] - 2, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    lm.save_pretrained(tmp_path / "lm")
    model = llava_from_parts(**fields, vision_model=str(tmp_path / "siglip"), language_model=str(tmp_path / "lm"))
    assert model.get_input_embeddings().weight.shape[0] == fields["vocab_size"]  # grown for the added tokens
    torch.testing.assert_close(model.model.vision_tower.encoder.layers[1].mlp.fc1.weight,
                               siglip.vision_model.encoder.layers[1].mlp.fc1.weight)
    ids = torch.randint(3, 40, (2, 7))
    with torch.no_grad():  # text-only input: the student's LM is the pretrained LM
        torch.testing.assert_close(model(input_ids=ids).logits[..., :lm.config.vocab_size], lm(input_ids=ids).logits)
    assert not any(p.requires_grad for p in model.model.vision_tower.head.parameters())
    model.save_pretrained(tmp_path / "student")
    assert type(students.load(tmp_path / "student")).__name__ == "LlavaForConditionalGeneration"
    with pytest.raises(ValueError, match="takes 48px images in 16px patches but the processor makes 64px"):
        llava_from_parts(**{**fields, "image_size": 64}, vision_model=str(tmp_path / "siglip"),
                         language_model=str(tmp_path / "lm"))


def test_tapped_terms_with_projectors_and_fused_logits_train_end_to_end(tmp_path, tiny_vlm_dir):
    """Student text width 32, teacher 48: the feature term gets a 32 -> 48 projector per layer
    pair; it trains with the student, is checkpointed, and stays out of the export."""
    overrides = tiny(tmp_path, f"teacher.path={tiny_vlm_dir}", "trainer.fused_logits=true",
                     "loss.feat={type: feature_mse, student: 'model.language_model.layers.{i}', layers: uniform, mask: all}",
                     "loss.attn={type: attention_kl, student: 'model.language_model.layers.{i}.self_attn', layers: 'last:1'}",
                     "loss.qkv={type: qkv_relation, student: 'model.language_model.layers.{i}.self_attn.{p}_proj', layers: [[1, 1]], relation_heads: 2}",
                     "loss.rdist={type: rdist}", "loss.rkd={type: rkd_distance, student: model.multi_modal_projector}")
    assert main(["run", "experiments/windtunnel/student_kd.yaml", *overrides]) == 0
    run_dir = tmp_path / "runs" / "windtunnel-student-kd" / "latest"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["params"]["projectors"] == 2 * (32 * 48 + 48)
    assert summary["taps"]["feat"] == [["model.language_model.layers.0", "model.language_model.layers.0"],
                                       ["model.language_model.layers.1", "model.language_model.layers.1"]]
    assert {"train/feat", "train/attn", "train/qkv", "train/rdist", "train/rkd", "train/kd", "train/ce"} <= set(
        summary["final_train"])
    assert all(value == value for value in summary["final_train"].values())  # no NaN
    exported = load_file(run_dir / "student" / "model.safetensors")
    assert exported and not any("projectors" in k or k.startswith("loss.") for k in exported)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    first = ckpt["state_dict"]["loss.terms.feat.projectors.0.proj.weight"]
    assert first.shape == (48, 32)
    assert ckpt["optimizer_states"][0]["state"], "the optimizer holds state for trained parameters"


def test_tapped_terms_refuse_a_logit_cache_and_bad_taps(tmp_path, tiny_vlm_dir, capsys):
    base = tiny(tmp_path, f"teacher.path={tiny_vlm_dir}")
    assert main(["run", "experiments/windtunnel/student_kd.yaml", *base,
                 "loss.feat={type: feature_mse, student: model.language_model.layers.9}"]) == 2
    assert "no module '9' under model.language_model.layers" in capsys.readouterr().err
    for term in ("{type: feature_cosine, student: model.multi_modal_projector}", "{type: mdist}"):
        assert main(["run", "experiments/windtunnel/student_kd.yaml", *base, "teacher.cache=auto", "loss.kd.temperature=1",
                     f"loss.x={term}"]) == 2
        assert "loss terms x need the teacher loaded" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "windtunnel-student-kd").exists()


def stage_steps(steps=3):
    out = []
    for stage in ("teacher", "dpt", "sft", "dft"):
        out += [f"stages.{stage}.trainer.max_steps={steps}", f"stages.{stage}.trainer.val_every_n_steps={steps}"]
    return out


@pytest.fixture(scope="module")
def llava_kd_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_kd")
    assert main(["run", RECIPE, *tiny(root), *stage_steps(), "stages.teacher.student.kwargs.text_layers=4"]) == 0
    return root, root / "runs" / "windtunnel-llava-kd" / "latest"


def test_llava_kd_recipe_runs_three_stages_with_the_right_trainable_parts(llava_kd_run):
    root, run_dir = llava_kd_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and list(summary["stages"]) == ["teacher", "dpt", "sft", "dft"]
    assert all("acc" in row for row in summary["results"])
    stages = summary["stages"]
    assert {"train/mdist", "train/rdist"} == {k for k in stages["dpt"]["final_train"] if k.startswith("train/") and k != "train/loss"}
    assert {"train/ce", "train/mdist", "train/rdist"} <= set(stages["dft"]["final_train"])
    import students

    weights = {name: students.load(run_dir / "stages" / name / "student").state_dict() for name in stages}
    teacher, dpt, sft = weights["teacher"], weights["dpt"], weights["sft"]
    projector = [k for k in dpt if "multi_modal_projector" in k]
    assert stages["dpt"]["params"]["student_trainable"] == sum(dpt[k].numel() for k in projector)
    # DPT trains the projector only; the student began as the teacher's tower + first two layers
    for key, value in dpt.items():
        if key in projector:
            assert not torch.equal(value, teacher[key]), key
        else:
            assert torch.equal(value, teacher[key]), key
    # the vision tower stays frozen through SFT; the language model trains
    assert all(torch.equal(sft[k], teacher[k]) for k in sft if "vision_tower" in k)
    assert not torch.equal(sft["model.language_model.layers.0.mlp.up_proj.weight"],
                           dpt["model.language_model.layers.0.mlp.up_proj.weight"])
    assert "| dft |" in (run_dir / "results.md").read_text()


def test_llava_kd_ablation_sweep_reuses_one_teacher_and_compares(llava_kd_run, capsys):
    root, run_dir = llava_kd_run
    teacher = run_dir / "stages" / "teacher" / "student"
    assert main(["run", RECIPE, *tiny(root), *stage_steps(2), "stages.teacher=null", f"vars.teacher={teacher}",
                 "--sweep", "vars.rdist=0,1"]) == 0
    (sweep,) = (root / "runs" / "windtunnel-llava-kd").glob("sweep-*")
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.is_symlink())
    assert runs == ["vars.rdist=0", "vars.rdist=1"]
    no_rdist = json.loads((sweep / "vars.rdist=0" / "summary.json").read_text())
    assert list(no_rdist["stages"]) == ["dpt", "sft", "dft"]
    assert "train/rdist" not in no_rdist["stages"]["dft"]["final_train"]  # weight 0 drops the term
    capsys.readouterr()
    assert main(["compare", str(sweep)]) == 0
    table = capsys.readouterr().out
    assert "vars.rdist" in table and table.count("\n") >= 4
