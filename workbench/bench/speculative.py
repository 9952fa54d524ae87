"""`workbench bench speculative TARGET --draft DRAFT | extract:SPEC [--gamma 2,4]`: a draft model
measured as a draft of TARGET (students/speculative.py) on held-out prompts.

Per draft length gamma: empirical acceptance alpha and its analytic counterpart (the mean over
proposed positions of sum_v min(p, q)), mean accepted length tau (tokens per target pass),
target passes per generated token, the draft's cost ratio c (the decode FLOPs proxy: Linear
weights of the language model and its head, draft / target), the speed-up Leviathan et al.'s
formula predicts from alpha and c, and wall-clock decode tokens/s on this machine against the
target's own greedy `generate` (reported, not asserted), both timed after one untimed pass of
each on the first prompt. Every greedy run is checked token for token against the target's
greedy output (`lossless`).

Prompts are the first held-out samples up to their first answer token, and the models decode
`--new-tokens` tokens past the end-of-turn token (a fixed length, so every draft is timed on
the same work). `extract:SPEC` drafts with the MatFormer submodel SPEC of TARGET (no
training); `--draft-reduce SPEC` lets the draft read fewer image tokens (a training-free
reducer of `students.reduce`) while the target reads them all, so decoding stays lossless. A draft that is a run gets the results in its `summary.json` (`speculative`), so
`workbench compare --metric speculative.gamma4.tau` reads them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError


def decode_params(model: torch.nn.Module) -> int:
    """Linear weights a decode step runs through: the language model's layers and its head."""
    head_only = getattr(model, "is_draft_head", False)  # its layers; the LM head is the target's
    decoder = model.get_decoder() if hasattr(model, "get_decoder") and not head_only else model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    total = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))
    return total + (head.weight.numel() if head is not None else 0)


def predicted_speedup(alpha: float, gamma: int, cost: float) -> float:
    """(1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1)): the expected wall-clock speed-up when
    each draft token is accepted independently with probability alpha and a draft step costs
    c target steps (Leviathan et al.)."""
    from students.speculative import expected_tokens_per_round

    return expected_tokens_per_round(alpha, gamma) / (gamma * cost + 1)


def load_draft(spec: str, target_dir: Path, reduce: str | None = None, target: torch.nn.Module | None = None
               ) -> tuple[torch.nn.Module, str, Path | None]:
    """(draft model, its name, its folder) from a run / model folder (a model, or a draft head,
    which is attached to `target`) or `extract:SPEC` of the target; with `reduce`, the draft
    reads fewer image tokens (the target still reads them all)."""
    draft, name, folder = _draft(spec, target_dir, target)
    if reduce is not None:
        if getattr(draft, "is_draft_head", False):
            raise WorkbenchError(f"--draft-reduce {reduce}: a draft head reads the target's features, not image "
                                 "tokens of its own")
        from students.reduce import apply_reducer

        try:
            apply_reducer(draft, reduce)
        except ValueError as e:
            raise WorkbenchError(f"--draft-reduce {reduce}: {e}") from None
        name = f"{name} + {reduce}"
    return draft, name, folder


def _draft(spec: str, target_dir: Path, target: torch.nn.Module | None) -> tuple[torch.nn.Module, str, Path | None]:
    from workbench.elastic import load_universal, resolve_model_dir, spec_for
    from workbench.evaluation import load_model

    if spec.startswith("extract:"):
        from students.matformer import extract

        universal = load_universal(target_dir)
        try:
            return extract(universal, spec_for(universal, spec.partition(":")[2], None)).eval(), spec, None
        except ValueError as e:
            raise WorkbenchError(f"--draft {spec}: {e}") from None
    folder = resolve_model_dir(spec)
    from students.eagle import is_draft_head_folder, load_draft_head

    if is_draft_head_folder(folder):
        try:
            return load_draft_head(folder, target if target is not None else load_model(target_dir)), \
                f"{folder} (draft head)", folder
        except (OSError, ValueError) as e:
            raise WorkbenchError(f"--draft {spec}: cannot load the draft head: {e}".splitlines()[0]) from None
    return load_model(folder), str(folder), folder


