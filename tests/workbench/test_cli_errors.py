"""Bad input through the CLI: exit code 2, one short message naming the key or file, no
traceback, and nothing written (DESIGN.md §4). Runs `workbench.cli.main` in process; no case
trains (every error surfaces while building, before the run directory is opened)."""

import json
import os
import shutil

import pytest
import yaml
from conftest import make_tiny_vlm

from workbench.cli import EXIT_BAD_INPUT, main
from workbench.errors import WorkbenchError

TINY = [f"student.kwargs.{k}={v}" for k, v in dict(
    vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=16, text_layers=1, text_heads=2).items()]


TWO_STAGES = ["stages.a={student: {kwargs: {vision_hidden: 16, vision_layers: 1, vision_heads: 2, text_hidden: 16, "
              "text_layers: 1, text_heads: 2}}}", "stages.b.student.path=stage:a"]


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
    from workbench.fit import Prepared, loaders

    cfg = load_config(config, TINY)
    train, val, sampler = loaders(cfg, Prepared(build(cfg)))
    assert len(train) == cfg.trainer.max_steps and val is not None  # one batch per step, resumable
    assert len(next(iter(train))["ids"]) == cfg.data.batch_size
    assert not (tmp_path / "runs").exists()  # building and loading write nothing


# ----------------------------------------------------------------------------- the table
# Each case: overrides of the fixture recipe -> exit 2, a message naming these words, no
# traceback, no run directory. Grow it with every bad input met.

