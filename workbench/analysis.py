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
        for b, n in enumerate(lengths):
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
