"""A new method is one file plus one registration: this test file registers a student
transform, a loss term and a target of its own - editing no file of the project - and
trains with them end to end through the command line, then reads back what the run wrote."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn

import students
from conftest import tiny_run_args
from losses.inputs import IGNORE_INDEX, LossInputs
from losses.term import LossTerm
from workbench.cli import main
from workbench.registry import LOSSES, TARGETS, TRANSFORMS
from workbench.targets import Target, TargetContext

TEACHER_RECIPE = "experiments/windtunnel/teacher.yaml"  # supervised: no teacher configured


def perturb(student: nn.Module, std: float = 0.01, seed: int = 0) -> dict:
    """A student transform: seeded Gaussian noise on every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return {"std": std, "tensors": sum(1 for _ in student.parameters())}


class LogitMSE(LossTerm):
    """A loss term: mean squared difference of student and target logits at answer positions."""

    needs_teacher = True

    def __init__(self, scale: float = 1.0):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = scale

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        mask = inputs.token_mask("answer")
        diff = inputs.shifted_student_logits[mask] - inputs.shifted_teacher_logits[mask]
        return self.scale * diff.float().pow(2).mean()


class LabelLogits(Target):
    """A target: "teacher" logits made from the labels themselves (a peaked one-hot)."""

    name = "label_logits"
    priority = -1
    filled = 0

    def __init__(self, vocab: int, peak: float):
        self.vocab, self.peak = vocab, peak

    @classmethod
    def applies(cls, ctx: TargetContext) -> bool:
        return False  # only when a config names it

    @classmethod
    def create(cls, ctx: TargetContext) -> LabelLogits:
        return cls(ctx.student.get_output_embeddings().weight.shape[0], peak=5.0)

    def fill(self, batch, inputs: LossInputs, loss, fused: bool) -> None:
        b, length = inputs.labels.shape
        logits = torch.zeros(b, length, self.vocab, device=inputs.labels.device)
        nxt = inputs.labels[:, 1:]
        rows = nxt != IGNORE_INDEX
        logits[:, :-1][rows, nxt[rows]] = self.peak  # position t predicts label t + 1
        inputs.teacher_logits = logits
        type(self).filled += 1


@pytest.fixture
def registered():
    TRANSFORMS.register("perturb", perturb, order=70)
    LOSSES.register("logit_mse", LogitMSE)
    TARGETS.register("label_logits", LabelLogits)
    yield
    TRANSFORMS.unregister("perturb")
    LOSSES.unregister("logit_mse")
    TARGETS.unregister("label_logits")


def test_a_transform_a_term_and_a_target_from_outside_train_end_to_end(registered, tmp_path):
    args = tiny_run_args(tmp_path, "name=extension", "run_id=x", "target=label_logits",
                         "transforms={perturb: {std: 0.02, seed: 3}}",
                         "loss={ce: {type: ce}, mse: {type: logit_mse, weight: 0.1, scale: 2.0}}")
    assert main(["run", TEACHER_RECIPE, *args]) == 0
    run = tmp_path / "runs" / "extension" / "x"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["target"] == "label_logits"
    assert summary["perturb"]["std"] == 0.02 and summary["perturb"]["tensors"] > 0
    metrics = pd.read_csv(run / "metrics.csv")
    mse = metrics["train/mse"].dropna()
    assert len(mse) == 6 and (mse > 0).all() and "val/loss" in metrics  # the target fills held-out batches too
    assert LabelLogits.filled >= 6
    assert students.load(run / "student") is not None


def test_extension_options_are_checked_like_built_in_ones(registered, tmp_path, capsys):
    base = tiny_run_args(tmp_path, "name=extension", "target=label_logits")
    assert main(["run", TEACHER_RECIPE, *base, "loss={mse: {type: logit_mse, scael: 2.0}}"]) == 2
    assert "'loss.mse.scael'" in capsys.readouterr().err
    assert main(["run", TEACHER_RECIPE, *base, "loss={mse: {type: logit_mse, scale: -1}}"]) == 2
    assert "'loss.mse.scale': scale must be > 0" in capsys.readouterr().err
    assert main(["run", TEACHER_RECIPE, *base, "loss.ce.type=ce", "transforms={perturb: {sd: 1}}"]) == 2
    assert "'transforms.perturb.sd'" in capsys.readouterr().err
    assert main(["run", TEACHER_RECIPE, *base, "loss.ce.type=ce", "target=label_logit"]) == 2
    assert "Did you mean: 'label_logits'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before anything was written
