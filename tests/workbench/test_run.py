"""End-to-end runs of the shipped wind-tunnel configs at tiny size, read back from disk."""

import importlib.metadata
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import tiny_run_args
from workbench.cli import main
from workbench.config import load_config

tiny = tiny_run_args


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    assert main(["run", "experiments/windtunnel/teacher.yaml", *tiny(root)]) == 0
    (run_dir,) = [p for p in (root / "runs" / "windtunnel-teacher").iterdir() if p.name != "latest"]
    return root, run_dir


def test_teacher_run_directory_is_complete(teacher_run):
    root, run_dir = teacher_run
    assert {"config.yaml", "env.json", "metrics.csv", "summary.json", "checkpoints", "student"} <= {
        p.name for p in run_dir.iterdir()}
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["trainer"]["max_steps"] == 6 and cfg["teacher"] is None
    env = json.loads((run_dir / "env.json").read_text())
    assert env["packages"]["transformers"] == importlib.metadata.version("transformers")
    assert env["kernels"] in ("ref", "triton")
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["train/loss"].notna().sum() >= 1 and metrics["val/acc"].notna().sum() == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert summary["params"]["teacher"] is None and summary["params"]["student"] > 0
    assert 0.0 <= summary["student"]["acc"] <= 1.0
    assert set(summary["student"]) > {"acc", "acc/count", "acc/position"}
    assert (root / "runs" / "windtunnel-teacher" / "latest").resolve() == run_dir.resolve()


def test_exported_student_reloads_bit_identically(teacher_run):
    _, run_dir = teacher_run
    folder = run_dir / "student"
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.image_token_id == model.config.image_token_index
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    trained = {k.removeprefix("student."): v for k, v in ckpt["state_dict"].items()}
    reloaded = model.state_dict()
    assert set(reloaded) == set(trained)
    for key, value in reloaded.items():
        assert torch.equal(value, trained[key]), key


def test_student_kd_run_loads_teacher_folder_int8(teacher_run):
    root, teacher_dir = teacher_run
    code = main(["run", "experiments/windtunnel/student_kd.yaml", *tiny(root, "teacher.quantize=int8",
                                                                          "student.kwargs.text_hidden=16")])
    assert code == 0
    runs = root / "runs" / "windtunnel-student-kd"
    summary = json.loads((runs / "latest" / "summary.json").read_text())
    assert summary["status"] == "completed"
    teacher_params = summary["params"]["teacher"]
    assert teacher_params is not None and teacher_params > summary["params"]["student"]
    assert {"acc"} <= set(summary["teacher"]) and {"acc"} <= set(summary["student"])
    assert {"train/kd", "train/ce"} <= set(summary["final_train"])
    cfg = load_config(runs / "latest" / "config.yaml")
    assert cfg.teacher.path == str(root / "runs" / "windtunnel-teacher" / "latest" / "student")
    # The checkpoint holds the student only, never the frozen teacher.
    ckpt = torch.load(runs / "latest" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert all(k.startswith("student.") for k in ckpt["state_dict"])


def test_ddp_two_cpu_processes(teacher_run, tmp_path):
    root, teacher_dir = teacher_run
    args = tiny(root, "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", f"out_root={tmp_path}",
                "run_id=ddp", f"teacher.path={teacher_dir / 'student'}")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "run", "experiments/windtunnel/student_kd.yaml",
                          *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "windtunnel-student-kd" / "ddp" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["distributed"] == {"world_size": 2, "student_weights_in_sync": True, "teacher_grads": False}