def prompts(held_out, count: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` held-out samples up to their first answer token."""
    from workbench.batch import model_inputs
    from workbench.metrics import answer_positions

    out = []
    for batch in held_out.loader(1):
        answers = answer_positions(batch["labels"])[0].nonzero()
        if not len(answers):
            continue
        inputs = model_inputs(batch)
        first = int(answers[0]) + 1
        out.append({"input_ids": inputs["input_ids"][:, :first],
                    **({"pixel_values": inputs["pixel_values"]} if "pixel_values" in inputs else {})})
        if len(out) == count:
            break
    if not out:
        raise WorkbenchError("no held-out sample has an answer to prompt with")
    return out


@torch.no_grad()
def _target_greedy(target, prompt: dict, new_tokens: int) -> tuple[torch.Tensor, float]:
    ids = prompt["input_ids"]
    start = time.perf_counter()
    out = target.generate(**prompt, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                          pad_token_id=getattr(target.generation_config, "pad_token_id", None) or 0)
    return out, time.perf_counter() - start


def _row(target, draft, items: list[dict], references: list[torch.Tensor], gamma: int, new_tokens: int,
         temperature: float, top_k: int | None, seed: int) -> dict[str, Any]:
    from students.speculative import SpecStats, speculative_generate

    stats, lossless, seconds = SpecStats(), True, 0.0
    generator = torch.Generator().manual_seed(seed)
    for prompt, reference in zip(items, references):
        extra = {k: v for k, v in prompt.items() if k != "input_ids"}
        start = time.perf_counter()
        out = speculative_generate(target, draft, prompt["input_ids"], max_new_tokens=new_tokens, gamma=gamma,
                                   temperature=temperature, top_k=top_k, generator=generator, stats=stats, **extra)
        seconds += time.perf_counter() - start
        if temperature <= 0:
            lossless &= bool(torch.equal(out, reference))
    return {"gamma": gamma, **stats.as_dict(), "target_passes_per_token": stats.target_passes / max(stats.emitted, 1),
            "tok_s": stats.emitted / seconds, "lossless": lossless if temperature <= 0 else None}


def _warm_up(target, draft, prompt: dict, gammas: list[int], new_tokens: int, temperature: float,
             top_k: int | None, seed: int) -> None:
    """One untimed pass of each timed path on the first prompt: the first calls pay one-time costs
    (allocator growth, lazy initialisation) that would otherwise land on the target's greedy
    baseline, which is timed first, and inflate every speed-up."""
    reference, _ = _target_greedy(target, prompt, new_tokens)
    for gamma in gammas:
        _row(target, draft, [prompt], [reference], gamma, new_tokens, temperature, top_k, seed)


def bench_speculative_command(source: str, draft: str, config: str | None = None, overrides: list[str] = (),
                              data: str | None = None, gammas: str = "2,4", count: int = 8, new_tokens: int = 32,
                              temperature: float = 0.0, top_k: int | None = None, seed: int = 0, threads: int = 2,
                              json_out: str | None = None, draft_reduce: str | None = None) -> dict[str, Any]:
    from workbench.bench import machine
    from workbench.elastic import resolve_model_dir
    from workbench.evaluation import held_out_for, load_model
    from workbench.rundir import write_json

    try:
        gamma_list = [int(g) for g in gammas.split(",")]
    except ValueError:
        raise WorkbenchError(f"--gamma {gammas!r}: draft lengths separated by commas, e.g. 2,4") from None
    if any(g < 1 for g in gamma_list) or count < 1 or new_tokens < 1 or threads < 1:
        raise WorkbenchError("--gamma values, --prompts, --new-tokens and --threads must be at least 1")
    torch.set_num_threads(threads)
    target_dir = resolve_model_dir(source)
    if not draft.startswith("extract:"):
        resolve_model_dir(draft)  # a wrong --draft path fails before the held-out data are built
    held_out, _ = held_out_for(target_dir, config, overrides, data)
    if held_out.classification:
        raise WorkbenchError(f"{target_dir} is an image classifier: nothing to decode")
    target = load_model(target_dir)
    draft_model, draft_name, draft_dir = load_draft(draft, target_dir, draft_reduce, target)
    if draft_model.get_input_embeddings().weight.shape[0] != target.get_input_embeddings().weight.shape[0]:
        raise WorkbenchError(f"--draft {draft}: its vocabulary differs from the target's; a draft must share the "
                             "target's tokenizer")
    items = prompts(held_out, count)
    print(f"[workbench] target {target_dir}, draft {draft_name}: {len(items)} prompts, {new_tokens} new tokens")
    _warm_up(target, draft_model, items[0], gamma_list, new_tokens, temperature, top_k, seed)
    references, seconds = [], 0.0
    for prompt in items:
        out, took = _target_greedy(target, prompt, new_tokens)
        references.append(out)
        seconds += took
    cost = decode_params(draft_model) / decode_params(target)
    rows = []
    for gamma in gamma_list:
        print(f"[workbench] gamma {gamma}")
        row = _row(target, draft_model, items, references, gamma, new_tokens, temperature, top_k, seed)
        row["cost_ratio"] = cost
        row["predicted_speedup"] = predicted_speedup(row["alpha"], gamma, cost)
        row["speedup"] = row["tok_s"] / (len(items) * new_tokens / seconds)
        rows.append(row)
    result = {"target": str(target_dir), "draft": draft_name, "prompts": len(items), "new_tokens": new_tokens,
              "temperature": temperature, "top_k": top_k, "target_tok_s": len(items) * new_tokens / seconds,
              "rows": rows, "machine": machine()}
    _print(result)
    if json_out:
        write_json(Path(json_out), result)
        print(f"written to {json_out}")
    _record(draft_dir, result)
    if any(r["lossless"] is False for r in rows):
        raise WorkbenchError("speculative output differed from the target's greedy output: a bug in the decoding "
                             "loop or a model whose forward is not deterministic; results written")
    return result


def _record(draft_dir: Path | None, result: dict[str, Any]) -> None:
    """Put the rows in the draft run's summary.json (`speculative.gamma<g>`), for `compare`."""
    import json

    from workbench.rundir import run_dir_of_model, write_json

    run = run_dir_of_model(draft_dir) if draft_dir is not None else None
    if run is None:
        return
    path = run.path / "summary.json"
    summary = json.loads(path.read_text())
    keys = ("alpha", "alpha_analytic", "tau", "target_passes_per_token", "cost_ratio", "predicted_speedup", "speedup")
    summary["speculative"] = {"target": result["target"], "temperature": result["temperature"],
                              **{f"gamma{r['gamma']}": {k: r[k] for k in keys} for r in result["rows"]}}
    write_json(path, summary)
    print(f"[workbench] recorded in {path} (speculative.gamma<g>.*)")


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"draft {result['draft']} for {result['target']} (target greedy: "
                        f"{result['target_tok_s']:.1f} tok/s)")
    for col in ("gamma", "alpha", "sum min(p,q)", "tau", "target passes / token", "cost c", "predicted speed-up",
                "tok/s", "speed-up", "lossless"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(str(r["gamma"]), f"{r['alpha']:.3f}", f"{r['alpha_analytic']:.3f}", f"{r['tau']:.2f}",
                      f"{r['target_passes_per_token']:.3f}", f"{r['cost_ratio']:.3f}", f"{r['predicted_speedup']:.2f}",
                      f"{r['tok_s']:.1f}", f"{r['speedup']:.2f}", "-" if r["lossless"] is None else str(r["lossless"]))
    Console(width=160).print(table)
