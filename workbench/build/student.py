"""The student: created (a registered builder, a timm name, or an exported folder), changed by
the registered student transforms in their declared order, started from other weights
(`init_from`), partly frozen (`trainable`)."""

from __future__ import annotations

from dataclasses import asdict
from fnmatch import fnmatch
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError  # transformers' config validation
from torch import nn

from workbench.build.data import Data
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.registry import STUDENTS, TRANSFORMS, closest

INIT_FROM_ORDER = 50  # transforms ordered below this run before `init_from`, the others after
TYPED_TRANSFORMS = ("hybrid", "matformer")  # transforms with a typed top-level config block


def create_student(cfg: RunConfig, data: Data, teacher: Any = None) -> nn.Module:
    """`student.path` (an exported folder) or `student.type` with `student.kwargs`: a registered
    VLM builder given the processor's fields (and, for a builder registered `from_teacher`, the
    teacher's model as `target`), or a timm classifier sized for the data."""
    import students

    s = cfg.student
    if s.path:
        if s.kwargs:
            raise WorkbenchError("config keys 'student.kwargs' and 'student.path' exclude each other; to load a "
                                 "folder with a recipe that sets kwargs, clear them: student.kwargs={}")
        from students.vlm import freeze_unread

        student = students.load(s.path)
        freeze_unread(student)  # what `from_pretrained` made trainable again (DDP needs every trainable one used)
        return student
    try:
        if data.classification:
            return _timm_student(s.type, s.kwargs, data)
        fixed = _processor_fields(s.type, data.processor)
        if STUDENTS.info.get(s.type, {}).get("from_teacher"):
            fixed["target"] = _teacher_model(cfg, s.type, teacher)
        return STUDENTS.build(s.type, "student.kwargs", fixed=fixed, **s.kwargs)
    except (TypeError, ValueError, OSError, RuntimeError, AssertionError, StrictDataclassError) as e:
        # a negative width, heads not dividing it
        raise WorkbenchError(f"config key 'student.kwargs': cannot build {s.type}: {e}".splitlines()[0]) from None


def _teacher_model(cfg: RunConfig, student_type: str, teacher: Any) -> nn.Module:
    if cfg.teacher is None or teacher is None:
        raise WorkbenchError(f"config key 'student.type': {student_type} is built on the teacher, but 'teacher' is null")
    return getattr(teacher(), "model", teacher())


def _timm_student(name: str, kwargs: dict[str, Any], data: Data) -> nn.Module:
    import timm

    import students
    import students.minivit  # noqa: F401 - registers the MiniViT models

    if not timm.is_model(name):
        raise WorkbenchError(f"config key 'student.type': {name!r} is not a timm model; image classification "
                             f"students are timm names.{closest(name, timm.list_models())}")
    splits = data.splits
    return students.create_vision_student(name, splits.num_classes, splits.image_size, splits.in_chans, **kwargs)


