"""Atomic checkpoints (workbench/checkpoint.py): a write that fails - a full disk simulated
with ENOSPC while serialising or while flushing to disk - leaves the previous checkpoint whole
and no temporary file; a run
that hits it ends `failed` with exit 2 and resumes from that checkpoint."""

import errno
import json

import pandas as pd
import pytest
import torch

import teachers.cache as cache_module
import workbench.checkpoint as ckpt_io
from conftest import tiny_run_args
from workbench.checkpoint import AtomicCheckpointIO
from workbench.cli import main
from workbench.fit import _merge_metrics
from workbench.rundir import RunDir


def _full_disk_after(monkeypatch, good_saves: int):
    """torch.save in checkpoint writes: `good_saves` succeed, then each writes a few bytes and fails."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) <= good_saves:
            return real(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", save)


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.arange(5.0)}, path)
    before = path.read_bytes()
    _full_disk_after(monkeypatch, 0)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(5)}, path)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    monkeypatch.undo()

    def full_disk(_fd):  # the bytes went to the temporary file, flushing them to disk fails
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 3, "w": torch.ones(5)}, path)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["step"] == 1


def test_a_full_disk_mid_run_ends_failed_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    _full_disk_after(monkeypatch, 1)  # the step-2 checkpoint is written, the step-4 one is not
    args = tiny_run_args(tmp_path, "trainer.checkpoint_every_n_steps=2", "run_id=r")
    assert main(["run", "experiments/windtunnel/teacher.yaml", *args]) == 2
    run_dir = tmp_path / "runs" / "windtunnel-teacher" / "r"
    err = capsys.readouterr().err
    assert "No space left on device" in err and f"--resume {run_dir}" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left" in summary["error"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not (run_dir.parent / "latest").exists()
    monkeypatch.undo()  # space freed
    assert main(["run", "--resume", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    metrics = pd.read_csv(run_dir / "metrics.csv").dropna(subset=["train/loss"])
    assert metrics["step"].tolist() == list(range(6))  # one row per step, from before and after the failure
    row = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["workbench_metrics_row"]
    assert row["step"] == 5 and row["train/loss"] == pytest.approx(metrics["train/loss"].iloc[-1], rel=1e-6)
    assert row["lr"] == pytest.approx(metrics["lr"].iloc[-1], rel=1e-6)


def test_a_row_lost_between_the_checkpoint_and_the_logger_comes_back_on_resume(tmp_path):
    """Lightning writes step 3's checkpoint before step 3's row reaches metrics.csv; a kill in
    between leaves rows 0-2. The resume puts the checkpoint's row back, once, in order."""
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    earlier = run.path / "metrics.before-resume.csv"
    pd.DataFrame({"step": [0, 1, 2], "epoch": 0, "train/loss": [3.0, 2.5, 2.0]}).to_csv(earlier, index=False)
    pd.DataFrame({"step": [4, 5], "epoch": 0, "train/loss": [1.2, 1.0]}).to_csv(run.metrics, index=False)
    row = {"step": 3, "epoch": 0, "train/loss": 1.5, "lr": 0.001}
    _merge_metrics(run, earlier, 4, row)
    merged = pd.read_csv(run.metrics)
    assert merged["step"].tolist() == [0, 1, 2, 3, 4, 5] and merged["train/loss"].tolist() == [3, 2.5, 2, 1.5, 1.2, 1]
    assert not earlier.exists()

    pd.DataFrame({"step": [0, 1, 2, 3], "epoch": 0, "train/loss": [3.0, 2.5, 2.0, 1.6]}).to_csv(earlier, index=False)
    pd.DataFrame({"step": [4, 5], "epoch": 0, "train/loss": [1.2, 1.0]}).to_csv(run.metrics, index=False)
    _merge_metrics(run, earlier, 4, row)  # the row was written before the kill: kept as logged, not doubled
    merged = pd.read_csv(run.metrics)
    assert merged["step"].tolist() == [0, 1, 2, 3, 4, 5] and merged["train/loss"].iloc[3] == 1.6
