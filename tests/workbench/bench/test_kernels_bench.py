"""`workbench bench kernels`: the worker measures a tiny case in a fresh process, the CLI writes
the table's rows and the machine to JSON, and bad input or broken ops are reported, not raised.
Only relation_loss at --quick size is run (each measurement is one ~5 s subprocess)."""

import json
import math

import pytest

import workbench.bench.kernels as bench
from workbench.bench import run_worker
from workbench.cli import EXIT_BAD_INPUT, main

RELATION = "cosine, 12 heads x 64"


def test_worker_measures_a_tiny_case():
    import torch

    from kernels.relation_loss import relation_loss_naive

    shape = dict(B=2, N=40, D=16)
    spec = dict(op="relation_loss", case=RELATION, shape=shape, path="ours", repeats=2, seed=3)
    result = run_worker("workbench.bench.kernels", spec, timeout=300)
    assert result.error is None, result.error
    data = result.data
    assert data["peak_mib"] >= 0 and data["seconds"] > 0 and math.isfinite(data["loss"])
    assert (data["device"], data["backend"]) == ("cpu", "ref")
    torch.manual_seed(3)  # the worker's inputs, rebuilt here
    args, kwargs = bench.INPUTS["relation_loss"](bench._case("relation_loss", RELATION), shape, "cpu")
    assert data["loss"] == pytest.approx(relation_loss_naive(*args, **kwargs).item(), rel=1e-5)


@pytest.mark.slow  # 15 s; the worker test above covers a measurement in the default run
def test_quick_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench" / "kernels.json"
    assert main(["bench", "kernels", "--quick", "--ops", "relation_loss", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "relation_loss" in captured.out and "[2/2]" in captured.err  # table and progress lines
    report = json.loads(out.read_text())
    assert report["quick"] is True
    assert {"cpu", "logical_cores", "ram_gib", "torch", "cuda_device", "kernels_backend"} <= set(report["machine"])
    (row,) = report["rows"]
    assert (row["op"], row["case"], row["path"], row["status"]) == ("relation_loss", RELATION, "ours (ref)", "ok")
    assert row["shape"] == dict(B=12, N=288, D=64)
    assert row["naive_peak_mib"] >= 0 and row["ours_peak_mib"] >= 0 and row["naive_s"] > 0 and row["ours_s"] > 0
    assert row["ours_loss"] == pytest.approx(row["naive_loss"], rel=1e-4)
    assert row["peak_ok"] is None  # no verdicts at --quick size


@pytest.mark.parametrize("argv, words", [
    (["--ops", "relation_loss,flash_attn"], ["flash_attn", "relation_loss"]),
    (["--ops", ","], ["(none given)"]),
    (["--repeats", "0"], ["--repeats"]),
])
def test_bad_arguments_exit_2(capsys, argv, words):
    assert main(["bench", "kernels", "--quick", *argv]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for word in words:
        assert word in err


def test_broken_op_and_crashing_worker_are_reported(monkeypatch):
    monkeypatch.setattr(bench, "unavailable", lambda op: "ImportError: half-written" if op == "attention_kl" else None)
    (row,) = bench.bench_kernels(["attention_kl"], quick=True)
    assert row["status"] == "not available: ImportError: half-written" and row["ours_s"] is None
    spec = dict(op="relation_loss", case="no such case", shape={}, path="ours")
    crashed = run_worker("workbench.bench.kernels", spec)
    assert crashed.data is None and "KeyError" in crashed.error
