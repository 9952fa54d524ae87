"""Sharded training: `trainer.strategy=fsdp` (FSDP2 through Lightning's ModelParallelStrategy) on
two CPU processes - the student sharded about half per rank, the teacher never wrapped and
kept on the CPU (`teacher.device: cpu`), whole-file checkpoints that resume under FSDP, an
export gathered from the shards that loads and scores as the summary says - plus bf16-mixed
precision on the CPU and the options' refusals."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import students
from conftest import subprocess_env, tiny_run_args
from workbench.cli import main

TEACHER, KD = "experiments/windtunnel/teacher.yaml", "experiments/windtunnel/student_kd.yaml"


def _workbench(*argv):
    return subprocess.run([sys.executable, "-m", "workbench.cli", *argv], capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    assert main(["run", TEACHER, *tiny_run_args(root, "data.windtunnel.grid=2", "trainer.max_steps=3")]) == 0
    return root, root / "runs" / "windtunnel-teacher" / "latest" / "student"


def test_fsdp_shards_the_student_keeps_the_teacher_on_cpu_and_resumes(teacher_dir):
    """Launched by torchrun (every rank runs the CLI and they share one run directory, named
    after the job), resumed by Lightning's own launcher."""
    root, teacher = teacher_dir
    args = tiny_run_args(root, "data.windtunnel.grid=2", f"teacher.path={teacher}", "teacher.device=cpu",
                         "trainer.strategy=fsdp", "trainer.devices=2", "trainer.accelerator=cpu")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "workbench.cli", "run", KD, *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = root / "runs" / "windtunnel-student-kd"
    made = [p for p in runs.iterdir() if p.name != "latest"]
    assert len(made) == 1 and made[0].name.startswith("job-")  # both ranks opened one directory
    run = made[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    check = summary["distributed"]
    assert check["sharded"] and not check["teacher_grads"] and check["world_size"] == 2
    assert all(0.4 < share < 0.6 for share in check["student_share_per_rank"])  # each rank holds about half
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)  # a whole file
    assert ckpt["global_step"] == 6 and all(type(v) is torch.Tensor for v in ckpt["state_dict"].values())
    exported = students.load(run / "student")  # gathered from the shards
    assert sum(p.numel() for p in exported.parameters()) == summary["params"]["student"]
    torch.testing.assert_close(exported.state_dict()["lm_head.weight"],
                               ckpt["state_dict"]["student.lm_head.weight"])

    # an interrupted FSDP run resumes from its checkpoint: 3 more steps
    resumed = root / "runs" / "windtunnel-student-kd" / "resumed"
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("student"))
    (resumed / "config.yaml").write_text((resumed / "config.yaml").read_text().replace("max_steps: 6", "max_steps: 9"))
    state = json.loads((resumed / "summary.json").read_text())
    (resumed / "summary.json").write_text(json.dumps({**state, "status": "interrupted"}))
    done = _workbench("run", "--resume", str(resumed))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from step 6" in done.stdout
    after = json.loads((resumed / "summary.json").read_text())
    assert after["status"] == "completed" and after["steps"] == 9 and after["distributed"]["sharded"]


def test_bf16_mixed_precision_runs_on_cpu(tmp_path):
    assert main(["run", TEACHER, *tiny_run_args(tmp_path, "trainer.precision=bf16-mixed", "trainer.max_steps=3")]) == 0
    summary = json.loads((tmp_path / "runs" / "windtunnel-teacher" / "latest" / "summary.json").read_text())
    assert summary["status"] == "completed" and all(map(torch.isfinite, map(torch.tensor, summary["final_train"].values())))


@pytest.mark.parametrize("override, message", [
    ("teacher.device=gpu", "'teacher.device'"),
    ("trainer.devices=auto", "number of devices per node"),
    ("trainer.num_nodes=0", "'trainer.num_nodes' must be >= 1"),
])
def test_sharding_options_are_checked(teacher_dir, override, message, capsys):
    root, teacher = teacher_dir
    args = tiny_run_args(root, f"teacher.path={teacher}", "trainer.strategy=fsdp", "trainer.devices=2", override)
    assert main(["run", KD, *args]) == 2
    assert message in capsys.readouterr().err
