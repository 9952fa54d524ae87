"""MatFormer joint training through the workbench: the summed per-granularity objective,
sampling and self-distillation, logging, export and extraction of a trained run."""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest
import timm
import torch

import students
from losses.combine import WeightedLoss
from losses.divergence import CrossEntropyTerm, LogitDivergenceTerm
from losses.inputs import LossInputs
from students.matformer import MatSpec, nested_mlps, set_uniform, submodel_params
from workbench.cli import main
from workbench.config import MatFormerConfig, OptimConfig
from workbench.targets.none import NoTeacher
from workbench.module import VisionDistillModule

RECIPE = "experiments/windtunnel/matformer_vit.yaml"
TINY = ["trainer.max_steps=8", "trainer.val_every_n_steps=4", "trainer.log_every_n_steps=1", "trainer.progress_bar=false",
        "optim.warmup_steps=2", "data.limit_train=128", "data.limit_val=64", "data.batch_size=32",
        "stages.teacher.trainer.max_steps=8", "stages.teacher.student.kwargs.embed_dim=32",
        "stages.teacher.student.kwargs.depth=2", "stages.matvit.student.kwargs.depth=2",
        "stages.ind_1=null", "stages.ind_1_2=null", "stages.ind_1_4=null", "stages.ind_1_8=null"]


def module(**matformer):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2,
                              num_heads=2, num_classes=10)
    from students.matformer import matformerize

    matformerize(model)
    loss = WeightedLoss({"ce": (1.0, CrossEntropyTerm())})
    return VisionDistillModule(model, loss, NoTeacher(), OptimConfig(), 10, matformer=MatFormerConfig(**matformer))


BATCH = {"pixel_values": torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
         "labels": torch.arange(6) % 10}


def ce_at(m, g):
    set_uniform(m.student, g)
    return torch.nn.functional.cross_entropy(m.student(BATCH["pixel_values"]), BATCH["labels"])


def test_joint_objective_is_the_sum_over_granularities():
    m = module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        total = m._matformer_step(BATCH, 6)
    expected = sum(ce_at(m, g) for g in (1.0, 0.5, 0.25, 0.125))
    torch.testing.assert_close(total, expected)
    set_uniform(m.student, 1.0)
    total.backward()
    fc1 = m.student.blocks[0].mlp.fc1.weight.grad  # (64, 16): every row gets a gradient, the first 8 from all four
    assert fc1[:8].abs().sum() > 0 and fc1[32:].abs().sum() > 0


def test_sampled_granularities_and_self_distillation():
    m = module(sample=1, self_distill=0.5)
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, value)
    total = m._matformer_step(BATCH, 6)
    grans = sorted({k.split("/")[1] for k in logged if k.startswith("train/g")})
    assert len(grans) == 2 and "g1" in grans  # the full width + one sampled
    other = float([g for g in grans if g != "g1"][0][1:])
    set_uniform(m.student, 1.0)
    full = m.student(BATCH["pixel_values"]).detach()
    set_uniform(m.student, other)
    small = m.student(BATCH["pixel_values"])
    kd = LogitDivergenceTerm("forward_kl")(LossInputs(student_logits=small, labels=BATCH["labels"], teacher_logits=full))
    torch.testing.assert_close(logged[f"train/g{other:g}/self_distill"], kd.detach())
    torch.testing.assert_close(total, ce_at(m, 1.0) + ce_at(m, other) + 0.5 * kd)


@pytest.fixture(scope="module")
def matvit_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("matvit")
    assert main(["run", RECIPE, f"out_root={root}", *TINY]) == 0
    return root / "windtunnel-matformer-vit" / "latest"


