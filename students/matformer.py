"""MatFormer: nested FFNs whose smaller granularities are prefixes of the hidden units, and
Mix'n'Match submodels extracted from them (MatFormer-OLMo; Gemma 3n's MatFormer Lab).

`matformerize(model)` swaps every MLP of a timm ViT (`fc1` / `fc2`) or of a Hugging Face
decoder (`gate_proj` / `up_proj` / `down_proj`, also the language model inside a VLM) for a
`NestedMLP` holding the *same* Linear layers under the same names: state dicts do not change
and at full width the model computes exactly what it did. Once-for-all style elastic API:
`set_active(model, spec)` picks per-layer widths and skipped layers, `active_config(model)`
reports them, `extract(model, spec)` returns a static model with copied (sliced) weights.
A width k keeps rows [:k] of the input projections (and their biases) and columns [:, :k] of
the output projection; its bias is kept whole.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATED = ("gate_proj", "up_proj", "down_proj")  # Llama / Qwen2 / Mistral / Gemma MLPs
PLAIN = ("fc1", "fc2")  # timm Mlp
DEFAULT_GRANULARITIES = (1.0, 0.5, 0.25, 0.125)


def _sliced(linear: nn.Linear, rows: int | None = None, cols: int | None = None) -> nn.Linear:
    """A new Linear holding a copy of `linear`'s first `rows` outputs / first `cols` inputs."""
    w = linear.weight[:rows] if rows is not None else linear.weight
    w = w[:, :cols] if cols is not None else w
    out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if linear.bias is not None:
            out.bias.copy_(linear.bias[:rows] if rows is not None else linear.bias)
    return out


class NestedMLP(nn.Module):
    """An MLP whose hidden units can be cut to any prefix `active` (MatFormer's nesting).

    Holds the wrapped MLP's own Linear layers under their own names (`gate_proj`, `up_proj`,
    `down_proj` or `fc1`, `fc2`), so parameter names and state dicts are those of the
    original; the original module is kept (not as a submodule) as the template `static`
    rebuilds.

    Args:
        mlp: a gated MLP (gate_proj, up_proj, down_proj, act_fn) or a timm `Mlp` (fc1, act,
            fc2; its optional hidden-size norm must be off).
    """

    def __init__(self, mlp: nn.Module):
        super().__init__()
        if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in GATED):
            self.kind = "gated"
            self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
            self.act_fn = mlp.act_fn
            self.hidden = mlp.gate_proj.out_features
        elif all(isinstance(getattr(mlp, n, None), nn.Linear) for n in PLAIN):
            if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
                raise ValueError(f"{type(mlp).__name__} normalises its hidden units; nesting would change that norm")
            act = getattr(mlp, "act", None) or getattr(mlp, "activation_fn", None)  # timm Mlp / CLIPMLP
            if act is None:
                raise ValueError(f"{type(mlp).__name__} has fc1/fc2 but no activation (act or activation_fn)")
            self.kind = "plain"
            self.fc1, self.act, self.fc2 = mlp.fc1, act, mlp.fc2
            self.drop1, self.drop2 = getattr(mlp, "drop1", nn.Identity()), getattr(mlp, "drop2", nn.Identity())
            self.hidden = mlp.fc1.out_features
        else:
            raise ValueError(f"{type(mlp).__name__} is neither a gated (gate/up/down_proj) nor a fc1/fc2 MLP")
        object.__setattr__(self, "template", mlp)
        self.active = self.hidden

    def forward(self, x: Tensor) -> Tensor:
        k = self.active
        if self.kind == "gated":
            gate = F.linear(x, self.gate_proj.weight[:k], None if self.gate_proj.bias is None else self.gate_proj.bias[:k])
            up = F.linear(x, self.up_proj.weight[:k], None if self.up_proj.bias is None else self.up_proj.bias[:k])
            return F.linear(self.act_fn(gate) * up, self.down_proj.weight[:, :k], self.down_proj.bias)  # (..., d)
        h = F.linear(x, self.fc1.weight[:k], None if self.fc1.bias is None else self.fc1.bias[:k])
        h = self.drop1(self.act(h))
        return self.drop2(F.linear(h, self.fc2.weight[:, :k], self.fc2.bias))

    def static(self, width: int | None = None) -> nn.Module:
        """The wrapped MLP's own class with weights cut to `width` hidden units (copies)."""
        k = self.hidden if width is None else width
        names = ("gate_proj", "up_proj") if self.kind == "gated" else ("fc1",)
        out_name = "down_proj" if self.kind == "gated" else "fc2"
        memo = {id(getattr(self.template, n)): _sliced(getattr(self, n), rows=k) for n in names}
        memo[id(getattr(self.template, out_name))] = _sliced(getattr(self, out_name), cols=k)
        static = copy.deepcopy(self.template, memo)
        if hasattr(static, "intermediate_size"):
            static.intermediate_size = k
        return static

    def extra_repr(self) -> str:
        return f"{self.kind}, active={self.active} of {self.hidden}"