OVERRIDE_CASES = [
    # optimizer
    (["optim.lr=nan"], "'optim.lr'", "finite"), (["optim.lr=inf"], "'optim.lr'"), (["optim.lr=-inf"], "'optim.lr'"),
    (["optim.lr=0"], "'optim.lr'"), (["optim.lr=-1e-3"], "'optim.lr'"), (["optim.lr=abc"], "'optim.lr'"),
    (["optim.betas=[0.9]"], "'optim.betas'"), (["optim.betas=[2,3]"], "'optim.betas'"),
    (["optim.betas=[0.9,1.0]"], "'optim.betas'"), (["optim.betas=[-0.1,0.9]"], "'optim.betas'"),
    (["optim.two_stage=[0.5,0.5]"], "'optim.two_stage'"), (["optim.two_stage=[1.0,0.5,0.3]"], "'optim.two_stage'"),
    (["optim.two_stage=[0.5,1.5,0.3]"], "'optim.two_stage'"),
    (["optim.betas=[0.9,nan]"], "'optim.betas[1]'"), (["optim.betas=[0.9,0.99,0.999]"], "'optim.betas'"),
    (["optim.weight_decay=-0.1"], "'optim.weight_decay'"), (["optim.warmup_steps=-10"], "'optim.warmup_steps'"),
    (["optim.grad_clip=-1"], "'optim.grad_clip'"), (["optim.schedule=linear"], "'optim.schedule'", "cosine"),
    # trainer
    (["trainer.max_steps=0"], "'trainer.max_steps'"), (["trainer.max_steps=-5"], "'trainer.max_steps'"),
    (["trainer.max_steps=1.5"], "'trainer.max_steps'"), (["trainer.val_every_n_steps=0"], "'trainer.val_every_n_steps'"),
    (["trainer.log_every_n_steps=0"], "'trainer.log_every_n_steps'"),
    (["trainer.accumulate_grad_batches=0"], "'trainer.accumulate_grad_batches'"),
    (["trainer.accumulate_grad_batches=-2"], "'trainer.accumulate_grad_batches'"),
    (["trainer.checkpoint_every_n_steps=0"], "'trainer.checkpoint_every_n_steps'"),
    (["trainer.checkpoint_every_n_steps=-1"], "'trainer.checkpoint_every_n_steps'"),
    (["trainer.devices=0"], "'trainer.devices'"), (["trainer.devices=-2"], "'trainer.devices'"),
    (["trainer.precision=bogus"], "'trainer.precision'", "bf16-mixed"), (["trainer.precision=15"], "'trainer.precision'"),
    (["trainer.max_time_minutes=-1"], "'trainer.max_time_minutes'"),
    (["trainer.max_time_minutes=0"], "'trainer.max_time_minutes'"),
    (["trainer.max_time_minutes=nan"], "'trainer.max_time_minutes'"),
    (["trainer.on_nonfinite=ignore"], "'trainer.on_nonfinite'", "skip"),
    (["trainer.max_skipped_steps=-1"], "'trainer.max_skipped_steps'"),
    (["trainer.progress_bar=maybe"], "'trainer.progress_bar'"),
    # data
    (["data.batch_size=0"], "'data.batch_size'"), (["data.batch_size=-3"], "'data.batch_size'"),
    (["data.labeled_fraction=-0.1"], "'data.labeled_fraction'"), (["data.labeled_fraction=2"], "'data.labeled_fraction'"),
    (["data.unlabeled=bogus"], "'data.unlabeled'"), (["data.bad_images=ignore"], "'data.bad_images'", "skip"),
    (["data.max_length=abc"], "'data.max_length'"), (["data.val_fraction=0"], "'data.val_fraction'"),
    (["data.val_fraction=1.5"], "'data.val_fraction'"), (["data.train=/no/such/file.json"], "/no/such/file.json"),
    (["data.type=parquet"], "data.type", "'parquet'"),
    # loss terms
    (["loss.ce.weight=nan"], "'loss.ce.weight'"), (["loss.ce.weight=inf"], "'loss.ce.weight'"),
    (["loss.ce.temperature=0"], "'loss.ce.temperature'"), (["loss.ce.temperature=-1"], "'loss.ce.temperature'"),
    (["loss.ce.temperature=nan"], "'loss.ce.temperature'"), (["loss.ce.beta=1.5"], "'loss.ce.beta'"),
    (["loss.ce.beta=-0.1"], "'loss.ce.beta'"), (["loss.ce.reduction=sum"], "'loss.ce.reduction'"),
    (["loss.ce.mask=bogus"], "'loss.ce.mask'"), (["loss={}"], "'loss'", "no terms"),
    # names that become folders
    (["name=../../x"], "'name'", "plain name"), (["name=a/b"], "'name'"), (["name=.hidden"], "'name'"),
    (["name="], "'name'"), (["run_id=../x"], "'run_id'"), (["run_id=a/b"], "'run_id'"), (["run_id=.."], "'run_id'"),
    # keys and types
    (["optim.lrr=1"], "'optim.lrr'"), (["trainer.max_step=1"], "'trainer.max_step'", "max_steps"),
    (["bogus=1"], "'bogus'"), (["seed=abc"], "'seed'"), (["optim=3"], "'optim'", "section"), (["data.windtunnel=2"], "'data.windtunnel'", "section"),
    (["data.type=windtunnel", "data.windtunnel.patch_size=5"], "'data.windtunnel.patch_size'", "divide"),
    (["data.type=windtunnel", "data.windtunnel.question_types=[colour]"], "'data.windtunnel.question_types'",
     "describe"),
    (["data.type=windtunnel", "data.windtunnel.frames=0"], "'data.windtunnel.frames'", ">= 1"),
    (["data.type=windtunnel", "data.windtunnel.frames=2", "data.windtunnel.min_frames=3"],
     "'data.windtunnel.min_frames'", "1..frames"),
    (["data.type=windtunnel", "data.windtunnel.min_shapes=4"], "'data.windtunnel.min_shapes'", "max_shapes"),
    (["data.type=windtunnel", "data.windtunnel.grid=2", "data.windtunnel.max_shapes=5"], "max_shapes <= 4"),
    (["data.type=windtunnel", "data.windtunnel.motion=1.5"], "'data.windtunnel.motion'", "[0, 1]"),
    (["transforms.mod.schedule=cosine"], "'transforms.mod'", "unknown schedule"),
    (["transforms.mod.router=softmax"], "'transforms.mod'", "router"),
    (["transforms.mod.schedule=uniform:1.5"], "'transforms.mod'", "(0, 1]"),
    (["transforms.mod.threshold=0.005"], "'transforms.mod'", "gamma-MoD's"), (["oops"], "oops", "key=value"),
    # a later stage's transform that does not fit the first stage's model: refused before that trains
    ([*TWO_STAGES, "stages.b.transforms.mod.schedule=[0.5,0.5]"], "'stages.b.transforms.mod'",
     "2 ratios for 1 decoder layers"),
    ([*TWO_STAGES, "stages.b.transforms.ternary.skip=[nowhere]"], "'stages.b.transforms.ternary'", "nowhere"),
    ([*TWO_STAGES, "stages.b.transforms.quantize.group_size=1024"], "'stages.b.transforms.quantize'",
     "group_size 1024"),
    ([*TWO_STAGES, "stages.b.hybrid={layers: [3]}"], "'stages.b.hybrid'", "not one of the 1 layers"),
    ([*TWO_STAGES, "stages.b.transforms.ternary.placement=outside"], "'transforms.ternary'", "outside"),  # at load
    ([*TWO_STAGES, "stages.b.transforms.quantize.method=int3"], "'transforms.quantize'", "int3"),
    ([*TWO_STAGES, "stages.bb=null"], "'stages.bb'", "no stage 'bb'", "a, b", "Did you mean: 'b'"),  # a misspelt skip
    # teacher and student
    (["teacher.path=/nonexistent", "teacher.top_k=0"], "'teacher.top_k'"),
    (["teacher.path=/nonexistent", "teacher.quantize=int4"], "'teacher.quantize'", "nf4"),
    (["teacher.path=/nonexistent", "teacher.dtype=fp8"], "'teacher.dtype'"),
    ([*TINY, "student.kwargs.text_hidden=-4"], "student.kwargs", "negative"),
    ([*TINY, "student.kwargs.text_heads=3"], "student.kwargs"),
    (["student.path=/no/such/student"], "/no/such/student"),
    (["init_from=teacher"], "'init_from'", "teacher"),
    # quantization-aware training (the `quantize` transform)
    ([*TINY, "transforms.quantize.method=int3"], "'transforms.quantize'", "int3"),
    ([*TINY, "transforms.quantize.method=llm_int8"], "'transforms.quantize'", "llm_int8", "weight-only"),
    ([*TINY, "transforms.quantize.preset=bogus"], "'transforms.quantize'", "bogus", "bluelm_mixed"),
    ([*TINY, "transforms.quantize.group_size=0"], "'transforms.quantize'", "group_size"),
    ([*TINY, "transforms.quantize.group_size=8", "transforms.quantize.skip=[no_such_layer]"], "no_such_layer"),
    ([*TINY, "transforms.quantize.scopes=[brain]"], "'transforms.quantize'", "brain"),
    ([*TINY, "transforms.quantize.group_size=1024"], "'transforms.quantize'", "group_size 1024"),  # no layer is that wide
    ([*TINY, "transforms.quantize.bits=4"], "'transforms.quantize.bits'"),
    # ternary students (the `ternary` transform)
    ([*TINY, "transforms.ternary.weight_scale=row"], "'transforms.ternary'", "group:"),
    ([*TINY, "transforms.ternary.placement=outside"], "'transforms.ternary'", "outside", "bitnet_faq"),
    ([*TINY, "transforms.ternary.scopes=[eyes]"], "'transforms.ternary'", "eyes"),
    ([*TINY, "transforms.ternary.act_bits=1"], "'transforms.ternary'", "act_bits"),
    ([*TINY, "transforms.ternary.skip=[nowhere]"], "'transforms.ternary'", "nowhere"),
    ([*TINY, "transforms.ternary.weight_scale=group:7"], "'transforms.ternary'", "group:7", "input widths: 16, 64"),
    # the MatMul-free student
    (["student.type=tiny_mmfree_llava", "student.kwargs.weight_scale=row"], "'student.kwargs'", "group:"),
    (["student.type=tiny_mmfree_llava", "student.kwargs.text_heads=2"], "'student.kwargs.text_heads'",
     "tiny_mmfree_llava"),
    (["optim.schedule=two_stage", "optim.two_stage=[0.5,0.5,-1]"], "'optim.two_stage'"),
]


