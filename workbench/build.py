"""The one place where a `RunConfig` becomes objects: data, teacher, student, loss.

Everything that can be wrong with a config or its files (unknown names, missing paths,
corrupt checkpoints, teacher/student vocabulary mismatches) fails here, before a run
directory is created.
"""

from __future__ import annotations

from collections.abc import Callable
import inspect
from dataclasses import dataclass, field, fields
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError  # transformers' config validation
from torch import nn

from losses.combine import WeightedLoss
from workbench.config import RunConfig, TeacherConfig
from workbench.data import Splits, VLMCollator
from workbench.data.vision import ImageCollator, ImageSplits
from workbench.teacher_data import attach_teacher
from workbench.errors import WorkbenchError
from workbench.registry import DATASETS, LOSSES, STUDENTS, TEACHERS, closest
from workbench.taps import LAYER, TapPoint, layer_pairs, layer_taps, make_projector, probe


@dataclass
class Built:
    """Everything a run needs, built and cross-checked."""

    splits: Splits | ImageSplits
    processor: Any  # None for image classification
    collator: VLMCollator | ImageCollator
    student: nn.Module
    loss: WeightedLoss
    teacher: nn.Module | None = None
    callbacks: list[Any] = field(default_factory=list)  # Lightning callbacks the data/loss setup needs
    pool_fn: Callable[[int], list[int]] | None = None  # per-epoch training pool (parity alignment)
    notes: dict[str, Any] = field(default_factory=dict)  # extra summary.json entries (data split, cache)
    eval_collator: Any = None  # held-out batches (default: `collator`; it differs when training reads a cache)

    @property
    def classification(self) -> bool:
        """Image classification (timm models, class logits) rather than a VLM on conversations."""
        return isinstance(self.splits, ImageSplits)


_TEACHER_DATA_KEYS = ("type", "cache", "top_k")  # read by the workbench, not passed to the builder


def build_teacher(cfg: RunConfig) -> nn.Module | None:
    """The teacher `teacher.type` names, given the `teacher.*` keys its builder takes; a key
    set to a non-default value that this type does not read is an error."""
    t = cfg.teacher
    if t is None:
        return None
    builder = TEACHERS.get(t.type, "teacher.type")
    takes = inspect.signature(builder).parameters
    default = TeacherConfig(path=t.path)
    args = {}
    for f in fields(TeacherConfig):
        value = getattr(t, f.name)
        if f.name in _TEACHER_DATA_KEYS:
            continue
        if f.name in takes:
            args[f.name] = value
        elif value != getattr(default, f.name):
            raise WorkbenchError(f"config key 'teacher.{f.name}' does not apply to teacher type {t.type!r}")
    return builder(**args)


def is_feature_teacher(t: TeacherConfig) -> bool:
    """A teacher that returns features on images (a vision encoder), not logits."""
    return bool(getattr(TEACHERS.get(t.type, "teacher.type"), "feature_teacher", False))


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


