"""Image-classification data: image folders through timm, scikit-learn's digits, and the wind
tunnel's classification set.

Each loader returns `ImageSplits`: datasets of (image tensor (C, H, W), class index) plus
the class names and image geometry the student is built for. `ImageCollator` stacks them
into {"pixel_values": (B, C, H, W), "labels": (B,)}.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from workbench.errors import WorkbenchError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ImageSplits:
    train: Dataset
    val: Dataset | None
    classes: list[str]
    image_size: int
    in_chans: int = 3
    notes: dict[str, Any] = field(default_factory=dict)  # for summary.json
    preprocess: dict[str, Any] = field(default_factory=lambda: {"mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    # ^ normalisation (and crop) the images went through; exported with the student

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class ImageCollator:
    """(image, label) pairs -> {"pixel_values": (B, C, H, W), "labels": (B,)}."""

    def __call__(self, items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        images, labels = zip(*items)
        return {"pixel_values": torch.stack(list(images)), "labels": torch.as_tensor(labels, dtype=torch.long)}


def _transform(cfg, image_size: int, training: bool, crop_pct: float):
    from timm.data import create_transform

    augment = training and cfg.augment
    return create_transform(input_size=(3, image_size, image_size), is_training=augment,
                            auto_augment=cfg.auto_augment if augment else None,
                            crop_pct=crop_pct, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic")


def _folder(path: str | Path, key: str, cfg, image_size: int, training: bool, crop_pct: float,
            classes: list[str] | None = None, limit: int | None = None) -> Dataset:
    from timm.data import create_dataset

    if not Path(path).is_dir():
        raise WorkbenchError(f"config key '{key}': image folder {path} does not exist")
    kwargs = {"class_map": {c: i for i, c in enumerate(classes)}} if classes else {}
    try:
        ds = create_dataset("", root=str(path), is_training=training, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm raises plain Exceptions for empty / unreadable folders
        raise WorkbenchError(f"config key '{key}': cannot read image folder {path}: {e}".splitlines()[0]) from None
    if len(ds) == 0:
        raise WorkbenchError(f"config key '{key}': image folder {path} holds no images (expected <class>/<image> files)")
    ds.transform = _transform(cfg, image_size, training, crop_pct)
    if limit is not None:
        ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
    return ds


def _class_names(ds: Dataset) -> list[str]:
    ds = getattr(ds, "dataset", ds)
    mapping = ds.reader.class_to_idx
    return [name for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])]


def image_folder_splits(cfg, crop_pct: float = 0.875) -> ImageSplits:
    """`data.train` / `data.val`: ImageNet-style folders (<class>/<image>), read with timm's
    `create_dataset` and transformed with `create_transform` at `data.image_size` (default
    224); training images are augmented when `data.augment` (RandomResizedCrop, flip,
    `data.auto_augment` such as "rand-m9-mstd0.5-inc1"). Validation uses the training
    classes' indices, so a missing class in `val` cannot shift labels."""
    if not cfg.train:
        raise WorkbenchError("config key 'data.train' must name an image folder (<class>/<image> files)")
    size = cfg.image_size or 224
    train = _folder(cfg.train, "data.train", cfg, size, True, crop_pct, limit=cfg.limit_train)
    classes = _class_names(train)
    val = None
    if cfg.val:
        if Path(cfg.val).is_dir():
            extra = sorted({d.name for d in Path(cfg.val).iterdir() if d.is_dir()} - set(classes))
            if extra:
                raise WorkbenchError(f"config key 'data.val': classes {extra[:3]} are not in data.train")
        val = _folder(cfg.val, "data.val", cfg, size, False, crop_pct, classes, limit=cfg.limit_val)
    return ImageSplits(train, val, classes, size,
                       preprocess={"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": crop_pct})


def digits_splits(cfg) -> ImageSplits:
    """scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes): a real, offline
    dataset. `data.val_fraction` of it (stratified by `data.split_seed`) is held out;
    `data.image_size` (default 8) upsamples it."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    images = (images - 0.5) / 0.5
    size = cfg.image_size or 8
    if size != 8:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    rng = random.Random(cfg.split_seed)
    val_idx: list[int] = []
    for c in range(10):  # stratified: the same share of every digit
        idx = (labels == c).nonzero().flatten().tolist()
        val_idx += rng.sample(idx, round(cfg.val_fraction * len(idx)))
    held = set(val_idx)
    train_idx = [i for i in range(len(labels)) if i not in held]
    rng.shuffle(train_idx)
    train_idx = train_idx[: cfg.limit_train] if cfg.limit_train is not None else train_idx
    val_idx = sorted(val_idx)[: cfg.limit_val] if cfg.limit_val is not None else sorted(val_idx)
    train = _Pairs(TensorDataset(images[train_idx], labels[train_idx]))
    val = _Pairs(TensorDataset(images[val_idx], labels[val_idx])) if val_idx else None
    return ImageSplits(train, val, [str(c) for c in range(10)], size, in_chans=1,
                       notes={"data": {"train": len(train), "val": len(val) if val else 0}},
                       preprocess={"mean": (0.5,), "std": (0.5,), "crop_pct": 1.0})


class _Pairs(Dataset):
    """A TensorDataset whose items are (image, int label) like timm's datasets."""

    def __init__(self, ds: TensorDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.ds[i]
        return image, int(label)


def windtunnel_classification_splits(cfg) -> ImageSplits:
    """The wind tunnel's image-folder classification set (one shape per image; class =
    "<colour>_<shape>", 18 classes), generated once under `data.root` with
    `data.windtunnel.n_classification` training images, then read as image folders."""
    from workbench.data import generate_windtunnel

    if cfg.windtunnel.n_classification < 18:
        raise WorkbenchError("config key 'data.windtunnel.n_classification' must be >= 18 (one image per class) "
                             "for windtunnel_classification")
    root = generate_windtunnel(cfg) / "classification"
    native = json.loads((root.parent / "world.json").read_text())["image_size"]
    folders = replace(cfg, train=str(root / "train"), val=str(root / "val"), image_size=cfg.image_size or native)
    return image_folder_splits(folders, crop_pct=1.0)