@pytest.mark.parametrize("case", OVERRIDE_CASES, ids=lambda c: " ".join(o for o in c[0] if o not in TINY + TWO_STAGES)[-60:])
def test_bad_overrides_exit_2_before_writing(run_fails, case):
    overrides, *names = case
    run_fails(overrides, *names)


def _turns(answer="two"):
    return [{"from": "human", "value": "<image>\nhow many ?"}, {"from": "gpt", "value": answer}]


RECORD_CASES = {  # a record of the data file -> words of the message
    "record-is-a-string": ("just text", ["record 0", "not a JSON object"]),
    "no-conversations": ({"id": "a", "image": "IMG"}, ["'a'", "conversations"]),
    "empty-conversations": ({"id": "a", "image": "IMG", "conversations": []}, ["'a'", "conversations"]),
    "turn-is-a-string": ({"id": "a", "image": "IMG", "conversations": ["hello"]}, ["'a'", "'hello'"]),
    "turn-without-from": ({"id": "a", "conversations": [{"value": "hi"}]}, ["'a'", "'from'"]),
    "unknown-role": ({"id": "a", "conversations": [{"from": "robot", "value": "hi"}]}, ["'a'", "'from'"]),
    "value-not-text": ({"id": "a", "conversations": [{"from": "human", "value": 3}]}, ["'a'", "'value'"]),
    "no-answer": ({"id": "a", "conversations": [{"from": "human", "value": "hi"}]}, ["'a'", "assistant"]),
    "empty-answer": ({"id": "a", "image": "IMG", "conversations": _turns("")}, ["'a'", "empty assistant answer"]),
    "blank-answer": ({"id": "a", "image": "IMG", "conversations": _turns("  ")}, ["'a'", "empty assistant answer"]),
    "image-is-a-number": ({"id": "a", "image": 7, "conversations": _turns()}, ["'a'", "'image'", "int"]),
    "image-is-a-list-of-numbers": ({"id": "a", "image": [3], "conversations": _turns()},
                                   ["'a'", "'image'", "non-empty list"]),
    "more-images-than-placeholders": ({"id": "a", "image": ["IMG", "IMG"], "conversations": _turns()},
                                      ["'a'", "2 images but 1 '<image>'"]),
    "image-leaves-folder": ({"id": "a", "image": "../../etc/passwd", "conversations": _turns()},
                            ["'a'", "leaves data.image_folder"]),
    "image-absolute": ({"id": "a", "image": "/etc/hostname", "conversations": _turns()},
                       ["'a'", "absolute", "data.absolute_images"]),
    "image-missing": ({"id": "a", "image": "images/none.png", "conversations": _turns()}, ["'a'", "does not exist"]),
    "image-is-text": ({"id": "a", "image": "TEXT", "conversations": _turns()}, ["'a'", "not a readable image"]),
    "image-zero-bytes": ({"id": "a", "image": "EMPTY", "conversations": _turns()}, ["'a'", "not a readable image"]),
    "image-without-placeholder": ({"id": "a", "image": "IMG", "conversations": [
        {"from": "human", "value": "how many ?"}, {"from": "gpt", "value": "two"}]}, ["'a'", "<image>"]),
}


