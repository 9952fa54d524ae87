"""Name -> builder tables: configs name students, teachers, loss terms and datasets by key.

A `Registry` checks the arguments a config passes against the builder's signature before
calling it, so a misspelt argument or a value of the wrong type is a short error naming the
key, not a TypeError deep inside a model constructor.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

from workbench.errors import WorkbenchError


def closest(name: str, options) -> str:
    """' Did you mean ...?' for the nearest of `options`, or ''."""
    near = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(repr(n) for n in near)}?" if near else ""


def _accepts(value: Any, hint: Any) -> bool:
    """Loose check of a config value against a (possibly union / generic) annotation."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is not None:
        hint = origin
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


class Registry:
    """A named table of builders for one kind of thing (student, teacher, loss, dataset)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, builder: Callable[..., Any] | None = None):
        """Add `builder` under `name`; usable as a decorator."""
        def add(fn):
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = fn
            return fn
        return add(builder) if builder is not None else add

    def names(self) -> list[str]:
        return sorted(self._builders)

    def get(self, name: str, key: str | None = None) -> Callable[..., Any]:
        """The builder registered as `name`; `key` is the config key that named it (for errors)."""
        if name not in self._builders:
            where = f"config key '{key}': " if key else ""
            raise WorkbenchError(
                f"{where}unknown {self.kind} {name!r}.{closest(name, self._builders)} "
                f"Registered: {', '.join(self.names())}"
            )
        return self._builders[name]

    def check_kwargs(self, name: str, kwargs: dict[str, Any], where: str) -> None:
        """Fail on arguments the builder does not take or whose type does not fit."""
        fn = self.get(name)
        params = inspect.signature(fn).parameters
        hints = typing.get_type_hints(fn)
        for key, value in kwargs.items():
            if key not in params:
                raise WorkbenchError(
                    f"unknown config key '{where}.{key}': {self.kind} {name!r} takes no argument {key!r}."
                    f"{closest(key, params)}"
                )
            if not _accepts(value, hints.get(key, Any)):
                expected = getattr(hints[key], "__name__", str(hints[key]))
                raise WorkbenchError(
                    f"config key '{where}.{key}' has the wrong type: expected {expected}, got {value!r}"
                )

    def build(self, name: str, where: str, /, fixed: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Call the builder with `fixed` (filled in by the workbench) plus user `kwargs`."""
        self.check_kwargs(name, kwargs, where)
        clash = set(kwargs) & set(fixed or {})
        if clash:
            raise WorkbenchError(
                f"config key '{where}.{sorted(clash)[0]}' is set by the workbench (from the processor); remove it"
            )
        return self.get(name)(**(fixed or {}), **kwargs)


STUDENTS = Registry("student")
TEACHERS = Registry("teacher")
LOSSES = Registry("loss")
DATASETS = Registry("dataset")


# loss type -> (term builder, the LossTermConfig fields it reads besides type and weight)
_TERM_FIELDS = {
    "ce": ("label_smoothing",),
    "divergence": ("temperature", "mask", "beta", "reduction"),
    "mdist": ("temperature",),
    "rdist": ("student", "teacher", "layers"),
    "feature": ("student", "teacher", "layers", "projector", "mask"),
    "hidden_relation": ("student", "teacher", "layers", "mask", "scale"),
    "rkd": ("student", "teacher", "layers", "mask"),
    "attention_kl": ("student", "teacher", "layers", "heads", "mask", "kind"),
    "qkv_relation": ("student", "teacher", "layers", "relation_heads", "mask", "kind"),
    "layer_replay": ("student", "teacher", "layers", "kind"),
    "eve_alignment": ("every", "heads"),
    "breen_query": (),
}


