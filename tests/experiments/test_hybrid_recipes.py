"""Hybrid students in the workbench: the MaTVLM and mmMamba recipes end to end on tiny data,
MaTVLM's teacher-input layer loss and mmMamba's in-student targets against hand computations,
batchmean divergences against PyTorch's KLDivLoss, and the config errors."""

import json

import pytest
import torch
import torch.nn.functional as F

import students
from losses.divergence import LogitDivergenceTerm
from losses.inputs import LossInputs
from students.hybrid import MambaAttention, convert, mamba_layers
from workbench.cli import main

MATVLM = "experiments/windtunnel/matvlm.yaml"
MMMAMBA = "experiments/windtunnel/mmmamba.yaml"


def small(root, teacher, *extra):
    return [f"data.root={root}/data", "data.windtunnel.n_train=48", "data.windtunnel.n_val=16", "data.batch_size=8",
            "data.eval_batch_size=16", "trainer.max_steps=3", "trainer.val_every_n_steps=3",
            "trainer.log_every_n_steps=1", "optim.warmup_steps=1", f"out_root={root}/runs", "stages.teacher=null",
            f"vars.teacher={teacher}", *extra]


def test_batchmean_is_kldivloss_batchmean():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 7, 11, generator=g), torch.randn(3, 7, 11, generator=g)
    attention = torch.ones(3, 7, dtype=torch.long)
    inputs = LossInputs(student_logits=s, teacher_logits=t, labels=torch.full((3, 7), -100),
                        attention_mask=attention, image_mask=torch.zeros(3, 7, dtype=torch.bool))
    term = LogitDivergenceTerm("forward_kl", temperature=1.0, mask="all", reduction="batchmean")
    expected = F.kl_div(F.log_softmax(s[:, :-1], -1), F.log_softmax(t[:, :-1], -1), log_target=True,
                        reduction="batchmean")
    torch.testing.assert_close(term(inputs), expected)
    mean = LogitDivergenceTerm("forward_kl", mask="all")(inputs)
    torch.testing.assert_close(mean * 6, expected)  # 6 predicted positions per sample


def test_matvlm_recipe_trains_the_mamba_layers_and_projector(tmp_path, tiny_vlm_dir):
    assert main(["run", MATVLM, *small(tmp_path, tiny_vlm_dir, "vars.layers=[1]")]) == 0
    run_dir = tmp_path / "runs" / "windtunnel-matvlm" / "latest"
    summary = json.loads((run_dir / "summary.json").read_text())
    stage = summary["stages"]["matvlm"]
    assert stage["hybrid"]["mamba_layers"] == [1] and stage["hybrid"]["attention_layers"] == 1
    assert {"train/kl", "train/layer"} <= set(stage["final_train"])
    assert stage["taps"]["layer"] == [["model.language_model.layers.1", "model.language_model.layers.1"]]
    model = students.load(run_dir / "stages" / "matvlm" / "student")
    assert mamba_layers(model) == [1]
    mamba = sum(p.numel() for n, p in model.named_parameters() if ".mamba." in n)
    projector = sum(p.numel() for n, p in model.named_parameters() if "multi_modal_projector" in n)
    assert stage["params"]["student_trainable"] == mamba + projector
    teacher = students.load(tiny_vlm_dir).state_dict()
    trained = model.state_dict()
    for key, value in trained.items():  # everything but the Mamba layer and projector is the teacher's
        if ".mamba." not in key and "multi_modal_projector" not in key:
            assert torch.equal(value, teacher[key]), key