@pytest.fixture
def image_dir(tmp_path, world_dir):
    """A folder with one real image (ok.png), a text file and an empty file."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    real = json.loads((world_dir / "train.json").read_text())[0]
    shutil.copy(world_dir / real["image"], folder / "ok.png")
    (folder / "note.txt").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    return folder


def _data_file(tmp_path, records):
    good = {"id": "good", "image": "ok.png", "conversations": _turns()}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([*records, good]))
    return path


@pytest.mark.parametrize("name", sorted(RECORD_CASES))
def test_bad_records_exit_2_naming_the_record(run_fails, tmp_path, image_dir, name):
    record, words = RECORD_CASES[name]
    if isinstance(record, dict) and isinstance(record.get("image"), str):
        record = {**record, "image": {"IMG": "ok.png", "TEXT": "note.txt", "EMPTY": "empty.png"}.get(
            record["image"], record["image"])}
    run_fails([f"data.train={_data_file(tmp_path, [record])}", f"data.image_folder={image_dir}"], *words)


def test_duplicate_record_ids_exit_2(run_fails, tmp_path, image_dir):
    twice = [{"id": "same", "image": "ok.png", "conversations": _turns()}] * 2
    run_fails([f"data.train={_data_file(tmp_path, twice)}", f"data.image_folder={image_dir}"],
              "'same'", "share the id")


def test_unreadable_images_can_be_skipped_and_are_counted(config, tmp_path, image_dir):
    from workbench.build import build
    from workbench.config import load_config

    bad = [{"id": f"bad{i}", "image": name, "conversations": _turns()} for i, name in enumerate(["note.txt", "empty.png"])]
    good = [{"id": f"g{i}", "image": "ok.png", "conversations": _turns()} for i in range(8)]
    data = _data_file(tmp_path, [*bad, *good])
    cfg = load_config(config, [*TINY, f"data.train={data}", f"data.image_folder={image_dir}", "data.bad_images=skip",
                               "data.val=null"])
    built = build(cfg)
    assert len(built.splits.train) == 9
    assert built.notes["skipped_images"]["train"]["count"] == 2
    assert [s["id"] for s in built.notes["skipped_images"]["train"]["first"]] == ["bad0", "bad1"]
    assert "not a readable image" in built.notes["skipped_images"]["train"]["first"][0]["problem"]


def test_a_data_file_that_is_an_object_exits_2(run_fails, tmp_path):
    (tmp_path / "obj.json").write_text('{"records": []}')
    run_fails([f"data.train={tmp_path / 'obj.json'}"], tmp_path / "obj.json", "JSON list")


def test_a_yaml_key_given_twice_exits_2(run_fails, config, tmp_path):
    text = config.read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text + "name: again\n")
    run_fails([], twice, "'name' appears twice", "line", cfg=twice)


def test_a_read_only_out_root_exits_2(run_fails, monkeypatch, tmp_path):
    from pathlib import Path

    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if "runs" in self.parts:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    run_fails(TINY, "cannot create run directory", "Permission denied", "out_root")


@pytest.mark.parametrize("argv, words", [
    (["--resume", "NOWHERE"], ["nowhere", "not a run directory"]),
    (["--resume", "TMP"], ["not a run directory"]),
    (["--resume", "TMP", "optim.lr=1"], ["--resume", "takes no config"]),
    ([], ["give an experiment config"]),
])
def test_bad_resume_calls_exit_2(capsys, tmp_path, argv, words):
    argv = [str(tmp_path / "nowhere") if a == "NOWHERE" else str(tmp_path) if a == "TMP" else a for a in argv]
    fails(capsys, ["run", *argv], *words)


@pytest.fixture
def cache_recipe(tmp_path, world_dir, tiny_vlm_dir):
    """A KD recipe over the session's tiny teacher that a teacher cache serves."""
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bad-cache", "out_root": str(tmp_path / "runs"),
        "teacher": {"path": str(tiny_vlm_dir), "top_k": 4, "cache": "auto"},
        "student": {"type": "tiny_llava", "processor": str(world_dir / "processor")},
        "loss": {"kd": {"type": "forward_kl"}},
        "data": {"type": "llava", "train": str(world_dir / "train.json"), "batch_size": 4, "limit_train": 8},
    }))
    return path


