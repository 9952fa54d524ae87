"""Datasets by registry key: each returns the training and held-out splits of a `DataConfig`.

`llava` reads LLaVA JSON or JSONL files from any path, `hf_dataset` Hugging Face datasets; `windtunnel` generates the world once per
parameter set under `data.root` (atomically, so an interrupted generation is never reused)
and then reads it through the same LLaVA loader. The image-classification datasets
(`image_folder`, `digits`, `windtunnel_classification`) live in `workbench/data/vision.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from workbench.data.llava import LlavaDataset, VLMCollator
from workbench.data.windtunnel import CELL, WORLD_VERSION, WorldConfig, write_windtunnel
from workbench.errors import WorkbenchError

__all__ = ["LlavaDataset", "VLMCollator", "Splits", "generate_windtunnel", "hf_dataset_splits", "llava_splits",
           "windtunnel_splits", "write_windtunnel"]


@dataclass
class Splits:
    train: LlavaDataset
    val: LlavaDataset | None
    processor_path: Path | None = None  # a processor that ships with the data, if any


def llava_splits(cfg) -> Splits:
    """`data.train` / `data.val` LLaVA-format JSON files, images under `data.image_folder`."""
    if cfg.image_folder is not None and not Path(cfg.image_folder).is_dir():
        raise WorkbenchError(f"config key 'data.image_folder': folder {cfg.image_folder} does not exist")
    images = dict(bad_images=cfg.bad_images, absolute_images=cfg.absolute_images)
    train = LlavaDataset(cfg.train, cfg.image_folder, limit=cfg.limit_train, **images)
    val = LlavaDataset(cfg.val, cfg.image_folder, limit=cfg.limit_val, **images) if cfg.val else None
    return Splits(train, val)


def hf_dataset_splits(cfg) -> Splits:
    """`data.train` / `data.val` as Hugging Face datasets: `save_to_disk` folders or parquet /
    arrow files (globs allowed), columns mapped by `data.columns`; images as paths (relative
    to `data.image_folder`, default the dataset's folder) or as bytes."""
    from workbench.data.sources import hf_records, load_hf_dataset

    if not cfg.train:
        raise WorkbenchError("config key 'data.train' must name a dataset folder or parquet / arrow files")

    def split(path: str, key: str, limit: int | None) -> LlavaDataset:
        ds = load_hf_dataset(path, key)
        records, images = hf_records(ds, dict(cfg.columns), path)
        folder = cfg.image_folder or (path if Path(path).is_dir() else str(Path(path).parent))
        return LlavaDataset(path, folder, limit=limit, bad_images=cfg.bad_images, absolute_images=cfg.absolute_images,
                            records=records, images=images)

    return Splits(split(cfg.train, "data.train", cfg.limit_train),
                  split(cfg.val, "data.val", cfg.limit_val) if cfg.val else None)


def windtunnel_dir(cfg) -> Path:
    """The folder of the world `cfg.windtunnel` describes: one per parameter set."""
    # n_classification = 0 is left out so that worlds made before it existed keep their folder
    params = {"version": WORLD_VERSION, **{k: v for k, v in asdict(cfg.windtunnel).items()
                                           if v is not None and not (k == "n_classification" and v == 0)}}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return Path(cfg.root) / f"windtunnel-{digest}"


def generate_windtunnel(cfg) -> Path:
    """The folder of the world `data.windtunnel` describes, generated first if needed."""
    wt = cfg.windtunnel
    out = windtunnel_dir(cfg)
    if not (out / "world.json").is_file():
        Path(cfg.root).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".windtunnel-", dir=cfg.root))
        try:
            world = WorldConfig(grid=wt.grid, questions_per_image=wt.questions_per_image,
                                question_first=wt.question_first, frames=wt.frames or 1, min_frames=wt.min_frames,
                                motion=0.5 if wt.motion is None else wt.motion, min_shapes=wt.min_shapes or 1,
                                max_shapes=wt.max_shapes or 3,
                                **({"question_types": tuple(wt.question_types)} if wt.question_types else {}))
            write_windtunnel(tmp / "w", n_train=wt.n_train, n_val=wt.n_val, seed=wt.seed, world=world,
                             n_classification=wt.n_classification, patch_size=wt.patch_size or CELL)
            if not (out / "world.json").is_file():  # another process may have finished first
                shutil.rmtree(out, ignore_errors=True)
                os.replace(tmp / "w", out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def windtunnel_splits(cfg) -> Splits:
    """Generate (once) and read the wind tunnel described by `data.windtunnel`."""
    out = generate_windtunnel(cfg)
    train = LlavaDataset(out / "train.json", limit=cfg.limit_train)
    val = LlavaDataset(out / "val.json", limit=cfg.limit_val)
    return Splits(train, val, processor_path=out / "processor")
