"""`workbench eval` and what a score is recorded against.

A tiny teacher run and a tiny KD run distilled from it are trained once per module; `eval` of
the KD run must reproduce both scores of its summary, record the same `scored_on` hashes, and
`compare` must refuse to average runs whose records differ.
"""

import json
import re
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import make_tiny_vlm, tiny_run_args
from workbench.cli import main
from workbench.data.llava import LlavaDataset, VLMCollator
from workbench.evaluation import data_fingerprint, evaluate, scored_on
from workbench.metrics import accuracies, merge_scores, score_batch
from workbench.rundir import RunDir


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    args = tiny_run_args(root, "data.windtunnel.grid=2")
    assert main(["run", "experiments/windtunnel/teacher.yaml", *args]) == 0
    teacher = root / "runs" / "windtunnel-teacher" / "latest" / "student"
    assert main(["run", "experiments/windtunnel/student_kd.yaml", *args, f"teacher.path={teacher}"]) == 0
    return root / "runs" / "windtunnel-student-kd" / "latest", teacher


def test_evaluate_never_builds_sequence_logits_and_matches_full_logit_scoring(world_dir, processor):
    model = make_tiny_vlm(processor).eval()
    loader = DataLoader(LlavaDataset(world_dir / "val.json"), batch_size=8, collate_fn=VLMCollator(processor))
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    scores = evaluate(model, loader)
    hook.remove()
    assert shapes and all(len(s) == 2 for s in shapes)  # (answer positions, V), never (B, L, V)
    expected = {}
    with torch.no_grad():
        for batch in loader:
            out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
            merge_scores(expected, score_batch(out.logits, batch["labels"], batch["qtypes"]))
    assert scores == accuracies(expected) and "acc/color" in scores