@pytest.mark.parametrize("argv, words", [
    (["--top-k", "0"], ["--top-k", ">= 1"]),
    (["--top-k", "100000"], ["100000", "vocabulary"]),
    (["--out", "FILE"], ["is a file", "folder"]),
    (["teacher=null", "--top-k", "4"], ["'teacher' is null"]),
    (["teacher=null"], ["'teacher' is null"]),
])
def test_bad_cache_teacher_calls_exit_2_and_write_nothing(capsys, tmp_path, cache_recipe, argv, words):
    (tmp_path / "file.txt").write_text("a file")
    argv = [str(tmp_path / "file.txt") if a == "FILE" else a for a in argv]
    fails(capsys, ["cache-teacher", cache_recipe, *argv], *words)
    assert not (tmp_path / "runs").exists() and (tmp_path / "file.txt").read_text() == "a file"


# ----------------------------------------------------------------------------- workbench compress


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, processor):
    path = tmp_path_factory.mktemp("compress") / "student"
    make_tiny_vlm(processor, text_hidden=64, vision_hidden=64).save_pretrained(path)
    processor.save_pretrained(path)
    return path


COMPRESS_CASES = [
    (["--preset", "bogus"], "bogus", "minicpmv_nf4"),
    (["--method", "int3"], "int3", "nf4"),
    ([], "quantization-aware", "--preset"),
    (["--preset", "int8", "--method", "int8"], "not both"),
    (["--preset", "int8", "--scope", "llm"], "scopes"),
    (["--method", "int8", "--scope", "brain"], "brain"),
    (["--method", "int8", "--skip", "no.such.module"], "no.such.module", "matches no Linear"),
    (["--method", "int4", "--group-size", "48"], "group_size 48"),
    (["--method", "int4", "--group-size", "0"], "group_size"),
    (["--method", "ternary", "--scope", "brain"], "brain"),
    (["--method", "ternary", "--group-size", "48"], "group:48", "none of the", "input widths"),
    (["--method", "ternary", "--skip", "nowhere"], "nowhere"),
]


@pytest.mark.parametrize("case", COMPRESS_CASES, ids=lambda c: " ".join(c[0]) or "no-method")
def test_bad_compress_input_exits_2_and_writes_nothing(capsys, model_dir, tmp_path, case):
    flags, *names = case
    fails(capsys, ["compress", model_dir, "--out", tmp_path / "q", *flags], *names)
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.*"))


def test_compress_refuses_an_existing_folder_and_timm_models(capsys, model_dir, tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("mine")
    fails(capsys, ["compress", model_dir, "--out", tmp_path / "q", "--preset", "int8"], "exists", "--force")
    assert (tmp_path / "q" / "keep.txt").read_text() == "mine"
    timm_dir = tmp_path / "vit"
    timm_dir.mkdir()
    (timm_dir / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}))
    fails(capsys, ["compress", timm_dir, "--out", tmp_path / "v", "--preset", "int8"], "timm")
    fails(capsys, ["compress", tmp_path / "nothing", "--out", tmp_path / "v", "--preset", "int8"], "nothing")