def _loss_builder(family: str, make: Callable[..., Any]) -> Callable[[Any], Any]:
    """A LOSSES builder: checks that the term config sets only fields `family` reads, then calls
    `make(**those fields)`, leaving unset (None) ones to the term's own defaults."""
    fields = _TERM_FIELDS[family]

    def build(term) -> Any:
        from workbench.config import LossTermConfig

        default = LossTermConfig(type=term.type)
        unused = [f for f in vars(default) if f not in ("type", "weight", *fields)
                  and getattr(term, f) != getattr(default, f)]
        if unused:
            raise WorkbenchError(f"loss type {term.type!r} does not read {unused[0]!r}; it reads "
                                 f"{', '.join(fields) or 'only type and weight'}")
        kwargs = {f: getattr(term, f) for f in fields if getattr(term, f) is not None}
        try:
            return make(**kwargs)
        except ValueError as e:
            raise WorkbenchError(f"loss type {term.type!r}: {e}") from None

    return build


def _register_builtins() -> None:
    from losses.attention import AttentionKLTerm, QKVRelationTerm
    from losses.combine import CrossEntropyTerm, LogitDivergenceTerm, MDistTerm
    from losses.feature import FeatureTerm, LayerReplayTerm
    from losses.relation import HiddenRelationTerm, RDistTapTerm, RDistTerm, RKDTerm
    from losses.vision_align import BREENQueryTerm, EVEAlignmentTerm
    from students.encoder_free import breen_student, eve_student
    from students.vlm import llava_from_parts, tiny_llava
    from teachers.vision_encoder import VisionEncoderTeacher
    from teachers.hf_vlm import HFVLMTeacher
    from teachers.timm_vit import TimmTeacher
    from workbench.data import llava_splits, windtunnel_splits
    from workbench.data.vision import digits_splits, image_folder_splits, windtunnel_classification_splits

    STUDENTS.register("tiny_llava", tiny_llava)
    STUDENTS.register("llava_from_parts", llava_from_parts)
    STUDENTS.register("eve", eve_student)
    STUDENTS.register("breen", breen_student)
    TEACHERS.register("hf_vlm", HFVLMTeacher)
    TEACHERS.register("timm", TimmTeacher)
    TEACHERS.register("vision_encoder", VisionEncoderTeacher)
    DATASETS.register("llava", llava_splits)
    DATASETS.register("windtunnel", windtunnel_splits)
    DATASETS.register("image_folder", image_folder_splits)
    DATASETS.register("digits", digits_splits)
    DATASETS.register("windtunnel_classification", windtunnel_classification_splits)
    LOSSES.register("ce", _loss_builder("ce", CrossEntropyTerm))
    for divergence in ("forward_kl", "reverse_kl", "jsd", "tvd", "soft_ce"):
        LOSSES.register(divergence, _loss_builder(
            "divergence", lambda _d=divergence, **kw: LogitDivergenceTerm(_d, **kw)))
    LOSSES.register("mdist", _loss_builder("mdist", MDistTerm))
    LOSSES.register("rdist", _loss_builder(
        "rdist", lambda student="logits", **kw: RDistTerm() if student == "logits" else RDistTapTerm(student, **kw)))
    for kind in ("mse", "cosine"):
        LOSSES.register(f"feature_{kind}", _loss_builder("feature", lambda _k=kind, **kw: FeatureTerm(_k, **kw)))
    LOSSES.register("hidden_relation", _loss_builder("hidden_relation", HiddenRelationTerm))
    for kind in ("distance", "angle"):
        LOSSES.register(f"rkd_{kind}", _loss_builder("rkd", lambda _k=kind, **kw: RKDTerm(_k, **kw)))
    LOSSES.register("attention_kl", _loss_builder("attention_kl", AttentionKLTerm))
    LOSSES.register("qkv_relation", _loss_builder("qkv_relation", QKVRelationTerm))
    LOSSES.register("layer_replay", _loss_builder("layer_replay", LayerReplayTerm))
    LOSSES.register("eve_alignment", _loss_builder("eve_alignment", EVEAlignmentTerm))
    LOSSES.register("breen_query", _loss_builder("breen_query", BREENQueryTerm))


_register_builtins()