def test_trained_universal_model_reads_back(matvit_run):
    stage = matvit_run / "stages" / "matvit"
    summary = json.loads((stage / "summary.json").read_text())
    grans = summary["granularities"]
    assert list(grans) == ["1", "0.5", "0.25", "0.125"]
    assert [v["params"] for v in grans.values()] == sorted((v["params"] for v in grans.values()), reverse=True)
    assert grans["1"]["params"] == summary["params"]["student"]
    metrics = pd.read_csv(stage / "metrics.csv")
    assert {f"train/g{g}/kd" for g in ("1", "0.5", "0.25", "0.125")} <= set(metrics.columns)
    model = students.load(stage / "student")
    assert len(nested_mlps(model)) == 2
    spec = MatSpec([32, 32])
    assert submodel_params(model, spec) == grans["0.125"]["params"]


def test_extract_from_the_trained_run(matvit_run, tmp_path, capsys):
    assert main(["extract", str(matvit_run), "--spec", "uniform:0.25", "--out", str(tmp_path / "q")]) == 0
    assert "parameters:" in capsys.readouterr().out
    static = students.load(tmp_path / "q")
    grans = json.loads((matvit_run / "stages" / "matvit" / "summary.json").read_text())["granularities"]
    assert sum(p.numel() for p in static.parameters()) == grans["0.25"]["params"]


@pytest.mark.parametrize("override, message", [
    (["stages.matvit.matformer.granularities=[0.5,0.25]"], "including 1.0"),
    (["stages.matvit.matformer.sample=4"], "matformer.sample"),
    (["stages.matvit.matformer.target=blocks.9"], "blocks"),
])
def test_bad_matformer_configs_exit_2(tmp_path, capsys, override, message):
    assert main(["run", RECIPE, f"out_root={tmp_path}", *TINY, "stages.teacher=null",
                 "vars.teacher=nowhere", *override]) == 2
    assert message in capsys.readouterr().err


def test_vlm_language_model_trains_nested(tmp_path):
    """A tiny LLaVA with `matformer:` nests its language model only and logs every granularity."""
    from conftest import tiny_run_args as tiny

    args = ["run", "experiments/windtunnel/teacher.yaml", *tiny(tmp_path), "matformer.granularities=[1.0,0.5]"]
    assert main(args) == 0
    run_dir = tmp_path / "runs" / "windtunnel-teacher" / "latest"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["matformer"]["nested_mlps"] == 2 and set(summary["granularities"]) == {"1", "0.5"}
    assert "acc/count" in summary["granularities"]["0.5"]
    model = students.load(run_dir / "student")
    assert len(nested_mlps(model)) == 2  # the language model's two layers; the vision tower stays plain
    assert not any("vision_tower" in n for n, _ in nested_mlps(model))


def test_bench_elastic_on_the_trained_run(matvit_run, tmp_path, capsys):
    from workbench.bench.elastic import bench_elastic

    result = bench_elastic(str(matvit_run), repeats=1)
    rows = {r["spec"]: r for r in result["rows"]}
    grans = json.loads((matvit_run / "stages" / "matvit" / "summary.json").read_text())["granularities"]
    for g in ("1", "0.5", "0.25", "0.125"):
        assert rows[f"uniform:{g}"]["params"] == grans[g]["params"]
        assert rows[f"uniform:{g}"]["acc"] == pytest.approx(grans[g]["acc"])
    assert len([s for s in rows if s.startswith("budget:")]) == 3  # halfway between neighbouring granularities
    flops = [rows[f"uniform:{g}"]["flops_per_image"] for g in ("1", "0.5", "0.25", "0.125")]
    assert flops == sorted(flops, reverse=True) and rows["uniform:1"]["flop_ratio"] == 1.0
    assert main(["bench", "elastic", str(matvit_run), "--spec", "uniform:0.5", "--spec", "widths:64,16",
                 "--repeats", "1", "--json", str(tmp_path / "e.json"), "--plot", str(tmp_path / "e.png")]) == 0
    saved = json.loads((tmp_path / "e.json").read_text())
    assert [r["spec"] for r in saved["rows"]] == ["uniform:0.5", "widths:64,16"] and (tmp_path / "e.png").stat().st_size
