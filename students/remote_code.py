"""Exported folders that load where this project is not installed: the Hugging Face remote-code
convention (`from_pretrained(folder, trust_remote_code=True)`).

Stock families (LLaVA, plain decoders, uniform MatFormer extracts) need nothing: their
`config.json` names a transformers architecture. The others get their modeling code copied
next to the weights, with imports made relative to the folder, and an `auto_map`:

- encoder-free students (EVE, BREEN): their configuration, modeling and processing files,
  mapped for `AutoConfig`, `AutoModelForImageTextToText`, `AutoProcessor` and
  `AutoImageProcessor`;
- stock architectures whose structure the config changes (attention -> Mamba hybrids,
  per-layer MatFormer widths, ternary BitLinear layers - trained or packed, mixture-of-depths routers): a generated `modeling_workbench.py` whose class builds the stock
  model, rebuilds the recorded structure, and then loads the weights, plus the files that
  structure needs (the Mamba-2 mixer and its torch SSD scan, the nested MLP, the ternary layers and
  their integer path in torch);
- EAGLE draft heads: `eagle.py`, mapped for `AutoConfig` and `AutoModel`; the loaded head drafts
  once `head.attach(target)` gives it the target's embeddings and LM head.

Every copied file may import only torch, transformers, the standard library and its siblings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from torch import nn

_PACKAGE = Path(__file__).resolve().parent
_KERNELS = _PACKAGE.parent / "kernels"
_OURS = ("students", "kernels", "workbench", "teachers", "losses")

# file copied -> (its source, the import lines rewritten to the folder's copies)
_FILES = {
    "hf_cache.py": _PACKAGE / "hf_cache.py",
    "configuration_encoder_free.py": _PACKAGE / "encoder_free" / "configuration_encoder_free.py",
    "modeling_encoder_free.py": _PACKAGE / "encoder_free" / "modeling_encoder_free.py",
    "processing_encoder_free.py": _PACKAGE / "encoder_free" / "processing_encoder_free.py",
    "hybrid.py": _PACKAGE / "hybrid.py",
    "mamba2.py": _PACKAGE / "mamba2.py",
    "ssd_ref.py": _KERNELS / "ssd" / "ref.py",
    "matformer.py": _PACKAGE / "matformer.py",
    "bitlinear.py": _PACKAGE / "bitlinear.py",
    "ternary_ref.py": _KERNELS / "ternary" / "ref.py",
    "mmfree.py": _PACKAGE / "mmfree.py",
    "hgrn_ref.py": _KERNELS / "hgrn" / "ref.py",
    "mod.py": _PACKAGE / "mod.py",
    "eagle.py": _PACKAGE / "eagle.py",
}
_IMPORTS = [
    (re.compile(r"^(\s*)from students\.encoder_free\.(\w+) import", re.M), r"\1from .\2 import"),
    (re.compile(r"^(\s*)from students\.(hf_cache|mamba2|hybrid|matformer|bitlinear|mmfree|mod) import", re.M),
     r"\1from .\2 import"),
    # the torch scan: mamba-ssm's fused one is this project's dispatch, not needed to load a model
    (re.compile(r"^(\s*)from kernels\.ssd import compute_dtype, ssd_scan, ssd_step$", re.M),
     r"\1from .ssd_ref import compute_dtype, ssd_step\n\1from .ssd_ref import ssd_chunked as ssd_scan"),
    # the MLGRU recurrence and the ternary integer path: their torch references
    (re.compile(r"^(\s*)from kernels\.hgrn import hgrn_recurrence$", re.M),
     r"\1from .hgrn_ref import recurrence as hgrn_recurrence"),
    (re.compile(r"^(\s*)from kernels\.ternary(?:\.ref)? import", re.M), r"\1from .ternary_ref import"),
]
_NEEDS = {
    "encoder_free": ["configuration_encoder_free.py", "modeling_encoder_free.py", "processing_encoder_free.py",
                     "hf_cache.py"],
    "hybrid": ["hybrid.py", "mamba2.py", "ssd_ref.py", "hf_cache.py"],
    "widths": ["matformer.py"],
    "ternary": ["bitlinear.py", "ternary_ref.py"],
    "mod": ["mod.py", "hf_cache.py"],
    "mmfree": ["mmfree.py", "hgrn_ref.py", "bitlinear.py", "ternary_ref.py", "hf_cache.py"],
    "eagle": ["eagle.py", "hf_cache.py"],
}
MODELING = "modeling_workbench.py"


def _copy(name: str, folder: Path) -> None:
    text = _FILES[name].read_text()
    for pattern, replacement in _IMPORTS:
        text = pattern.sub(replacement, text)
    left = [line for line in text.splitlines() if re.match(rf"\s*(from|import) ({'|'.join(_OURS)})\b", line)]
    if left:
        raise RuntimeError(f"{name} still imports this project ({left[0].strip()}); it cannot be copied into an "
                           "exported folder")
    (folder / name).write_text(text)


def _update_json(path: Path, **entries) -> None:
    data = json.loads(path.read_text())
    data.update(entries)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_remote_code(model: nn.Module, folder: str | Path) -> list[str]:
    """Make an exported folder (already `save_pretrained`) load with stock transformers and
    `trust_remote_code=True`; returns the files written ([] for a stock model)."""
    folder = Path(folder)
    config = model.config
    if config.model_type == "encoder_free_vlm":
        return _encoder_free(folder)
    if config.model_type == "mmfree":  # the MatMul-free LM on its own: its own classes
        return _own_classes(folder, "mmfree", {"AutoConfig": "mmfree.MMFreeConfig",
                                               "AutoModelForCausalLM": "mmfree.MMFreeForCausalLM"})
    if config.model_type == "workbench_eagle":  # a draft head: attach(target) after loading
        return _own_classes(folder, "eagle", {"AutoConfig": "eagle.EagleConfig", "AutoModel": "eagle.EagleDraft"})
    text = config.get_text_config()
    kinds = [k for k, present in (("hybrid", getattr(text, "hybrid", None)),
                                  ("widths", getattr(text, "matformer_widths", None)),
                                  ("ternary", getattr(config, "workbench_ternary", None)),
                                  ("mod", getattr(config, "workbench_mod", None)),
                                  ("mmfree", text.model_type == "mmfree")) if present]
    if not kinds:
        return []
    files = list(dict.fromkeys(f for k in kinds for f in _NEEDS[k]))
    for name in files:
        _copy(name, folder)
    base = type(model).__name__
    auto = "AutoModelForCausalLM" if base.endswith("ForCausalLM") else "AutoModelForImageTextToText"
    auto_map = {auto: f"modeling_workbench.{base}"}
    if "mmfree" in kinds:  # the text config's model type must be registered before the config parses
        auto_map["AutoConfig"] = f"modeling_workbench.{type(config).__name__}"
    (folder / MODELING).write_text(_modeling(base, kinds, type(config).__name__))
    _update_json(folder / "config.json", auto_map=auto_map)
    return [*files, MODELING]


def _own_classes(folder: Path, kind: str, auto_map: dict[str, str]) -> list[str]:
    """A model whose classes are ours alone (not a restructured stock architecture)."""
    files = _NEEDS[kind]
    for name in files:
        _copy(name, folder)
    _update_json(folder / "config.json", auto_map=auto_map)
    return list(files)


def _encoder_free(folder: Path) -> list[str]:
    files = _NEEDS["encoder_free"]
    for name in files:
        _copy(name, folder)
    _update_json(folder / "config.json", auto_map={
        "AutoConfig": "configuration_encoder_free.EncoderFreeConfig",
        "AutoModel": "modeling_encoder_free.EncoderFreeForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_encoder_free.EncoderFreeForConditionalGeneration"})
    image = {"AutoImageProcessor": "processing_encoder_free.EncoderFreeImageProcessor"}
    if (folder / "preprocessor_config.json").is_file():
        _update_json(folder / "preprocessor_config.json", auto_map=image)
    if (folder / "processor_config.json").is_file():  # transformers 5 nests the image processor's config here
        data = json.loads((folder / "processor_config.json").read_text())
        if isinstance(data.get("image_processor"), dict):
            data["image_processor"]["auto_map"] = image
        data["auto_map"] = {"AutoProcessor": "processing_encoder_free.EncoderFreeProcessor", **image}
        (folder / "processor_config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return list(files)


def _modeling(base: str, kinds: list[str], config_class: str) -> str:
    lines = [
        '"""A stock transformers architecture with the structure its config records (written by',
        'distill-workbench: `from_pretrained(folder, trust_remote_code=True)`)."""',
        "",
        f"from transformers import {base} as _Stock",
        "",
    ]
    if "hybrid" in kinds:
        lines.append("from .hybrid import restore_structure")
    if "widths" in kinds:
        lines.append("from .matformer import NestedMLP")
    if "ternary" in kinds:
        lines.append("from .bitlinear import restore_ternary")
    if "mod" in kinds:
        lines.append("from .mod import restore_mod")
    if "mmfree" in kinds:
        lines += [f"from transformers import {config_class} as _StockConfig", "",
                  "from .mmfree import MMFreeConfig  # noqa: F401 - registers \"mmfree\" with the Auto classes",
                  "", "", f"class {config_class}(_StockConfig):",
                  '    """The stock configuration, read once the text model\'s type is registered."""']
    lines += [
        "",
        "",
        f"class {base}(_Stock):",
        '    """Built as the stock class, then restructured before the weights load."""',
        "",
        "    @classmethod",
        "    def is_custom_code(cls):",
        "        return False  # the stock checkpoint layout: transformers applies the stock key conversions",
        "",
        "    def __init__(self, config, *args, **kwargs):",
        "        super().__init__(config, *args, **kwargs)",
    ]
    if "widths" in kinds:
        lines += [
            "        widths = getattr(config.get_text_config(), 'matformer_widths', None) or []",
            "        for layer, width in zip(self.get_decoder().layers, widths):",
            "            layer.mlp = NestedMLP(layer.mlp).static(width)",
        ]
    if "hybrid" in kinds:
        lines.append("        restore_structure(self)")
    if "ternary" in kinds:
        lines.append("        restore_ternary(self, config.workbench_ternary)")
    if "mod" in kinds:
        lines.append("        restore_mod(self, config.workbench_mod)")
    lines.append("")
    return "\n".join(lines)

