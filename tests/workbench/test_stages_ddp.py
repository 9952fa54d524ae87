"""A multi-stage experiment under DDP (2 CPU processes): the quickstart's three stages (teacher,
KD from a teacher cache built between stages, CE) in one run directory, each stage once, and
a run killed in the middle of a stage that resumes and completes."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import subprocess_env
from conftest import REPO

QUICKSTART = "experiments/windtunnel/quickstart.yaml"


def _args(root, *extra):
    return [
        f"out_root={root}/runs", f"data.root={root}/data", "data.windtunnel.n_train=320", "data.windtunnel.n_val=16",
        "data.batch_size=8", "data.eval_batch_size=16", "trainer.max_steps=4", "trainer.val_every_n_steps=4",
        "stages.teacher.trainer.max_steps=4", "stages.teacher.trainer.val_every_n_steps=4", "trainer.progress_bar=false",
        "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", *extra,
    ]



def _workbench(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "workbench.cli", *argv], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout)


def _summary(path):
    return json.loads((path / "summary.json").read_text())


def test_three_stages_under_ddp_run_once_each(tmp_path):
    out = _workbench("run", QUICKSTART, *_args(tmp_path, "run_id=once"))
    assert out.returncode == 0, out.stderr[-3000:]
    runs = tmp_path / "runs" / "windtunnel-quickstart"
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "once"]  # one run directory
    run_dir = runs / "once"
    summary = _summary(run_dir)
    assert summary["status"] == "completed" and list(summary["stages"]) == ["teacher", "kd", "ce"]
    for name in ("teacher", "kd", "ce"):
        stage = _summary(run_dir / "stages" / name)
        assert stage["status"] == "completed" and stage["steps"] == 4
        assert stage["distributed"] == {"world_size": 2, "student_weights_in_sync": True, "teacher_grads": False}
        assert (run_dir / "stages" / name / "student" / "config.json").is_file()
    assert _summary(run_dir / "stages" / "kd")["teacher_cache"]["made_by_this_run"] is True
    assert (run_dir / "results.md").is_file() and (runs / "latest").resolve() == run_dir.resolve()


def test_a_killed_ddp_stage_resumes(tmp_path):
    args = _args(tmp_path, "run_id=killed", "stages.kd.trainer.max_steps=60", "stages.kd.trainer.val_every_n_steps=60",
                 "stages.kd.trainer.checkpoint_every_n_steps=5")
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "run", QUICKSTART, *args], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = tmp_path / "runs" / "windtunnel-quickstart" / "killed"
    ckpt = run_dir / "stages" / "kd" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before the kd stage checkpointed"
    os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and its worker, mid-stage
    proc.wait()
    teacher_summary = (run_dir / "stages" / "teacher" / "summary.json").read_text()
    assert _summary(run_dir / "stages" / "kd")["status"] != "completed"
    assert not (run_dir.parent / "latest").exists()

    out = _workbench("run", "--resume", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = _summary(run_dir)
    assert summary["status"] == "completed" and list(summary["stages"]) == ["teacher", "kd", "ce"]
    assert (run_dir / "stages" / "teacher" / "summary.json").read_text() == teacher_summary  # not trained again
    kd = _summary(run_dir / "stages" / "kd")
    assert kd["status"] == "completed" and kd["steps"] == 60
    assert kd["distributed"]["student_weights_in_sync"] is True
    resumed = re.search(r"stages/kd: .* resuming from step (\d+)", out.stdout)
    assert resumed and int(resumed[1]) >= 5  # continued from its checkpoint, not restarted
    assert _summary(run_dir / "stages" / "ce")["status"] == "completed"
    assert (run_dir.parent / "latest").resolve() == run_dir.resolve()


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(str(REPO))


@pytest.mark.slow  # 22 s; DDP stages are covered by the three-stage test in the default run
def test_a_stage_continuing_a_student_folder_trains_under_ddp(tmp_path):
    """BitCPM4's order under DDP: fp, then ternary QAT from the fp export. The reloaded LLaVA's
    unread tower norm must be frozen again, or DDP finds a trainable parameter without a gradient."""
    args = [f"out_root={tmp_path}/runs", f"data.root={tmp_path}/data", "data.windtunnel.n_train=64",
            "data.windtunnel.n_val=16", "data.batch_size=8", "trainer.progress_bar=false", "trainer.strategy=ddp",
            "trainer.devices=2", "trainer.accelerator=cpu", "run_id=chain", *(f"stages.{s}=null" for s in (
                "teacher", "fp_more", "scratch", "kd", "kd_teacher", "joint")),
            *(f"stages.{s}.trainer.{k}=2" for s in ("fp", "qat") for k in ("max_steps", "val_every_n_steps")),
            "stages.qat.transforms.ternary.act_bits=8"]
    out = _workbench("run", str(REPO / "experiments/windtunnel/bitcpm4.yaml"), *args)
    assert out.returncode == 0, out.stderr[-3000:]
    qat = _summary(tmp_path / "runs" / "windtunnel-bitcpm4" / "chain" / "stages" / "qat")
    assert qat["status"] == "completed" and qat["distributed"]["student_weights_in_sync"]
    assert qat["params"]["student_trainable"] < qat["params"]["student"]  # the tower's post-layernorm