def processor_fields(processor) -> dict[str, Any]:
    """Student builder arguments that must agree with the shared processor."""
    tok = processor.tokenizer
    fixed = {"vocab_size": len(tok), "image_token_id": processor.image_token_id, "pad_token_id": tok.pad_token_id,
             "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    crop = getattr(processor.image_processor, "crop_size", None) or getattr(processor.image_processor, "size", None)
    if crop and getattr(processor, "patch_size", None):
        fixed.update(image_size=crop["height"], patch_size=processor.patch_size)
    return fixed


def _processor_fields(student_type: str, processor) -> dict[str, Any]:
    """`processor_fields` that the builder takes (builders with their own image layout
    declare the fewer they take as `processor_fields`)."""
    fixed = processor_fields(processor)
    builder = STUDENTS.get(student_type, "student.type")
    wanted = getattr(builder, "processor_fields", None)
    if wanted is not None:
        return {k: v for k, v in fixed.items() if k in wanted}
    if "image_size" not in fixed:
        raise WorkbenchError(f"student.type {student_type!r} needs a processor with a fixed image and patch size; "
                             f"{type(processor).__name__} has none (an encoder-free student's processor?)")
    return fixed


def transform_key(name: str) -> str:
    """The config key of transform `name`: `hybrid` / `matformer` (typed blocks), else `transforms.<name>`."""
    return name if name in TYPED_TRANSFORMS else f"transforms.{name}"


def requested_transforms(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Transform name -> options: `hybrid:` and `matformer:` (typed keys) and `transforms:`."""
    wanted = {name: dict(options or {}) for name, options in cfg.transforms.items()}
    for name in TYPED_TRANSFORMS:
        block = getattr(cfg, name)
        if block is not None:
            if name in wanted:
                raise WorkbenchError(f"config keys '{name}' and 'transforms.{name}' both set transform {name!r}")
            wanted[name] = asdict(block)
    return wanted


def apply_transforms(student: nn.Module, wanted: dict[str, dict[str, Any]], before_init: bool,
                     notes: dict[str, Any]) -> None:
    """Apply the requested transforms of one side of `init_from`, in their registered order."""
    for name in wanted:
        TRANSFORMS.get(name, "transforms")
    for order, name in sorted((TRANSFORMS.info[n].get("order", INIT_FROM_ORDER), n) for n in wanted):
        if (order < INIT_FROM_ORDER) != before_init:
            continue
        where = transform_key(name)
        try:
            note = TRANSFORMS.build(name, where, fixed={"student": student}, **wanted[name])
        except ValueError as e:
            raise WorkbenchError(f"config key '{where}': {e}") from None
        if note:
            notes[name] = note


def init_student(student: nn.Module, source: str, key: str = "init_from") -> dict[str, int]:
    """Copy every same-named, same-shaped weight of the model folder `source` into `student`.

    Returns counts of copied and left-alone tensors; shape mismatches and a source that
    shares no weight with the student are errors.
    """
    import students

    donor = students.load(source).state_dict()
    own = student.state_dict()
    shared = [k for k in own if k in donor]
    bad = [k for k in shared if own[k].shape != donor[k].shape]
    if bad:
        raise WorkbenchError(
            f"config key '{key}': {source} does not fit the student: {bad[0]} is "
            f"{tuple(donor[bad[0]].shape)} there and {tuple(own[bad[0]].shape)} in the student"
            + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")
        )
    if not shared:
        raise WorkbenchError(f"config key '{key}': {source} shares no weight name with the student")
    with torch.no_grad():
        for k in shared:
            own[k].copy_(donor[k])
    return {"copied": len(shared), "kept": len(own) - len(shared)}


def init_from(cfg: RunConfig, student: nn.Module, data: Data, teacher: Any) -> dict[str, Any] | None:
    """`init_from`: a model folder, `teacher` (its folder; for a multiplexed image student, the
    teacher's weights through `students.minivit.init_from_dense`), or nothing."""
    if not cfg.init_from:
        return None
    if cfg.init_from != "teacher":
        return {"path": str(cfg.init_from), **init_student(student, cfg.init_from)}
    if cfg.teacher is None:
        raise WorkbenchError("config key 'init_from' is 'teacher' but 'teacher' is null")
    if not data.classification:
        return {"path": str(cfg.teacher.path), **init_student(student, cfg.teacher.path)}
    from students.minivit import init_from_dense

    try:
        return {"path": str(cfg.teacher.path), **init_from_dense(student, teacher().model.state_dict())}
    except ValueError as e:
        raise WorkbenchError(f"config key 'init_from': {e}") from None


def check_fusable_head(student: nn.Module) -> None:
    """`trainer.fused_logits` multiplies hidden states by the LM head's matrix: the head must be a
    plain Linear layer, or say which matrix it computes with (`fused_weight`, a fake-quantized head)."""
    head = student.get_output_embeddings() if hasattr(student, "get_output_embeddings") else None
    if head is not None and type(head) is not nn.Linear and not hasattr(head, "fused_weight"):
        raise WorkbenchError(f"config key 'trainer.fused_logits': the student's LM head is a {type(head).__name__} "
                             "(e.g. a ternary lm_head), which is not one matrix product; set trainer.fused_logits=false "
                             "or keep lm_head out of the transform")


def apply_trainable(student: nn.Module, patterns: list[str]) -> None:
    """Freeze every parameter whose name matches none of the glob `patterns`."""
    names = [n for n, _ in student.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch(n, pattern) for n in names):
            raise WorkbenchError(
                f"config key 'trainable': pattern {pattern!r} matches no parameter; names look like "
                + ", ".join(names[:: max(1, len(names) // 4)][:4])
            )
    for name, p in student.named_parameters():
        if not any(fnmatch(name, pattern) for pattern in patterns):
            p.requires_grad_(False)


def student_processor(student: nn.Module, processor):
    """The processor the student reads: the shared one, or for an encoder-free student its
    own around the shared tokenizer and chat template (any-aspect-ratio images, one image
    token per tokenizer token)."""
    from students.encoder_free import EncoderFreeForConditionalGeneration, EncoderFreeProcessor

    if not isinstance(student, EncoderFreeForConditionalGeneration) or isinstance(processor, EncoderFreeProcessor):
        return processor
    return EncoderFreeProcessor.for_model(student.config, processor.tokenizer, processor.chat_template)


def build_student(cfg: RunConfig, data: Data, teacher: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The student as the config describes it, and notes for the summary. `teacher()` builds
    (once) the configured teacher, for `init_from: teacher` of an image student."""
    notes: dict[str, Any] = {}
    student = create_student(cfg, data, teacher)
    wanted = requested_transforms(cfg)
    apply_transforms(student, wanted, True, notes)
    init = init_from(cfg, student, data, teacher)
    if init is not None:
        notes["init_from"] = init
    apply_transforms(student, wanted, False, notes)
    if cfg.trainer.fused_logits:
        check_fusable_head(student)
    if cfg.trainable:
        apply_trainable(student, cfg.trainable)
    return student, notes
