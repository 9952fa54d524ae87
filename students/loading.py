"""Loading and exporting student folders: `load(path)` for exported Hugging Face and timm
folders (encoder-free, MatFormer and hybrid ones rebuilt to their recorded structure),
`load_language_model` for the decoder and head a student builder starts from, `export_timm`,
and `create_vision_student` for timm-registered image classifiers (ours included).
Re-exported by `students`; raises `StudentLoadError` for folders it cannot read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from students.errors import StudentLoadError


def is_timm_folder(path: str | Path) -> bool:
    """A folder in timm's hub format: config.json naming an `architecture`, plus weights."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "architecture" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def register_families() -> None:
    """Register this project's model families with the transformers Auto classes (the
    encoder-free VLMs, the MatMul-free LM), so `AutoConfig` and the Auto model classes read
    their folders; idempotent."""
    import students.encoder_free.modeling_encoder_free  # noqa: F401
    import students.mmfree  # noqa: F401


def load_config(path: str | Path) -> Any:
    """`AutoConfig.from_pretrained(path)` with this project's families registered."""
    from transformers import AutoConfig

    register_families()
    return AutoConfig.from_pretrained(path)


def load(path: str | Path, quantization_config: Any = None) -> nn.Module:
    """Load an exported student (`config.json` + `model.safetensors`) from a folder: a Hugging
    Face VLM, or a timm image classifier (timm's hub format, as `export_timm` writes it).

    A quantization-aware student (its config records the request it trained under) comes
    back fake-quantized as it trained; with `quantization_config` (a `transformers` one, see
    `students.quantize.quantization_config`) a Hugging Face folder loads really quantized.

    Raises:
        StudentLoadError: the folder, its config or its weights are missing or unreadable.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise StudentLoadError(f"student folder {path} has no config.json (not an exported model)")
    from students.eagle import is_draft_head_folder

    if is_draft_head_folder(path):
        raise StudentLoadError(f"{path} holds a draft head, which runs on its target's features: attach it with "
                               "students.eagle.load_draft_head(path, target), or measure it with "
                               f"`workbench bench speculative TARGET --draft {path}`")
    try:
        if is_timm_folder(path):
            import students.minivit  # noqa: F401 - registers the MiniViT models with timm

            return _load_timm(path)
        return _load_hf(path, quantization_config)
    except Exception as e:  # noqa: BLE001 - safetensors, JSON and OS errors all mean "unreadable"
        raise StudentLoadError(f"cannot load the student from {path}: {type(e).__name__}: {e}".splitlines()[0]) from None



def load_language_model(path: str | Path) -> tuple[nn.Module, nn.Module, Any]:
    """(decoder, LM head, text config) of a causal LM folder or of a VLM's language model - what
    a student builder puts behind its own vision side (`students.vlm.llava_from_parts`, the
    encoder-free builders).

    Raises:
        StudentLoadError: the folder is unreadable.
        ValueError: it holds an encoder-free model, which is continued with `load` instead.
    """
    from students.encoder_free.modeling_encoder_free import EncoderFreeForConditionalGeneration

    model = load(path)
    if isinstance(model, EncoderFreeForConditionalGeneration):
        raise ValueError(f"{path} is an encoder-free model already; continue from it with student.path")
    return model.get_decoder(), model.get_output_embeddings(), model.config.get_text_config()

def skeleton(path: str | Path) -> nn.Module:
    """The model of a Hugging Face folder without its weights (on the meta device), rebuilt
    to its recorded structure: what planning a quantization needs of a model of any size."""
    import torch

    config = load_config(path)
    auto, widths, hybrid = _auto_class(config)
    with torch.device("meta"):
        model = auto.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    if widths or hybrid or getattr(config, "workbench_ternary", None) or getattr(config, "workbench_mod", None):
        _restructure(model, widths, hybrid, getattr(config, "workbench_ternary", None),
                     getattr(config, "workbench_mod", None))
    return model


def _auto_class(config: Any) -> tuple[Any, list[int] | None, dict | None]:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in config.architectures or []) \
        else AutoModelForImageTextToText
    text = config.get_text_config()
    return auto, getattr(text, "matformer_widths", None), getattr(text, "hybrid", None)


def _load_hf(path: Path, quantization_config: Any = None) -> nn.Module:
    """A Hugging Face VLM (encoder-free ones included) or causal LM folder; MatFormer folders
    come back nested (a universal model, `matformer_granularities` in its text config) or
    with per-layer MLP widths (an extracted Mix'n'Match submodel, `matformer_widths`);
    attention->Mamba hybrids with their Mamba layers (`hybrid`, see `students.hybrid`); ternary
    students with their BitLinear layers, or packed ones (`workbench_ternary`, see
    `students.bitlinear`); mixture-of-depths students with their routers (`workbench_mod`, see
    `students.mod`)."""
    from transformers import AutoModelForCausalLM

    from students.quantize import fake_quantize_model, recorded_request

    config = load_config(path)
    auto, widths, hybrid = _auto_class(config)
    extra = {} if quantization_config is None else {"quantization_config": quantization_config}
    ternary = getattr(config, "workbench_ternary", None)
    mod = getattr(config, "workbench_mod", None)
    if widths or hybrid or ternary or mod:  # the structure differs from the architecture's: rebuild it, then load
        model = _from_pretrained_restructured(
            auto, path, config, lambda m: _restructure(m, widths, hybrid, ternary, mod), extra)
    else:
        model = auto.from_pretrained(path, **extra)
    request = recorded_request(config)
    if request is not None and quantization_config is None:
        fake_quantize_model(model, request)  # a quantization-aware student computes as it trained
    text = config.get_text_config()
    granularities = getattr(text, "matformer_granularities", None)
    if granularities:
        from students.matformer import matformerize

        matformerize(model if auto is AutoModelForCausalLM else model.get_decoder(), granularities)
        object.__setattr__(model, "matformer_granularities", tuple(granularities))
    return model


def _restructure(model: nn.Module, widths: list[int] | None, hybrid: dict | None,
                 ternary: dict | None = None, mod: dict | None = None) -> None:
    if widths:
        from students.matformer import NestedMLP

        for (name, mlp), width in zip(_mlps(model), widths):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NestedMLP(mlp).static(width))
    if hybrid:
        from students.hybrid import restore_structure

        restore_structure(model)
    if ternary and "layers" not in ternary:  # exported before the layers were recorded: plan them again
        from students.ternary import ternary_transform

        ternary_transform(model, **{k: v for k, v in ternary.items() if k != "packed"})
    elif ternary:
        from students.bitlinear import restore_ternary

        restore_ternary(model, ternary)
    if mod:
        from students.mod import restore_mod

        restore_mod(model, mod)


def _from_pretrained_restructured(auto: Any, path: Path, config: Any, restructure, extra: dict) -> nn.Module:
    """`from_pretrained` into the architecture changed by `restructure` (called right after
    the model is built, before the weights load), so transformers' own loading - key
    renames of older checkpoint layouts, shards, dtypes - applies; every weight must fit."""
    base = auto._model_mapping[type(config)]

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        restructure(self)

    cls = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})
    model, info = cls.from_pretrained(path, config=config, output_loading_info=True, **extra)
    model.__class__ = base
    if info["missing_keys"] or info["unexpected_keys"]:
        raise ValueError(f"weights do not fit the recorded structure: missing {sorted(info['missing_keys'])[:3]}, "
                         f"unexpected {sorted(info['unexpected_keys'])[:3]}")
    return model


def _mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder's per-layer MLPs, in order."""
    decoder = model.get_decoder()
    prefix = next(n for n, m in model.named_modules() if m is decoder)
    return [(f"{prefix}.layers.{i}.mlp", layer.mlp) for i, layer in enumerate(decoder.layers)]


