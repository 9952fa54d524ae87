"""Image classification end to end: datasets (image folders via timm, digits, the wind
tunnel's classification set), the timm teacher, and MiniViT runs read back from disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import students
from teachers.timm_vit import TimmTeacher, read_state_dict
from workbench.cli import main
from workbench.config import DataConfig, load_config
from workbench.data.vision import ImageCollator, digits_splits, image_folder_splits, windtunnel_classification_splits
from workbench.errors import INPUT_ERRORS
from workbench.evaluation import evaluate

DEIT = "experiments/windtunnel/minivit_deit.yaml"
SWIN = "experiments/windtunnel/minivit_swin.yaml"
TINY = ["trainer.max_steps=12", "trainer.val_every_n_steps=6", "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false", "optim.warmup_steps=2", "data.limit_train=256", "data.limit_val=64",
        "data.batch_size=32"]


def small_vit_teacher(num_classes=10, in_chans=1, img_size=8):
    return timm.create_model("deit_tiny_patch16_224", img_size=img_size, patch_size=2, in_chans=in_chans,
                             embed_dim=32, depth=2, num_heads=2, num_classes=num_classes)


# ----------------------------------------------------------------------------- data


def test_digits_split_is_stratified_disjoint_and_seeded():
    a, b = digits_splits(DataConfig(type="digits")), digits_splits(DataConfig(type="digits"))
    assert (len(a.train), len(a.val)) == (1438, 359) and a.num_classes == 10 and a.in_chans == 1
    image, label = a.train[0]
    assert image.shape == (1, 8, 8) and isinstance(label, int) and -1.0 <= image.min() < image.max() <= 1.0
    assert torch.equal(a.val.ds.tensors[0], b.val.ds.tensors[0])
    counts = torch.bincount(a.val.ds.tensors[1], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # ~20% of each digit's ~180 images
    train = {tuple(x.flatten().tolist()) for x in a.train.ds.tensors[0]}
    assert not any(tuple(x.flatten().tolist()) in train for x in a.val.ds.tensors[0][:50])
    other = digits_splits(DataConfig(type="digits", split_seed=1))
    assert not torch.equal(other.val.ds.tensors[0], a.val.ds.tensors[0])
    batch = ImageCollator()([a.train[0], a.train[1]])
    assert batch["pixel_values"].shape == (2, 1, 8, 8) and batch["labels"].dtype == torch.long


def _write_folder(root, classes, n=3, size=12):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_through_timm(tmp_path):
    _write_folder(tmp_path / "train", ["cat", "dog", "emu"])
    _write_folder(tmp_path / "val", ["dog", "emu"])  # a class missing from val keeps train's indices
    splits = image_folder_splits(DataConfig(type="image_folder", train=str(tmp_path / "train"),
                                            val=str(tmp_path / "val"), image_size=16))
    assert splits.classes == ["cat", "dog", "emu"] and len(splits.train) == 9
    image, label = splits.val[0]
    assert image.shape == (3, 16, 16) and label == 1  # "dog" is class 1 in training
    _write_folder(tmp_path / "bad", ["zebra"])
    with pytest.raises(INPUT_ERRORS, match="zebra"):
        image_folder_splits(DataConfig(type="image_folder", train=str(tmp_path / "train"), val=str(tmp_path / "bad")))
    with pytest.raises(INPUT_ERRORS, match="does not exist"):
        image_folder_splits(DataConfig(type="image_folder", train=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(INPUT_ERRORS, match="empty|no images|cannot read"):
        image_folder_splits(DataConfig(type="image_folder", train=str(tmp_path / "empty")))


def test_windtunnel_classification_set(tmp_path):
    cfg = DataConfig(type="windtunnel_classification", root=str(tmp_path))
    cfg.windtunnel.grid, cfg.windtunnel.n_train, cfg.windtunnel.n_val = 2, 4, 2
    cfg.windtunnel.n_classification = 40
    splits = windtunnel_classification_splits(cfg)
    assert len(splits.train) == 40 and len(splits.val) == 8 and splits.image_size == 32
    assert len(splits.classes) == 18 and all("_" in c for c in splits.classes)
    image, label = splits.train[0]
    assert image.shape == (3, 32, 32) and splits.classes[label].split("_")[1] in ("square", "triangle", "cross")
    cfg.windtunnel.n_classification = 0
    with pytest.raises(INPUT_ERRORS, match="n_classification"):
        windtunnel_classification_splits(cfg)


# ----------------------------------------------------------------------------- teacher


def test_timm_teacher_from_checkpoint_files_and_folders(tmp_path):
    net = small_vit_teacher().eval()
    x = torch.randn(3, 1, 8, 8)
    torch.save({"model": net.state_dict(), "epoch": 3}, tmp_path / "t.pth")
    from safetensors.torch import save_file

    save_file(net.state_dict(), tmp_path / "t.safetensors")
    students.export_timm(net, tmp_path / "folder")
    kwargs = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    for path, model, kw in ((tmp_path / "t.pth", "deit_tiny_patch16_224", kwargs),
                            (tmp_path / "t.safetensors", "deit_tiny_patch16_224", kwargs),
                            (tmp_path / "folder", None, None)):
        teacher = TimmTeacher(str(path), model=model, kwargs=kw)
        torch.testing.assert_close(teacher(x).logits, net(x))
        assert teacher.num_classes == 10 and not any(p.requires_grad for p in teacher.parameters())
        teacher.train()
        assert not teacher.model.training
    with pytest.raises(INPUT_ERRORS, match="teacher.model"):
        TimmTeacher(str(tmp_path / "t.pth"))
    with pytest.raises(INPUT_ERRORS, match="does not fit"):
        TimmTeacher(str(tmp_path / "t.pth"), model="deit_tiny_patch16_224", kwargs={**kwargs, "depth": 3})
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(INPUT_ERRORS, match="cannot read"):
        read_state_dict(tmp_path / "junk.pth")


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def deit_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("minivit")
    args = ["run", DEIT, f"out_root={root}", *TINY, "stages.teacher.trainer.max_steps=12",
            "stages.teacher.student.kwargs.embed_dim=32", "stages.teacher.student.kwargs.depth=2",
            "vars.student.embed_dim=16", "vars.student.depth=2", "vars.student.num_heads=2",
            "stages.unshared_ce.student.kwargs.embed_dim=16", "stages.unshared_ce.student.kwargs.depth=2",
            "stages.unshared_ce.student.kwargs.num_heads=2"]
    assert main(args) == 0
    return root / "windtunnel-minivit-deit" / "latest"


def test_minivit_stages_run_and_read_back(deit_run):
    summary = json.loads((deit_run / "summary.json").read_text())
    assert summary["status"] == "completed"
    stages = summary["stages"]
    assert list(stages) == ["teacher", "mini_wd", "mini_kd", "mini_ce", "unshared_ce"]
    mini, unshared = stages["mini_wd"]["params"]["student"], stages["unshared_ce"]["params"]["student"]
    assert mini < unshared < stages["teacher"]["params"]["student"]
    assert stages["mini_wd"]["params"]["teacher"] == stages["teacher"]["params"]["student"]
    assert stages["mini_wd"]["taps"]["qkv"][0] == ["blocks.0.attn.qkv", "blocks.0.attn.qkv"]
    assert len(stages["mini_wd"]["taps"]["hidden"]) == 2  # layers: all over the 2 applications
    assert set(stages["mini_wd"]["final_train"]) >= {"train/pred", "train/qkv", "train/hidden"}
    assert stages["mini_ce"]["params"]["teacher"] is None
    results = (deit_run / "results.md").read_text()
    assert "mini_wd" in results and "unshared_ce" in results


def test_exported_minivit_scores_what_the_summary_says(deit_run):
    from torch.utils.data import DataLoader

    stage = deit_run / "stages" / "mini_wd"
    model = students.load(stage / "student")
    assert type(model).__name__ == "MiniVisionTransformer"
    config = json.loads((stage / "student" / "config.json").read_text())
    assert config["label_names"] == [str(i) for i in range(10)] and config["model_args"]["repeat"] == 2
    assert config["pretrained_cfg"]["mean"] == [0.5] and config["pretrained_cfg"]["input_size"] == [1, 8, 8]
    from dataclasses import replace

    cfg = load_config(stage.parents[1] / "config.yaml")
    val = digits_splits(replace(cfg.data, limit_val=64)).val
    acc = evaluate(model, DataLoader(val, batch_size=32, collate_fn=ImageCollator()))["acc"]
    summary = json.loads((stage / "summary.json").read_text())
    assert acc == pytest.approx(summary["student"]["acc"])
    # `workbench eval` of the stage: the student and its (timm) teacher, as the summary says
    assert main(["eval", str(stage)]) == 0
    report = json.loads((stage / "eval.json").read_text())
    assert report["scored_on"] == summary["scored_on"] and report["scored_on"]["protocol"] == "top1/1"
    assert report["models"]["student"]["scores"]["acc"] == pytest.approx(summary["student"]["acc"])
    assert report["models"]["teacher"]["scores"]["acc"] == pytest.approx(summary["teacher"]["acc"])


def test_swin_weight_distillation_recipe_runs(tmp_path):
    args = ["run", SWIN, f"out_root={tmp_path}", *TINY, "stages.teacher.student.kwargs.embed_dim=16",
            "stages.mini_wd.student.kwargs.embed_dim=8"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "windtunnel-minivit-swin" / "latest" / "summary.json").read_text())
    taps = summary["stages"]["mini_wd"]["taps"]
    assert taps["qkv"][-1] == ["layers.1.blocks.3.attn.qkv", "layers.1.blocks.3.attn.qkv"]
    assert len(taps["hidden"]) == 6


@pytest.mark.parametrize("override, message", [
    (["stages.mini_wd.student.type=mini_deit_tiny"], "not a timm model"),
    (["stages.mini_wd.student.kwargs.repeat=0"], "repeat"),
    (["stages.mini_wd.teacher.quantize=int8"], "does not apply to teacher type 'timm'"),
    (["stages.mini_wd.loss.qkv.student=blocks.{i}.attn.nope"], "nope"),
    (["stages.mini_wd.trainer.fused_logits=true"], "fused_logits"),
    (["stages.mini_wd.trainer.strategy=fsdp", "stages.mini_wd.trainer.devices=2"], "image classifiers train with ddp"),
])
def test_bad_vision_configs_exit_2_before_writing(tmp_path, capsys, override, message):
    """Errors surface when a stage is built: the earlier stages' results stay on disk."""
    args = ["run", DEIT, f"out_root={tmp_path}", *TINY, "trainer.max_steps=2", "stages.teacher.trainer.max_steps=2",
            "stages.teacher.student.kwargs.embed_dim=16", *override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    (run_dir,) = [p for p in (tmp_path / "windtunnel-minivit-deit").iterdir()]
    assert (run_dir / "stages" / "teacher" / "student" / "model.safetensors").is_file()
