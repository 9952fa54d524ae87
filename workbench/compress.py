"""`workbench compress`: quantize a student (a run's export or any Hugging Face model folder)
into a folder that `from_pretrained` reloads quantized, with its processor, and a report
(`compress.json`): the preset and what it follows, every layer's scheme, what stayed in full
precision, and the bytes of every Linear weight and of the whole model before and after.

A student trained quantization-aware (the `quantize` transform) carries its request in its
config; compressing it without --preset / --method converts it with exactly that request,
so the quantized model computes what the fake-quantized student computed.

Ternary: a ternary student (the `ternary` transform) compresses to its packed form - codes
four to a byte and fp32 absmean scales, computed by the integer path of `kernels.ternary`
(`students.bitlinear.PackedBitLinear`); `--method ternary` on a full-precision model first
makes the chosen layers ternary without training (post-training ternarisation, weight-only:
the baseline the BitNet notes warn about).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.errors import WorkbenchError

REPORT = "compress.json"
_WRITTEN = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor stores: a torchao tensor subclass its inner tensors, a bitsandbytes
    parameter its packed data and quantization state, a plain tensor its elements."""
    try:
        from torchao.utils import TorchAOBaseTensor
    except ImportError:
        TorchAOBaseTensor = ()  # noqa: N806
    if isinstance(t, TorchAOBaseTensor):
        return sum(tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    total = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)  # bitsandbytes Params4bit
    if state is not None:
        total += sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values() if torch.is_tensor(v))
    scb = getattr(t, "SCB", None)  # bitsandbytes Int8Params: one scale per row
    if torch.is_tensor(scb):
        total += scb.numel() * scb.element_size()
    return total


def model_bytes(model: nn.Module) -> dict[str, Any]:
    """{"total": every parameter and buffer, "linear": {name: bytes of its weight}} (a packed
    ternary layer's weight: its packed codes and scales)."""
    linear = {name: tensor_bytes(m.weight) if isinstance(m, nn.Linear)
              else tensor_bytes(m.weight_packed) + tensor_bytes(m.weight_scale)
              for name, m in model.named_modules() if isinstance(m, nn.Linear) or hasattr(m, "weight_packed")}
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return {"total": total, "linear": linear}


def resolve_request(source: Path, preset: str | None, method: str | None, **options: Any):
    """The request of the flags, or the one a quantization-aware student recorded."""
    import students

    from students.quantize import QuantRequest, recorded_request

    config = students.load_config(source)
    quantized = getattr(config, "quantization_config", None)
    if quantized:
        method = quantized.get("quant_method") if isinstance(quantized, dict) else getattr(quantized, "quant_method", "")
        raise WorkbenchError(f"{source} is quantized already ({method}); compress its full-precision source")
    recorded = recorded_request(config)
    if preset is None and method is None:
        if recorded is None:
            raise WorkbenchError(f"{source} was not trained quantization-aware: give --preset NAME or --method NAME")
        if any(v not in (None, False) for v in options.values()):
            raise WorkbenchError("the student records the quantization it trained under; --skip, --scope, "
                                 "--group-size and --double-quant apply with --preset or --method only")
        return recorded, recorded
    try:
        return QuantRequest.from_options(preset, method, **options), recorded
    except ValueError as e:
        raise WorkbenchError(str(e)) from None


def compress(source: str | Path, out: str | Path, preset: str | None = None, method: str | None = None,
             scopes: list[str] | None = None, skip: list[str] | None = None, group_size: int | None = None,
             double_quant: bool | None = None, quantize_lm_head: bool = False, force: bool = False) -> dict[str, Any]:
    """Write the quantized model of `source` to `out` (see the module docstring); returns the report."""
    import students
    from students.quantize import PRESETS, plan, quantization_config
    from workbench.elastic import resolve_model_dir

    model_dir = resolve_model_dir(source)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise WorkbenchError(f"--out {out} exists and is not empty; choose a new folder (or --force to replace it)")
    if students.is_timm_folder(model_dir):
        raise WorkbenchError(f"{model_dir} is a timm image classifier; compress takes Hugging Face model folders")
    if method == TERNARY or _recorded_ternary(model_dir):
        if preset is not None or method not in (None, TERNARY):
            raise WorkbenchError(f"{model_dir} is a ternary student: it compresses to its packed form only (no "
                                 "--preset / --method, or --method ternary)")
        report = compress_ternary(model_dir, scopes=scopes, skip=skip, group_size=group_size,
                                  quantize_lm_head=quantize_lm_head)
        _write(report.pop("model"), model_dir, out, report)
        return report
    request, recorded = resolve_request(model_dir, preset, method, scopes=scopes, skip=skip, group_size=group_size,
                                        double_quant=double_quant, quantize_lm_head=quantize_lm_head)
    _check_backend(request)
    skeleton = students.skeleton(model_dir)  # weightless: plans and sizes a model of any size
    try:
        layout = plan(skeleton, request)
    except ValueError as e:
        raise WorkbenchError(f"{model_dir}: {e}") from None
    before = model_bytes(skeleton)
    model = _load(model_dir, quantization_config(layout, skeleton))
    after = model_bytes(model)
    report = _report(model_dir, request, recorded, layout, before, after, PRESETS.get(request.preset))
    _write(model, model_dir, out, report)
    return report