def _load_timm(path: Path) -> nn.Module:
    """A timm folder; MatFormer ones come back nested (`matformer_granularities`) or as the
    extracted submodel they hold (`matformer_spec`: per-layer widths of the universal model
    its `model_args` describe, and skipped layers)."""
    import timm

    config = json.loads((path / "config.json").read_text())
    spec = config.get("matformer_spec")
    if spec is None:
        model = timm.create_model(f"local-dir:{path.resolve()}", pretrained=True)
    else:
        from safetensors.torch import load_file

        from students.matformer import MatSpec, extract, matformerize

        universal = timm.create_model(f"local-dir:{path.resolve()}", pretrained=False)
        matformerize(universal)
        model = extract(universal, MatSpec(spec["widths"], tuple(spec["skip"])))
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    if config.get("matformer_granularities"):
        from students.matformer import matformerize

        matformerize(model, config["matformer_granularities"])
    return model


def export_timm(model: nn.Module, out: str | Path, class_names: list[str] | None = None,
                preprocess: dict[str, Any] | None = None, matformer_spec: Any = None) -> None:
    """Save a timm model as config.json (architecture, constructor arguments, preprocessing,
    class names) + model.safetensors; `load(out)` and `timm.create_model("local-dir:" + out,
    pretrained=True)` rebuild it.

    Args:
        preprocess: the normalisation the training images had ({"mean", "std", "crop_pct"}),
            recorded in the folder's `pretrained_cfg` for whoever runs the model next.
        matformer_spec: for a submodel `students.matformer.extract` made, its `MatSpec`
            (timm's constructor arguments still describe the universal model).
    """
    from timm.models import save_for_hf

    extra: dict[str, Any] = {"label_names": list(class_names)} if class_names else {}
    if getattr(model, "matformer_granularities", None):
        extra["matformer_granularities"] = list(model.matformer_granularities)
    if matformer_spec is not None:
        extra["matformer_spec"] = {"widths": list(matformer_spec.widths), "skip": list(matformer_spec.skip)}
    save_for_hf(model, str(out), safe_serialization=True, model_config=extra or None,
                data_config=dict(preprocess) if preprocess else None)


def create_vision_student(name: str, num_classes: int, img_size: int, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name)` for the data at hand: its classes, channels and image size.

    Any timm architecture works (e.g. `deit_tiny_patch16_224` as an unshared baseline);
    `students.minivit` registers the Mini-DeiT / Mini-Swin models. `img_size` is passed only
    when it differs from the architecture's default, so convolutional nets need not take it.
    """
    import timm

    import students.minivit  # noqa: F401

    default = timm.get_pretrained_cfg(name)
    size = tuple(default.input_size[1:]) if default is not None else None
    extra = {} if size == (img_size, img_size) else {"img_size": img_size}
    return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **{**extra, **kwargs})
