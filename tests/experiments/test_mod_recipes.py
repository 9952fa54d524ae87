"""The wind-tunnel p-MoD recipe through the CLI at tiny size: the dense teacher (trained on in a
second and a third stage), then p-MoD with cross-entropy and p-MoD distilled from the teacher, both started
from the teacher's weights.
The stage summaries carry the FLOPs and KV proxies, which read back from the exported students."""

import json

import pytest
import torch

import students
from conftest import REPO
from students.mod import count_tokens, decoder_layers, mod_state
from workbench.cli import main

RECIPE = REPO / "experiments" / "windtunnel" / "pmod.yaml"
TINY = ["data.windtunnel.n_train=48", "data.windtunnel.n_val=16", "data.batch_size=8", "data.eval_batch_size=16",
        "trainer.max_steps=6", "trainer.val_every_n_steps=3", "trainer.progress_bar=false", "trainer.log_every_n_steps=1",
        "stages.teacher.student.kwargs={vision_hidden: 32, vision_layers: 1, vision_heads: 2, text_hidden: 32, "
        "text_layers: 4, text_heads: 2}",
        "stages.gmod_kd.transforms.mod.schedule=uniform:0.5",  # arank_mod leaves no MoD layer of 4
        *[f"stages.{s}.trainer.{k}={v}" for s in ("teacher_more", "teacher_long", "pmod_ce", "pmod_kd", "gmod_kd")
          for k, v in (("max_steps", 4), ("val_every_n_steps", 2))]]


@pytest.fixture(scope="module")
def pmod_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pmod")
    assert main(["run", str(RECIPE), f"out_root={root}/runs", f"data.root={root}/data", *TINY]) == 0
    return (root / "runs" / "windtunnel-pmod" / "latest").resolve()


def test_the_recipe_reports_the_proxies_and_its_students_read_back(pmod_run):
    from workbench.config import load_config
    from workbench.evaluation import held_out_from_config

    loader = held_out_from_config(load_config(pmod_run / "config.yaml")).loader(16)
    teacher = students.load(pmod_run / "stages" / "teacher_long" / "student")
    assert mod_state(teacher) is None
    for stage in ("pmod_ce", "pmod_kd"):
        summary = json.loads((pmod_run / "stages" / stage / "summary.json").read_text())
        assert summary["mod"] == {"mod_layers": [1, 2, 3], "mean_retention": 0.5375}
        scores = summary["student"]
        assert 0.4 < scores["tokens/flops_ratio"] < 0.75 and 0.4 < scores["tokens/kv_ratio"] < 0.75
        student = students.load(pmod_run / "stages" / stage / "student").eval()
        assert [hasattr(layer, "mod_router") for layer in decoder_layers(student)] == [False, True, True, True]
        assert (pmod_run / "stages" / stage / "student" / "mod.py").is_file()  # loads without this project
        with count_tokens(student) as counter, torch.no_grad():
            for batch in loader:
                student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"])
        assert counter.summary()["flops_ratio"] == pytest.approx(scores["tokens/flops_ratio"], rel=1e-9)
        # everything but the routers started from the teacher (same names: the dense weights fit)
        own = student.state_dict()
        assert {k for k in own if "mod_router" not in k} == set(teacher.state_dict())
    results = (pmod_run / "results.md").read_text()
    assert "| FLOPs | KV |" in results and "| teacher | " in results
    assert "| 1.000 | 1.000 |" in results.splitlines()[4]  # the dense teacher's row


def test_the_gamma_stage_trains_its_shared_router_with_the_router_loss(pmod_run):
    import pandas as pd

    summary = json.loads((pmod_run / "stages" / "gmod_kd" / "summary.json").read_text())
    assert summary["mod"]["mod_layers"] == [0, 1, 2, 3] and summary["final_train"]["train/router"] > 0
    logged = pd.read_csv(pmod_run / "stages" / "gmod_kd" / "metrics.csv").dropna(subset=["train/router"])
    assert logged["step"].tolist() == [0, 1, 2, 3]
    student = students.load(pmod_run / "stages" / "gmod_kd" / "student")
    teacher = students.load(pmod_run / "stages" / "teacher_long" / "student")
    router = student.state_dict()["model.language_model.mod_router.weight"]
    assert router.shape == (2, student.config.text_config.hidden_size)
    assert set(student.state_dict()) - set(teacher.state_dict()) == {"model.language_model.mod_router.weight"}
