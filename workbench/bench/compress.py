"""`workbench bench compress`: a student in full precision and under each quantization preset
(and post-training ternarisation), measured on the same axes; a quantization-aware or ternary
student also as converted ("trained": the packed form of a ternary one).

Quality (in this process, the full-precision model beside each quantized one, batch by batch
over the held-out split): KL(full || quantized) of the next-token distributions at the answer
positions, argmax agreement there, held-out answer accuracy. Cost (each variant in a fresh
subprocess with fixed threads, `python -m workbench.bench.compress --worker SPEC`): bytes of
the Linear weights and of the whole model as stored, RSS of the loaded model, peak RSS of
prefill + decode, prefill time of the first held-out prompt (median of --repeats after one
warm-up) and decode tokens/s (median single-token step of --new-tokens steps, the first
discarded). Times are this machine's, reported and never asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError

DEFAULT_PRESETS = ("tinygptv_int8", "minicpmv_nf4", "bluelm_mixed", "int8", "nf4", "int4", "ternary")
MIB = 2**20


@torch.no_grad()
def quality(full: torch.nn.Module, model: torch.nn.Module, loader) -> dict[str, float]:
    """KL(full || model) and argmax agreement at the answer positions, and `model`'s accuracy."""
    from workbench.batch import model_inputs
    from workbench.metrics import accuracies, answer_positions, merge_scores, score_spans, spans_correct

    kl_sum, agree, n, scores = 0.0, 0, 0, {}
    for batch in loader:
        inputs, labels = model_inputs(batch), batch["labels"]
        keep = answer_positions(labels)
        p = _answer_logits(full, inputs, keep).float().log_softmax(-1)
        q = _answer_logits(model, inputs, keep).float().log_softmax(-1)
        kl_sum += (p.exp() * (p - q)).sum().item()
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
        n += p.shape[0]
        merge_scores(scores, score_spans(*spans_correct(q.argmax(-1), labels), batch.get("qtypes")))
    return {"kl": kl_sum / max(n, 1), "agreement": agree / max(n, 1), **accuracies(scores), "answer_tokens": n}


def _answer_logits(model, inputs: dict, keep: torch.Tensor) -> torch.Tensor:
    logits = model(**inputs, logits_to_keep=keep).logits
    return logits[keep] if logits.dim() == 3 else logits


