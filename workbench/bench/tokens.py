"""`workbench bench tokens`: fewer image tokens on one set of axes - the processed-token FLOPs
and KV-cache proxies, the KV bytes a prefill leaves, prefill time and decode speed, and (for
trained models) held-out accuracy - for the dense model, mixture-of-depths students and
training-free reducers, measured in one process.

Two modes:
- `workbench bench tokens RUN_OR_MODEL [--mod DIR ...] [--reduce SPEC ...]`: the dense model
  scored on its held-out split as it is and with each reducer, beside each MoD student folder:
  accuracy, the FLOPs and KV proxies averaged over the split, and the mean answer-token KL to
  the dense model; timings on the first held-out prompt (up to its first answer token).
- `workbench bench tokens` (no model): a randomly initialised Llama decoder at real-size layer
  shapes (default LLaVA-1.5-7B's: d 4096, MLP 11008, 32 heads; 4 of its 32 layers), a prompt of
  `--image-tokens` image and `--text-tokens` text tokens, dense against p-MoD (PRD) and each
  reducer. The question is how much of the FLOPs proxy's promise a CPU prefill delivers:
  `efficiency` = measured speed-up x FLOPs ratio (1.0: the speed-up the proxy predicts).

Prefills are timed in rounds, every variant once per round, and the median taken per variant:
a shared machine's speed drifts by tens of percent over minutes, and drift between variants
measured one after another would show up as speed-up.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError

MIB = 2**20
DEFAULT_REDUCERS = ("attention_prune:layer=1,keep=0.5",)


def cache_bytes(cache: Any) -> int:
    """Bytes of the keys and values a `transformers` cache holds."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def prefill(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[float, Any, Any]:
    """One timed prefill into a fresh cache: (seconds, outputs, cache)."""
    from transformers import DynamicCache

    from students.hf_cache import CACHE_KWARG

    cache = DynamicCache()
    start = time.perf_counter()
    out = model(**inputs, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
    return time.perf_counter() - start, out, cache


@torch.inference_mode()
def prefill_times(models: list[torch.nn.Module], inputs: dict[str, torch.Tensor], repeats: int) -> list[float]:
    """Median prefill milliseconds of each model, timed in turns (one warm-up round, then
    `repeats` rounds), so that a machine getting slower or faster shifts every model alike."""
    rounds = [[prefill(m.eval(), inputs)[0] for m in models] for _ in range(repeats + 1)]
    return [statistics.median(r[i] for r in rounds[1:]) * 1e3 for i in range(len(models))]


@torch.inference_mode()
def decoding(model: torch.nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int) -> dict[str, float]:
    """KV bytes after prefill and the median decode step after it."""
    from students.hf_cache import CACHE_KWARG

    _, out, cache = prefill(model.eval(), inputs)
    kv = cache_bytes(cache)
    token = out.logits[:, -1:].argmax(-1)
    length = inputs["input_ids"].shape[1]
    steps = []
    for i in range(new_tokens + 1):
        mask = torch.ones(token.shape[0], length + i + 1, dtype=torch.long)
        start = time.perf_counter()
        out = model(input_ids=token, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache})
        steps.append(time.perf_counter() - start)
        token = out.logits[:, -1:].argmax(-1)
    return {"kv_bytes": kv, "decode_tok_s": 1.0 / statistics.median(steps[1:]) if new_tokens else None}


