"""The `ternary` student transform: chosen Linear layers of a Hugging Face decoder or VLM
language model become BitNet b1.58 BitLinear layers (`students.bitlinear`), in place, starting
from their weights, with the norms placed as one of three published layouts. The conversion is
recorded in the model's config (`students.bitlinear.CONFIG_KEY`: the layers, their norm, the
scales, removed norms), so `students.load` and an exported folder's remote code rebuild it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from students.bitlinear import CONFIG_KEY, PLACEMENTS, SUBLN, BitLinear, PackedBitLinear, parse_weight_scale


def _divisible(scoped: list[str], modules: dict[str, nn.Module], group: int | None, weight_scale: str,
               chosen: list[str]) -> list[str]:
    """The layers of `scoped` whose inputs split into whole groups (all of them per tensor)."""
    picked = [n for n in scoped if group is None or modules[n].in_features % group == 0]
    if scoped and not picked:
        widths = sorted({modules[n].in_features for n in scoped})
        raise ValueError(f"weight_scale {weight_scale}: the group divides the inputs of none of the {len(scoped)} "
                         f"Linear layers in scopes {chosen} (their input widths: {', '.join(map(str, widths))})")
    if not picked:
        raise ValueError(f"no Linear layer to make ternary (scopes {chosen}, weight_scale {weight_scale})")
    return picked


def check_ternary_options(scopes: list[str] | None = None, skip: list[str] | None = None, placement: str = "mmfree",
                          weight_scale: str = "tensor", act_bits: int | None = 8, quantize_lm_head: bool = False
                          ) -> list[str]:
    """The `ternary` transform's options that need no model, checked when a config loads (before
    any stage trains): the scopes they choose. Raises ValueError."""
    from students.quantize import SCOPES

    chosen = list(scopes or ["llm"]) + (["lm_head"] if quantize_lm_head else [])
    bad = [s for s in chosen if s not in SCOPES]
    if bad:
        raise ValueError(f"unknown scope {bad[0]!r}; scopes: {', '.join(SCOPES)}")
    if act_bits is not None and not 2 <= act_bits <= 16:
        raise ValueError(f"act_bits must be between 2 and 16 (or null for weight-only), got {act_bits}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r}: use one of {', '.join(PLACEMENTS)}")
    parse_weight_scale(weight_scale)
    return chosen


def check_ternary_fits(model: nn.Module, scopes: list[str] | None = None, skip: list[str] | None = None,
                       placement: str = "mmfree", weight_scale: str = "tensor", act_bits: int | None = 8,
                       quantize_lm_head: bool = False) -> tuple[dict[str, str], list[str] | None]:
    """The `ternary` options against a model, changing nothing: its Linear layers by scope and
    the ones that would become BitLinear (None: the model is ternary already). Raises
    ValueError for a skip pattern that matches nothing or a group that divides no layer."""
    from students.quantize import linear_scopes, matches

    chosen = check_ternary_options(scopes, skip, placement, weight_scale, act_bits, quantize_lm_head)
    names = linear_scopes(model)
    for pattern in skip or []:
        if not any(matches(pattern, n) for n in names):
            raise ValueError(f"skip pattern {pattern!r} matches no Linear layer")
    if any(isinstance(m, (BitLinear, PackedBitLinear)) for m in model.modules()):
        return names, None
    scoped = [n for n, s in names.items() if s in chosen and not any(matches(p, n) for p in skip or [])]
    return names, _divisible(scoped, dict(model.named_modules()), parse_weight_scale(weight_scale), weight_scale,
                             chosen)


def ternary_transform(student: nn.Module, scopes: list[str] | None = None, skip: list[str] | None = None,
                      placement: str = "mmfree", weight_scale: str = "tensor", act_bits: int | None = 8,
                      quantize_lm_head: bool = False) -> dict[str, Any]:
    """The `ternary` student transform: the Linear layers of `scopes` (default the language
    model: embeddings, `lm_head` and the vision tower stay full precision) become BitLinear,
    in place, starting from their weights. `skip` as in `students.quantize` (globs on full
    names or module prefixes, each must match). Returns notes for the run's summary.

    `placement` says where the norms go: `mmfree` (matmulfreellm's code: an RMSNorm inside
    every BitLinear, the block's pre-norms kept), `bitnet_faq` (the BitNet training FAQ: norms
    inside, the decoder blocks' pre-norms removed), `bitnet_2b4t` (BitNet b1.58 2B4T's inference
    layout: block pre-norms kept, no norm inside except the "subln" RMSNorm before `o_proj` and
    `down_proj`).

    Raises:
        ValueError: an unknown scope, norm or weight scale, a pattern matching nothing, or a
            group that divides no layer.
    """
    chosen = check_ternary_options(scopes, skip, placement, weight_scale, act_bits, quantize_lm_head)
    names, picked = check_ternary_fits(student, scopes, skip, placement, weight_scale, act_bits, quantize_lm_head)
    if picked is None:  # a ternary student loaded from its folder keeps its layers
        already = sum(isinstance(m, (BitLinear, PackedBitLinear)) for m in student.modules())
        return {"ternary_layers": already, "kept_layers": len(names) - already, "already_ternary": True}
    modules = dict(student.named_modules())
    group = parse_weight_scale(weight_scale)
    for name in picked:
        parent, _, child = name.rpartition(".")
        inside = placement != "bitnet_2b4t" or child in SUBLN
        layer = BitLinear.from_linear(modules[name], norm="inside" if inside else "none", group=group,
                                      act_bits=act_bits)
        setattr(student.get_submodule(parent) if parent else student, child, layer)
    removed = _remove_block_norms(student) if placement == "bitnet_faq" else []
    config = getattr(student, "config", None)
    if config is not None:
        layers = {n: "inside" if student.get_submodule(n).norm is not None else "none" for n in picked}
        setattr(config, CONFIG_KEY, {"scopes": chosen, "skip": list(skip or []), "placement": placement,
                                     "weight_scale": weight_scale, "act_bits": act_bits, "layers": layers,
                                     "removed_norms": removed})
    return {"ternary_layers": len(picked), "kept_layers": len(names) - len(picked), "placement": placement,
            "weight_scale": weight_scale, "act_bits": act_bits,
            **({"removed_norms": len(removed)} if removed else {})}


def _remove_block_norms(student: nn.Module) -> list[str]:
    """The BitNet FAQ's layout: the decoder blocks' pre-norms go (BitLinear normalises its own
    input); the final norm before the LM head stays. Returns their names."""
    decoder = student.get_decoder()
    prefix = next(n for n, m in student.named_modules() if m is decoder)
    removed = []
    for i, block in enumerate(decoder.layers):
        for name in ("input_layernorm", "post_attention_layernorm"):
            if isinstance(getattr(block, name, None), nn.Module) and not isinstance(getattr(block, name), nn.Identity):
                setattr(block, name, nn.Identity())
                removed.append(f"{prefix}.layers.{i}.{name}".lstrip("."))
    if not removed:
        raise ValueError("placement bitnet_faq: the decoder blocks have no input_layernorm / "
                         "post_attention_layernorm to remove")
    return removed
