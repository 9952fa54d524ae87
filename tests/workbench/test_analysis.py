"""`workbench analyze arank` (workbench/analysis.py): the rank function on matrices of known
rank, the per-layer ranks against a direct computation from the model's attention weights, the
schedule of the lowest-ranked layers, the CLI's file and its bad input."""

import json

import pytest
import torch

from conftest import make_tiny_vlm, vlm_inputs
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


def test_analyze_arank_through_the_cli(teacher_run, tmp_path, capsys):
    run = teacher_run
    assert main(["analyze", "arank", str(run), "--batches", "1", "--mod-layers", "2", "--ratio", "0.25",
                 "--out", str(tmp_path / "arank.json")]) == 0
    report = json.loads((tmp_path / "arank.json").read_text())
    assert len(report["arank"]) == 4 and report["schedule"].count(0.25) == 2 and report["schedule"].count(None) == 2
    assert "transforms.mod.schedule" in capsys.readouterr().out
    assert main(["analyze", "arank", str(run), "--mod-layers", "5"]) == 2
    assert main(["analyze", "arank", str(run), "--batches", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


def _calibration(processor, world_dir):
    inputs = vlm_inputs(processor, world_dir, n=2)
    from workbench.data.llava import LlavaDataset, VLMCollator

    batch = VLMCollator(processor)([LlavaDataset(world_dir / "val.json")[i] for i in range(4)])
    return [{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}], inputs


def test_g_search_finds_a_nested_schedule_within_the_tolerance(processor, world_dir):
    from students.reduce import attention_prune
    from workbench.analysis import answer_logprobs, g_search, mean_kl

    model = make_tiny_vlm(processor, text_layers=4).eval()
    calibration, _ = _calibration(processor, world_dir)
    found = g_search(model, calibration, tolerance=5e-4, layer=0, queries="text", steps=8)
    keeps = found["keep"]
    assert len(keeps) == 3 and all(b <= a for a, b in zip(keeps, keeps[1:]))
    assert all(k * 8 == int(k * 8) for k in keeps) and found["mod_schedule"] == [None, *keeps]
    assert found["kl"] <= 5e-4 and keeps[0] == found["uniform_keep"]  # the first layer's search is the uniform one
    assert 1 / 8 < keeps[0] < 1 and keeps[-1] < keeps[0]  # (on this model: a schedule, not a uniform ratio)
    reference = answer_logprobs(model, calibration)
    import copy

    for i in range(3):  # the search is minimal: one step less at a layer (the deeper ones with it) breaks it
        if keeps[i] == 1 / 8:
            continue
        tighter = copy.deepcopy(model)
        attention_prune(tighter, layer=0, keep=[*keeps[:i], *[keeps[i] - 1 / 8] * (3 - i)], queries="text")
        assert mean_kl(reference, answer_logprobs(tighter, calibration)) > 5e-4
    assert mean_kl(reference, answer_logprobs(model, calibration)) == 0.0


def test_analyze_gsearch_through_the_cli(teacher_run, tmp_path, capsys):
    run = teacher_run
    assert main(["analyze", "gsearch", str(run), "--layer", "0", "--batches", "1", "--batch-size", "8",
                 "--steps", "4", "--tolerance", "0.01"]) == 0
    report = json.loads((run / "gsearch.json").read_text())  # the default place: the run directory
    assert len(report["keep"]) == 3 and report["reducer"].startswith("attention_prune:layer=0,keep=")
    assert report["searched_check"]["flops_ratio"] <= report["uniform_check"]["flops_ratio"]
    out = capsys.readouterr().out
    assert "transforms.mod.schedule" in out
    assert main(["eval", str(run), "--teacher", "none", "--reduce", report["reducer"],
                 "--out", str(tmp_path / "e.json")]) == 0  # the found reducer runs as it is written
    assert main(["analyze", "gsearch", str(run), "--layer", "3"]) == 2
    assert main(["analyze", "gsearch", str(run), "--queries", "all"]) == 2