TERNARY = "ternary"


def _recorded_ternary(model_dir: Path) -> dict | None:
    import students

    config = students.load_config(model_dir)
    spec = getattr(config, "workbench_ternary", None)
    if (spec and spec.get("packed")) or getattr(config, "quantization_config", None):
        raise WorkbenchError(f"{model_dir} is quantized already ({'packed ternary' if spec else 'quantization_config'}); "
                             "compress its full-precision source or its training export")
    return spec


def compress_ternary(model_dir: Path, scopes: list[str] | None = None, skip: list[str] | None = None,
                     group_size: int | None = None, quantize_lm_head: bool = False) -> dict[str, Any]:
    """The packed ternary model of `model_dir` (a ternary student as trained, or a full-precision
    model ternarised here) and its report; the model is under "model"."""
    from students.bitlinear import CONFIG_KEY, BitLinear, pack_model
    from students.quantize import covering_prefixes
    from students.ternary import ternary_transform

    if group_size is not None and group_size < 1:
        raise WorkbenchError(f"--group-size must be >= 1, got {group_size}")
    model = _load(model_dir, None)
    trained = getattr(model.config, CONFIG_KEY, None) is not None
    if trained and any(v not in (None, False) for v in (scopes, skip, group_size, quantize_lm_head)):
        raise WorkbenchError("the student records the ternary layers it trained with; --scope, --skip, "
                             "--group-size and --quantize-lm-head apply to full-precision sources only")
    if not trained:
        try:
            ternary_transform(model, scopes=scopes, skip=skip, act_bits=None, quantize_lm_head=quantize_lm_head,
                              weight_scale=f"group:{group_size}" if group_size else "tensor")
        except ValueError as e:
            raise WorkbenchError(f"{model_dir}: {e}") from None
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BitLinear)}
    full, weights = model_bytes(model)["total"], sum(m.weight.numel() for m in layers.values())
    fp_bytes = sum(tensor_bytes(m.weight) for m in layers.values())
    pack_model(model)
    after = model_bytes(model)
    packed = sum(after["linear"][n] for n in layers)
    spec = getattr(model.config, CONFIG_KEY)
    return {
        "model": model, "source": str(model_dir), "preset": None, "follows": None, "not_reproduced": None,
        "request": {"method": TERNARY, "weight_scale": spec["weight_scale"], "act_bits": spec["act_bits"],
                    "placement": spec["placement"]},
        "quantization_aware": trained, "backend": "workbench (kernels.ternary)", "layers": {TERNARY: len(layers)},
        "kept": covering_prefixes([n for n in after["linear"] if n not in layers], list(after["linear"])),
        "bytes": {"full": full, "quantized": after["total"], "ratio": round(full / max(1, after["total"]), 3),
                  "linear_full": fp_bytes, "linear_quantized": packed, "linear_ratio": round(fp_bytes / max(1, packed), 3),
                  "linear_bf16": 2 * weights, "linear_bf16_ratio": round(2 * weights / max(1, packed), 3)},
        "schemes": {TERNARY: {"layers": len(layers), "fp_bytes": fp_bytes, "bytes": packed,
                              "ratio": round(fp_bytes / max(1, packed), 3)}},
        **_provenance(),
    }


def _provenance() -> dict[str, Any]:
    from workbench.device import environment

    env = environment()
    return {"packages": {k: v for k, v in env["packages"].items()
                         if k in ("torch", "transformers", "torchao", "bitsandbytes", "accelerate")},
            "git_commit": env["git_commit"]}


