"""`workbench extract`: specs from the command line, folders that load on their own, errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import students
from students.matformer import MatSpec, matformerize, set_active
from workbench.cli import main

IDS = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def universal(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    matformerize(model)
    root = tmp_path_factory.mktemp("universal")
    model.save_pretrained(root / "run" / "student")
    (root / "run" / "student" / "tokenizer_config.json").write_text("{}")
    return model, root / "run"


def test_uniform_spec_from_a_run_directory(universal, tmp_path, capsys):
    model, run_dir = universal
    assert main(["extract", str(run_dir), "--spec", "uniform:0.25", "--skip", "4-5", "--out", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "widths [16, 16, 16, 16]" in out and "skipped layers [4, 5]" in out and "->" in out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    set_active(model, MatSpec([16] * 6, (4, 5)))
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=1e-5, rtol=0)
    report = json.loads((tmp_path / "q" / "extract.json").read_text())
    assert report["params_after"] == sum(p.numel() for p in loaded.parameters()) < report["params_before"]
    assert (tmp_path / "q" / "tokenizer_config.json").is_file()


def test_budget_and_per_layer_specs(universal, tmp_path, capsys):
    model, run_dir = universal
    assert main(["extract", str(run_dir / "student"), "--spec", "budget:30k", "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "extract.json").read_text())
    assert report["params_after"] <= 30_000 and report["widths"] == sorted(report["widths"])
    assert main(["extract", str(run_dir), "--spec", "widths:64,8,0.5,16,64,24", "--out", str(tmp_path / "w")]) == 0
    loaded = students.load(tmp_path / "w").eval()
    set_active(model, MatSpec([64, 8, 32, 16, 64, 24]))
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("args, message", [
    (["--spec", "uniform:2"], "fraction"),
    (["--spec", "budget:12"], "below the smallest"),
    (["--spec", "budget:lots"], "not a parameter count"),
    (["--spec", "uniform:0.5", "--skip", "9"], "6 layers"),
])
def test_bad_specs_exit_2(universal, tmp_path, capsys, args, message):
    _, run_dir = universal
    assert main(["extract", str(run_dir), *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_bad_sources_and_outputs_exit_2(universal, tmp_path, capsys):
    _, run_dir = universal
    assert main(["extract", str(tmp_path / "nowhere"), "--spec", "uniform:0.5", "--out", str(tmp_path / "x")]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["extract", str(run_dir), "--spec", "uniform:0.5", "--out", str(tmp_path / "full")]) == 2
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert "not empty" in capsys.readouterr().err


def test_timm_matvit_round_trip(tmp_path):
    import timm

    from students.matformer import nested_mlps

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=5).eval()
    matformerize(vit)
    students.export_timm(vit, tmp_path / "u", class_names=list("abcde"))
    assert len(nested_mlps(students.load(tmp_path / "u"))) == 4  # saved nested, reloads nested
    assert main(["extract", str(tmp_path / "u"), "--spec", "widths:768,96,0.5,192", "--skip", "1",
                 "--out", str(tmp_path / "s")]) == 0
    static = students.load(tmp_path / "s").eval()
    assert len(static.blocks) == 3 and json.loads((tmp_path / "s" / "config.json").read_text())["label_names"] == list("abcde")
    set_active(vit, MatSpec([768, 96, 384, 192], (1,)))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(static(x), vit(x), atol=1e-5, rtol=0)


def test_a_plain_llava_folder_is_cut_in_its_language_model_only(tiny_vlm_dir, tmp_path, capsys):
    """A VLM trained without MatFormer: the language model's MLPs are sliced exactly as by
    hand (rows of gate/up, columns of down), the vision tower and projector are untouched."""
    from transformers import AutoModelForImageTextToText

    source = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir)
    assert main(["extract", str(tiny_vlm_dir), "--spec", "uniform:0.5", "--out", str(tmp_path / "half")]) == 0
    assert "not saved as a MatFormer model" in capsys.readouterr().out
    cut = AutoModelForImageTextToText.from_pretrained(tmp_path / "half")
    full = source.config.text_config.intermediate_size
    k = full // 2
    assert cut.config.text_config.intermediate_size == k
    theirs, mine = source.state_dict(), cut.state_dict()
    assert theirs.keys() == mine.keys()
    for key, value in theirs.items():
        if ".language_model." in key and (".gate_proj." in key or ".up_proj." in key):
            expected = value[:k]
        elif ".language_model." in key and ".down_proj.weight" in key:
            expected = value[:, :k]
        else:  # vision tower (its fc1/fc2 too), projector, attention, norms, embeddings, head
            expected = value
        assert torch.equal(mine[key], expected), key
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.isfinite(cut(input_ids=ids).logits).all()


@pytest.mark.parametrize("spec, needle", [
    ("uniform:1.5", "fraction"), ("uniform:", "could not convert"), ("widths:2.7,3", "neither a whole number"),
    ("widths:1,2,3", "3 widths for 2"), ("budget:lots", "not a parameter count"), ("half", "use uniform"),
    ("widths:0,8", "at least 1 hidden unit"), ("widths:9999,8", "outside 1.."),
])
def test_bad_specs_on_a_plain_vlm_exit_2(tiny_vlm_dir, tmp_path, capsys, spec, needle):
    assert main(["extract", str(tiny_vlm_dir), "--spec", spec, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and not (tmp_path / "x").exists()
