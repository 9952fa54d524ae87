"""The one place where a `RunConfig` becomes objects: data, teacher, student, loss.

Everything that can be wrong with a config or its files (unknown names, missing paths,
corrupt checkpoints, teacher/student vocabulary mismatches) fails here, before a run
directory is created.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from losses.combine import WeightedLoss
from workbench.config import RunConfig
from workbench.data import Splits, VLMCollator
from workbench.errors import WorkbenchError
from workbench.registry import DATASETS, LOSSES, STUDENTS, TEACHERS


@dataclass
class Built:
    """Everything a run needs, built and cross-checked."""

    splits: Splits
    processor: Any
    collator: VLMCollator
    student: nn.Module
    loss: WeightedLoss
    teacher: nn.Module | None = None


def build_teacher(cfg: RunConfig) -> nn.Module | None:
    t = cfg.teacher
    if t is None:
        return None
    builder = TEACHERS.get(t.type, "teacher.type")
    return builder(path=t.path, revision=t.revision, dtype=t.dtype, quantize=t.quantize,
                   skip_modules=t.skip_modules, trust_remote_code=t.trust_remote_code)


def load_processor(path: str | Path, key: str):
    from transformers import AutoProcessor

    if not Path(path).is_dir():
        raise WorkbenchError(f"config key '{key}': processor folder {path} does not exist")
    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"config key '{key}': cannot load a processor from {path}: {e}") from None


def resolve_processor(cfg: RunConfig, teacher, splits: Splits):
    """The student shares its teacher's processor; else `student.processor`, the student
    folder's own, or the one that ships with the data (the wind tunnel's)."""
    if teacher is not None:
        return teacher.processor
    if cfg.student.processor:
        return load_processor(cfg.student.processor, "student.processor")
    if cfg.student.path and (Path(cfg.student.path) / "preprocessor_config.json").is_file():
        return load_processor(cfg.student.path, "student.path")
    if splits.processor_path is not None:
        return load_processor(splits.processor_path, "data")
    raise WorkbenchError("no processor: set teacher.path, student.processor or student.path")


def processor_fields(processor) -> dict[str, Any]:
    """Student builder arguments that must agree with the shared processor."""
    tok = processor.tokenizer
    crop = getattr(processor.image_processor, "crop_size", None) or processor.image_processor.size
    return {
        "vocab_size": len(tok),
        "image_token_id": processor.image_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "image_size": crop["height"],
        "patch_size": processor.patch_size,
    }


def build_student(cfg: RunConfig, processor) -> nn.Module:
    s = cfg.student
    if s.path:
        import students

        if s.kwargs:
            raise WorkbenchError("config keys 'student.kwargs' and 'student.path' exclude each other")
        return students.load(s.path)
    STUDENTS.get(s.type, "student.type")
    return STUDENTS.build(s.type, "student.kwargs", fixed=processor_fields(processor), **s.kwargs)


def _image_token_id(config) -> int | None:
    for key in ("image_token_index", "image_token_id"):
        if getattr(config, key, None) is not None:
            return getattr(config, key)
    return None


def check_vocabularies(student: nn.Module, processor, teacher=None) -> None:
    """Teacher, student and processor must agree on vocabulary size and special-token ids."""
    tok = processor.tokenizer
    v_s = student.get_output_embeddings().weight.shape[0]
    if v_s < len(tok):
        raise WorkbenchError(f"student vocabulary ({v_s}) is smaller than the tokenizer's ({len(tok)})")
    if _image_token_id(student.config) != processor.image_token_id:
        raise WorkbenchError(
            f"student image token id {_image_token_id(student.config)} != processor's {processor.image_token_id}"
        )
    if teacher is None:
        return
    v_t = teacher.vocab_size
    if v_t != v_s:
        raise WorkbenchError(
            f"teacher and student vocabularies differ: teacher has {v_t} logits, student {v_s}; "
            "distillation needs the same tokenizer (build the student from the teacher's processor)"
        )
    if teacher.image_token_id != _image_token_id(student.config):
        raise WorkbenchError(
            f"teacher image token id {teacher.image_token_id} != student's {_image_token_id(student.config)}"
        )


def build_loss(cfg: RunConfig, has_teacher: bool) -> WeightedLoss:
    terms = {}
    for name, term in cfg.loss.items():
        module = LOSSES.get(term.type, f"loss.{name}.type")(term)
        if getattr(module, "needs_teacher", False) and term.weight and not has_teacher:
            raise WorkbenchError(
                f"loss term '{name}' ({term.type}) needs a teacher but 'teacher' is null; "
                "set teacher.path or give the term weight 0"
            )
        terms[name] = (term.weight, module)
    try:
        return WeightedLoss(terms)
    except ValueError as e:
        raise WorkbenchError(f"config key 'loss': {e}") from None


def build(cfg: RunConfig) -> Built:
    """Config -> data, teacher, student, loss; raises `WorkbenchError` on any bad input."""
    torch.manual_seed(cfg.seed)
    splits = DATASETS.get(cfg.data.type, "data.type")(cfg.data)
    teacher = build_teacher(cfg)
    processor = resolve_processor(cfg, teacher, splits)
    loss = build_loss(cfg, teacher is not None)
    student = build_student(cfg, processor)
    check_vocabularies(student, processor, teacher)
    collator = VLMCollator(processor, max_length=cfg.data.max_length)
    return Built(splits, processor, collator, student, loss, teacher)
