"""Feature taps: what a loss term reads from inside the teacher and the student, by module path.

A tap is a module path plus a site: the module's `output` (default), its `input`, or, for a
Hugging Face attention module, the `qk` its attention function receives (queries and keys
after RoPE, before the KV repeat). Taps are forward hooks added for one forward pass and
removed after it; models never change `forward` to return features. `layer_pairs` maps
layers between models of different depth, and `Projector` bridges widths (student side).
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from workbench.errors import WorkbenchError
from workbench.registry import closest

SITES = ("output", "input", "qk")
LAYER = "{i}"  # the layer-index placeholder of a tap template


@dataclass(frozen=True)
class TapPoint:
    """One captured tensor: `path` is a module path from the model's root, `site` what is kept."""

    path: str
    site: str = "output"

    @classmethod
    def parse(cls, text: str) -> TapPoint:
        """"a.b.c" (output), "a.b.c:input" or "a.b.c:qk"."""
        path, _, site = text.partition(":")
        site = site or "output"
        if site not in SITES:
            raise WorkbenchError(f"tap {text!r}: unknown site {site!r}; use one of {', '.join(SITES)}")
        return cls(path, site)

    def __str__(self) -> str:
        return self.path if self.site == "output" else f"{self.path}:{self.site}"


@dataclass
class QK:
    """What an attention function received: (B, H, N, D) queries, (B, Hkv, M, D) keys."""

    query: Tensor
    key: Tensor
    scaling: float
    causal: bool


def get_module(root: nn.Module, path: str, who: str = "model") -> nn.Module:
    """The submodule at dotted `path` ("" is the root), with a short error naming near misses."""
    module = root
    done: list[str] = []
    for part in filter(None, path.split(".")):
        children = dict(module.named_children())
        if part not in children:
            where = ".".join(done) or "the root"
            raise WorkbenchError(
                f"tap {path!r}: the {who} has no module {part!r} under {where}.{closest(part, children)} "
                f"Children there: {', '.join(list(children)[:8]) or 'none'}"
            )
        module = children[part]
        done.append(part)
    return module


def layer_taps(root: nn.Module, template: str, who: str = "model") -> list[str]:
    """The taps a template's `{i}` ranges over, in order: one per layer.

    The path before `{i}` names a ModuleList / Sequential of layers; a `*` part before it
    ranges over every child there, so nested stages flatten into one layer index
    ("layers.*.blocks.{i}" numbers a Swin's blocks 0..23 across its four stages, as
    MiniViT's layer lists do).
    """
    if LAYER not in template:
        raise WorkbenchError(f"tap template {template!r} has no {LAYER} placeholder")
    head, tail = template.split(LAYER, 1)
    if "*" in tail:
        raise WorkbenchError(f"tap template {template!r}: '*' may only come before {LAYER}")
    prefixes = [""]
    for part in filter(None, head.rstrip(".").split(".")):
        if part == "*":
            prefixes = [f"{p}{name}." for p in prefixes for name, _ in get_module(root, p.rstrip("."), who).named_children()]
        else:
            prefixes = [f"{p}{part}." for p in prefixes]
    taps = []
    for prefix in prefixes:
        container = get_module(root, prefix.rstrip("."), who)
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            raise WorkbenchError(f"tap template {template!r}: {prefix.rstrip('.') or 'the root'} is a "
                                 f"{type(container).__name__}, not a ModuleList of layers")
        taps += [f"{prefix}{name}{tail}" for name, _ in container.named_children()]
    return taps


def num_layers(root: nn.Module, template: str, who: str = "model") -> int:
    """How many layers a template's `{i}` ranges over (see `layer_taps`)."""
    return len(layer_taps(root, template, who))


def layer_pairs(n_student: int, n_teacher: int, mapping: Any) -> list[tuple[int, int]]:
    """Which student layer is compared with which teacher layer.

    Args:
        n_student, n_teacher: layer counts.
        mapping: "uniform" (each student layer i with teacher layer
            round((i + 1) * n_teacher / n_student) - 1, so the last layers meet, as in
            TinyBERT), "last:K" (the last K layers of each, in order), "all" (same depth,
            layer i with layer i), or explicit [[s, t], ...] pairs (negative indices count
            from the end).
    Returns:
        (student layer, teacher layer) pairs with non-negative indices.
    """
    if isinstance(mapping, str):
        if mapping == "uniform":
            return [(i, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]
        if mapping == "all":
            if n_student != n_teacher:
                raise WorkbenchError(f"layers 'all' needs equal depths, got student {n_student} and teacher "
                                     f"{n_teacher}; use 'uniform', 'last:K' or explicit pairs")
            return [(i, i) for i in range(n_student)]
        match = re.fullmatch(r"last:(\d+)", mapping)
        if match:
            k = int(match.group(1))
            if not 0 < k <= min(n_student, n_teacher):
                raise WorkbenchError(f"layers {mapping!r}: K must be in [1, {min(n_student, n_teacher)}]")
            return [(n_student - k + j, n_teacher - k + j) for j in range(k)]
        raise WorkbenchError(f"layers {mapping!r} is not valid; use uniform, all, last:K or [[s, t], ...]")
    pairs = []
    for pair in mapping:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(i, int) for i in pair)):
            raise WorkbenchError(f"layers: {pair!r} is not a [student, teacher] pair of layer indices")
        s, t = pair
        if not (-n_student <= s < n_student and -n_teacher <= t < n_teacher):
            raise WorkbenchError(f"layers: pair {list(pair)} is out of range for {n_student} student and "
                                 f"{n_teacher} teacher layers")
        pairs.append((s % n_student, t % n_teacher))
    if not pairs:
        raise WorkbenchError("layers: the list of pairs is empty")
    return pairs