# ---------------------------------------------------------------- the worker (one variant, fresh process)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one variant and time prefill and decode on the recorded prompt (see the module docstring)."""
    from transformers import DynamicCache

    import students
    from students.hf_cache import CACHE_KWARG
    from workbench.bench import peak_rss_bytes, reset_peak_rss, rss_bytes
    from workbench.compress import model_bytes

    torch.set_num_threads(spec["threads"])
    inputs = {k: torch.tensor(v) for k, v in spec["inputs"].items()}
    inputs["pixel_values"] = inputs["pixel_values"].float()
    before = rss_bytes()
    model = students.load(spec["path"]).eval()
    loaded = rss_bytes() - before
    sizes = model_bytes(model)
    reset_peak_rss()
    start_rss = rss_bytes()
    prefill = []
    with torch.inference_mode():
        for _ in range(spec["repeats"] + 1):
            cache = DynamicCache()
            t = time.perf_counter()
            out = model(**inputs, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
            prefill.append(time.perf_counter() - t)
        token = out.logits[:, -1:].argmax(-1)
        steps, length = [], inputs["input_ids"].shape[1]
        for i in range(spec["new_tokens"] + 1):
            mask = torch.ones(1, length + i + 1, dtype=torch.long)
            t = time.perf_counter()
            out = model(input_ids=token, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache})
            steps.append(time.perf_counter() - t)
            token = out.logits[:, -1:].argmax(-1)
    step = statistics.median(steps[1:])
    return {"linear_bytes": sum(sizes["linear"].values()), "model_bytes": sizes["total"], "load_rss": loaded,
            "peak_rss": peak_rss_bytes() - start_rss, "prefill_ms": statistics.median(prefill[1:]) * 1e3,
            "decode_tok_s": 1.0 / step, "prompt_tokens": length}


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: `python -m workbench.bench.compress --worker SPEC_JSON` prints one JSON line."""
    p = argparse.ArgumentParser(prog="python -m workbench.bench.compress")
    p.add_argument("--worker", required=True, metavar="SPEC_JSON")
    args = p.parse_args(argv)
    print(json.dumps(measure(json.loads(args.worker))), flush=True)
    return 0


# ---------------------------------------------------------------- the command


def _prompt(held_out) -> dict[str, list]:
    """The first held-out sample up to its first answer token: the prompt every variant decodes from."""
    from workbench.batch import model_inputs
    from workbench.metrics import answer_positions

    batch = next(iter(held_out.loader(1)))
    first = int(answer_positions(batch["labels"])[0].nonzero()[0]) + 1
    inputs = model_inputs(batch)
    return {"input_ids": inputs["input_ids"][:, :first].tolist(), "pixel_values": inputs["pixel_values"].tolist()}


def _variants(model_dir: Path, presets: list[str], workdir: Path, reference: Path | None) -> dict[str, Path]:
    """"full" (the reference), the source itself when a reference is given, "trained" (the
    conversion of a quantization-aware student, or the packed form of a ternary one), and one
    compressed folder per preset ("ternary": post-training ternarisation). A ternary source's
    presets compress the full-precision reference (without one they are skipped)."""
    import students

    from students.quantize import recorded_request
    from workbench.compress import TERNARY, compress

    config = students.load_config(model_dir)
    folders = {"full": reference or model_dir}
    if reference is not None:
        folders["source"] = model_dir
    ternary = getattr(config, "workbench_ternary", None) is not None
    if ternary or recorded_request(config) is not None:
        folders["trained"] = workdir / "trained"
        compress(model_dir, folders["trained"])
    base = reference if ternary else model_dir
    if ternary and reference is None and presets:
        print("[workbench] a ternary source: the presets need its full-precision model (--reference DIR); skipped")
        presets = []
    for preset in presets:
        print(f"[workbench] compressing {'the reference ' if base != model_dir else ''}with {preset}")
        folders[preset] = workdir / preset
        if preset == TERNARY:
            compress(base, folders[preset], method=TERNARY)
        else:
            compress(base, folders[preset], preset=preset)
    return folders


def bench_compress_command(source: str, config: str | None, overrides: list[str], presets: list[str] | None,
                           data: str | None, new_tokens: int, repeats: int, threads: int, batch_size: int,
                           json_out: str | None, plot_out: str | None, keep: str | None,
                           reference: str | None = None) -> dict[str, Any]:
    from students.quantize import PRESETS
    from workbench.evaluation import held_out_for
    from workbench.elastic import resolve_model_dir

    from workbench.compress import TERNARY

    presets = list(presets or DEFAULT_PRESETS)
    bad = [p for p in presets if p not in PRESETS and p != TERNARY]
    if bad:
        raise WorkbenchError(f"--presets: unknown preset {bad[0]!r}; presets: {', '.join([*PRESETS, TERNARY])}")
    model_dir = resolve_model_dir(source)
    ref_dir = resolve_model_dir(reference) if reference else None
    held_out, _ = held_out_for(model_dir, config, overrides, data)
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="wb-compress-"))
    try:
        result = _measure_all(model_dir, _variants(model_dir, presets, workdir, ref_dir), held_out, new_tokens, repeats,
                              threads, batch_size)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    _print(result)
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
        print(f"written to {json_out}")
    if plot_out:
        plot(result, plot_out)
        print(f"plot written to {plot_out}")
    return result


def _measure_all(model_dir: Path, folders: dict[str, Path], held_out, new_tokens: int, repeats: int, threads: int,
                 batch_size: int) -> dict[str, Any]:
    from workbench.bench import machine, run_worker
    from workbench.evaluation import load_model

    full = load_model(folders["full"])
    spec = {"threads": threads, "repeats": repeats, "new_tokens": new_tokens, "inputs": _prompt(held_out)}
    rows = []
    for name, folder in folders.items():
        print(f"[workbench] measuring {name}")
        row = {"variant": name, "path": str(folder)}
        row.update(quality(full, load_model(folder) if name != "full" else full, held_out.loader(batch_size)))
        cost = run_worker("workbench.bench.compress", {**spec, "path": str(folder)}, timeout=3600)
        row.update(cost.data if cost.data is not None else {"error": cost.error})
        rows.append(row)
    return {"source": str(model_dir), "reference": str(folders["full"]), "data": held_out.source, "threads": threads, "new_tokens": new_tokens,
            "repeats": repeats, "rows": rows, "machine": machine(), "packages": _packages()}


def _packages() -> dict[str, str | None]:
    from workbench.device import environment

    return {k: v for k, v in environment()["packages"].items()
            if k in ("torch", "transformers", "torchao", "bitsandbytes")}


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = result["rows"]
    full = rows[0]
    table = Table(title=f"{result['source']} on {result['data']} ({result['threads']} threads)")
    for col in ("variant", "Linear MiB", "model MiB", "x smaller", "peak RSS MiB", "prefill ms", "decode tok/s",
                "KL(full||q)", "agreement", "acc"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["variant"], *["-"] * 6, f"{r['kl']:.2e}", f"{r['agreement']:.3f}", f"{r['acc']:.3f}")
            continue
        table.add_row(r["variant"], f"{r['linear_bytes'] / MIB:.2f}", f"{r['model_bytes'] / MIB:.2f}",
                      f"{full.get('model_bytes', 0) / r['model_bytes']:.2f}", f"{r['peak_rss'] / MIB:.1f}",
                      f"{r['prefill_ms']:.1f}", f"{r['decode_tok_s']:.1f}", f"{r['kl']:.2e}",
                      f"{r['agreement']:.3f}", f"{r['acc']:.3f}")
    Console(width=160).print(table)


def plot(result: dict[str, Any], out: str | Path) -> None:
    """Held-out accuracy against the model's stored bytes, one labelled point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in result["rows"]:
        if "model_bytes" in r:
            ax.scatter(r["model_bytes"] / MIB, r["acc"], color="C1" if r["variant"] == "full" else "C0")
            ax.annotate(r["variant"], (r["model_bytes"] / MIB, r["acc"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("stored model size (MiB)")
    ax.set_ylabel("held-out answer accuracy")
    ax.set_title(Path(result["source"]).name, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
