"""The divergence guard (workbench/guard.py): injected nan / inf losses, gradients and weights
end a run `failed` with exit 3, the step and the term named, the last finite checkpoint intact
and `latest` unmoved; `trainer.on_nonfinite=skip` drops bad steps up to its limit."""

import json

import pytest
import torch

from conftest import tiny_run_args
from workbench.cli import main
from workbench.guard import Diverged, DivergenceGuard
from workbench.module import DistillModule

TEACHER = "experiments/windtunnel/teacher.yaml"


def _poison_from(monkeypatch, first: int, last: int | None = None):
    """Student logits become nan in training steps first..last (global_step)."""
    original = DistillModule._loss_inputs

    def poisoned(self, batch, fused=False):
        out = original(self, batch, fused)
        if self.training and first <= self.global_step <= (last if last is not None else 10**9):
            out.student_logits = out.student_logits * float("nan")
        return out

    monkeypatch.setattr(DistillModule, "_loss_inputs", poisoned)


def _only_run(root):
    (run_dir,) = [p for p in (root / "runs" / "windtunnel-teacher").iterdir() if p.name != "latest"]
    return run_dir, json.loads((run_dir / "summary.json").read_text())


def test_a_nan_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch, capsys):
    _poison_from(monkeypatch, 4)
    code = main(["run", TEACHER, *tiny_run_args(tmp_path, "trainer.checkpoint_every_n_steps=2")])
    assert code == 3
    err = capsys.readouterr().err
    assert "diverged at step 4" in err and "loss term 'ce'" in err and "Traceback" not in err
    run_dir, summary = _only_run(tmp_path)
    assert summary["status"] == "failed" and "diverged at step 4" in summary["error"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not (run_dir / "student").exists()  # nothing exported
    assert not (tmp_path / "runs" / "windtunnel-teacher" / "latest").exists()


def test_a_huge_learning_rate_is_caught_at_the_gradient(tmp_path, capsys):
    assert main(["run", TEACHER, *tiny_run_args(tmp_path, "optim.lr=1e6")]) == 3
    assert "training diverged at step" in capsys.readouterr().err
    _, summary = _only_run(tmp_path)
    assert summary["status"] == "failed" and "Diverged" in summary["error"]


def test_skip_mode_drops_bad_steps_up_to_its_limit(tmp_path, monkeypatch, capsys):
    _poison_from(monkeypatch, 2, 3)  # two bad steps
    args = tiny_run_args(tmp_path, "trainer.on_nonfinite=skip", "trainer.max_skipped_steps=2")
    assert main(["run", TEACHER, *args]) == 0
    assert capsys.readouterr().out.count("step skipped") == 2
    run_dir, summary = _only_run(tmp_path)
    assert summary["status"] == "completed" and summary["skipped_steps"] == 2 and summary["steps"] == 6
    assert all(torch.isfinite(p).all() for p in torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True,
                                                            map_location="cpu")["state_dict"].values())


def test_skip_mode_stops_past_its_limit(tmp_path, monkeypatch, capsys):
    _poison_from(monkeypatch, 1)
    args = tiny_run_args(tmp_path, "trainer.on_nonfinite=skip", "trainer.max_skipped_steps=2")
    assert main(["run", TEACHER, *args]) == 3
    assert "diverged at step 3 after 2 skipped steps" in capsys.readouterr().err


def test_skipped_step_leaves_every_weight_and_the_optimizer_alone():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 3)).sum().mul(float("inf")).backward()

    class Module:
        step_values = [("loss", torch.tensor(float("inf")))]
        named_parameters = model.named_parameters

    class Trainer:
        global_step = 7
        precision_plugin = None

    guard = DivergenceGuard("skip", max_skips=1)
    guard.on_before_optimizer_step(Trainer, Module, opt)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not opt.state
    Module.step_values = [("ce", torch.tensor(1.0)), ("kd", torch.tensor(float("nan")))]
    with pytest.raises(Diverged, match="step 7 after 1 skipped steps: loss term 'kd'"):
        guard.on_before_optimizer_step(Trainer, Module, opt)


def test_a_checkpoint_with_a_nonfinite_weight_is_never_written():
    class Trainer:
        global_step = 12

    state = {"student.a": torch.ones(2), "student.b": torch.tensor([1.0, float("inf")])}
    with pytest.raises(Diverged, match="step 12: weight student.b is not finite; the checkpoint was not written"):
        DivergenceGuard().on_save_checkpoint(Trainer, None, {"state_dict": state})


@pytest.mark.parametrize("override, key", [
    ("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"), ("loss.ce.weight=nan", "loss.ce.weight"),
    ("optim.betas=[0.9,inf]", "optim.betas[1]"), ("trainer.on_nonfinite=ignore", "trainer.on_nonfinite"),
    ("trainer.max_skipped_steps=-1", "trainer.max_skipped_steps"),
])
def test_nonfinite_and_bad_guard_settings_exit_2_before_writing(tmp_path, capsys, override, key):
    assert main(["run", TEACHER, *tiny_run_args(tmp_path), override]) == 2
    assert f"'{key}'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_an_absurd_temperature_is_caught_at_the_first_step(tmp_path, tiny_vlm_dir, capsys):
    args = tiny_run_args(tmp_path, f"teacher.path={tiny_vlm_dir}", "loss.kd.temperature=1e30")
    assert main(["run", "experiments/windtunnel/student_kd.yaml", *args]) == 3
    assert "diverged at step 0: loss term 'kd'" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "windtunnel-student-kd" / "latest").exists()


def test_with_a_grad_scaler_inf_gradients_are_left_to_it_but_nan_terms_are_not():
    """fp16 mixed precision: an overflowing loss scale gives inf gradients that GradScaler
    skips on its own; the guard must not stop the run for them."""
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().mul(float("inf")).backward()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)

    class Module:
        step_values = [("loss", torch.tensor(1.0))]
        named_parameters = model.named_parameters

    class Scaled:
        global_step = 5
        precision_plugin = type("AMP", (), {"scaler": object()})()

    DivergenceGuard().on_before_optimizer_step(Scaled, Module, opt)  # no raise
    Module.step_values = [("loss", torch.tensor(float("nan")))]
    with pytest.raises(Diverged, match="step 5: loss term 'loss'"):
        DivergenceGuard().on_before_optimizer_step(Scaled, Module, opt)