def test_mmmamba_recipe_three_stages(tmp_path, tiny_vlm_dir):
    assert main(["run", MMMAMBA, *small(tmp_path, tiny_vlm_dir)]) == 0
    run_dir = tmp_path / "runs" / "windtunnel-mmmamba" / "latest"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["stages"]) == ["layerwise1", "layerwise2", "e2e"]
    loaded = {name: students.load(run_dir / "stages" / name / "student") for name in summary["stages"]}
    w1, w2, w3 = (loaded[n].state_dict() for n in ("layerwise1", "layerwise2", "e2e"))
    key = "model.language_model.layers.0.self_attn.mamba.{}.weight"
    # stage 1 trains the new SSM parameters only; the inherited x/B/C start as V/K/Q and stay
    teacher = students.load(tiny_vlm_dir).state_dict()
    assert torch.equal(w1[key.format("x_proj")], teacher["model.language_model.layers.0.self_attn.v_proj.weight"])
    assert not torch.equal(w1[key.format("z_proj")], w2[key.format("z_proj")])
    assert not torch.equal(w1[key.format("x_proj")], w2[key.format("x_proj")])  # stage 2 trains x/B/C too
    assert torch.equal(w2[key.format("out_proj")], w3[key.format("out_proj")])  # o_proj stays frozen in stage 3
    assert "model.language_model.layers.0.self_attn.attention.q_proj.weight" in w2
    assert not any(".self_attn.attention." in k for k in w3)  # the kept attention is gone after stage 2
    assert summary["stages"]["layerwise1"]["final_train"]["train/mixer"] > 0
    assert "train/kl" in summary["stages"]["e2e"]["final_train"]
    assert mamba_layers(loaded["e2e"]) == [0, 1]


def test_layer_replay_reads_the_teacher_layer_input_and_output(tiny_vlm_dir):
    from losses.feature import LayerReplayTerm

    teacher = students.load(tiny_vlm_dir)
    student = students.load(tiny_vlm_dir)
    convert(student, [1])
    term = LayerReplayTerm("model.language_model.layers.{i}")
    tap = "model.language_model.layers.1"
    term.bind([(tap, tap)], [None])
    term.attach(student, None)
    h_in, h_out = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    inputs = LossInputs(student_logits=torch.zeros(2, 5, 3), labels=torch.zeros(2, 5, dtype=torch.long),
                        attention_mask=torch.ones(2, 5, dtype=torch.long), image_mask=torch.zeros(2, 5, dtype=torch.bool),
                        teacher_features={f"{tap}:input": h_in, tap: h_out})
    value = term(inputs)
    layer = student.model.language_model.layers[1]
    expected = torch.linalg.vector_norm(layer(h_in) - h_out)
    torch.testing.assert_close(value, expected)
    value.backward()
    grads = {n for n, p in student.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith("model.language_model.layers.1.") for n in grads)
    assert not any(p.grad is not None for p in teacher.parameters())
    with pytest.raises(ValueError, match="not a Mamba layer"):
        other = LayerReplayTerm("model.language_model.layers.{i}")
        other.bind([("model.language_model.layers.0", "model.language_model.layers.0")], [None])
        other.attach(student, None)
    assert isinstance(layer.self_attn, MambaAttention)


def test_hybrid_config_errors(tmp_path, tiny_vlm_dir, capsys):
    base = small(tmp_path, tiny_vlm_dir)
    assert main(["run", MATVLM, *base, "vars.layers=every:0"]) == 2
    assert "hybrid" in capsys.readouterr().err
    assert main(["run", MATVLM, *base, "vars.init=zeros"]) == 2
    assert "hybrid.init" in capsys.readouterr().err
    assert main(["run", MATVLM, *base, "stages.matvlm.hybrid=null"]) == 2
    assert "'*.mamba.*' matches no parameter" in capsys.readouterr().err
    assert main(["run", MATVLM, *base, "stages.matvlm.hybrid=null", "stages.matvlm.trainable=[model.multi_modal_projector.*]"]) == 2
    assert "no Mamba layers" in capsys.readouterr().err
    assert main(["run", "experiments/windtunnel/minivit_deit.yaml", f"data.root={tmp_path}/data",
                 "hybrid={layers: all}", f"out_root={tmp_path}/runs"]) == 2
    assert "image classifiers" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
