"""The draft-head recipe (experiments/windtunnel/eagle.yaml) through the CLI at tiny size, on
the session's teacher run: the head trains online on the teacher's taps with EAGLE's two
terms, exports only its own weights, and `bench speculative` loads it onto the target and
decodes losslessly, recording the rows in the head's run. Bad requests exit 2."""

import json

import pytest
from safetensors.torch import load_file

import students
from conftest import REPO
from students.eagle import is_draft_head_folder, load_draft_head
from workbench.cli import main

RECIPE = REPO / "experiments" / "windtunnel" / "eagle.yaml"


def tiny(root, teacher_run, *extra):
    return [f"out_root={root}/runs", f"data.root={root}/data", "data.windtunnel.n_train=48", "data.windtunnel.n_val=16",
            "data.windtunnel.question_types=null", "data.batch_size=8", "data.eval_batch_size=16",
            "trainer.max_steps=6", "trainer.val_every_n_steps=3", "trainer.log_every_n_steps=1",
            "trainer.progress_bar=false", "optim.warmup_steps=2", f"teacher.path={teacher_run}/student", *extra]


@pytest.fixture(scope="module")
def head_run(tmp_path_factory, teacher_run):
    root = tmp_path_factory.mktemp("eagle")
    assert main(["run", str(RECIPE), *tiny(root, teacher_run, "run_id=h")]) == 0
    return root / "runs" / "windtunnel-eagle" / "h"


def test_the_head_trains_on_both_terms_and_exports_only_its_weights(head_run, teacher_run):
    summary = json.loads((head_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert {"train/feature", "train/kd"} <= set(summary["final_train"])
    assert 0 <= summary["student"]["acc"] <= 1  # teacher-forced through the target's features
    folder = head_run / "student"
    assert is_draft_head_folder(folder)
    keys = set(load_file(folder / "model.safetensors"))
    assert all(k.startswith(("fc.", "model.layers.0.", "model.norm.")) for k in keys)
    target = students.load(teacher_run / "student")
    width = target.config.text_config.hidden_size
    assert load_file(folder / "model.safetensors")["fc.weight"].shape == (width, 2 * width)
    load_draft_head(folder, target)


def test_bench_speculative_loads_the_head_onto_the_target(head_run, teacher_run, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["bench", "speculative", str(teacher_run), "--draft", str(head_run), "--gamma", "3", "--prompts", "2",
                 "--new-tokens", "6", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert row["lossless"] is True and result["draft"].endswith("(draft head)") and 0 < row["cost_ratio"] < 1
    assert json.loads((head_run / "summary.json").read_text())["speculative"]["gamma3"]["tau"] == row["tau"]
    capsys.readouterr()
    assert main(["bench", "speculative", str(teacher_run), "--draft", str(head_run), "--draft-reduce",
                 "random_prune:keep=0.5", "--prompts", "1", "--new-tokens", "2"]) == 2
    assert "a draft head reads the target's features" in capsys.readouterr().err


@pytest.mark.parametrize("extra, words", [
    (["teacher=null"], "term 'feature' (feature_smooth_l1) needs a teacher but 'teacher' is null"),
    (["teacher=null", "loss.feature.weight=0", "loss.kd.weight=0", "loss.ce={type: ce}"],
     "eagle_head is built on the teacher, but 'teacher' is null"),
    (["student.kwargs.init_layer=9"], "init_layer 9 is not a layer of the target"),
    (["target=none"], "reads the teacher's features as its input, but target 'none' runs no teacher"),
    (["data.labeled_fraction=0.5"], "need the teacher loaded"),  # pseudo-labels would pick the cache
    (["on_policy={}"], "a draft head does not generate on its own"),
])
def test_bad_head_configs_exit_2(tmp_path, teacher_run, capsys, extra, words):
    assert main(["run", str(RECIPE), *tiny(tmp_path, teacher_run, *extra)]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("summary.json"))


def test_eval_of_a_head_alone_exits_2_pointing_at_the_bench(head_run, capsys):
    assert main(["eval", str(head_run)]) == 2
    assert "holds a draft head" in capsys.readouterr().err