def _check_backend(request) -> None:
    from transformers.utils import is_accelerate_available, is_bitsandbytes_available, is_torchao_available

    from students.quantize import BACKENDS

    backend = BACKENDS[next(iter(request.scopes.values()))]
    ok = is_torchao_available() if backend == "torchao" else is_bitsandbytes_available() and is_accelerate_available()
    if not ok:
        need = "torchao" if backend == "torchao" else "bitsandbytes accelerate"
        raise WorkbenchError(f"{'/'.join(sorted(set(request.scopes.values())))} needs {need}: "
                             f"pip install {need} (or pip install -e '.[quant]')")


def _load(model_dir: Path, quantization_config):
    import students

    try:
        model = students.load(model_dir, quantization_config=quantization_config)
    except students.StudentLoadError as e:
        raise WorkbenchError(str(e)) from None
    return model.eval()


def _report(model_dir: Path, request, recorded, layout, before: dict, after: dict, preset) -> dict[str, Any]:
    from collections import Counter

    from students.quantize import covering_prefixes

    quantized = [n for n in layout.layers if n in before["linear"] and n in after["linear"]]
    fp_w = sum(before["linear"][n] for n in quantized)
    q_w = sum(after["linear"][n] for n in quantized)
    by_scheme = {}
    for scheme in sorted(set(layout.layers.values())):
        names = [n for n in quantized if layout.layers[n] == scheme]
        by_scheme[scheme] = {"layers": len(names), "fp_bytes": sum(before["linear"][n] for n in names),
                             "bytes": sum(after["linear"][n] for n in names)}
        by_scheme[scheme]["ratio"] = round(by_scheme[scheme]["fp_bytes"] / max(1, by_scheme[scheme]["bytes"]), 3)
    return {
        "source": str(model_dir),
        "preset": request.preset,
        "follows": preset.follows if preset else None,
        "not_reproduced": preset.not_reproduced if preset else None,
        "request": request.record(),
        "quantization_aware": recorded is not None,
        "trained_request": recorded.record() if recorded is not None else None,
        "backend": layout.backend,
        "layers": dict(Counter(layout.layers.values())),
        "kept": covering_prefixes(layout.kept, [*layout.layers, *layout.kept]),
        "unfit": layout.unfit,
        "bytes": {"full": before["total"], "quantized": after["total"],
                  "ratio": round(before["total"] / max(1, after["total"]), 3),
                  "linear_full": fp_w, "linear_quantized": q_w, "linear_ratio": round(fp_w / max(1, q_w), 3)},
        "schemes": by_scheme,
        **_provenance(),
    }


def _write(model, model_dir: Path, out: Path, report: dict[str, Any]) -> None:
    """Save into a temporary sibling folder, then move it into place: an interrupted compress
    leaves no half-written folder behind."""
    import students
    from students.quantize import CONFIG_KEY

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if hasattr(model.config, CONFIG_KEY):  # the real format replaces the fake quantization
            delattr(model.config, CONFIG_KEY)
        model.save_pretrained(tmp)
        written = set(students.write_remote_code(model, tmp))
        for f in model_dir.iterdir():  # processor, tokenizer, chat template, remote code
            if f.is_file() and f.name not in _WRITTEN | written and not f.name.endswith(".safetensors") \
                    and f.name != REPORT:
                shutil.copy2(f, tmp / f.name)
        (tmp / REPORT).write_text(json.dumps(report, indent=2, default=str))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def compress_command(args) -> dict[str, Any]:
    report = compress(args.source, args.out, args.preset, args.method, args.scope, args.skip, args.group_size,
                      args.double_quant, args.quantize_lm_head, args.force)
    b = report["bytes"]
    what = report["preset"] or "/".join(sorted(report["layers"]))
    print(f"{what} ({report['backend']}): {sum(report['layers'].values())} Linear layers quantized "
          + ", ".join(f"{n} {s}" for s, n in report["layers"].items()) + "; kept in full precision: "
          + ", ".join(report["kept"]))
    for scheme, row in report["schemes"].items():
        print(f"  {scheme}: Linear weights {row['fp_bytes'] / 2**20:.2f} MiB -> {row['bytes'] / 2**20:.2f} MiB "
              f"({row['ratio']:.2f}x)")
    if "linear_bf16" in b:
        print(f"  {TERNARY} against bf16: {b['linear_bf16'] / 2**20:.2f} MiB -> {b['linear_quantized'] / 2**20:.2f} MiB "
              f"({b['linear_bf16_ratio']:.2f}x)")
    print(f"whole model {b['full'] / 2**20:.2f} MiB -> {b['quantized'] / 2**20:.2f} MiB ({b['ratio']:.2f}x)")
    if report["not_reproduced"]:
        print(f"not reproduced here: {report['not_reproduced']}")
    print(f"written to {args.out}")
    return report
