"""`workbench bench tokens` (workbench/bench/tokens.py): on a random decoder the FLOPs and KV
proxies and the KV bytes a prefill leaves follow from the layer shapes and the kept counts; on a
trained run the accuracy column equals `workbench eval --reduce` of the same reducer. Times are
reported, never asserted."""

import json

import pytest

from students.mod import kept_count, prd_ratios
from workbench.cli import main


def test_random_decoder_rows_follow_from_the_shapes(tmp_path):
    d, ff, layers, heads, kv_heads, n_v, n_t = 64, 160, 4, 4, 2, 40, 10
    out = tmp_path / "t.json"
    assert main(["bench", "tokens", "--hidden", str(d), "--intermediate", str(ff), "--layers", str(layers),
                 "--heads", str(heads), "--kv-heads", str(kv_heads), "--vocab", "300", "--image-tokens", str(n_v),
                 "--text-tokens", str(n_t), "--repeats", "1", "--new-tokens", "1", "--json", str(out),
                 "--reduce", "attention_prune:layer=0,keep=0.25"]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["dense", "p-MoD (PRD)", "attention_prune:layer=0,keep=0.25"]
    weights = 2 * d * d + 2 * d * (d * kv_heads // heads) + 3 * d * ff
    n = n_v + n_t

    def flops(k):
        return k * (2 * weights + d * (k + 1))

    per_layer = {"dense": [n] * layers,
                 "p-MoD (PRD)": [n if r is None else n_t + kept_count(r, n_v) for r in prd_ratios(layers)],
                 "attention_prune:layer=0,keep=0.25": [n] + [n_t + kept_count(0.25, n_v)] * (layers - 1)}
    entry = 2 * kv_heads * (d // heads) * 4  # keys and values of one token in one layer, fp32
    for name, kept in per_layer.items():
        r = rows[name]
        assert r["flops_ratio"] == pytest.approx(sum(map(flops, kept)) / (layers * flops(n)), rel=1e-12)
        assert r["kv_ratio"] == pytest.approx(sum(kept) / (layers * n), rel=1e-12)
        assert r["kv_bytes"] == sum(kept) * entry
        assert r["prefill_ms"] > 0 and r["decode_tok_s"] > 0
    assert rows["dense"]["prefill_speedup"] == 1.0 and rows["dense"]["efficiency"] == 1.0


def test_a_trained_run_scores_each_reducer_as_eval_does(teacher_run, tmp_path):
    run = teacher_run
    spec = "attention_prune:layer=0,keep=0.5"
    out = tmp_path / "t.json"
    assert main(["bench", "tokens", str(run), "--reduce", spec, "--repeats", "1", "--new-tokens", "1",
                 "--json", str(out), "--plot", str(tmp_path / "t.png")]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense", spec] and (tmp_path / "t.png").stat().st_size > 0
    assert main(["eval", str(run), "--teacher", "none", "--reduce", spec, "--out", str(tmp_path / "e.json")]) == 0
    scores = json.loads((tmp_path / "e.json").read_text())["models"]["student"]["scores"]
    assert rows[1]["acc"] == scores["acc"] and rows[1]["flops_ratio"] == scores["tokens/flops_ratio"] < 1
    assert rows[0]["flops_ratio"] == 1.0 and rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0
    assert "object_recall" not in rows[0] and 0 <= rows[1]["object_recall"] <= 1  # a wind tunnel: objects known
    assert main(["bench", "tokens", str(run), "--reduce", "fastv"]) == 2
    # a FrameFusion budget that its first layer already overspends: found in the forward, exit 2, nothing written
    assert main(["eval", str(run), "--teacher", "none", "--reduce", "framefusion:cost=0.05",
                 "--out", str(tmp_path / "ff.json")]) == 2 and not (tmp_path / "ff.json").exists()
    assert main(["bench", "tokens", "--mod", str(run)]) == 2