def test_eval_of_a_run_reproduces_its_summary_and_records_what_it_scored_on(kd_run, capsys):
    run, teacher = kd_run
    summary = RunDir(run).read_summary()
    assert main(["eval", str(run)]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["models"]["student"]["scores"] == pytest.approx(summary["student"])
    assert report["models"]["teacher"]["scores"] == pytest.approx(summary["teacher"])
    assert report["scored_on"] == summary["scored_on"]
    assert report["scored_on"]["protocol"] == "answer-exact-match/1" and report["scored_on"]["teacher"]
    assert report["data"]["fingerprint"]["n_samples"] == 16  # data.windtunnel.n_val
    weights = report["models"]["student"]["fingerprint"]["weights_sha256"]
    assert len(weights) == 64 and weights != report["models"]["teacher"]["fingerprint"]["weights_sha256"]
    out = capsys.readouterr().out
    assert "student" in out and "teacher" in out and "acc/color" in out and "written to" in out


def test_eval_of_a_model_folder_on_a_data_file(kd_run, tmp_path, capsys):
    run, teacher = kd_run
    cfg_val = RunDir(run).read_summary()["scored_on"]
    val = next((run.parents[2] / "data").glob("windtunnel-*/val.json"))
    out = tmp_path / "teacher-eval.json"
    assert main(["eval", str(teacher), "--data", str(val), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["models"]) == ["student"]  # the teacher run's own student; it had no teacher
    teacher_summary = RunDir(run).read_summary()["teacher"]
    assert report["models"]["student"]["scores"] == pytest.approx(teacher_summary)
    alone = shutil.copytree(teacher, tmp_path / "model")  # a folder outside any run
    assert main(["eval", str(alone), "--data", str(val), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["models"]["model"]["scores"] == pytest.approx(teacher_summary)
    assert report["scored_on"]["data"] == cfg_val["data"]  # same file, same processor: same fingerprint
    # a smaller held-out split is different data
    assert main(["eval", str(run), "data.limit_val=4", "--teacher", "none", "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["scored_on"]["data"] != cfg_val["data"]


def test_eval_with_a_token_reducer_reports_its_proxies(kd_run, tmp_path, capsys):
    """`--reduce`: the model scored with attention pruning, its FLOPs and KV proxies beside the
    accuracy; keep=1 scores exactly as the model itself."""
    run, _ = kd_run
    out = tmp_path / "e.json"
    assert main(["eval", str(run), "--teacher", "none", "--out", str(out), "--reduce", "attention_prune:layer=0,keep=1"]) == 0
    scores = json.loads(out.read_text())["models"]["student"]["scores"]
    assert scores["tokens/flops_ratio"] == 1.0 and scores["tokens/kv_ratio"] == 1.0
    assert {k: v for k, v in scores.items() if k.startswith("acc")} == pytest.approx(RunDir(run).read_summary()["student"])
    assert main(["eval", str(run), "--teacher", "none", "--out", str(out), "--reduce",
                 "attention_prune:layer=0,keep=0.5"]) == 0
    report = json.loads(out.read_text())["models"]["student"]
    assert report["reducer"] == "attention_prune:layer=0,keep=0.5"
    assert report["scores"]["tokens/flops_ratio"] < 1 and report["scores"]["tokens/kv_ratio"] < 1
    assert "tokens/flops_ratio" in capsys.readouterr().out


def test_data_fingerprint_sees_a_changed_image(world_dir, processor, tmp_path):
    copy = tmp_path / "wt"
    shutil.copytree(world_dir, copy, ignore=shutil.ignore_patterns("train.json"))
    before = scored_on(data_fingerprint(LlavaDataset(copy / "val.json"), processor), None, False)
    image = copy / json.loads((copy / "val.json").read_text())[0]["image"]
    image.write_bytes(image.read_bytes() + b"\0")
    after = scored_on(data_fingerprint(LlavaDataset(copy / "val.json"), processor), None, False)
    assert before["data"] != after["data"] and before["protocol"] == after["protocol"] and after["teacher"] is None


@pytest.mark.parametrize("args, message", [
    (["eval", "{tmp}/missing"], "neither a model folder"),
    (["eval", "{alone}"], "not inside a run directory"),
    (["eval", "{alone}", "--data", "{tmp}/nope.json"], "does not exist"),
    (["eval", "{run}", "experiments/windtunnel/teacher.yaml", "--data", "x.json"], "either --data or a CONFIG"),
    (["eval", "{teacher}", "--data", "{tmp}"], "not an image classifier"),
    (["eval", "{run}", "--reduce", "fastv"], "unknown reducer"),
    (["eval", "{run}", "--reduce", "attention_prune:layer=0,keep=2"], "keep must be in"),
])
def test_eval_refuses_bad_input(kd_run, tmp_path, capsys, args, message):
    run, teacher = kd_run
    alone = shutil.copytree(teacher, tmp_path / "model")
    argv = [a.format(tmp=tmp_path, run=run, teacher=teacher, alone=alone) for a in args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_compare_refuses_to_average_runs_scored_differently_and_marks_unfinished_ones(kd_run, tmp_path, capsys):
    run, _ = kd_run
    study = tmp_path / "study"
    for seed in (0, 1, 2):
        copy = study / f"seed{seed}"
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "student"))
        summary = json.loads((copy / "summary.json").read_text())
        (copy / "config.yaml").write_text(re.sub("^seed: 0$", f"seed: {seed}", (copy / "config.yaml").read_text(), flags=re.M))
        if seed == 2:
            summary["status"] = "failed"
        (copy / "summary.json").write_text(json.dumps(summary))
    assert main(["compare", str(study), "--format", "json"]) == 0
    row, = json.loads(capsys.readouterr().out)
    assert row["n"] == 3 and row["status"] == "2 completed, 1 failed" and "scored_on" not in row

    summary = json.loads((study / "seed1" / "summary.json").read_text())
    summary["scored_on"]["data"] = "0" * 16  # another held-out split
    (study / "seed1" / "summary.json").write_text(json.dumps(summary))
    assert main(["compare", str(study)]) == 2
    assert "scored on different held-out data" in capsys.readouterr().err
    assert main(["compare", str(study), "--mixed", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["scored_on"].startswith("data ")
    assert main(["compare", str(study), "--per-run", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["scored_on"] for r in rows)[0] == "data 00000000"