# --------------------------------------------------------------------------- specs


@dataclass
class MatSpec:
    """A submodel: hidden units of every layer's MLP, and the layers to skip.

    Attributes:
        widths: one hidden-unit count per layer of the universal model (skipped layers'
            entries are ignored).
        skip: indices of layers left out entirely (Gemma 3n E2B skips 20-24).
    """

    widths: list[int]
    skip: tuple[int, ...] = field(default_factory=tuple)


def parse_spec(text: str, full: Sequence[int], skip: str | None = None) -> MatSpec:
    """"uniform:0.25" (a fraction of every layer's width) or "widths:w1,w2,..." (one per layer:
    whole numbers are hidden units, numbers with a decimal point fractions in (0, 1]), plus
    skip = "20-24,30" (layer indices and ranges).
    A parameter budget ("budget:<N>") needs the model: see `budget_spec`."""
    kind, _, value = text.partition(":")
    n = len(full)
    if kind == "uniform":
        fraction = float(value)
        widths = [_width(fraction, h) for h in full]
    elif kind == "widths":
        items = [v.strip() for v in value.split(",") if v.strip()]
        if len(items) != n:
            raise ValueError(f"spec {text!r} gives {len(items)} widths for {n} layers")
        widths = [_layer_width(v, h) for v, h in zip(items, full)]
    else:
        raise ValueError(f"spec {text!r}: use uniform:<fraction> or widths:<w1,w2,...>")
    return MatSpec(widths, parse_skip(skip or "", n))


def _layer_width(item: str, hidden: int) -> int:
    """One `widths:` entry: a whole number is hidden units ("1" is one unit), a number with a
    decimal point a fraction of the layer's width in (0, 1] ("1.0" is the full width)."""
    if re.fullmatch(r"\d+", item):
        if int(item) < 1:
            raise ValueError(f"width {item!r}: a layer keeps at least 1 hidden unit")
        return int(item)
    try:
        fraction = float(item)
    except ValueError:
        fraction = None
    if fraction is None or not 0 < fraction <= 1:
        raise ValueError(f"width {item!r} is neither a whole number of hidden units nor a fraction in (0, 1] "
                         "such as 0.5")
    return _width(fraction, hidden)


def _width(fraction: float, hidden: int) -> int:
    if not 0 < fraction <= 1:
        raise ValueError(f"width fraction {fraction} must be in (0, 1]")
    return max(1, round(fraction * hidden))


def parse_skip(text: str, n: int) -> tuple[int, ...]:
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"skip {part!r} is not an index or a range a-b")
        a, b = int(match.group(1)), int(match.group(2) or match.group(1))
        out.update(range(a, b + 1))
    bad = sorted(i for i in out if i >= n)
    if bad:
        raise ValueError(f"skip names layer {bad[0]}, but the model has {n} layers")
    return tuple(sorted(out))


# --------------------------------------------------------------------------- model level


def matformerize(model: nn.Module, granularities: Sequence[float] = DEFAULT_GRANULARITIES) -> list[str]:
    """Make every MLP of `model` nested, in place; returns their module paths, in order.

    Finds gated MLPs (Hugging Face decoders, also inside a VLM's language model) and timm
    `Mlp`s; a vision tower's CLIP-style MLP (fc1/fc2) is nested too, so pass the language
    model alone to nest only it. `granularities` (fractions of each MLP's width, the largest
    1.0) are what joint training and `uniform` specs use.
    """
    if not granularities or max(granularities) != 1.0 or min(granularities) <= 0:
        raise ValueError(f"granularities must be fractions in (0, 1] including 1.0, got {list(granularities)}")
    paths = []
    for name, module in list(model.named_modules()):
        if isinstance(module, NestedMLP) or not name.endswith(("mlp", "ffn", "feed_forward")):
            continue
        try:
            nested = NestedMLP(module)
        except ValueError:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nested)
        paths.append(name)
    if not paths:
        raise ValueError(f"{type(model).__name__} has no MLP with gate/up/down_proj or fc1/fc2 Linear layers")
    object.__setattr__(model, "matformer_granularities", tuple(sorted(granularities, reverse=True)))
    object.__setattr__(model, "_matformer_skip_hooks", {})
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):  # a Hugging Face model: save_pretrained records it, students.load re-nests
        config.matformer_granularities = list(model.matformer_granularities)
    return paths


