"""`workbench bench decode` on a tiny model: the cache arithmetic of attention vs Mamba layers
(closed form), the JSON it writes, and its CLI errors. Timing targets are for real runs."""

import json

from workbench.bench.decode import bench_decode, parse_contexts
from workbench.cli import main


def test_cache_sizes_follow_the_layer_kinds():
    hidden, layers, tokens = 32, 4, 3
    result = bench_decode(contexts=(16, 48), tokens=tokens, hidden=hidden, layers=layers, heads=2, vocab=64,
                          device="cpu")
    rows = {(r["model"], r["context"]): r for r in result["rows"]}
    assert set(rows) == {(m, c) for m in ("teacher", "hybrid 25%", "all-mamba") for c in (16, 48)}
    for context in (16, 48):
        kv = 2 * layers * (context + tokens) * hidden * 4  # K and V, every layer, fp32
        assert rows["teacher", context]["kv_mib"] * 2**20 == kv and rows["teacher", context]["state_mib"] == 0
        assert rows["hybrid 25%", context]["kv_mib"] * 2**20 == kv * 3 // 4  # one of four layers is Mamba
        assert rows["all-mamba", context]["kv_mib"] == 0
    # a Mamba layer's state: conv (conv_dim x 3) + SSM (heads x head_dim x d_state), no context in it
    head_dim = hidden // 2
    conv_dim = 3 * hidden  # x (V), B (K), C (Q) widths with MHA
    state = (conv_dim * 3 + 2 * head_dim * head_dim) * 4
    assert rows["all-mamba", 16]["state_mib"] * 2**20 == layers * state == rows["all-mamba", 48]["state_mib"] * 2**20
    assert result["growth"]["all-mamba"]["cache_growth"] == 1.0
    assert set(result["speedup_vs_teacher"]) == {"hybrid 25%", "all-mamba"}
    assert result["machine"]["logical_cores"] >= 1


def test_cli_writes_json_and_rejects_bad_contexts(tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--contexts", "8,16", "--tokens", "2", "--hidden", "32", "--layers", "4",
                 "--heads", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["contexts"] == [8, 16] and len(result["rows"]) == 6
    assert "all-mamba latency growth" in capsys.readouterr().out
    assert parse_contexts("1k, 4K,16384") == (1024, 4096, 16384)
    assert main(["bench", "decode", "--contexts", "1k,lots"]) == 2
    assert "--contexts" in capsys.readouterr().err
    assert main(["bench", "decode", "--dtype", "nn"]) == 2
    assert "--dtype" in capsys.readouterr().err
