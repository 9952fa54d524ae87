"""`workbench analyze arank` (workbench/analysis.py): the rank function on matrices of known
rank, the per-layer ranks against a direct computation from the model's attention weights, the
schedule of the lowest-ranked layers, the CLI's file and its bad input."""

import json

import pytest
import torch

from conftest import make_tiny_vlm, tiny_run_args, vlm_inputs
from workbench.analysis import arank_schedule, attention_rank, layer_aranks
from workbench.cli import main


def test_rank_of_known_attention_patterns():
    n = 7
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]  # each row uniform over its prefix
    assert attention_rank(uniform[None]).tolist() == [n - 1]  # the diagonal zeroed: strictly lower triangular
    to_first = torch.zeros(n, n)
    to_first[:, 0] = 1.0  # every row attends to token 0
    assert attention_rank(torch.stack([uniform, to_first])).tolist() == [n - 1, 1]


def test_layer_aranks_average_the_heads_over_real_tokens(processor, world_dir):
    model = make_tiny_vlm(processor, text_layers=3).eval()
    inputs = vlm_inputs(processor, world_dir, left_pad=4)
    batch = {**inputs, "labels": inputs["input_ids"]}
    aranks = layer_aranks(model, [batch], batches=1)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    for layer, a in enumerate(attentions):
        expected = []
        for b in range(2):
            real = inputs["attention_mask"][b].bool()
            heads = a[b][:, real][:, :, real]
            expected.append(float(torch.stack([torch.linalg.matrix_rank(h.tril(-1)) for h in heads]).float().mean()))
        assert aranks[layer] == pytest.approx(sum(expected) / 2)


def test_the_schedule_takes_the_lowest_ranked_layers():
    assert arank_schedule([9.0, 3.0, 5.0, 3.0], 2, 0.5) == [None, 0.5, None, 0.5]  # ties: the deeper first
    assert arank_schedule([9.0, 3.0, 5.0, 3.0], 1, 0.25) == [None, None, None, 0.25]


def test_analyze_arank_through_the_cli(tmp_path, capsys):
    args = tiny_run_args(tmp_path, "run_id=r", "student.kwargs.text_layers=4")
    assert main(["run", "experiments/windtunnel/teacher.yaml", *args]) == 0
    run = tmp_path / "runs" / "windtunnel-teacher" / "r"
    assert main(["analyze", "arank", str(run), "--batches", "1", "--mod-layers", "2", "--ratio", "0.25"]) == 0
    report = json.loads((run / "arank.json").read_text())
    assert len(report["arank"]) == 4 and report["schedule"].count(0.25) == 2 and report["schedule"].count(None) == 2
    assert "transforms.mod.schedule" in capsys.readouterr().out
    assert main(["analyze", "arank", str(run), "--mod-layers", "5"]) == 2
    assert main(["analyze", "arank", str(run), "--batches", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
