"""`workbench bench decode`: per-token decode latency and cache memory at long contexts for a
transformer (the teacher: every layer attention), the same model with 25 % of its layers
converted to Mamba-2 (MaTVLM's ratio) and with every layer converted (mmMamba-linear).

For each model every context length is prefilled once (random tokens), then `--tokens`
single-token steps run on each cache, the contexts taking turns, each step timed (median).
Memory is what the cache holds after them - attention KV entries grow with the context,
Mamba states do not - and, on CUDA, the peak allocated during the decode steps (with every
context's cache alive). All numbers are measured in one process and compared as ratios
(longest vs shortest context per model; teacher vs hybrid / Mamba per context).
"""

from __future__ import annotations

import copy
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError

FLAT_TARGET = 1.2  # the all-Mamba model's per-token latency at the longest context vs the shortest
MIB = 2**20


def _base_model(source: str | None, hidden: int, layers: int, heads: int, vocab: int):
    """The all-attention model: a causal LM or VLM folder (decoded on text tokens), or a
    randomly initialised Llama of the given width."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if source:
        import students

        return students.load(source)
    if hidden % heads:
        raise WorkbenchError(f"--hidden {hidden} is not a multiple of --heads {heads}")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=1 << 20, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def _variants(base, ratio: float) -> dict[str, Any]:
    from students.hybrid import convert

    hybrid, mamba = copy.deepcopy(base), copy.deepcopy(base)
    convert(hybrid, f"ratio:{ratio}")
    convert(mamba, "all")
    return {"teacher": base, f"hybrid {ratio:.0%}": hybrid, "all-mamba": mamba}


@torch.inference_mode()
def _measure(model, contexts: list[int], tokens: int, batch: int, device: torch.device, vocab: int
             ) -> list[dict[str, Any]]:
    """Prefill one cache per context, then decode `tokens` steps taking the contexts in turn
    (so drift in the machine's speed hits every context alike); one row per context."""
    from transformers import DynamicCache

    from students.hf_cache import CACHE_KWARG
    from students.hybrid import cache_nbytes

    caches, nexts, prefill = {}, {}, {}
    for context in contexts:
        g = torch.Generator().manual_seed(context)
        ids = torch.randint(0, vocab, (batch, context), generator=g).to(device)
        caches[context] = DynamicCache()
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: caches[context]})
        _sync(device)
        prefill[context] = time.perf_counter() - start
        nexts[context] = out.logits[:, -1:].argmax(-1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times: dict[int, list[float]] = {c: [] for c in contexts}
    for _ in range(tokens):
        for context in contexts:
            start = time.perf_counter()
            out = model(input_ids=nexts[context], use_cache=True, **{CACHE_KWARG: caches[context]})
            nexts[context] = out.logits[:, -1:].argmax(-1)
            _sync(device)
            times[context].append(time.perf_counter() - start)
    rows = []
    for context in contexts:
        held = cache_nbytes(caches[context])
        rows.append({"context": context, "ms_per_token": 1e3 * statistics.median(times[context]),
                     "prefill_s": prefill[context], "kv_mib": held["kv"] / MIB, "state_mib": held["mamba"] / MIB,
                     "cache_mib": (held["kv"] + held["mamba"]) / MIB})
    if device.type == "cuda":  # all contexts' caches are alive: the peak is of the decode steps over all of them
        peak = (torch.cuda.max_memory_allocated(device) - base) / MIB
        for row in rows:
            row["decode_peak_mib"] = peak
    del caches, out
    gc.collect()
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_decode(source: str | None = None, contexts: tuple[int, ...] = (1024, 4096, 16384), tokens: int = 32,
                 batch: int = 1, hidden: int = 256, layers: int = 8, heads: int = 4, vocab: int = 1024,
                 ratio: float = 0.25, device: str | None = None, dtype: str = "float32") -> dict[str, Any]:
    """Measure every (model, context) pair; returns rows, summary ratios and the machine."""
    from workbench.bench import machine

    if tokens < 1 or batch < 1 or not contexts or min(contexts) < 1:
        raise WorkbenchError("--tokens, --batch and every context must be >= 1")
    if device not in (None, "cpu", "cuda"):
        raise WorkbenchError(f"--device {device!r}: use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError("--device cuda: no CUDA device is available here")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise WorkbenchError(f"--dtype {dtype!r}: use one of {', '.join(dtypes)}")
    torch_dtype = dtypes[dtype]
    base = _base_model(source, hidden, layers, heads, vocab)
    cfg = base.config.get_text_config()
    vocab = cfg.vocab_size
    models = _variants(base.eval(), ratio)
    rows = []
    for name, model in models.items():
        model.to(device=dev, dtype=torch_dtype)
        params = sum(p.numel() for p in model.parameters())
        _measure(model, [min(contexts)], 3, batch, dev, vocab)  # warm-up: allocator, kernels, lazy inits
        for row in _measure(model, sorted(contexts), tokens, batch, dev, vocab):
            rows.append({"model": name, "params": params, **row})
            print(f"  {name:>12} @ {row['context']:>6}: {row['ms_per_token']:.2f} ms/token, "
                  f"cache {row['cache_mib']:.1f} MiB", flush=True)
        model.to("cpu")
    lo, hi = min(contexts), max(contexts)

    def at(name: str, context: int) -> dict[str, Any]:
        return next(r for r in rows if r["model"] == name and r["context"] == context)

    summary = {name: {"latency_growth": at(name, hi)["ms_per_token"] / at(name, lo)["ms_per_token"],
                      "cache_growth": at(name, hi)["cache_mib"] / max(at(name, lo)["cache_mib"], 1e-9)}
               for name in models}
    speedups = {name: {c: at("teacher", c)["ms_per_token"] / at(name, c)["ms_per_token"] for c in sorted(contexts)}
                for name in models if name != "teacher"}
    memory = {name: {c: 1 - at(name, c)["cache_mib"] / at("teacher", c)["cache_mib"] for c in sorted(contexts)}
              for name in models if name != "teacher"}
    flat = summary["all-mamba"]["latency_growth"]
    return {"source": source or f"llama d={hidden} L={layers} H={heads}", "device": str(dev), "dtype": dtype,
            "batch": batch, "tokens": tokens, "contexts": sorted(contexts), "rows": rows, "growth": summary,
            "speedup_vs_teacher": speedups, "cache_saving_vs_teacher": memory,
            "flat_target": {"all_mamba_latency_growth": flat, "target": FLAT_TARGET, "pass": flat <= FLAT_TARGET},
            "machine": machine()}


def format_table(result: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"decode latency and cache of {result['source']} on {result['device']} "
                        f"(batch {result['batch']}, {result['dtype']})")
    cols = ["model", "params", "context", "ms/token", "speedup", "cache MiB", "KV MiB", "state MiB", "prefill s"]
    cuda = any("decode_peak_mib" in r for r in result["rows"])
    if cuda:
        cols.append("decode peak MiB")
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in result["rows"]:
        speed = result["speedup_vs_teacher"].get(r["model"], {}).get(r["context"])
        cells = [r["model"], f"{r['params']:,}", f"{r['context']:,}", f"{r['ms_per_token']:.2f}",
                 "-" if speed is None else f"{speed:.2f}x", f"{r['cache_mib']:.2f}", f"{r['kv_mib']:.2f}",
                 f"{r['state_mib']:.2f}", f"{r['prefill_s']:.2f}"]
        if cuda:
            cells.append(f"{r['decode_peak_mib']:.1f}")
        table.add_row(*cells)
    return table


def parse_contexts(text: str) -> tuple[int, ...]:
    """"1k,4k,16k" or "1024,4096" -> token counts (k = 1024)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = 1024 if part.endswith("k") else 1
        try:
            out.append(int(part.removesuffix("k")) * scale)
        except ValueError:
            raise WorkbenchError(f"--contexts {text!r}: give comma-separated lengths, e.g. 1k,4k,16k") from None
    return tuple(out)


def bench_decode_command(source: str | None, contexts: str, tokens: int, batch: int, hidden: int, layers: int,
                         heads: int, ratio: float, device: str | None, dtype: str, json_out: str | None) -> None:
    from rich.console import Console

    ctx = parse_contexts(contexts)
    result = bench_decode(source, ctx, tokens, batch, hidden, layers, heads, ratio=ratio, device=device, dtype=dtype)
    Console(width=160).print(format_table(result))
    lo, hi = result["contexts"][0], result["contexts"][-1]
    for name, g in result["growth"].items():
        print(f"{name}: per-token latency x{g['latency_growth']:.2f} and cache x{g['cache_growth']:.2f} "
              f"from {lo:,} to {hi:,} tokens")
    flat = result["flat_target"]
    print(f"all-mamba latency growth {flat['all_mamba_latency_growth']:.2f} (target <= {FLAT_TARGET}): "
          f"{'PASS' if flat['pass'] else 'FAIL'}")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
