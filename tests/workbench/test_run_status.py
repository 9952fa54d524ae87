"""How runs end (workbench/interrupt.py, workbench/fit.py): SIGTERM and SIGINT mid-training end
`interrupted` with exit 143 / 130 and resume to completion; an error while the Trainer is
built ends `failed`; nothing that did not complete moves `latest`."""

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import subprocess_env, tiny_run_args
from workbench.cli import main

TEACHER = "experiments/windtunnel/teacher.yaml"


@pytest.mark.parametrize("signum, code", [
    (signal.SIGTERM, 143),
    pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),  # the same path as SIGTERM; 20 s of the default run
])
def test_a_signal_mid_training_ends_interrupted_and_resumes(tmp_path, signum, code):
    args = tiny_run_args(tmp_path, "trainer.max_steps=100", "trainer.val_every_n_steps=100",
                         "trainer.checkpoint_every_n_steps=3", "run_id=r")
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "run", TEACHER, *args], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "windtunnel-teacher" / "r"
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and f"--resume {run_dir}" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == signal.Signals(signum).name
    assert not (run_dir.parent / "latest").exists()
    assert main(["run", "--resume", str(run_dir), "trainer.max_steps=5"]) == 2  # no overrides on resume
    env = subprocess_env()
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "run", "--resume", str(run_dir)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 100
    assert (run_dir.parent / "latest").resolve() == run_dir.resolve()


def test_an_error_while_the_trainer_is_built_ends_failed(tmp_path, monkeypatch):
    import workbench.fit

    def broken(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(workbench.fit, "make_trainer", broken)
    assert main(["run", TEACHER, *tiny_run_args(tmp_path, "run_id=r")]) == 2  # the disk: a message
    summary = json.loads((tmp_path / "runs" / "windtunnel-teacher" / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    assert not (tmp_path / "runs" / "windtunnel-teacher" / "latest").exists()


def test_identical_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    from workbench.config import load_config
    from workbench.errors import WorkbenchError
    from workbench.config import to_yaml
    from workbench.rundir import create

    def open_run_dir(cfg):
        return create(cfg.out_root, cfg.name, to_yaml(cfg), cfg.run_id).path

    monkeypatch.setattr("time.strftime", lambda *_: "20261203-120000")
    cfg = load_config(TEACHER, [f"out_root={tmp_path}"])
    first, second, third = (open_run_dir(cfg) for _ in range(3))
    assert first.name.startswith("20261203-120000-") and second.name == f"{first.name}-2"
    assert third.name == f"{first.name}-3" and all(p.is_dir() for p in (first, second, third))
    named = load_config(TEACHER, [f"out_root={tmp_path}", "run_id=mine"])
    open_run_dir(named)
    with pytest.raises(WorkbenchError, match="already exists; choose another run_id"):
        open_run_dir(named)  # a run_id you chose is never renamed


def test_sigterm_outside_fit_unwinds_past_except_exception_and_maps_to_143(monkeypatch):
    from workbench import interrupt

    monkeypatch.setattr(interrupt, "_received", [])  # this process's record of signals, restored after

    def swallowing():
        try:
            interrupt._on_signal(signal.SIGTERM, None)
        except Exception:  # library code on the way must not swallow it
            return "swallowed"

    with pytest.raises(interrupt.Terminated):
        swallowing()
    assert interrupt.ending(interrupt.Terminated("SIGTERM")) == ("interrupted", "SIGTERM")
    mapped = interrupt.reraise(interrupt.Terminated("SIGTERM"))
    assert isinstance(mapped, interrupt.Interrupted) and mapped.exit_code == 143
    with interrupt.fitting():
        assert interrupt._on_signal(signal.SIGTERM, None) is None  # Lightning stops after the batch
    with pytest.raises(KeyboardInterrupt):
        interrupt._on_signal(signal.SIGINT, None)
    assert interrupt.ending(SystemExit(1)) == ("interrupted", "SIGINT")  # Lightning's exit after Ctrl-C


def test_a_target_that_fails_while_preparing_ends_failed_and_can_be_resumed(tmp_path, capsys):
    """Work over the data set (a teacher cache) runs after the run directory exists: when it
    fails the run is recorded as failed, with its config, so `--resume` can finish it."""
    from teachers.errors import TeacherError
    from workbench.registry import TARGETS
    from workbench.targets.none import NoTeacher

    class Flaky(NoTeacher):
        name, priority, failures = "flaky", -1, [1]

        @classmethod
        def applies(cls, ctx) -> bool:
            return False

        def prepare(self) -> dict:
            if self.failures and self.failures.pop():
                raise TeacherError("the teacher cache could not be made")
            return {"prepared": True}

    TARGETS.register("flaky", Flaky)
    try:
        assert main(["run", TEACHER, *tiny_run_args(tmp_path, "run_id=f", "target=flaky")]) == 2
        assert "could not be made" in capsys.readouterr().err
        run = tmp_path / "runs" / "windtunnel-teacher" / "f"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "failed" and "could not be made" in summary["error"]
        assert not (run.parent / "latest").exists()
        assert main(["run", "--resume", str(run)]) == 0
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["prepared"] is True
    finally:
        TARGETS.unregister("flaky")
