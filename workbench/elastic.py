"""Elastic submodels from the command line: `workbench extract RUN_OR_MODEL --spec ... --out DIR`.

Resolves a run directory or model folder to the universal (MatFormer) model, turns the spec
text (uniform:<f> | widths:<w1,...> | budget:<N params>, plus --skip) into a `MatSpec`,
extracts the static submodel (`students.matformer.extract`) and writes it as a folder that
`students.load` — and for uniform widths `AutoModelForCausalLM` / the VLM auto class, or
timm — loads on its own, with the source's tokenizer / processor files.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.rundir import RunDir

_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}


def resolve_model_dir(path: str | Path) -> Path:
    """A model folder, a run's exported `student/`, or a multi-stage run's last stage's."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    exported = RunDir(path).exported_student()
    if exported is not None:
        return exported
    raise WorkbenchError(f"{path} is neither a model folder (config.json) nor a run directory with an exported student")


def parse_budget(text: str) -> int:
    """"1.5B", "300M", "12000" -> a parameter count."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmbgKMBG]?)\s*", text)
    if not match:
        raise WorkbenchError(f"budget {text!r} is not a parameter count such as 300M or 1.5B")
    return int(float(match.group(1)) * _SUFFIX.get(match.group(2).lower(), 1))


def load_universal(model_dir: Path):
    """The nested model in `model_dir`; a model trained without nesting is nested on the fly
    the way training nests it - a VLM's language model only, its vision tower untouched - and
    its FFNs are sliced all the same (said so)."""
    import students
    from students.matformer import default_target, matformerize, nested_mlps

    model = students.load(model_dir)
    try:
        nested_mlps(model)
    except ValueError:
        try:
            matformerize(default_target(model))
        except ValueError as e:
            raise WorkbenchError(f"{model_dir}: {e}") from None
        print(f"[workbench] {model_dir} was not saved as a MatFormer model: slicing its FFNs as they are")
    return model.eval()


def spec_for(model, text: str, skip: str | None):
    from students.matformer import budget_spec, full_widths, parse_spec

    try:
        if text.startswith("budget:"):
            from students.matformer import parse_skip

            skips = parse_skip(skip or "", len(full_widths(model)))
            return budget_spec(model, parse_budget(text.partition(":")[2]), skips)
        return parse_spec(text, full_widths(model), skip)
    except ValueError as e:
        raise WorkbenchError(f"--spec {text!r}: {e}") from None


def extract_to(source: str | Path, spec_text: str, out: str | Path, skip: str | None = None) -> dict[str, Any]:
    """Extract the submodel `spec_text` of `source` into the new folder `out`; returns a report
    (spec, parameters before / after, the folder)."""
    from students.matformer import count_params, extract

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise WorkbenchError(f"--out {out} exists and is not empty; choose a new folder")
    model_dir = resolve_model_dir(source)
    model = load_universal(model_dir)
    spec = spec_for(model, spec_text, skip)
    try:
        static = extract(model, spec)
    except ValueError as e:  # widths beyond a layer's size, every layer skipped
        raise WorkbenchError(f"--spec {spec_text!r}: {e}") from None
    report = {"source": str(model_dir), "out": str(out), "widths": spec.widths, "skip": list(spec.skip),
              "params_before": count_params(model), "params_after": count_params(static)}
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(static, "save_pretrained"):
        import students

        static.save_pretrained(out)
        _copy_processing_files(model_dir, out)
        students.write_remote_code(static, out)
    else:
        import students

        config = json.loads((model_dir / "config.json").read_text())
        students.export_timm(static, out, config.get("label_names"),
                             {k: config["pretrained_cfg"][k] for k in ("mean", "std", "crop_pct")
                              if k in config.get("pretrained_cfg", {})}, matformer_spec=spec)
    (out / "extract.json").write_text(json.dumps(report, indent=2))
    return report


def _copy_processing_files(src: Path, dst: Path) -> None:
    """Tokenizer, processor and chat-template files: everything but weights and config."""
    for f in src.iterdir():
        if f.is_file() and f.suffix not in _WEIGHTS and f.name not in ("config.json", "generation_config.json") \
                and not f.name.endswith(".index.json") and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
