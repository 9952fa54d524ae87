"""`workbench bench elastic`: every uniform granularity of a MatFormer model plus Mix'n'Match
specs, each extracted to a static model and measured in this process — parameters, FLOPs
(per token for language models, per image for classifiers), CPU latency at one batch size,
and held-out accuracy when the source is a run directory — as a table, JSON and a plot of
accuracy against parameters. Latencies are compared as ratios within one run.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.rundir import run_dir_of_model

SPEEDUP_TARGET = 0.8  # the quarter-width model's speedup must reach this share of its FLOP ratio


def _source(source: str):
    """(universal model, model folder or None, run config or None) for a run, a folder or timm:<name>."""
    from students.matformer import matformerize
    from workbench.config import load_config
    from workbench.elastic import load_universal, resolve_model_dir

    if source.startswith("timm:"):
        import timm

        import students.minivit  # noqa: F401

        try:
            model = timm.create_model(source[5:])
        except Exception as e:  # noqa: BLE001 - unknown names, bad kwargs
            raise WorkbenchError(f"cannot build {source}: {e}".splitlines()[0]) from None
        matformerize(model)
        return model.eval(), None, None
    model_dir = resolve_model_dir(source)
    run = run_dir_of_model(model_dir)
    return load_universal(model_dir), model_dir, load_config(run.config) if run is not None else None


def _batches(model, model_dir: Path | None, cfg, batch: int):
    """(a held-out loader or None, one input batch of `batch` samples)."""
    from torch.utils.data import DataLoader

    from workbench.registry import DATASETS

    if cfg is None:
        if model_dir is not None and not hasattr(model, "pretrained_cfg"):
            raise WorkbenchError(f"{model_dir} has no run config next to it: give a run directory to time a VLM")
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        return None, {"x": torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))}
    splits = DATASETS.get(cfg.data.type, "data.type")(cfg.data)
    if hasattr(splits, "classes"):
        from workbench.data.vision import ImageCollator

        collate = ImageCollator()
    else:
        from workbench.build.data import load_processor
        from workbench.data import VLMCollator

        collate = VLMCollator(load_processor(model_dir, "source"), max_length=cfg.data.max_length)
    loader = DataLoader(splits.val, batch_size=cfg.data.eval_batch_size, collate_fn=collate)
    sample = collate([splits.val[i] for i in range(min(batch, len(splits.val)))])
    return loader, sample


def _tokens(inputs: dict[str, Any]) -> int | None:
    mask = inputs.get("attention_mask")
    return int(mask.sum()) if mask is not None else None


@torch.inference_mode()
def _flops(model, inputs: dict[str, Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


@torch.inference_mode()
def _latencies(models: list, inputs: dict[str, Any], repeats: int) -> list[float]:
    """Median seconds per forward of each model; the models take turns within every repeat,
    so drift (clock, allocator, other processes) spreads over all of them alike."""
    for model in models:
        for _ in range(2):
            model(**inputs)  # warm-up
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, model in enumerate(models):
            start = time.perf_counter()
            model(**inputs)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def default_specs(model) -> list[tuple[str, Any]]:
    """Every uniform granularity, and budget-searched Mix'n'Match specs halfway between them."""
    from students.matformer import budget_spec, parse_spec, submodel_params, full_widths

    grans = sorted(getattr(model, "matformer_granularities", None) or (1.0, 0.5, 0.25, 0.125), reverse=True)
    uniform = [(f"uniform:{g:g}", parse_spec(f"uniform:{g}", full_widths(model))) for g in grans]
    mixes = []
    for (_, a), (_, b) in zip(uniform, uniform[1:]):
        budget = (submodel_params(model, a) + submodel_params(model, b)) // 2
        mixes.append((f"budget:{budget}", budget_spec(model, budget)))
    return uniform + mixes


def bench_elastic(source: str, specs: list[str] | None = None, batch: int = 8, repeats: int = 5,
                  skip: str | None = None) -> dict[str, Any]:
    """Measure every spec of `source`; returns {"rows": [...], "source", "batch", "machine"}."""
    from students.matformer import extract
    from workbench.bench import machine
    from workbench.elastic import spec_for
    from workbench.batch import model_inputs
    from workbench.evaluation import evaluate

    model, model_dir, cfg = _source(source)
    chosen = default_specs(model) if not specs else [(s, spec_for(model, s, skip)) for s in specs]
    loader, sample = _batches(model, model_dir, cfg, batch)
    inputs = model_inputs(sample) if "labels" in sample else sample
    per = "token" if _tokens(inputs) else "image"
    units = _tokens(inputs) or next(iter(inputs.values())).shape[0]
    statics = [extract(model, spec).eval() for _, spec in chosen]
    latencies = _latencies(statics, inputs, repeats)
    rows = []
    for (name, spec), static, latency in zip(chosen, statics, latencies):
        row = {"spec": name, "widths": spec.widths, "skip": list(spec.skip),
               "params": sum(p.numel() for p in static.parameters()), f"flops_per_{per}": _flops(static, inputs) / units,
               "latency_ms": latency * 1e3}
        if loader is not None:
            row.update(evaluate(static, loader))
        rows.append(row)
    full = rows[0]
    for row in rows:
        row["flop_ratio"] = full[f"flops_per_{per}"] / row[f"flops_per_{per}"]
        row["speedup"] = full["latency_ms"] / row["latency_ms"]
        row["speedup_vs_flops"] = row["speedup"] / row["flop_ratio"]
    return {"source": source, "batch": batch, "per": per, "rows": rows, "machine": machine()}


def format_table(result: dict[str, Any]):
    from rich.table import Table

    per = result["per"]
    table = Table(title=f"elastic submodels of {result['source']} (batch {result['batch']})")
    for col in ("spec", "params", f"MFLOPs/{per}", "latency ms", "speedup", "FLOP ratio", "speedup/FLOPs", "acc"):
        table.add_column(col, justify="left" if col == "spec" else "right")
    for r in result["rows"]:
        table.add_row(r["spec"], f"{r['params']:,}", f"{r[f'flops_per_{per}'] / 1e6:.2f}", f"{r['latency_ms']:.2f}",
                      f"{r['speedup']:.2f}", f"{r['flop_ratio']:.2f}", f"{r['speedup_vs_flops']:.2f}",
                      "-" if "acc" not in r else f"{r['acc']:.3f}")
    return table


def plot(result: dict[str, Any], out: str | Path) -> None:
    """Accuracy (or, without held-out data, latency) against parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    key = "acc" if all("acc" in r for r in rows) else "latency_ms"
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, marker in (("uniform", "o"), ("budget", "s"), ("widths", "^")):
        pts = [(r["params"], r[key]) for r in rows if r["spec"].startswith(kind)]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker=marker, linestyle="-" if kind == "uniform" else "none", label=kind)
    ax.set_xlabel("parameters")
    ax.set_ylabel("held-out accuracy" if key == "acc" else "latency (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def bench_elastic_command(source: str, specs: list[str] | None, batch: int, repeats: int, skip: str | None,
                          json_out: str | None, plot_out: str | None) -> None:
    from rich.console import Console

    result = bench_elastic(source, specs, batch, repeats, skip)
    Console(width=150).print(format_table(result))
    quarter = next((r for r in result["rows"] if r["spec"] == "uniform:0.25"), None)
    if quarter is not None:
        ok = quarter["speedup_vs_flops"] >= SPEEDUP_TARGET
        print(f"quarter width: speedup {quarter['speedup']:.2f}x vs FLOP ratio {quarter['flop_ratio']:.2f}x -> "
              f"{quarter['speedup_vs_flops']:.2f} (target >= {SPEEDUP_TARGET}): {'PASS' if ok else 'FAIL'}")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
    if plot_out:
        plot(result, plot_out)
