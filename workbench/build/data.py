"""The data side of a build: splits, the processor the student reads, the collators.

VLM data (LLaVA conversations) needs a processor: the teacher's, else `student.processor`,
the student folder's own, or the one that ships with the data (the wind tunnel's). Image
classification data carries its own geometry and class names and needs none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.config import RunConfig
from workbench.data import Splits
from workbench.data.vision import ImageCollator, ImageSplits
from workbench.errors import WorkbenchError
from workbench.registry import DATASETS
from workbench.build.teacher import is_feature_teacher


@dataclass
class Data:
    """The splits, and for VLMs the processor the student reads."""

    splits: Splits | ImageSplits
    processor: Any = None  # None for image classification
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def classification(self) -> bool:
        """Image classification (timm models, class logits) rather than a VLM on conversations."""
        return isinstance(self.splits, ImageSplits)

    @property
    def num_classes(self) -> int | None:
        return self.splits.num_classes if self.classification else None


def build_data(cfg: RunConfig) -> Data:
    """The data set `data.type` names, checked against the options that apply to it."""
    splits = DATASETS.get(cfg.data.type, "data.type")(cfg.data)
    if isinstance(splits, ImageSplits):
        _check_classification_options(cfg)
        return Data(splits, notes=dict(splits.notes))
    notes: dict[str, Any] = {}
    skipped = {name: ds.skipped_images for name, ds in (("train", splits.train), ("val", splits.val))
               if getattr(ds, "skipped_images", None)}
    if skipped:  # data.bad_images=skip: counted, with the first few reasons
        notes["skipped_images"] = {name: {"count": len(s), "first": s[:5]} for name, s in skipped.items()}
    return Data(splits, resolve_processor(cfg, splits), notes)


def _check_classification_options(cfg: RunConfig) -> None:
    if cfg.trainer.fused_logits:
        raise WorkbenchError("config key 'trainer.fused_logits' is for VLM vocabularies; class logits are small, "
                             "set it to false")
    if cfg.hybrid is not None:
        raise WorkbenchError("config key 'hybrid' converts a language model's attention; image classifiers have none")
    if cfg.trainer.strategy == "fsdp":
        raise WorkbenchError("config key 'trainer.strategy': fsdp shards Hugging Face students; image classifiers "
                             "train with ddp")


def load_processor(path: str | Path, key: str):
    from transformers import AutoProcessor

    import students.encoder_free  # noqa: F401 - registers the encoder-free processor

    if not Path(path).is_dir():
        raise WorkbenchError(f"config key '{key}': processor folder {path} does not exist")
    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"config key '{key}': cannot load a processor from {path}: {e}") from None


def resolve_processor(cfg: RunConfig, splits: Splits):
    """The student shares its teacher's processor; else (no teacher, or a vision encoder that
    has no tokenizer) `student.processor`, the student folder's own, or the one that ships
    with the data (the wind tunnel's)."""
    if cfg.teacher is not None and not is_feature_teacher(cfg.teacher):
        from teachers.hf_vlm import load_teacher_processor

        t = cfg.teacher
        return load_teacher_processor(t.path, t.revision, t.trust_remote_code)
    if cfg.student.processor:
        return load_processor(cfg.student.processor, "student.processor")
    if cfg.student.path and any((Path(cfg.student.path) / f).is_file()
                                for f in ("processor_config.json", "preprocessor_config.json")):
        return load_processor(cfg.student.path, "student.path")
    if splits.processor_path is not None:
        return load_processor(splits.processor_path, "data")
    raise WorkbenchError("no processor: set teacher.path, student.processor or student.path")


def make_collator(cfg: RunConfig, data: Data, processor):
    """Batches for the student; a `data.max_length` that cuts every answer fails here."""
    if data.classification:
        return ImageCollator()
    from workbench.data.llava import VLMCollator

    collator = VLMCollator(processor, max_length=cfg.data.max_length)
    if cfg.data.max_length is not None:
        train = data.splits.train
        collator([train[i] for i in range(min(len(train), cfg.data.batch_size))])
    return collator