def default_target(model: nn.Module) -> nn.Module:
    """What MatFormer nests unless told otherwise: a causal LM's or VLM's decoder (a VLM's
    vision tower stays as it is), a timm model whole."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def nested_mlps(model: nn.Module) -> list[tuple[str, NestedMLP]]:
    """(path, NestedMLP) of every nested MLP, in layer order."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, NestedMLP)]
    if not found:
        raise ValueError("the model has no nested MLPs; call matformerize(model) first")
    return found


def _layer_path(mlp_path: str) -> str:
    return mlp_path.rpartition(".")[0]


def full_widths(model: nn.Module) -> list[int]:
    return [m.hidden for _, m in nested_mlps(model)]


def set_active(model: nn.Module, spec: MatSpec) -> None:
    """Run the universal model as the submodel `spec`: MLP widths cut, skipped layers made
    identities (their output is their input; they still compute, so time the extracted model)."""
    mlps = nested_mlps(model)
    _check_spec(spec, [m.hidden for _, m in mlps])
    for (_, mlp), width in zip(mlps, spec.widths):
        mlp.active = width
    hooks: dict[int, torch.utils.hooks.RemovableHandle] = model.__dict__.setdefault("_matformer_skip_hooks", {})
    for handle in hooks.values():
        handle.remove()
    hooks.clear()
    for i in spec.skip:
        layer = model.get_submodule(_layer_path(mlps[i][0]))
        hooks[i] = layer.register_forward_hook(_identity_output, with_kwargs=True)


def _identity_output(module: nn.Module, args: tuple, kwargs: dict, output):
    hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    return hidden


def set_uniform(model: nn.Module, fraction: float) -> None:
    """`set_active` with every layer at `fraction` of its width and no layer skipped."""
    set_active(model, MatSpec([_width(fraction, h) for h in full_widths(model)]))


def active_config(model: nn.Module) -> MatSpec:
    """The spec the model runs now."""
    skips = tuple(sorted(model.__dict__.get("_matformer_skip_hooks", {})))
    return MatSpec([m.active for _, m in nested_mlps(model)], skips)


def _check_spec(spec: MatSpec, full: list[int]) -> None:
    if len(spec.widths) != len(full):
        raise ValueError(f"spec has {len(spec.widths)} widths for {len(full)} nested MLPs")
    bad = [(i, w, h) for i, (w, h) in enumerate(zip(spec.widths, full)) if not 0 < w <= h]
    if bad:
        i, w, h = bad[0]
        raise ValueError(f"layer {i}: width {w} is outside 1..{h}")
    if any(not 0 <= i < len(full) for i in spec.skip):
        raise ValueError(f"skip {list(spec.skip)} names a layer outside 0..{len(full) - 1}")
    if len(set(spec.skip)) == len(full):
        raise ValueError("the spec skips every layer")


def extract(model: nn.Module, spec: MatSpec) -> nn.Module:
    """A static copy of the submodel `spec`: every MLP its own class with sliced weights
    (copies), skipped layers removed and the rest renumbered. A Hugging Face model's config
    follows (`num_hidden_layers`, `intermediate_size` when all kept widths agree, else the
    list `matformer_widths`, `layer_types`), and attention modules get their new `layer_idx`.
    """
    mlps = nested_mlps(model)
    _check_spec(spec, [m.hidden for _, m in mlps])
    memo = {id(m): m.static(w) for (_, m), w in zip(mlps, spec.widths)}
    hooks = model.__dict__.get("_matformer_skip_hooks")
    object.__setattr__(model, "_matformer_skip_hooks", {})  # hooks are not copied into the static model
    try:
        static = copy.deepcopy(model, memo)
    finally:
        object.__setattr__(model, "_matformer_skip_hooks", hooks)
    for attr in ("_matformer_skip_hooks", "matformer_granularities"):
        static.__dict__.pop(attr, None)
    config = getattr(static, "config", None)
    for cfg in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)()) if c is not None}.values():
        if hasattr(cfg, "matformer_granularities"):
            del cfg.matformer_granularities  # a static model: not nested any more
    layer_paths = [_layer_path(p) for p, _ in mlps]
    containers = _drop_layers(static, [layer_paths[i] for i in spec.skip])
    kept = [w for i, w in enumerate(spec.widths) if i not in set(spec.skip)]
    _update_config(static, containers, kept, spec.skip)
    return static


def _drop_layers(model: nn.Module, paths: list[str]) -> dict[str, int]:
    """Remove the layers at `paths` from their ModuleList / Sequential; returns container
    path -> layers left."""
    by_container: dict[str, list[int]] = {}
    for path in paths:
        container, _, index = path.rpartition(".")
        by_container.setdefault(container, []).append(int(index))
    for container, drop in by_container.items():
        seq = model.get_submodule(container)
        kept = [m for i, m in enumerate(seq) if i not in set(drop)]
        parent, _, name = container.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, type(seq)(kept) if isinstance(seq, nn.ModuleList)
                else nn.Sequential(*kept))
    return {c: len(model.get_submodule(c)) for c in by_container}


