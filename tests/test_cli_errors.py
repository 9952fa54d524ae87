"""Bad input through the CLI: exit code 2, one short message naming the key or file, no
traceback, and nothing written (DESIGN.md §4). Runs `workbench.cli.main` in process; no case
trains (every error surfaces while building, before the run directory is opened)."""

import json
import os

import pytest
import yaml
from conftest import make_tiny_vlm

from workbench.cli import EXIT_BAD_INPUT, main
from workbench.errors import WorkbenchError

TINY = [f"student.kwargs.{k}={v}" for k, v in dict(
    vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=16, text_layers=1, text_heads=2).items()]


@pytest.fixture
def config(tmp_path, world_dir):
    """A valid supervised recipe over the session's wind tunnel, writing under tmp_path/runs."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bad-input",
        "out_root": str(tmp_path / "runs"),
        "teacher": None,
        "student": {"type": "tiny_llava", "processor": str(world_dir / "processor")},
        "loss": {"ce": {"type": "ce"}},
        "data": {"type": "llava", "train": str(world_dir / "train.json"), "val": str(world_dir / "val.json"),
                 "batch_size": 4, "limit_train": 16, "limit_val": 8},
        "trainer": {"max_steps": 2, "val_every_n_steps": 1, "progress_bar": False},
    }))
    return path


def fails(capsys, argv, *names) -> str:
    """Run the CLI; assert exit 2 and a one-paragraph message naming `names`; return it."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert "Traceback" not in err
    message = err[err.index("error: "):].strip()  # loaders may print progress bars before it
    assert message.count("error: ") == 1
    assert all(line.strip() for line in message.splitlines()), f"not one paragraph:\n{message}"
    assert len(message) < 400, message
    for name in names:
        assert str(name) in message, f"{name!r} not in {message!r}"
    return message


@pytest.fixture
def run_fails(capsys, config, tmp_path):
    """`workbench run recipe.yaml *overrides` fails as `fails` says and writes no run directory."""
    def check(overrides, *names, cfg=None):
        message = fails(capsys, ["run", cfg or config, *overrides], *names)
        assert not (tmp_path / "runs").exists(), os.listdir(tmp_path / "runs")
        return message
    return check


def test_the_fixture_recipe_is_valid(config):
    from workbench.config import load_config

    load_config(config, TINY)


def test_missing_config_file(run_fails, tmp_path):
    run_fails([], tmp_path / "nope.yaml", "does not exist", cfg=tmp_path / "nope.yaml")


