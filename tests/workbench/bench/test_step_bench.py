"""`workbench bench step`: the workbench step and the hand-written loop train the same thing
(equal first losses), every step is paired, and configs the hand loop cannot mirror are refused.
No wall-clock threshold: the ratio itself is recorded in docs/benchmarks.md."""

import json

import pytest

from conftest import TINY_MODEL
from workbench.bench.step import _Paired, bench_step
from workbench.cli import main

SMALL_TEACHER = ["data.windtunnel.n_train=64"]


def test_pairs_subtract_the_hand_step_from_the_workbench_period():
    paired = _Paired(lambda: None)
    paired.starts = [0.0, 10.0, 20.0, 30.0]
    paired.hand = [(4.0, 7.0), (18.0, 20.0), (24.0, 25.0)]  # after step 0; before step 2; after step 2
    assert paired.times() == ([7.0, 8.0, 9.0], [3.0, 2.0, 1.0])


def test_bench_step_trains_the_same_thing_both_ways(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert main(["bench", "step", *TINY_MODEL, "--steps", "4", "--warmup", "1", "--batch", "8",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["first_loss"]["workbench"] == pytest.approx(result["first_loss"]["hand"], rel=1e-4)
    assert result["steps"] == 4 and result["batch_size"] == 8 and result["ratio"] > 0
    assert set(result["median_step_s"]) == {"workbench", "hand"} and result["machine"]["logical_cores"]
    text = capsys.readouterr().out
    assert "ratio (median over pairs)" in text and ("PASS" in text or "FAIL" in text)


@pytest.mark.parametrize("override, message", [
    ("loss.kd.type=jsd", "no hand-written counterpart"),
    ("trainer.fused_logits=true", "unfused logits"),
    ("trainer.accumulate_grad_batches=2", "without gradient accumulation"),
])
def test_bench_step_refuses_what_the_hand_loop_does_not_do(override, message, capsys):
    assert main(["bench", "step", *TINY_MODEL, override, "--steps", "2"]) == 2
    assert message in capsys.readouterr().err