def _update_config(model: nn.Module, containers: dict[str, int], widths: list[int], skip: Sequence[int]) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if skip:
        text.num_hidden_layers = len(widths)
        if getattr(text, "layer_types", None):
            text.layer_types = [t for i, t in enumerate(text.layer_types) if i not in set(skip)]
        for container in containers:
            for idx, layer in enumerate(model.get_submodule(container)):
                for module in layer.modules():
                    if hasattr(module, "layer_idx"):
                        module.layer_idx = idx
    if len(set(widths)) == 1:
        text.intermediate_size = widths[0]
        if hasattr(text, "matformer_widths"):
            del text.matformer_widths
    else:
        text.matformer_widths = list(widths)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _per_unit(mlp: NestedMLP) -> int:
    """Parameters one hidden unit of `mlp` costs: its input-projection rows (and biases) and
    its output-projection column."""
    ins = (mlp.gate_proj, mlp.up_proj) if mlp.kind == "gated" else (mlp.fc1,)
    out = mlp.down_proj if mlp.kind == "gated" else mlp.fc2
    return sum(p.in_features + (p.bias is not None) for p in ins) + out.out_features


def submodel_params(model: nn.Module, spec: MatSpec) -> int:
    """Parameters of `extract(model, spec)`, without building it: the universal model's count
    minus (h_i - w_i) x per-unit cost for every kept layer, minus every skipped layer."""
    mlps = nested_mlps(model)
    _check_spec(spec, [m.hidden for _, m in mlps])
    total = count_params(model)
    for i, ((path, mlp), width) in enumerate(zip(mlps, spec.widths)):
        if i in set(spec.skip):
            total -= count_params(model.get_submodule(_layer_path(path)))
        else:
            total -= (mlp.hidden - width) * _per_unit(mlp)
    return total


def budget_spec(model: nn.Module, budget: int, skip: Sequence[int] = ()) -> MatSpec:
    """The largest submodel within `budget` parameters, by MatFormer's heuristic: the same
    granularity in every layer (the largest uniform fraction that fits), then what is left of
    the budget widens the deepest layers first, so widths never decrease with depth.

    Raises:
        ValueError: even the narrowest submodel (one hidden unit per layer) is over budget.
    """
    mlps = nested_mlps(model)
    full = [m.hidden for _, m in mlps]
    skip = tuple(sorted(set(skip)))
    smallest = MatSpec([1] * len(full), skip)
    if submodel_params(model, smallest) > budget:
        raise ValueError(f"budget {budget:,} is below the smallest submodel ({submodel_params(model, smallest):,})")
    lo, hi = 0.0, 1.0
    for _ in range(40):  # bisection on the uniform fraction
        mid = (lo + hi) / 2
        if submodel_params(model, MatSpec([max(1, int(mid * h)) for h in full], skip)) <= budget:
            lo = mid
        else:
            hi = mid
    widths = [max(1, int(lo * h)) for h in full]
    left = budget - submodel_params(model, MatSpec(widths, skip))
    kept = [i for i in range(len(full)) if i not in set(skip)]
    for i in reversed(kept):  # deepest first; a later layer is never narrower than an earlier one
        cost = _per_unit(mlps[i][1])
        extra = min(full[i] - widths[i], left // cost)
        widths[i] += extra
        left -= extra * cost
    return MatSpec(widths, skip)


def matformer_transform(student: nn.Module, granularities: Sequence[float] = (1.0, 0.5, 0.25, 0.125),
                        sample: int | None = None, self_distill: float = 0.0, temperature: float = 1.0,
                        target: str | None = None) -> dict[str, Any]:
    """The `matformer` student transform: nest the FFNs of `target` (a module path; default
    `default_target`: a VLM's language model, a timm model whole), in place. A student that is
    nested already (a universal model loaded from its folder) keeps its nesting and takes the
    granularities. `sample`, `self_distill` and `temperature` are joint-training options, read
    by the training step, not here. Returns notes for the run's summary.

    Raises:
        ValueError: no nestable MLP under `target`, or bad granularities.
    """
    try:
        already = nested_mlps(student)
    except ValueError:
        already = None
    if already:
        count = len(already)
    else:
        try:
            root = student.get_submodule(target) if target is not None else default_target(student)
        except AttributeError as e:
            raise ValueError(f"target {target!r}: the student has no such module ({e})") from None
        count = len(matformerize(root, granularities))
    order = tuple(sorted(granularities, reverse=True))
    object.__setattr__(student, "matformer_granularities", order)
    return {"nested_mlps": count, "granularities": list(order)}