def processor_fields(processor) -> dict[str, Any]:
    """Student builder arguments that must agree with the shared processor."""
    tok = processor.tokenizer
    fields = {
        "vocab_size": len(tok),
        "image_token_id": processor.image_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    crop = getattr(processor.image_processor, "crop_size", None) or getattr(processor.image_processor, "size", None)
    if crop and getattr(processor, "patch_size", None):
        fields.update(image_size=crop["height"], patch_size=processor.patch_size)
    return fields


def build_student(cfg: RunConfig, processor) -> nn.Module:
    s = cfg.student
    if s.path:
        import students

        if s.kwargs:
            raise WorkbenchError("config keys 'student.kwargs' and 'student.path' exclude each other; to load a "
                                 "folder with a recipe that sets kwargs, clear them: student.kwargs={}")
        return students.load(s.path)
    builder = STUDENTS.get(s.type, "student.type")
    fixed = processor_fields(processor)
    wanted = getattr(builder, "processor_fields", None)  # builders with their own image layout take fewer
    if wanted is not None:
        fixed = {k: v for k, v in fixed.items() if k in wanted}
    elif "image_size" not in fixed:
        raise WorkbenchError(f"student.type {s.type!r} needs a processor with a fixed image and patch size; "
                             f"{type(processor).__name__} has none (an encoder-free student's processor?)")
    try:
        return STUDENTS.build(s.type, "student.kwargs", fixed=fixed, **s.kwargs)
    except (ValueError, OSError, RuntimeError, StrictDataclassError) as e:  # a negative width, heads not dividing it
        raise WorkbenchError(f"config key 'student.kwargs': cannot build {s.type}: {e}".splitlines()[0]) from None


def student_processor(student: nn.Module, processor):
    """The processor the student reads: the shared one, or for an encoder-free student its
    own around the shared tokenizer and chat template (any-aspect-ratio images, one image
    token per tokenizer token)."""
    from students.encoder_free import EncoderFreeForConditionalGeneration
    from students.encoder_free_processing import EncoderFreeProcessor

    if not isinstance(student, EncoderFreeForConditionalGeneration) or isinstance(processor, EncoderFreeProcessor):
        return processor
    return EncoderFreeProcessor.for_model(student.config, processor.tokenizer, processor.chat_template)


def attach_vision_terms(built: Built) -> None:
    """Give the vision-feature terms (EVE's aligning layer, BREEN's query targets) the built
    student and teacher; a vision teacher must be read by such a term and only by them."""
    teacher = built.teacher
    feature = bool(getattr(teacher, "feature_teacher", False))
    terms = {n: t for n, t in built.loss.terms.items() if getattr(t, "needs_vision_features", False)}
    if feature:
        logit_terms = [n for n, t in built.loss.terms.items() if t.needs_teacher and n not in terms]
        if logit_terms:
            raise WorkbenchError(f"loss terms {', '.join(logit_terms)} read teacher logits, but teacher.type "
                                 f"{type(teacher).__name__} gives image features only")
    for name, term in terms.items():
        try:
            term.attach(built.student, teacher)
        except ValueError as e:
            raise WorkbenchError(f"loss.{name}: {e}") from None


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


def apply_matformer(cfg: RunConfig, student: nn.Module, notes: dict[str, Any]) -> None:
    """Nest the student's FFNs (`matformer:`): a VLM's language model, or `matformer.target`."""
    if cfg.matformer is None:
        return
    from students.matformer import default_target, matformerize, nested_mlps
    from workbench.taps import get_module

    m = cfg.matformer
    try:
        already = nested_mlps(student)  # e.g. a universal model loaded from student.path
    except ValueError:
        already = None
    if already:
        object.__setattr__(student, "matformer_granularities", tuple(sorted(m.granularities, reverse=True)))
        notes["matformer"] = {"nested_mlps": len(already), "granularities": sorted(m.granularities, reverse=True)}
        return
    target = get_module(student, m.target, "student") if m.target is not None else default_target(student)
    try:
        paths = matformerize(target, m.granularities)
    except ValueError as e:
        raise WorkbenchError(f"config key 'matformer': {e}") from None
    object.__setattr__(student, "matformer_granularities", tuple(sorted(m.granularities, reverse=True)))
    notes["matformer"] = {"nested_mlps": len(paths), "granularities": sorted(m.granularities, reverse=True)}


def apply_hybrid(cfg: RunConfig, student: nn.Module, notes: dict[str, Any]) -> None:
    """Convert attention layers of the student's language model to Mamba-2 (`hybrid:`). A
    student that already has Mamba layers (loaded from a converted folder) keeps them; with
    `keep_attention: false` it drops attention a layer-wise stage kept beside them."""
    if cfg.hybrid is None:
        return
    from students.hybrid import convert, drop_attention, mamba_layers

    h = cfg.hybrid
    try:
        already = mamba_layers(student)
        if already:
            if not h.keep_attention:
                drop_attention(student)
            layers = already
        else:
            layers = convert(student, h.layers, init=h.init, mimic=h.mimic, keep_attention=h.keep_attention,
                             chunk_size=h.chunk_size, d_conv=h.d_conv)
    except ValueError as e:
        raise WorkbenchError(f"config key 'hybrid': {e}") from None
    total = len(student.get_decoder().layers)
    notes["hybrid"] = {"mamba_layers": layers, "attention_layers": total - len(layers), "init": h.init,
                       "mimic": h.mimic, "keep_attention": h.keep_attention, "converted_before": bool(already)}


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


def _bound_pairs(name: str, term, student: nn.Module, teacher: nn.Module | None) -> list[tuple[str, str]]:
    """A term's (student tap, teacher tap) strings, with `{i}` filled in by its layer mapping
    ("mamba": the student's Mamba layers, same index on the other side)."""
    s_tpl, t_tpl = term.student_template, term.teacher_template
    if term.target_on_student:
        teacher = student
    if (LAYER in s_tpl) != (LAYER in t_tpl):
        raise WorkbenchError(f"loss.{name}: both tap templates or neither must hold {LAYER}, got {s_tpl!r} and {t_tpl!r}")
    if LAYER not in s_tpl:
        if term.layers is not None:
            raise WorkbenchError(f"loss.{name}.layers is set but the tap templates have no {LAYER}")
        return [(s_tpl, t_tpl)]
    s_taps, t_taps = layer_taps(student, s_tpl, "student"), layer_taps(teacher, t_tpl, "teacher")
    if term.layers == "mamba":
        from students.hybrid import mamba_layers

        try:
            mamba = mamba_layers(student)
        except ValueError:
            mamba = []
        if not mamba:
            raise WorkbenchError(f"loss.{name}.layers is 'mamba' but the student has no Mamba layers; set 'hybrid:'")
        if max(mamba) >= min(len(s_taps), len(t_taps)):
            raise WorkbenchError(f"loss.{name}: the templates {s_tpl!r} / {t_tpl!r} do not range over the decoder "
                                 "layers the Mamba layers are numbered by")
        return [(s_taps[i], t_taps[i]) for i in mamba]
    pairs = layer_pairs(len(s_taps), len(t_taps), term.layers if term.layers is not None else "uniform")
    return [(s_taps[i], t_taps[j]) for i, j in pairs]


def bind_taps(built: Built) -> None:
    """Resolve the tap templates of the feature/relation/attention terms against both models,
    run each once on one training sample (so a bad tap fails before a run starts), and give
    the terms that ask for them projectors sized from what the taps saw."""
    terms = built.loss.tapped_terms()
    on_teacher = [name for name, term in terms.items() if not term.target_on_student]
    if built.teacher is None and on_teacher:
        raise WorkbenchError(
            f"loss terms {', '.join(on_teacher)} read features inside the teacher, so they need it loaded: "
            "a teacher-logit cache (teacher.cache) holds logits only; unset teacher.cache"
        )
    teacher_root = getattr(built.teacher, "model", built.teacher)
    for name, term in terms.items():
        term.pairs = _bound_pairs(name, term, built.student, teacher_root)
    student_points, teacher_points = built.loss.tap_points()
    batch = built.collator([built.splits.train[0]])
    from workbench.module import model_inputs

    inputs = model_inputs(batch)
    seen_s = probe(built.student, built.student, [TapPoint.parse(p) for p in student_points], inputs, "student")
    seen_t = probe(built.teacher, teacher_root, [TapPoint.parse(p) for p in teacher_points], inputs, "teacher") \
        if teacher_points else {}
    seen_s, seen_t = {str(k): v for k, v in seen_s.items()}, {str(k): v for k, v in seen_t.items()}
    for name, term in terms.items():
        if hasattr(term, "attach"):
            try:
                term.attach(built.student)
            except ValueError as e:
                raise WorkbenchError(f"loss.{name}: {e}") from None
        projectors = []
        for s, t in term.pairs:
            if not term.uses_projector:
                projectors.append(None)
                continue
            d_s, d_t = seen_s[s].shape[-1], (seen_s if term.target_on_student else seen_t)[t].shape[-1]
            try:
                projectors.append(make_projector(term.projector_mode, d_s, d_t))
            except WorkbenchError as e:
                raise WorkbenchError(f"loss.{name} ({s} -> {t}): {e}") from None
        term.bind(term.pairs, projectors)
    built.notes["taps"] = {name: [list(p) for p in term.pairs] for name, term in terms.items()}


def build_vision_student(cfg: RunConfig, splits: ImageSplits) -> nn.Module:
    """A timm classifier for the data: `student.type` is any timm model name (the MiniViT
    ones included), sized for the data's classes, channels and image side."""
    import timm

    import students

    s = cfg.student
    if s.path:
        if s.kwargs:
            raise WorkbenchError("config keys 'student.kwargs' and 'student.path' exclude each other; to load a "
                                 "folder with a recipe that sets kwargs, clear them: student.kwargs={}")
        return students.load(s.path)
    import students.minivit  # noqa: F401 - registers the MiniViT models

    if not timm.is_model(s.type):
        raise WorkbenchError(f"config key 'student.type': {s.type!r} is not a timm model; image classification "
                             f"students are timm names.{closest(s.type, timm.list_models())}")
    try:
        return students.create_vision_student(s.type, splits.num_classes, splits.image_size, splits.in_chans,
                                              **s.kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise WorkbenchError(f"config key 'student.kwargs': cannot build {s.type}: {e}".splitlines()[0]) from None


def build_vision(cfg: RunConfig, splits: ImageSplits) -> Built:
    """Image classification: a timm student, an optional frozen timm teacher, class-logit and
    tapped (Q/K/V relation, hidden relation, feature) terms."""
    from students.minivit import init_from_dense

    if cfg.trainer.fused_logits:
        raise WorkbenchError("config key 'trainer.fused_logits' is for VLM vocabularies; class logits are small, "
                             "set it to false")
    if cfg.hybrid is not None:
        raise WorkbenchError("config key 'hybrid' converts a language model's attention; image classifiers have none")
    if cfg.teacher is not None and cfg.teacher.cache is not None:
        raise WorkbenchError("config key 'teacher.cache': teacher caches hold VLM answer tokens; unset it for "
                             "image classification")
    loss = build_loss(cfg, cfg.teacher is not None)
    student = build_vision_student(cfg, splits)
    notes: dict[str, Any] = dict(splits.notes)
    apply_matformer(cfg, student, notes)  # before the teacher loads: a bad target fails fast
    teacher = build_teacher(cfg)
    if teacher is not None and teacher.num_classes != splits.num_classes:
        raise WorkbenchError(f"the teacher has {teacher.num_classes} classes but the data has {splits.num_classes}")
    if cfg.init_from == "teacher":
        if teacher is None:
            raise WorkbenchError("config key 'init_from' is 'teacher' but 'teacher' is null")
        try:
            notes["init_from"] = {"path": str(cfg.teacher.path), **init_from_dense(student, teacher.model.state_dict())}
        except ValueError as e:
            raise WorkbenchError(f"config key 'init_from': {e}") from None
    elif cfg.init_from:
        notes["init_from"] = {"path": str(cfg.init_from), **init_student(student, cfg.init_from)}
    if cfg.trainable:
        apply_trainable(student, cfg.trainable)
    built = Built(splits, None, ImageCollator(), student, loss, teacher, notes=notes)
    if loss.tapped_terms():
        bind_taps(built)
    if len(splits.train) < cfg.data.batch_size:
        raise WorkbenchError(f"data.batch_size={cfg.data.batch_size} is larger than the training set "
                             f"({len(splits.train)} samples)")
    return built


def build(cfg: RunConfig) -> Built:
    """Config -> data, teacher, student, loss; raises `WorkbenchError` on any bad input."""
    torch.manual_seed(cfg.seed)
    splits = DATASETS.get(cfg.data.type, "data.type")(cfg.data)
    if isinstance(splits, ImageSplits):
        return build_vision(cfg, splits)
    processor = resolve_processor(cfg, splits)
    loss = build_loss(cfg, cfg.teacher is not None)
    student = build_student(cfg, processor)
    notes: dict[str, Any] = {}
    skipped = {name: ds.skipped_images for name, ds in (("train", splits.train), ("val", splits.val))
               if getattr(ds, "skipped_images", None)}
    if skipped:  # data.bad_images=skip: counted, with the first few reasons
        notes["skipped_images"] = {name: {"count": len(s), "first": s[:5]} for name, s in skipped.items()}
    apply_hybrid(cfg, student, notes)  # before init_from: a converted stage's weights load by name
    if cfg.init_from:
        if cfg.init_from == "teacher" and cfg.teacher is None:
            raise WorkbenchError("config key 'init_from' is 'teacher' but 'teacher' is null")
        source = cfg.teacher.path if cfg.init_from == "teacher" else cfg.init_from
        notes["init_from"] = {"path": str(source), **init_student(student, source)}
    apply_matformer(cfg, student, notes)
    if cfg.trainable:
        apply_trainable(student, cfg.trainable)
    processor = student_processor(student, processor)
    check_vocabularies(student, processor)
    collator = VLMCollator(processor, max_length=cfg.data.max_length)
    if cfg.data.max_length is not None:  # a length that cuts every answer fails here, before any write
        collator([splits.train[i] for i in range(min(len(splits.train), cfg.data.batch_size))])
    built = attach_teacher(cfg, Built(splits, processor, collator, student, loss, notes=notes))
    attach_vision_terms(built)
    if loss.tapped_terms():
        bind_taps(built)
    n_train = len(built.splits.train)  # after the labelled split: what the student trains on
    if n_train < cfg.data.batch_size:
        raise WorkbenchError(f"data.batch_size={cfg.data.batch_size} is larger than the training set ({n_train} samples)")
    return built
