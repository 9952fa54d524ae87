"""What `workbench run` prints: a header per run, progress lines with loss and held-out
accuracy when stdout is not a terminal, the summary table - and none of the libraries'
chatter, which goes to the run directory's run.log (`--verbose` brings it back)."""

import subprocess
import sys

from conftest import subprocess_env, tiny_run_args
from workbench import console
from workbench.cli import main

TEACHER = "experiments/windtunnel/teacher.yaml"
NOISE = ("GPU available", "Tip:", "LeafSpec", "Total params", "Loading weights", "Writing model shards")


def test_the_console_shows_the_run_and_the_log_keeps_the_rest(tmp_path):
    args = tiny_run_args(tmp_path, "trainer.progress_bar=true", "run_id=quiet")
    done = subprocess.run([sys.executable, "-m", "workbench.cli", "run", TEACHER, *args], capture_output=True,
                          text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "[workbench]" in out and "6 steps of 1 ce (target none)" in out
    assert "step 6/6  loss" in out and "val acc" in out  # plain progress lines: stdout is a pipe here
    assert "\r" not in out and not any(noise in out + done.stderr for noise in NOISE), out + done.stderr
    log = (tmp_path / "runs" / "windtunnel-teacher" / "quiet" / console.RUN_LOG).read_text()
    assert "GPU available" in log  # Lightning's banner, kept for whoever needs it


def test_verbose_shows_the_libraries_output(tmp_path, capfd):
    try:
        assert main(["--verbose", "run", TEACHER, *tiny_run_args(tmp_path, "trainer.max_steps=2")]) == 0
    finally:
        console.configure(False)
    captured = capfd.readouterr()
    assert "Total params" in captured.out + captured.err  # Lightning's model summary
