"""Weight quantization of a student: which Linear layers get which scheme (`plan`), fake
quantization with a straight-through estimator for quantization-aware distillation (the
`quantize` student transform), and the `transformers` quantization config that turns the
same plan into the real quantized format (`quantization_config`, used by `workbench compress`).

Schemes (one per Linear layer; a model mixes schemes of one backend only):

| scheme     | backend       | weights                                                   | QAD |
|------------|---------------|-----------------------------------------------------------|-----|
| `int8`     | torchao       | int8, symmetric per output channel (Int8WeightOnlyConfig) | yes |
| `int4`     | torchao       | int4, symmetric per group of `group_size` inputs (IntxWeightOnlyConfig) | yes |
| `nf4`      | bitsandbytes  | 4-bit NormalFloat, absmax per block of 64, optional double quantization | yes |
| `llm_int8` | bitsandbytes  | LLM.int8(): int8 rows, activations int8 with fp16 outlier columns (threshold 6) | no |

Fake quantization runs the backend's own quantizer and dequantizer on the latent weight
(torchao's tensor subclass, bitsandbytes' `quantize_4bit`), so the converted model computes
with exactly the weights the student trained with. Module scopes: `llm` (the Linear layers of
`model.get_decoder()`), `vision` (modules outside the decoder whose name says vision / visual),
`connector` (the other modules outside the decoder: projector, resampler), `lm_head`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from typing import Any

import torch
from torch import Tensor, nn

_log = logging.getLogger("students.quantize")
SCOPES = ("llm", "vision", "connector", "lm_head")
BACKENDS = {"int8": "torchao", "int4": "torchao", "nf4": "bitsandbytes", "llm_int8": "bitsandbytes"}
QAD_SCHEMES = ("int8", "int4", "nf4")
BITS = {"int8": 8, "int4": 4, "nf4": 4, "llm_int8": 8}
# bitsandbytes (0.50) runs NF4 on CPU through a kernel that packs weights in tiles of 32 output
# features by 64-input blocks and fails on other shapes; such layers stay in full precision on
# every device, so that a model is the same wherever it runs (teachers/hf_vlm.py does the same).
NF4_OUT_BLOCK, NF4_IN_BLOCK = 32, 64
CONFIG_KEY = "workbench_quantize"  # the request a QAD student was trained under, in its config.json


@dataclass(frozen=True)
class Preset:
    """A named quantization recipe: the scheme of each scope, the layers it keeps in full
    precision, what it follows and what of it cannot be reproduced here."""

    scopes: dict[str, str]
    follows: str
    not_reproduced: str = ""
    skip: tuple[str, ...] = ()
    group_size: int = 32
    double_quant: bool = False


PRESETS: dict[str, Preset] = {
    "tinygptv_int8": Preset(
        {"llm": "llm_int8"},
        "TinyGPT-V low_resource: the Phi-2 LLM loaded with LLM.int8(); vision tower and Q-Former in half precision",
        "the vision tower stays in the student's own dtype (fp32 here, fp16 in TinyGPT-V)"),
    "minicpmv_nf4": Preset(
        {"llm": "nf4", "vision": "nf4"},
        "MiniCPM-V int4 build: bitsandbytes NF4 with double quantization on LLM and vision tower; lm_head, the "
        "resampler and the vision attention output projections stay 16-bit",
        "MiniCPM-V's GGUF Q4_K_M (llama.cpp) builds", skip=("*out_proj", "*kv_proj"), double_quant=True),
    "bluelm_mixed": Preset(
        {"vision": "int8", "connector": "int8", "llm": "int4"},
        "BlueLM-V-3B: vision tower and projector int8, LLM int4 weight-only (group 32; 128 with --group-size)",
        "the NPU kernels (and packed int4 on x86 CPUs: torchao 0.18 stores int4 one value per byte there, so "
        "the LLM's memory is that of int8; its packed int4 layouts need CUDA or ARM kernels)"),
    "int8": Preset({"llm": "int8", "vision": "int8"}, "int8 weight-only (torchao), per output channel"),
    "nf4": Preset({"llm": "nf4", "vision": "nf4"}, "bitsandbytes NF4, blocks of 64"),
    "int4": Preset({"llm": "int4", "vision": "int4"}, "int4 weight-only (torchao), symmetric groups of 32",
                   "packed int4 storage on x86 CPUs (see bluelm_mixed)"),
    "llm_int8": Preset({"llm": "llm_int8", "vision": "llm_int8"}, "bitsandbytes LLM.int8() (outlier threshold 6)"),
}


@dataclass
class QuantRequest:
    """What to quantize and how; `quantize` transform options and `workbench compress` flags.

    Attributes:
        scopes: scheme per scope (`llm`, `vision`, `connector`, `lm_head`); scopes left out
            stay in full precision.
        skip: Linear layers kept in full precision whatever their scope: glob patterns on the
            full names (`*out_proj`) or module prefixes (`model.vision_tower`).
        group_size: inputs per scale of `int4`.
        double_quant: `nf4` with its block scales quantized too (bitsandbytes' compress_statistics).
        preset: the preset the request came from, for the record.
        preset_skip: the preset's own skip patterns (kept when `skip` is not given; unlike
            `skip`, they need not match a layer of every model: `*kv_proj` is MiniCPM-V's resampler).
    """

    scopes: dict[str, str]
    skip: list[str] = field(default_factory=list)
    group_size: int = 32
    double_quant: bool = False
    preset: str | None = None
    preset_skip: list[str] = field(default_factory=list)

    @classmethod
    def from_options(cls, preset: str | None = None, method: str | None = None, scopes: list[str] | None = None,
                     skip: list[str] | None = None, group_size: int | None = None,
                     double_quant: bool | None = None, quantize_lm_head: bool = False) -> QuantRequest:
        """A preset, or a scheme applied to `scopes` (default `llm` and `vision`); `skip`
        replaces the preset's list; `quantize_lm_head` adds the LM head with the LLM's scheme.

        Raises:
            ValueError: an unknown preset, scheme or scope, or both / neither of preset and method.
        """
        if (preset is None) == (method is None):
            raise ValueError("give a preset or a method (not both)")
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
            p = PRESETS[preset]
            if scopes is not None:
                raise ValueError("scopes are set by the preset; use a method to choose them")
            chosen = dict(p.scopes)
            preset_skip = list(p.skip) if skip is None else []
            group_size = p.group_size if group_size is None else group_size
            double_quant = p.double_quant if double_quant is None else double_quant
        else:
            if method not in BACKENDS:
                raise ValueError(f"unknown method {method!r}; methods: {', '.join(BACKENDS)}")
            bad = [s for s in scopes or () if s not in SCOPES]
            if bad:
                raise ValueError(f"unknown scope {bad[0]!r}; scopes: {', '.join(SCOPES)}")
            chosen = {s: method for s in scopes or ("llm", "vision")}
            preset_skip = []
        if quantize_lm_head:
            chosen["lm_head"] = chosen.get("llm") or next(iter(chosen.values()))
        request = cls(chosen, list(skip or []), 32 if group_size is None else int(group_size), bool(double_quant),
                      preset, preset_skip)
        request.check()
        return request

    def check(self) -> None:
        """Raises ValueError for a request no backend can carry out."""
        if not self.scopes:
            raise ValueError("nothing to quantize: no scope has a scheme")
        for scope, scheme in self.scopes.items():
            if scope not in SCOPES:
                raise ValueError(f"unknown scope {scope!r}; scopes: {', '.join(SCOPES)}")
            if scheme not in BACKENDS:
                raise ValueError(f"unknown method {scheme!r} for {scope}; methods: {', '.join(BACKENDS)}")
        backends = {BACKENDS[s] for s in self.scopes.values()}
        if len(backends) > 1:
            raise ValueError(f"schemes {sorted(set(self.scopes.values()))} need two backends ({' and '.join(sorted(backends))}); "
                             "one model takes one: use the torchao schemes (int8, int4) or the bitsandbytes ones")
        if {"nf4", "llm_int8"} <= set(self.scopes.values()):
            raise ValueError("bitsandbytes loads a model either in 8 bits or in 4 bits: nf4 and llm_int8 cannot be mixed")
        if self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    def record(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- which layers


def outside_decoder(model: nn.Module) -> list[str]:
    """Root-anchored names of the parameterised modules met beside the path from the root to
    `model.get_decoder()`, e.g. `["lm_head", "model.vision_tower",
    "model.multi_modal_projector"]` for LLaVA; the output embeddings are always included."""
    names = {id(module): name for name, module in model.named_modules()}
    decoder = model.get_decoder()
    parts = names[id(decoder)].split(".") if decoder is not model else []
    found = []
    for depth, step in enumerate(parts):
        parent_name = ".".join(parts[:depth])
        for child_name, child in model.get_submodule(parent_name).named_children():
            if child_name != step and any(True for _ in child.parameters()):
                found.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    head = model.get_output_embeddings()
    if head is not None and names[id(head)] not in found:
        found.append(names[id(head)])
    return found


def linear_scopes(model: nn.Module) -> dict[str, str]:
    """Every Linear layer's full name -> its scope."""
    roots = outside_decoder(model)
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    scopes = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        root = next((r for r in roots if name == r or name.startswith(r + ".")), None)
        if name == head_name:
            scopes[name] = "lm_head"
        elif root is None:
            scopes[name] = "llm"
        else:
            scopes[name] = "vision" if any(w in root.rsplit(".", 1)[-1] for w in ("vision", "visual")) else "connector"
    return scopes


def matches(pattern: str, name: str) -> bool:
    """A skip pattern: a glob on the full name, or a module prefix."""
    return fnmatch(name, pattern) or name.startswith(pattern.rstrip(".") + ".")


def fits(scheme: str, layer: nn.Linear, group_size: int) -> str | None:
    """Why `scheme` cannot run this layer (None when it can)."""
    if scheme == "int4" and layer.in_features % group_size:
        return f"{layer.in_features} inputs are not a multiple of group_size {group_size}"
    if scheme == "nf4" and (layer.out_features % NF4_OUT_BLOCK or layer.in_features % NF4_IN_BLOCK):
        return (f"bitsandbytes' NF4 CPU kernel needs output / input widths that are multiples of "
                f"{NF4_OUT_BLOCK} / {NF4_IN_BLOCK} ({layer.out_features} x {layer.in_features})")
    return None


@dataclass
class Plan:
    """The scheme of every Linear layer a request quantizes, and what it keeps in full precision."""

    request: QuantRequest
    layers: dict[str, str]  # name -> scheme
    kept: list[str]  # Linear layers in full precision (scope without scheme, or skipped)
    unfit: dict[str, str]  # Linear layers the scheme cannot run, and why (kept too)

    @property
    def backend(self) -> str:
        return BACKENDS[next(iter(self.request.scopes.values()))]


def plan(model: nn.Module, request: QuantRequest) -> Plan:
    """Assign every Linear layer of `model` its scheme.

    Raises:
        ValueError: a skip pattern that matches no Linear layer, or a plan that quantizes nothing.
    """
    scopes = linear_scopes(model)
    for pattern in request.skip:
        if not any(matches(pattern, n) for n in scopes):
            examples = ", ".join(list(scopes)[:: max(1, len(scopes) // 3)][:3])
            raise ValueError(f"skip pattern {pattern!r} matches no Linear layer; names look like {examples} "
                             "(globs match full names, e.g. '*out_proj'; other patterns are module prefixes)")
    modules = dict(model.named_modules())
    layers, kept, unfit = {}, [], {}
    for name, scope in scopes.items():
        scheme = request.scopes.get(scope)
        if scheme is None or any(matches(p, name) for p in (*request.skip, *request.preset_skip)):
            kept.append(name)
            continue
        why = fits(scheme, modules[name], request.group_size)
        if why:
            unfit[name] = why
            kept.append(name)
        else:
            layers[name] = scheme
    if not layers:
        why = f"; e.g. {next(iter(unfit))}: {next(iter(unfit.values()))}" if unfit else ""
        raise ValueError(f"the request quantizes no Linear layer of the model (scopes {sorted(request.scopes)}, "
                         f"skip {request.skip}){why}")
    if unfit:
        _log.warning("%d Linear layer(s) stay in full precision: %s", len(unfit),
                     "; ".join(f"{n}: {w}" for n, w in list(unfit.items())[:3]))
    return Plan(request, layers, kept, unfit)


def covering_prefixes(names: list[str], all_names: list[str]) -> list[str]:
    """The shortest module prefixes that cover `names` and no other name of `all_names`
    (`["model.vision_tower", "lm_head"]` rather than every layer of the tower)."""
    chosen = set(names)
    out = []
    for name in names:
        parts = name.split(".")
        best = name
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            under = [n for n in all_names if n == prefix or n.startswith(prefix + ".")]
            if all(n in chosen for n in under):
                best = prefix
                break
        if best not in out:
            out.append(best)
    return out


# ---------------------------------------------------------------- the backends


def torchao_config(scheme: str, group_size: int):
    """The torchao config of one scheme (torchao >= 0.14)."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if scheme == "int8":
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))


def quantization_config(p: Plan, model: nn.Module, compute_dtype: torch.dtype = torch.float32):
    """The `transformers` quantization config that loads a model quantized as `p` says.

    torchao gets one entry per weight (parameter names, so that biases stay as they are);
    bitsandbytes its skip list (which replaces its default list) as covering module prefixes.
    """
    if p.backend == "torchao":
        from torchao.quantization import FqnToConfig
        from transformers import TorchAoConfig

        g = p.request.group_size
        return TorchAoConfig(quant_type=FqnToConfig({f"{n}.weight": torchao_config(s, g) for n, s in p.layers.items()}))
    from transformers import BitsAndBytesConfig

    skip = covering_prefixes(p.kept, list(linear_scopes(model)))
    if "llm_int8" in p.layers.values():
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=p.request.double_quant, llm_int8_skip_modules=skip)


def fake_quantize(weight: Tensor, scheme: str, group_size: int = 32, double_quant: bool = False) -> Tensor:
    """The weight the backend computes with after quantizing `weight`: quantize, dequantize
    (no gradient; see `FakeQuantLinear` for the straight-through estimator)."""
    w = weight.detach()
    if scheme == "nf4":
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        return bnbf.dequantize_4bit(packed, state).to(w.dtype)
    if scheme in ("int8", "int4"):
        from torchao.quantization import quantize_

        holder = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        holder.weight = nn.Parameter(w, requires_grad=False)
        quantize_(holder, torchao_config(scheme, group_size))
        return holder.weight.dequantize().to(w.dtype)
    raise ValueError(f"scheme {scheme!r} has no fake quantization (quantization-aware training takes "
                     f"{', '.join(QAD_SCHEMES)}: weight-only schemes)")


class FakeQuantLinear(nn.Linear):
    """A Linear layer that computes with its quantized weight and trains its latent
    full-precision weight through a straight-through estimator: forward uses Q(W), backward
    passes the gradient to W unchanged (W + stopgrad(Q(W) - W)). Parameter names are those of
    nn.Linear, so state dicts and exports hold the latent weights under their usual names."""

    scheme: str = "int4"
    group_size: int = 32
    double_quant: bool = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int = 32,
                    double_quant: bool = False) -> FakeQuantLinear:
        """A FakeQuantLinear holding `linear`'s own weight and bias (no copy)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.scheme, layer.group_size, layer.double_quant = scheme, group_size, double_quant
        return layer

    def quantized_weight(self) -> Tensor:
        w = self.weight
        return w + (fake_quantize(w, self.scheme, self.group_size, self.double_quant) - w).detach()

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.quantized_weight(), self.bias)

    def fused_weight(self) -> Tensor:
        """The matrix a fused LM-head kernel multiplies by (`trainer.fused_logits`)."""
        return self.quantized_weight()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fake_quant={self.scheme}"


def _check_trainable(schemes) -> None:
    bad = sorted({s for s in schemes if s not in QAD_SCHEMES})
    if bad:
        raise ValueError(f"{bad[0]} cannot be trained quantization-aware: it quantizes activations at run time with "
                         f"outlier columns; use a weight-only scheme ({', '.join(QAD_SCHEMES)})")


def fake_quantize_model(model: nn.Module, request: QuantRequest) -> Plan:
    """Turn the planned Linear layers of `model` into `FakeQuantLinear` in place (same
    parameters), and record the request in `model.config` so the export carries it."""
    p = plan(model, request)
    _check_trainable(p.layers.values())
    modules = dict(model.named_modules())
    for name, scheme in p.layers.items():
        # a plain Linear, or a FakeQuantLinear of an earlier call (rebuilt alike)
        new = FakeQuantLinear.from_linear(modules[name], scheme, request.group_size, request.double_quant)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, request.record())
    return p


def recorded_request(config: Any) -> QuantRequest | None:
    """The request a quantization-aware student was trained under (None for other models)."""
    record = getattr(config, CONFIG_KEY, None)
    if not record:
        return None
    return QuantRequest(**record)


def check_quantize_options(method: str | None = "int4", preset: str | None = None, scopes: list[str] | None = None,
                           skip: list[str] | None = None, group_size: int | None = None,
                           double_quant: bool | None = None, quantize_lm_head: bool = False) -> QuantRequest:
    """The `quantize` transform's options that need no model, checked when a config loads
    (before any stage trains): the request they make. Raises ValueError."""
    request = QuantRequest.from_options(preset, None if preset else method, scopes, skip, group_size, double_quant,
                                        quantize_lm_head)
    _check_trainable(request.scopes.values())
    return request


def check_quantize_fits(model: nn.Module, **options: Any) -> None:
    """The `quantize` options against a model, changing nothing: every skip pattern matches a
    layer and some layer takes the scheme. Raises ValueError."""
    plan(model, check_quantize_options(**options))


def quantize_transform(student: nn.Module, method: str | None = "int4", preset: str | None = None,
                       scopes: list[str] | None = None, skip: list[str] | None = None, group_size: int | None = None,
                       double_quant: bool | None = None, quantize_lm_head: bool = False) -> dict[str, Any]:
    """The `quantize` student transform: fake quantization (straight-through estimator) of the
    student's Linear layers, for quantization-aware distillation against the full-precision
    model; `workbench compress` later converts the trained student to the real format. Takes
    the options of `QuantRequest.from_options` (`preset` replaces the default method). Returns
    notes for the run's summary.

    Raises:
        ValueError: a bad preset, method, scope or pattern, or a scheme without fake quantization.
    """
    request = check_quantize_options(method, preset, scopes, skip, group_size, double_quant, quantize_lm_head)
    p = fake_quantize_model(student, request)
    schemes = sorted(set(p.layers.values()))
    return {"schemes": schemes, "quantized_layers": len(p.layers), "kept_layers": len(p.kept),
            **({"group_size": request.group_size} if "int4" in schemes else {}),
            **({"double_quant": request.double_quant} if "nf4" in schemes else {}),
            **({"preset": preset} if preset else {})}
