"""Tapped loss terms bound to both models, and every term attached to them.

A tapped term's templates (module paths, `{i}` for a layer index) are resolved against the
student and the teacher, each tap is run once on one training sample (so a bad tap fails
before a run starts), and projectors are sized from what the taps saw. Then every term's
`attach(student, teacher)` runs once.
"""

from __future__ import annotations

from torch import nn

from losses.combine import WeightedLoss
from workbench.batch import model_inputs
from workbench.errors import WorkbenchError
from workbench.taps import LAYER, TapPoint, layer_pairs, layer_taps, make_projector, probe


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


def bind_taps(loss: WeightedLoss, student: nn.Module, teacher: nn.Module | None, sample_batch: dict) -> dict:
    """Resolve the tap templates of the feature/relation/attention terms against both models,
    run each once on one training sample (so a bad tap fails before a run starts), and give
    the terms that ask for them projectors sized from what the taps saw. Returns the bound
    pairs per term, for the summary."""
    terms = loss.tapped_terms()
    on_teacher = [name for name, term in terms.items() if not term.target_on_student]
    if teacher is None and on_teacher:
        raise WorkbenchError(
            f"loss terms {', '.join(on_teacher)} read features inside the teacher, so they need it loaded: "
            "a teacher-logit cache (teacher.cache) holds logits only; unset teacher.cache"
        )
    teacher_root = getattr(teacher, "model", teacher)
    for name, term in terms.items():
        term.pairs = _bound_pairs(name, term, student, teacher_root)
    student_points, teacher_points = loss.tap_points()
    inputs = model_inputs(sample_batch)
    seen_s = probe(student, student, [TapPoint.parse(p) for p in student_points], inputs, "student")
    seen_t = probe(teacher, teacher_root, [TapPoint.parse(p) for p in teacher_points], inputs, "teacher") \
        if teacher_points else {}
    seen_s, seen_t = {str(k): v for k, v in seen_s.items()}, {str(k): v for k, v in seen_t.items()}
    for name, term in terms.items():
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
    return {name: [list(p) for p in term.pairs] for name, term in terms.items()}


def attach_terms(loss: WeightedLoss, student: nn.Module, teacher: nn.Module | None, sample_batch: dict | None) -> dict:
    """Bind the tapped terms (when there are any), then attach every term to the models;
    returns the bound taps per term (empty without tapped terms)."""
    notes = bind_taps(loss, student, teacher, sample_batch) if loss.tapped_terms() else {}
    for name, term in loss.terms.items():
        try:
            term.attach(student, teacher)
        except ValueError as e:
            raise WorkbenchError(f"loss.{name}: {e}") from None
    return notes