@torch.inference_mode()
def proxies(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    from students.mod import count_tokens

    with count_tokens(model) as counter:
        model(**inputs)
    summary = counter.summary()
    return {"flops_ratio": summary["flops_ratio"], "kv_ratio": summary["kv_ratio"]}


def synthetic(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int | None, vocab: int,
              image_tokens: int, text_tokens: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """A random Llama decoder whose config names an image token, and one prompt: a few text
    tokens, the image tokens, the rest of the text (LLaVA's layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % heads:
        raise WorkbenchError(f"--hidden {hidden} is not a multiple of --heads {heads}")
    if image_tokens < 1 or text_tokens < 2 or layers < 2:
        raise WorkbenchError("need --image-tokens >= 1, --text-tokens >= 2 and --layers >= 2")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads or heads, vocab_size=vocab,
                      max_position_embeddings=4 * (image_tokens + text_tokens) + 64, attn_implementation="sdpa")
    cfg.image_token_id = vocab - 1
    model = LlamaForCausalLM(cfg).eval()
    generator = torch.Generator().manual_seed(0)
    lead = min(5, text_tokens - 1)
    text = torch.randint(0, vocab - 1, (text_tokens,), generator=generator)
    ids = torch.cat([text[:lead], torch.full((image_tokens,), vocab - 1), text[lead:]])[None]
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def bench_tokens_command(source: str | None = None, config: str | None = None, overrides: list[str] = (),
                         data: str | None = None, mods: list[str] = (), reducers: list[str] | None = None,
                         repeats: int = 3, new_tokens: int = 8, threads: int = 2, batch_size: int = 32,
                         hidden: int = 4096, intermediate: int = 11008, layers: int = 4, heads: int = 32,
                         kv_heads: int | None = None, vocab: int = 32000, image_tokens: int = 576,
                         text_tokens: int = 60, json_out: str | None = None, plot_out: str | None = None
                         ) -> dict[str, Any]:
    from workbench.bench import machine
    from workbench.rundir import write_json

    if repeats < 1 or new_tokens < 0 or threads < 1:
        raise WorkbenchError("--repeats and --threads must be at least 1, --new-tokens at least 0")
    torch.set_num_threads(threads)
    specs = list(DEFAULT_REDUCERS if reducers is None else reducers)
    rows: list[dict[str, Any]] = []
    models: list[torch.nn.Module] = []
    prompt: dict[str, torch.Tensor] = {}

    def row(name: str, model, inputs, held_out=None) -> None:
        print(f"[workbench] measuring {name}")
        r: dict[str, Any] = {"variant": name, **proxies(model, inputs), **decoding(model, inputs, new_tokens)}
        r["timed_flops_ratio"] = r["flops_ratio"]  # of the timed prompt; with held-out data the split's mean replaces it
        if held_out is not None:
            r.update(held_out(model))
        rows.append(r)
        models.append(model)
        prompt.update(inputs)

    if source is None:
        if mods:
            raise WorkbenchError("--mod compares trained MoD students with a trained dense model: give it as SOURCE")
        title = _synthetic_rows(row, specs, hidden, intermediate, layers, heads, kv_heads, vocab, image_tokens,
                                text_tokens)
    else:
        title = _trained_rows(row, specs, source, config, overrides, data, mods, batch_size)
    print(f"[workbench] timing prefills: {repeats} rounds over the {len(models)} variants in turn")
    for r, ms in zip(rows, prefill_times(models, prompt, repeats)):
        r["prefill_ms"] = ms
    dense = rows[0]
    for r in rows:
        r["prefill_speedup"] = dense["prefill_ms"] / r["prefill_ms"]
        r["efficiency"] = r["prefill_speedup"] * r["timed_flops_ratio"]
    result = {"title": title, "threads": threads, "repeats": repeats, "new_tokens": new_tokens, "rows": rows,
              "machine": machine()}
    _print(result)
    if json_out:
        write_json(Path(json_out), result)
        print(f"written to {json_out}")
    if plot_out:
        plot(result, plot_out)
        print(f"plot written to {plot_out}")
    return result


def _synthetic_rows(row, specs: list[str], hidden: int, intermediate: int, layers: int, heads: int,
                    kv_heads: int | None, vocab: int, image_tokens: int, text_tokens: int) -> str:
    """Dense, p-MoD (PRD) and each reducer on a random decoder at the given shapes; the title."""
    import copy

    from students.mod import mod_transform
    from students.reduce import apply_reducer

    base, inputs = synthetic(hidden, intermediate, layers, heads, kv_heads, vocab, image_tokens, text_tokens)
    row("dense", base, inputs)
    pmod = copy.deepcopy(base)
    mod_transform(pmod, schedule="prd")
    row("p-MoD (PRD)", pmod, inputs)
    for spec in specs:
        reduced = copy.deepcopy(base)
        _reduce(apply_reducer, reduced, spec)
        row(spec, reduced, inputs)
    return (f"random Llama, {layers} layers of d {hidden} / MLP {intermediate} / {heads} heads; "
            f"{image_tokens} image + {text_tokens} text tokens")


def _trained_rows(row, specs: list[str], source: str, config: str | None, overrides: list[str], data: str | None,
                  mods: list[str], batch_size: int) -> str:
    """The dense model, each MoD folder and each reducer on the held-out split; the title."""
    from students.reduce import apply_reducer
    from workbench.bench.compress import _prompt
    from workbench.elastic import resolve_model_dir
    from workbench.analysis import answer_logprobs, mean_kl, routable_model
    from workbench.evaluation import evaluate, held_out_for

    model_dir = resolve_model_dir(source)
    held_out, _ = held_out_for(model_dir, config, overrides, data)
    if held_out.classification:
        raise WorkbenchError(f"{model_dir} is an image classifier: no image tokens to reduce")
    prompt = _prompt(held_out)
    inputs = {"input_ids": torch.tensor(prompt["input_ids"]), "pixel_values": torch.tensor(prompt["pixel_values"])}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    loader = held_out.loader(batch_size)
    batches = list(loader)
    base = getattr(held_out.dataset, "dataset", held_out.dataset)  # a Subset under data.limit_val
    world = (Path(getattr(base, "json_path", "")).parent / "world.json").is_file()
    reference: list = []

    def scores(model) -> dict[str, Any]:
        """Held-out accuracy, the proxies averaged over the split, answer-token KL to the dense model."""
        metrics = evaluate(model, loader)
        out = {"acc": metrics.get("acc")}
        out.update({k: metrics[f"tokens/{k}"] for k in ("flops_ratio", "kv_ratio") if f"tokens/{k}" in metrics})
        logprobs = answer_logprobs(model, batches)
        if not reference:
            reference.extend(logprobs)
        out["kl"] = mean_kl(reference, logprobs)
        recall = object_recall(model, batches, held_out.collator.processor) if world else None
        return {**out, **({"object_recall": recall} if recall is not None else {})}

    row("dense", routable_model(model_dir), inputs, scores)
    for folder in mods:
        path = Path(folder)
        row(path.parent.name if path.name == "student" else path.name, routable_model(resolve_model_dir(folder)),
            inputs, scores)
    for spec in specs:
        model = routable_model(model_dir)
        _reduce(apply_reducer, model, spec)
        row(spec, model, inputs, scores)
    return f"{model_dir} on {held_out.source}"


@torch.inference_mode()
def object_recall(model: torch.nn.Module, batches: list[dict], processor: Any) -> float | None:
    """Wind-tunnel data: the share of the image tokens showing part of an object that a
    reducer's selection keeps to the deepest layer (`students.reduce.kept_image_tokens`); None
    for a model that selects nothing, one that merges (a merged token's content lives on in its
    run's head, so kept tokens do not measure kept objects) or tokens that are not one per patch."""
    from students.reduce import kept_image_tokens
    from workbench.batch import model_inputs
    from workbench.data.windtunnel import object_patches

    if getattr(model, "_framefusion", None) is not None:
        return None
    image_processor = processor.image_processor
    kept_total = objects = 0
    for batch in batches:
        model(**model_inputs(batch))
        kept = kept_image_tokens(model)
        if kept is None:
            return None
        flags = object_patches(batch["pixel_values"], processor.patch_size, image_processor.image_mean,
                               image_processor.image_std).flatten()
        image = batch["input_ids"] == processor.image_token_id
        if flags.numel() != int(image.sum()):
            return None
        shows = torch.zeros_like(image)
        shows[image] = flags
        kept_total += int((kept & shows).sum())
        objects += int(shows.sum())
    return kept_total / objects if objects else None


def _reduce(apply_reducer, model, spec: str) -> None:
    try:
        apply_reducer(model, spec)
    except ValueError as e:
        raise WorkbenchError(f"--reduce {spec}: {e}") from None


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['title']} ({result['threads']} threads)")
    accuracy = any("acc" in r for r in result["rows"])
    recall = any("object_recall" in r for r in result["rows"])
    columns = ["variant", *(["acc", "KL to dense"] if accuracy else []), *(["object recall"] if recall else []),
               "FLOPs ratio", "KV ratio", "KV MiB", "prefill ms", "speed-up", "efficiency", "decode tok/s"]
    for col in columns:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in result["rows"]:
        decode = "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}"
        shown = [f"{r['object_recall']:.3f}" if "object_recall" in r else "-"] if recall else []
        table.add_row(r["variant"], *([f"{r['acc']:.3f}", f"{r['kl']:.4f}"] if accuracy else []), *shown,
                      f"{r['flops_ratio']:.3f}",
                      f"{r['kv_ratio']:.3f}", f"{r['kv_bytes'] / MIB:.2f}", f"{r['prefill_ms']:.1f}",
                      f"{r['prefill_speedup']:.2f}", f"{r['efficiency']:.2f}", decode)
    Console(width=160).print(table)


def plot(result: dict[str, Any], out: str | Path) -> None:
    """Accuracy (trained models) or prefill time (random weights) against the FLOPs proxy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "acc" if any("acc" in r for r in result["rows"]) else "prefill_ms"
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, r in enumerate(result["rows"]):
        ax.scatter(r["flops_ratio"], r[key], color="C1" if i == 0 else "C0")
        ax.annotate(r["variant"], (r["flops_ratio"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("processed-token FLOPs proxy (dense = 1)")
    ax.set_ylabel("held-out answer accuracy" if key == "acc" else "prefill ms")
    ax.set_title(result["title"][:80], fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