def _first_tensor(value: Any) -> Tensor:
    """A module's main tensor: the tensor itself, the first of a tuple, or an output's [0]."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, dict):  # ModelOutput
        value = list(value.values())
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise WorkbenchError(f"tap: the module gave {type(value).__name__}, not a tensor")


# ---- queries and keys from Hugging Face attention -------------------------------------------

_QK_NAME = "workbench_qk"
_recording = threading.local()  # module id -> list to append QK to, for the current capture


def _qk_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """An attention function that records (query, key) for tapped modules, then runs the real one."""
    sink = getattr(_recording, "sinks", {}).get(id(module))
    if sink is not None:
        scaling = kwargs.get("scaling")
        sink.append(QK(query, key, float(scaling if scaling is not None else query.shape[-1] ** -0.5),
                       bool(getattr(module, "is_causal", False))))
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner = getattr(module, "_workbench_inner_attention", "sdpa")
    return ALL_ATTENTION_FUNCTIONS[inner](module, query, key, value, attention_mask, **kwargs)


def _route_attention(root: nn.Module, module: nn.Module, path: str) -> None:
    """Point the config of `module` at `_qk_attention`, keeping its implementation as the inner one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise WorkbenchError(f"tap '{path}:qk': {type(module).__name__} is not a Hugging Face attention module "
                             "(it has no config with an attention implementation)")
    if _QK_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(_QK_NAME, _qk_attention)
    current = config._attn_implementation
    if current != _QK_NAME:
        inner = current if current in ALL_ATTENTION_FUNCTIONS else "sdpa"
        # eager attention is not in the interface table; sdpa computes the same thing
        for m in root.modules():
            if getattr(m, "config", None) is config:
                m._workbench_inner_attention = inner
        config._attn_implementation = _QK_NAME


class FeatureTaps:
    """Forward hooks on a model's modules, active only inside `capture()`.

    Args:
        root: the model the paths start from.
        points: what to capture.
        who: "student" or "teacher", for error messages.
    """

    def __init__(self, root: nn.Module, points: list[TapPoint], who: str = "model") -> None:
        self.root = root
        self.points = list(dict.fromkeys(points))
        self.modules = {p: get_module(root, p.path, who) for p in self.points}
        for p in self.points:
            if p.site == "qk":
                _route_attention(root, self.modules[p], p.path)

    def __bool__(self) -> bool:
        return bool(self.points)

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[TapPoint, Any]]:
        """Within the block, forward passes fill the yielded dict: point -> tensor (or `QK`)."""
        found: dict[TapPoint, Any] = {}
        handles = []
        sinks: dict[int, list] = {}
        for point, module in self.modules.items():
            if point.site == "output":
                handles.append(module.register_forward_hook(
                    lambda m, args, out, _p=point: found.__setitem__(_p, _first_tensor(out))))
            elif point.site == "input":
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, kwargs, _p=point: found.__setitem__(
                        _p, _first_tensor(args if args else list(kwargs.values()))), with_kwargs=True))
            else:
                sinks[id(module)] = []
        previous = getattr(_recording, "sinks", {})
        _recording.sinks = {**previous, **sinks}
        try:
            yield found
            for point, module in self.modules.items():
                if point.site == "qk":
                    records = sinks[id(module)]
                    if not records:
                        raise WorkbenchError(f"tap '{point}': the attention function was not called; "
                                             "is it an attention module of this model?")
                    found[point] = records[-1]
        finally:
            _recording.sinks = previous
            for h in handles:
                h.remove()
        missing = [str(p) for p in self.points if p not in found]
        if missing:
            raise WorkbenchError(f"taps {missing} captured nothing: those modules did not run in the forward pass")


class Projector(nn.Module):
    """A learned linear map from student width to teacher width (FitNets' regressor).

    Lives with the loss term, so it is trained with the student, saved in checkpoints, and
    left out of the exported student.
    """

    def __init__(self, d_student: int, d_teacher: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_student, d_teacher)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.to(self.proj.weight.dtype))


def make_projector(mode: str, d_student: int, d_teacher: int) -> nn.Module | None:
    """`mode` auto (a projector only when widths differ), linear (always) or none (widths must match)."""
    if mode == "none" or (mode == "auto" and d_student == d_teacher):
        if d_student != d_teacher:
            raise WorkbenchError(f"projector 'none' but student width {d_student} != teacher width {d_teacher}")
        return None
    if mode not in ("auto", "linear"):
        raise WorkbenchError(f"projector {mode!r} is not valid; use auto, linear or none")
    return Projector(d_student, d_teacher)


@torch.no_grad()
def probe(model: nn.Module, root: nn.Module, points: list[TapPoint], inputs: dict[str, Any], who: str) -> dict:
    """Run `model` once on `inputs` and return what the taps on `root` saw (shapes for projectors)."""
    taps = FeatureTaps(root, points, who)
    with taps.capture() as found:
        model(**inputs)
    return found
