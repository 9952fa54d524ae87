"""Loggers (workbench/loggers.py): every logger `trainer.loggers` names writes what the CSV
holds, read back from its own files; validation logs every loss term; throughput lands in
the summary; the teacher-agreement diagnostics have closed forms."""

from __future__ import annotations

import json
import math
import struct

import pandas as pd
import pytest
import torch

from conftest import tiny_run_args
from losses.inputs import IGNORE_INDEX, LossInputs
from workbench.cli import main
from workbench.loggers import diagnostics

TEACHER = "experiments/windtunnel/teacher.yaml"


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("loggers")
    args = tiny_run_args(root, "run_id=all", "trainer.loggers=[csv,tensorboard,wandb,mlflow]",
                         "loss={ce: {type: ce}, smooth: {type: ce, weight: 0.5, label_smoothing: 0.1}}")
    assert main(["run", TEACHER, *args]) == 0
    return root / "runs" / "windtunnel-teacher" / "all"


def _csv(run, column):
    frame = pd.read_csv(run / "metrics.csv")
    return frame.dropna(subset=[column]).set_index("step")[column]


def test_csv_has_every_term_at_train_and_validation_and_throughput(logged_run):
    frame = pd.read_csv(logged_run / "metrics.csv")
    for column in ("train/ce", "train/smooth", "val/ce", "val/smooth", "val/loss", "perf/step_time_s",
                   "perf/samples_per_s", "perf/tokens_per_s"):
        assert frame[column].notna().any(), column
    # the logged total is the weighted sum of the logged terms
    val = frame.dropna(subset=["val/loss"]).iloc[-1]
    assert val["val/loss"] == pytest.approx(val["val/ce"] + 0.5 * val["val/smooth"], rel=1e-5)
    summary = json.loads((logged_run / "summary.json").read_text())
    t = summary["throughput"]
    assert t["step_time_s"] > 0 and t["samples_per_s"] > 0 and t["tokens_per_s"] > t["samples_per_s"]
    assert t["time_to_first_step_s"] > 0


def test_training_values_are_logged_on_the_steps_lightning_writes_and_the_last(tmp_path):
    from workbench.cli import main

    args = tiny_run_args(tmp_path, "trainer.max_steps=5", "trainer.log_every_n_steps=2", "trainer.val_every_n_steps=5")
    assert main(["run", "experiments/windtunnel/teacher.yaml", *args]) == 0
    run = tmp_path / "runs" / "windtunnel-teacher" / "latest"
    frame = pd.read_csv(run / "metrics.csv")
    logged = frame.dropna(subset=["train/loss"])
    assert len(logged) == 2 and logged["perf/step_time_s"].notna().all()  # steps 2 and 4, as Lightning writes
    summary = json.loads((run / "summary.json").read_text())
    last = summary["final_train"]["train/loss"]  # step 5's values still reach the summary
    assert math.isfinite(last) and last != pytest.approx(logged["train/loss"].iloc[-1])


def test_tensorboard_event_files_hold_the_same_values(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged_run / "tensorboard"))
    events.Reload()
    board = {e.step: e.value for e in events.Scalars("val/loss")}
    csv = _csv(logged_run, "val/loss")
    assert sorted(board) == sorted(int(s) for s in csv.index)
    for step, value in csv.items():
        assert board[int(step)] == pytest.approx(value, rel=1e-6)


def wandb_history(path) -> list[dict]:
    """The history rows of a W&B run file (`run-*.wandb`): a LevelDB-style log (32 KiB blocks of
    CRC, length, type, data after a 7-byte W&B header) of protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, records, pending = header, [], b""
    while pos + header <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= header else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(pending)
            pending = b""
    rows = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_writes_an_offline_run_with_the_same_values(logged_run):
    (run,) = (logged_run / "wandb").glob("offline-run-*")
    (path,) = run.glob("run-*.wandb")
    logged = [row["val/loss"] for row in wandb_history(path) if "val/loss" in row]
    assert logged == pytest.approx(list(_csv(logged_run, "val/loss")), rel=1e-6)


def test_mlflow_file_store_has_the_metric_history(logged_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(logged_run / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "windtunnel-teacher"]
    (run,) = client.search_runs([experiment.experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val.loss")}  # '/' -> '.'
    assert client.get_metric_history(run.info.run_id, "val.acc.cell")
    csv = _csv(logged_run, "val/loss")
    assert {int(s): v for s, v in csv.items()} == pytest.approx(history, rel=1e-6)


def test_an_unknown_logger_is_refused(tmp_path, capsys):
    assert main(["run", TEACHER, *tiny_run_args(tmp_path, "trainer.loggers=[csv,neptune]")]) == 2
    assert "'trainer.loggers' is 'neptune'; expected one of csv, tensorboard, wandb, mlflow" in capsys.readouterr().err


def _inputs(student, teacher=None, topk=None):
    labels = torch.full((1, 4), IGNORE_INDEX)
    labels[0, 2:] = torch.tensor([1, 2])
    return LossInputs(student_logits=student, labels=labels, attention_mask=torch.ones(1, 4, dtype=torch.long),
                      image_mask=torch.zeros(1, 4, dtype=torch.bool), teacher_logits=teacher, teacher_topk=topk)


def test_diagnostics_closed_forms():
    vocab = 5
    uniform = torch.zeros(1, 4, vocab)
    d = diagnostics(_inputs(uniform, teacher=uniform))
    assert d["diag/student_entropy"].item() == pytest.approx(math.log(vocab))
    peaked = torch.zeros(1, 4, vocab)
    peaked[0, :, 3] = 50.0
    d = diagnostics(_inputs(peaked, teacher=peaked.clone()))
    assert d["diag/student_entropy"].item() < 1e-6 and d["diag/top1_agreement"].item() == 1.0
    other = torch.zeros(1, 4, vocab)
    other[0, :, 0] = 50.0
    assert diagnostics(_inputs(peaked, teacher=other))["diag/top1_agreement"].item() == 0.0
    # a cached top-2 teacher: rows follow the labels; the rest mass is exp(rest_logp)
    ids = torch.tensor([[3, 0], [0, 3]])
    logp = torch.log(torch.tensor([[0.6, 0.3], [0.5, 0.2]]))
    rest = torch.log(torch.tensor([0.1, 0.3]))
    d = diagnostics(_inputs(peaked, topk=(ids, logp, rest)))
    # labels at t = 2, 3 are predicted from positions 1, 2; the teacher's top-1 there: 3, then 0
    assert d["diag/top1_agreement"].item() == 0.5
    assert d["diag/teacher_rest_mass"].item() == pytest.approx(0.2)
