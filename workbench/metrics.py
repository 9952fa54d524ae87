"""Answer accuracy from one teacher-forced forward pass.

Greedy decoding reproduces an answer exactly (end-of-turn token included) if and only if
the argmax at every answer position equals the answer token, so exact-match accuracy of
greedy decoding is computed here without calling `generate` (tests check the equivalence).
"""

from __future__ import annotations

import torch

from losses.inputs import IGNORE_INDEX


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the positions whose next-token prediction is an answer token - what
    `logits_to_keep` takes so that a model computes logits there only."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def answer_predictions(model: torch.nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """The model's argmax at every answer position, (N,) in reading order, without building
    (B, L, V) logits: the LM head runs on the answer positions only (`logits_to_keep`).

    A model whose forward ignores `logits_to_keep` (it returns (B, L, V)) is still scored, from
    its full logits."""
    keep = answer_positions(labels).to(inputs["input_ids"].device)
    logits = model(**inputs, logits_to_keep=keep).logits
    if logits.dim() == 3:
        logits = logits[keep]
    return logits.argmax(-1)


def answer_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-match correctness of every answer span from (B, L, V) next-token logits; see
    `spans_correct`."""
    return spans_correct(logits[:, :-1][answer_positions(labels)[:, :-1]].argmax(-1), labels)


def spans_correct(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-match correctness of every answer span.

    Args:
        predictions: (N,) predicted token at each answer position, in the order of
            `answer_positions(labels)` (row by row, left to right).
        labels: (B, L) answer token ids, IGNORE_INDEX elsewhere.
    Returns:
        correct: (S,) bool, one entry per contiguous answer span (turn), in reading order.
        row: (S,) long, the batch row each span belongs to.
    """
    target = labels[:, 1:]  # (B, L-1) token predicted at each position
    mask = target != IGNORE_INDEX
    wrong = torch.zeros_like(mask)
    wrong[mask] = predictions.to(target.device) != target[mask]
    starts = mask & ~torch.nn.functional.pad(mask, (1, 0))[:, :-1]  # first token of each span
    span_id = torch.cumsum(starts.flatten().long(), 0).view_as(mask) - 1  # (B, L-1)
    n_spans = int(starts.sum())
    errors = torch.zeros(n_spans, dtype=torch.long, device=labels.device)
    errors.scatter_add_(0, span_id[mask], wrong[mask].long())
    row = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(mask)[starts]
    return errors == 0, row


def score_batch(logits: torch.Tensor, labels: torch.Tensor, tags: list[list[str]] | None = None) -> dict[str, tuple[int, int]]:
    """(correct, total) answers overall (key "all") and per tag, e.g. per question type.

    Args:
        logits: (B, L, V); labels: (B, L).
        tags: per row, one tag per answer span in reading order (rows may have none).
    """
    return score_spans(*answer_correct(logits, labels), tags)


def score_spans(correct: torch.Tensor, row: torch.Tensor, tags: list[list[str]] | None = None) -> dict[str, tuple[int, int]]:
    """(correct, total) over spans from `spans_correct`, overall (key "all") and per tag."""
    out = {"all": (int(correct.sum()), int(correct.numel()))}
    if tags:
        seen: dict[int, int] = {}
        for ok, r in zip(correct.tolist(), row.tolist()):
            k = seen.get(r, 0)
            seen[r] = k + 1
            if k < len(tags[r]):
                c, n = out.get(tags[r][k], (0, 0))
                out[tags[r][k]] = (c + ok, n + 1)
    return out


def score_classes(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, tuple[int, int]]:
    """(correct, total) top-1 predictions of (B, C) class logits against (B,) labels, key "all"."""
    return {"all": (int((logits.argmax(-1) == labels).sum()), int(labels.numel()))}


def score_outputs(output, batch: dict) -> dict[str, tuple[int, int]]:
    """Scores of one model output on its batch: answer accuracy for a VLM (`.logits` over the
    sequence), top-1 accuracy for a classifier (a (B, C) tensor, or `.logits`)."""
    logits = output if torch.is_tensor(output) else output.logits
    labels = batch["labels"].to(logits.device)
    if labels.dim() == 1:
        return score_classes(logits, labels)
    return score_batch(logits, labels, batch.get("qtypes"))


def merge_scores(total: dict[str, tuple[int, int]], new: dict[str, tuple[int, int]]) -> None:
    for key, (c, n) in new.items():
        c0, n0 = total.get(key, (0, 0))
        total[key] = (c0 + c, n0 + n)


def accuracies(scores: dict[str, tuple[int, int]]) -> dict[str, float]:
    """{"acc": overall, "acc/<tag>": per tag} from accumulated (correct, total) counts."""
    return {("acc" if k == "all" else f"acc/{k}"): c / n for k, (c, n) in sorted(scores.items()) if n}
