"""The teacher a config names, built with the `teacher.*` keys its builder takes, and the
checks that teacher, student and processor share one vocabulary."""

from __future__ import annotations

import inspect
from dataclasses import fields

from torch import nn

from workbench.config import RunConfig, TeacherConfig
from workbench.errors import WorkbenchError
from workbench.registry import TEACHERS

_TARGET_KEYS = ("type", "cache", "top_k", "device")  # read by the targets, not passed to the builder


def build_teacher(cfg: RunConfig) -> nn.Module | None:
    """The teacher `teacher.type` names, given the `teacher.*` keys its builder takes."""
    if cfg.teacher is None:
        return None
    return TEACHERS.get(cfg.teacher.type)(**teacher_arguments(cfg.teacher))


def teacher_arguments(t: TeacherConfig) -> dict:
    """The `teacher.*` keys the builder of `teacher.type` takes; a key set to a non-default
    value that this type does not read is an error."""
    builder = TEACHERS.get(t.type, "teacher.type")
    takes = inspect.signature(builder).parameters
    default = TeacherConfig(path=t.path)
    args = {}
    for f in fields(TeacherConfig):
        value = getattr(t, f.name)
        if f.name in _TARGET_KEYS:
            continue
        if f.name in takes:
            args[f.name] = value
        elif value != getattr(default, f.name):
            raise WorkbenchError(f"config key 'teacher.{f.name}' does not apply to teacher type {t.type!r}")
    return args


def is_feature_teacher(t: TeacherConfig) -> bool:
    """A teacher that returns features on images (a vision encoder), not logits: declared
    when its type is registered (`feature_teacher=True`)."""
    TEACHERS.get(t.type, "teacher.type")
    return bool(TEACHERS.info[t.type].get("feature_teacher", False))


def image_token_id(config) -> int | None:
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
    if image_token_id(student.config) != processor.image_token_id:
        raise WorkbenchError(
            f"student image token id {image_token_id(student.config)} != processor's {processor.image_token_id}"
        )
    if teacher is None:
        return
    v_t = teacher.vocab_size
    if v_t != v_s:
        raise WorkbenchError(
            f"teacher and student vocabularies differ: teacher has {v_t} logits, student {v_s}; "
            "distillation needs the same tokenizer (build the student from the teacher's processor)"
        )
    if teacher.image_token_id != image_token_id(student.config):
        raise WorkbenchError(
            f"teacher image token id {teacher.image_token_id} != student's {image_token_id(student.config)}"
        )
