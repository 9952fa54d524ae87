"""`workbench analyze`: measurements of a trained model that choose how to compress it.

`arank` is gamma-MoD's attention rank: for each decoder layer and head, the rank of the causal
attention matrix with its diagonal zeroed, averaged over heads. A low rank marks a redundant
layer, a candidate mixture-of-depths layer. gamma-MoD's code takes batch item 0 of a few
samples; ours averages over every sample of the first `batches` batches, each cropped to its
real tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from workbench.errors import WorkbenchError

ARANK_FILE = "arank.json"


def attention_rank(attention: Tensor) -> Tensor:
    """(heads, N, N) attention -> (heads,) rank of tril(A) with the diagonal zeroed, in fp32."""
    a = attention.float().tril(-1)
    return torch.linalg.matrix_rank(a).float()


@torch.no_grad()
def layer_aranks(model: torch.nn.Module, loader, batches: int = 4) -> list[float]:
    """Mean attention rank of each decoder layer over the first `batches` batches."""
    from workbench.batch import model_inputs

    model.eval()
    model.set_attn_implementation("eager")  # the attention weights themselves
    totals: list[float] | None = None
    count = 0
    for i, batch in enumerate(loader):
        if i == batches:
            break
        inputs = model_inputs(batch)
        out = model(**inputs, output_attentions=True)
        attentions = out.attentions
        if attentions is None or not len(attentions):
            raise WorkbenchError("the model returned no attention weights: ARank needs an attention decoder")
        mask = inputs.get("attention_mask")
        lengths = mask.sum(1).tolist() if mask is not None else [attentions[0].shape[-1]] * attentions[0].shape[0]
        totals = totals or [0.0] * len(attentions)
        for b in range(len(lengths)):
            real = mask[b].bool() if mask is not None else slice(None)
            for layer, a in enumerate(attentions):
                totals[layer] += float(attention_rank(a[b][:, real][:, :, real]).mean())
            count += 1
    if not count:
        raise WorkbenchError("the held-out split is empty: nothing to measure")
    return [t / count for t in totals]


def arank_schedule(aranks: list[float], mod_layers: int, ratio: float) -> list[float | None]:
    """A `transforms.mod.schedule` list: the `mod_layers` lowest-ranked layers at `ratio` (ties:
    the deeper layer first), the others dense."""
    if not 0 < mod_layers <= len(aranks):
        raise WorkbenchError(f"--mod-layers must be in 1..{len(aranks)}, got {mod_layers}")
    if not 0 < ratio <= 1:
        raise WorkbenchError(f"--ratio must be in (0, 1], got {ratio}")
    chosen = sorted(range(len(aranks)), key=lambda i: (aranks[i], -i))[:mod_layers]
    return [ratio if i in chosen else None for i in range(len(aranks))]


def arank_command(source: str, config: str | None = None, overrides: list[str] = (), data: str | None = None,
                  batches: int = 4, batch_size: int = 8, mod_layers: int | None = None, ratio: float = 0.5,
                  out: str | None = None) -> dict[str, Any]:
    """Per-layer ARank of a model on a held-out split; writes arank.json (with a MoD schedule of
    the lowest-ranked layers) and prints the table."""
    from workbench.elastic import resolve_model_dir
    from workbench.evaluation import held_out_for, load_model
    from workbench.rundir import run_dir_of_model, write_json

    if batches < 1 or batch_size < 1:
        raise WorkbenchError("--batches and --batch-size must be at least 1")
    model_dir = resolve_model_dir(source)
    held_out, _ = held_out_for(model_dir, config, overrides, data)
    if held_out.classification:
        raise WorkbenchError(f"{model_dir} is an image classifier: ARank is measured on a decoder's attention")
    aranks = layer_aranks(load_model(model_dir), held_out.loader(batch_size), batches)
    k = mod_layers if mod_layers is not None else max(1, round(0.875 * len(aranks)))  # gamma-MoD: 28 of 32
    report = {"model": str(model_dir), "data": held_out.source, "batches": batches, "arank": aranks,
              "schedule": arank_schedule(aranks, k, ratio), "mod_layers": k, "ratio": ratio}
    run = run_dir_of_model(model_dir)
    path = Path(out) if out else (run.path if run is not None else Path.cwd()) / ARANK_FILE
    write_json(path, report)
    width = max(len(str(len(aranks) - 1)), 5)
    print(f"{'layer':>{width}}  ARank  schedule")
    for i, (a, r) in enumerate(zip(aranks, report["schedule"])):
        print(f"{i:>{width}}  {a:5.1f}  {'dense' if r is None else r}")
    print(f"transforms.mod.schedule: {json.dumps(report['schedule'])}")
    print(f"written to {path}")
    return report


# ---------------------------------------------------------------- G-Search

GSEARCH_FILE = "gsearch.json"


@torch.no_grad()
def answer_logprobs(model: torch.nn.Module, batches: list[dict]) -> list[Tensor]:
    """Per batch: log-probabilities at the answer positions, (N_answers, V)."""
    from workbench.batch import model_inputs
    from workbench.metrics import answer_positions

    model.eval()
    out = []
    for batch in batches:
        keep = answer_positions(batch["labels"])
        logits = model(**model_inputs(batch), logits_to_keep=keep).logits
        out.append(_at(logits, keep).float().log_softmax(-1))
    return out


def _at(logits: Tensor, keep: Tensor) -> Tensor:
    """Rows of the logits at the answer positions: a model that honours a boolean
    `logits_to_keep` returns them already (N, V); one that ignores it, (B, L, V)."""
    return logits[keep] if logits.dim() == 3 else logits


def mean_kl(reference: list[Tensor], other: list[Tensor]) -> float:
    """Mean over answer tokens of KL(reference || other)."""
    total = sum(float((p.exp() * (p - q)).sum()) for p, q in zip(reference, other))
    count = sum(p.shape[0] for p in reference)
    return total / max(count, 1)


def routable_model(model_dir) -> torch.nn.Module:
    """A model folder whose decoder layers token reducers can run on; a short error otherwise."""
    from students.mod import check_routable
    from workbench.evaluation import load_model

    model = load_model(model_dir)
    try:
        check_routable(model)
    except ValueError as e:
        raise WorkbenchError(f"{model_dir}: {e}") from None
    return model


def g_search(model: torch.nn.Module, calibration: list[dict], tolerance: float, layer: int = 1,
             queries: str = "text", steps: int = 16) -> dict[str, Any]:
    """G-Search (our reading of "Accelerating MLLMs by Searching Optimal Vision Token
    Reduction"): from the layer after `layer` to the last, the smallest keep fraction (a
    multiple of 1/steps, never more than the layer before) whose attention pruning keeps the
    mean answer-token KL to the unreduced model within `tolerance` on the calibration batches,
    the deeper layers inheriting the candidate while a layer is searched. Also the smallest
    uniform fraction that meets the tolerance, for comparison."""
    import copy

    from students.mod import decoder_layers
    from students.reduce import attention_prune

    n_layers = len(decoder_layers(model))
    if not 0 <= layer < n_layers - 1:
        raise WorkbenchError(f"--layer must be in 0..{n_layers - 2}, got {layer}")
    if tolerance <= 0 or steps < 2:
        raise WorkbenchError("--tolerance must be positive and --steps at least 2")
    reference = answer_logprobs(model, calibration)
    deeper = n_layers - 1 - layer

    def kl(keeps: list[float]) -> float:
        reduced = copy.deepcopy(model)
        attention_prune(reduced, layer=layer, keep=keeps, queries=queries)
        return mean_kl(reference, answer_logprobs(reduced, calibration))

    def smallest(fits, upper: int) -> int:
        lo, hi = 1, upper  # fits(hi) holds (hi = the previous layer's count, or the whole)
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(mid):
                hi = mid
            else:
                lo = mid + 1
        return hi

    counts: list[int] = []
    for i in range(deeper):
        previous = counts[-1] if counts else steps
        counts.append(smallest(lambda g: kl([c / steps for c in counts] + [g / steps] * (deeper - i)) <= tolerance,
                               previous))
    keeps = [c / steps for c in counts]
    uniform = smallest(lambda g: kl([g / steps] * deeper) <= tolerance, steps) / steps
    return {"layer": layer, "queries": queries, "tolerance": tolerance, "steps": steps, "keep": keeps,
            "kl": kl(keeps), "uniform_keep": uniform, "uniform_kl": kl([uniform] * deeper),
            "mod_schedule": [None] * (layer + 1) + keeps,
            "reducer": f"attention_prune:layer={layer},keep={'/'.join(f'{k:g}' for k in keeps)},queries={queries}"}


def gsearch_command(source: str, config: str | None = None, overrides: list[str] = (), data: str | None = None,
                    tolerance: float = 0.05, layer: int = 1, queries: str = "text", batches: int = 2,
                    batch_size: int = 16, steps: int = 16, out: str | None = None) -> dict[str, Any]:
    """G-Search on the first `batches` held-out batches; the searched schedule and the best
    uniform one are then checked on the next `batches` (KL and FLOPs proxy); writes gsearch.json."""
    import copy

    from students.mod import count_tokens
    from students.reduce import QUERIES, attention_prune
    from workbench.batch import model_inputs
    from workbench.elastic import resolve_model_dir
    from workbench.evaluation import held_out_for
    from workbench.rundir import run_dir_of_model, write_json

    if batches < 1 or batch_size < 1:
        raise WorkbenchError("--batches and --batch-size must be at least 1")
    if queries not in QUERIES:
        raise WorkbenchError(f"--queries {queries!r}: use one of {', '.join(QUERIES)}")
    model_dir = resolve_model_dir(source)
    held_out, _ = held_out_for(model_dir, config, overrides, data)
    if held_out.classification:
        raise WorkbenchError(f"{model_dir} is an image classifier: no image tokens to reduce")
    loaded = []
    for i, batch in enumerate(held_out.loader(batch_size)):
        if i == 2 * batches:
            break
        loaded.append(batch)
    calibration, check = loaded[:batches], loaded[batches:] or loaded[:batches]
    model = routable_model(model_dir)
    print(f"[workbench] G-Search on {len(calibration)} calibration batches (tolerance {tolerance})")
    report = {"model": str(model_dir), "data": held_out.source, **g_search(model, calibration, tolerance, layer,
                                                                            queries, steps)}
    reference = answer_logprobs(model, check)
    deeper = len(report["keep"])
    for name, keeps in (("searched", report["keep"]), ("uniform", [report["uniform_keep"]] * deeper)):
        reduced = copy.deepcopy(model)
        attention_prune(reduced, layer=layer, keep=keeps, queries=queries)
        with count_tokens(reduced) as counter, torch.no_grad():
            for batch in check:
                reduced(**model_inputs(batch))
        report[f"{name}_check"] = {"kl": mean_kl(reference, answer_logprobs(reduced, check)),
                                   **{k: counter.summary()[k] for k in ("flops_ratio", "kv_ratio")}}
    run = run_dir_of_model(model_dir)
    path = Path(out) if out else (run.path if run is not None else Path.cwd()) / GSEARCH_FILE
    write_json(path, report)
    for name in ("searched", "uniform"):
        c = report[f"{name}_check"]
        print(f"{name:>9}: keep {report['keep'] if name == 'searched' else report['uniform_keep']}  "
              f"held-out KL {c['kl']:.4f}  FLOPs {c['flops_ratio']:.3f}  KV {c['kv_ratio']:.3f}")
    print(f"reducer: {report['reducer']}")
    print(f"transforms.mod.schedule: {json.dumps(report['mod_schedule'])}")
    print(f"written to {path}")
    return report