def test_invalid_yaml(run_fails, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noptim: {lr: [1e-3, \n")
    message = run_fails([], bad, "YAML", cfg=bad)
    assert "line " in message


def test_yaml_that_is_not_a_mapping(run_fails, tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    run_fails([], bad, "mapping", cfg=bad)


def test_unknown_key(run_fails):
    run_fails(["optim.lrr=1"], "'optim.lrr'", "'lr'")


def test_wrong_type(run_fails):
    run_fails(["optim.lr=abc"], "'optim.lr'")


def test_missing_teacher_path(run_fails):
    run_fails(["teacher.path=/nonexistent"], "teacher.path", "/nonexistent")


def test_unknown_student_type(run_fails):
    run_fails(["student.type=tiny_lava"], "student.type", "'tiny_lava'", "tiny_llava")


def test_unknown_student_argument(run_fails):
    run_fails([*TINY, "student.kwargs.text_hiden=8"], "'student.kwargs.text_hiden'", "'text_hidden'")


def test_unknown_loss_type(run_fails):
    run_fails(["loss.ce.type=crossentropy"], "loss.ce.type", "'crossentropy'", "forward_kl")


def test_kd_term_without_teacher(run_fails):
    run_fails(["loss.kd.type=forward_kl"], "'kd'", "teacher")


def test_vocabulary_mismatch(run_fails, processor, tmp_path):
    vocab = len(processor.tokenizer)
    teacher = tmp_path / "teacher"
    model = make_tiny_vlm(processor, vocab_size=vocab + 7, vision_hidden=16, text_hidden=16, text_layers=1)
    model.save_pretrained(teacher)
    processor.save_pretrained(teacher)
    message = run_fails([f"teacher.path={teacher}", "loss.kd.type=forward_kl", *TINY], "vocabular")
    assert str(vocab) in message and str(vocab + 7) in message


def test_missing_image_file(run_fails, world_dir, tmp_path):
    records = json.loads((world_dir / "train.json").read_text())[:3]
    records[1]["image"] = "images/missing-000.png"
    (tmp_path / "data.json").write_text(json.dumps(records))
    run_fails([f"data.train={tmp_path / 'data.json'}", f"data.image_folder={world_dir}"],
              world_dir / "images" / "missing-000.png", records[1]["id"])


def test_missing_image_folder(run_fails, tmp_path):
    run_fails([f"data.image_folder={tmp_path / 'no-images'}"], "data.image_folder", tmp_path / "no-images")


def test_empty_dataset(run_fails, tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    run_fails([f"data.train={tmp_path / 'empty.json'}"], tmp_path / "empty.json", "empty")


def test_data_file_is_not_json(run_fails, tmp_path):
    (tmp_path / "broken.json").write_text('[{"id": 1,')
    run_fails([f"data.val={tmp_path / 'broken.json'}"], tmp_path / "broken.json", "JSON")


def test_batch_larger_than_dataset(run_fails):
    run_fails(["data.limit_train=3", "data.batch_size=8", *TINY], "data.batch_size", "8", "3 samples")


@pytest.mark.parametrize("keep", [0.5, 0.001], ids=["cut-in-tensors", "cut-in-header"])
def test_corrupt_student_checkpoint(run_fails, processor, tmp_path, keep):
    folder = tmp_path / "student"
    make_tiny_vlm(processor, vision_hidden=16, text_hidden=16, text_layers=1).save_pretrained(folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    run_fails([f"student.path={folder}"], folder)


def test_student_folder_without_config(run_fails, tmp_path):
    (tmp_path / "empty-student").mkdir()
    run_fails([f"student.path={tmp_path / 'empty-student'}"], tmp_path / "empty-student", "config.json")


def test_existing_run_directory_is_left_alone(capsys, config, tmp_path):
    run_dir = tmp_path / "runs" / "bad-input" / "taken"
    run_dir.mkdir(parents=True)
    (run_dir / "sentinel.txt").write_text("earlier results")
    before = sorted(p.relative_to(tmp_path / "runs") for p in (tmp_path / "runs").rglob("*"))
    fails(capsys, ["run", config, "run_id=taken", *TINY], run_dir, "already exists")
    assert sorted(p.relative_to(tmp_path / "runs") for p in (tmp_path / "runs").rglob("*")) == before
    assert (run_dir / "sentinel.txt").read_text() == "earlier results"


def test_data_windtunnel_refuses_an_existing_world(capsys, tmp_path):
    out = tmp_path / "world"
    argv = ["data", "windtunnel", "--out", out, "--n-train", "2", "--n-val", "1", "--questions-per-image", "2"]
    assert main([str(a) for a in argv]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    fails(capsys, [*argv, "--seed", "5"], out, "world.json", "--out")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_debug_flag_shows_the_traceback(config):
    with pytest.raises(WorkbenchError, match="optim.lrr"):
        main(["--debug", "run", str(config), "optim.lrr=1"])


def test_valid_input_is_not_refused(config, tmp_path):
    """The fixture recipe itself passes every check: the cases above fail for their own reason."""
    from workbench.build import build
    from workbench.config import load_config
    from workbench.run import loaders

    cfg = load_config(config, TINY)
    train, val, sampler = loaders(cfg, build(cfg))
    assert len(train) == cfg.trainer.max_steps and val is not None  # one batch per step, resumable
    assert len(next(iter(train))["ids"]) == cfg.data.batch_size
    assert not (tmp_path / "runs").exists()  # building and loading write nothing
