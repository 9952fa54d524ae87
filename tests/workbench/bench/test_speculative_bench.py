"""`workbench bench speculative` (workbench/bench/speculative.py): the target as its own draft
accepts everything (tau = gamma + 1) and the rows land in the draft run's summary.json where
`compare` reads them; a MatFormer extraction drafts losslessly at a cost ratio below 1; the
cost ratio and the predicted speed-up follow from closed forms; bad requests exit 2. Times are
reported, never asserted."""

import json
import shutil

import pytest

from workbench.bench.speculative import decode_params, predicted_speedup
from workbench.cli import main


@pytest.fixture()
def run_copy(teacher_run, tmp_path):
    """The session's teacher run, copied: this test writes into its summary.json."""
    copy = tmp_path / "runs" / "windtunnel-teacher" / "r"
    shutil.copytree(teacher_run, copy)
    return copy


def test_the_target_as_its_own_draft_and_compare_reads_the_result(run_copy, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["bench", "speculative", str(run_copy), "--draft", str(run_copy), "--gamma", "2,3", "--prompts", "2",
                 "--new-tokens", "7", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["gamma"] for r in rows] == [2, 3]
    for r in rows:
        assert r["alpha"] == r["alpha_analytic"] == 1.0 and r["lossless"] is True and r["cost_ratio"] == 1.0
        assert r["emitted"] == 2 * 7 and r["target_passes_per_token"] == r["rounds"] / r["emitted"]
    assert rows[0]["rounds"] == 2 * 3  # 7 tokens at gamma 2: rounds of 3, 3, 1
    recorded = json.loads((run_copy / "summary.json").read_text())["speculative"]
    assert recorded["gamma3"]["tau"] == rows[1]["tau"] and recorded["target"].endswith("student")
    capsys.readouterr()
    assert main(["compare", str(run_copy), "--metric", "speculative.gamma3.alpha", "--format", "json"]) == 0
    assert "speculative.gamma3.alpha" in capsys.readouterr().out


def test_the_first_calls_are_a_warm_up_and_not_timed(teacher_run, tmp_path, monkeypatch):
    """One-time costs of a first call (allocator growth, lazy init) would land on the greedy
    baseline, timed first, and inflate every speed-up: each path runs once untimed on the first
    prompt. Here the first call claims 1000 s; the baseline must not see it."""
    import workbench.bench.speculative as spec

    calls, greedy = [], spec._target_greedy

    def slow_first(target, prompt, new_tokens):
        out, took = greedy(target, prompt, new_tokens)
        calls.append(prompt["input_ids"])
        return out, (1000.0 if len(calls) == 1 else took)

    monkeypatch.setattr(spec, "_target_greedy", slow_first)
    out = tmp_path / "s.json"
    assert main(["bench", "speculative", str(teacher_run), "--draft", "extract:uniform:0.25", "--gamma", "2",
                 "--prompts", "2", "--new-tokens", "5", "--json", str(out)]) == 0
    assert len(calls) == 3 and calls[0] is calls[1]  # the first prompt once more, first
    result = json.loads(out.read_text())
    assert result["target_tok_s"] > 2 * 5 / 1000.0 * 100


def test_a_wrong_draft_path_fails_before_the_data_are_built(teacher_run, monkeypatch, capsys):
    import workbench.evaluation

    def no_data(*args, **kwargs):
        raise AssertionError("held-out data built before the draft path was checked")

    monkeypatch.setattr(workbench.evaluation, "held_out_for", no_data)
    assert main(["bench", "speculative", str(teacher_run), "--draft", "/nonexistent/run"]) == 2
    assert "/nonexistent/run" in capsys.readouterr().err


def test_a_matformer_extraction_drafts_losslessly_and_cheaper(teacher_run, tmp_path):
    out = tmp_path / "s.json"
    assert main(["bench", "speculative", str(teacher_run), "--draft", "extract:uniform:0.25", "--gamma", "3",
                 "--prompts", "2", "--new-tokens", "6", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["lossless"] is True and 0 < row["cost_ratio"] < 1 and row["alpha"] <= 1
    assert row["predicted_speedup"] == pytest.approx(predicted_speedup(row["alpha"], 3, row["cost_ratio"]))
    assert not (teacher_run / "summary.json").read_text().count("speculative")  # an extraction is not a run


def test_a_draft_that_reads_fewer_image_tokens_stays_lossless(run_copy, tmp_path):
    teacher_run = run_copy  # the draft is a run: its summary.json is written
    out = tmp_path / "s.json"
    assert main(["bench", "speculative", str(teacher_run), "--draft", str(teacher_run), "--draft-reduce",
                 "attention_prune:layer=0,keep=0.25", "--gamma", "3", "--prompts", "2", "--new-tokens", "6",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert row["lossless"] is True and result["draft"].endswith("+ attention_prune:layer=0,keep=0.25")
    assert row["alpha"] == row["alpha_analytic"] <= 1
    assert main(["bench", "speculative", str(teacher_run), "--draft", str(teacher_run), "--draft-reduce",
                 "attention_prune:keep=3"]) == 2


def test_cost_ratio_and_predicted_speedup_closed_forms():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=30)
    model = LlamaForCausalLM(cfg)
    per_layer = 16 * 16 * 2 + 16 * 8 * 2 + 3 * 16 * 40  # q, o; k, v at one KV head of 8; gate, up, down
    assert decode_params(model) == 3 * per_layer + 30 * 16  # the layers and the head (embeddings are looked up)
    assert predicted_speedup(1.0, 4, 0.0) == 5.0
    assert predicted_speedup(0.0, 4, 0.25) == pytest.approx(1 / 2)
    assert predicted_speedup(0.5, 2, 0.1) == pytest.approx((1 - 0.125) / 0.5 / 1.2)


@pytest.mark.parametrize("extra", [
    ["--gamma", "0"], ["--gamma", "two"], ["--draft", "/nonexistent/run"], ["--draft", "extract:uniform:3"],
    ["--prompts", "0"],
])
def test_bad_requests_exit_2(teacher_run, extra):
    args = ["bench", "speculative", str(teacher_run), "--draft", str(teacher_run), "--new-tokens", "2", *extra]
    assert main(args) == 2
