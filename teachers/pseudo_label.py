"""Teacher compute for a teacher cache: top-k rows along given answers, and pseudo-labels.

`teacher_forced` reads the teacher's top-k at every answer token of labelled samples.
`pseudo_label` finds the teacher's own greedy answers by Jacobi iteration: whole-sequence
teacher passes until every answer is a fixed point of greedy decoding, then reads the top-k
along them. Both take collated tensors (`input_ids`, `attention_mask`, `labels` with -100
outside answers, and the image inputs the teacher's forward takes) and return, per sample,
(top-k ids (T, K) int32, top-k log-probabilities (T, K), log of the rest mass (T,), the T
answer tokens int32, the answers' texts or None).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from teachers.errors import TeacherError

IGNORE_INDEX = -100
Rows = tuple[Tensor, Tensor, Tensor, Tensor, list[str] | None]


def topk_rows(logits: Tensor, positions: list[int], temperature: float, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k ids and log-probabilities at tau of the predictions for `positions` (made at
    position - 1), and the log of the mass outside the top-k, computed exactly."""
    rows = logits[torch.tensor(positions, dtype=torch.long) - 1].float() / temperature  # (T, V)
    logp = torch.log_softmax(rows, dim=-1)
    vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (T, K)
    rest = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), dim=-1)  # (T,)
    return idx.to(torch.int32), vals, rest


@torch.no_grad()
def teacher_forced(teacher, inputs: dict[str, Any], labels: Tensor, temperature: float, k: int) -> list[Rows]:
    """Cache rows for labelled samples: the teacher's top-k at every answer token."""
    logits = teacher(**inputs).logits
    out = []
    for i in range(labels.shape[0]):
        positions = (labels[i] != IGNORE_INDEX).nonzero().squeeze(1).tolist()
        ids, logp, rest = topk_rows(logits[i], positions, temperature, k)
        out.append((ids, logp, rest, labels[i][positions].to(torch.int32), None))
    return out


@dataclass
class _Slots:
    """One sample's token sequence as prompts and answer slots (answer tokens + end-of-turn)."""

    prompts: list[list[int]]
    ends: list[list[int]]
    tail: list[int]
    answers: list[list[int]] = field(default_factory=list)

    @classmethod
    def parse(cls, input_ids: list[int], labels: list[int]) -> _Slots:
        prompts, ends, cur, i = [], [], [], 0
        while i < len(input_ids):
            if labels[i] == IGNORE_INDEX:
                cur.append(input_ids[i])
                i += 1
                continue
            end = []
            while i < len(input_ids) and labels[i] != IGNORE_INDEX:
                end.append(input_ids[i])
                i += 1
            prompts.append(cur)
            ends.append(end)
            cur = []
        return cls(prompts, ends, cur, [[] for _ in ends])

    def sequence(self) -> tuple[list[int], list[int]]:
        seq, starts = [], []
        for prompt, ans, end in zip(self.prompts, self.answers, self.ends):
            seq += prompt
            starts.append(len(seq))
            seq += ans + end
        return seq + self.tail, starts

    def update(self, preds: list[int], starts: list[int], max_new_tokens: int) -> bool:
        """Take this pass's greedy guesses; True when every answer reproduced itself."""
        done = True
        for t, start in enumerate(starts):
            ans, end = self.answers[t], self.ends[t]
            guess = preds[start - 1:start + len(ans)]  # predictions for len(ans) + 1 tokens
            new = guess[:guess.index(end[0])] if end[0] in guess else guess
            if len(new) > max_new_tokens:  # too long: cut, and accept once the cut prefix is stable
                new = new[:max_new_tokens]
            fixed = new == ans  # reproduces itself and, being shorter than guess, ends the turn
            self.answers[t] = new
            done = done and fixed
        return done


def _padded(seqs: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    return ids, mask


@torch.no_grad()
def pseudo_label(teacher, blank: dict[str, Tensor], image_inputs: dict[str, Tensor], temperature: float, k: int,
                 decode: Callable[[list[int]], str], pad_id: int = 0, max_new_tokens: int = 32,
                 names: list[str] | None = None) -> list[Rows]:
    """The teacher's greedy answer to every question, and its top-k along those answers.

    Args:
        blank: the samples collated with empty answers (`input_ids`, `attention_mask`,
            `labels` marking each answer slot: its end-of-turn tokens).
        image_inputs: the other inputs of the teacher's forward, one row per sample.
        decode: token ids -> text (the tokenizer's decode).
        names: sample ids, for the error message.

    Each pass reads the teacher's argmax at every answer slot given the current guesses; a
    sample is done when every answer reproduces itself and is followed by the end-of-turn
    token, i.e. it is exactly what greedy decoding turn by turn would produce. Answers of n
    tokens take about n + 1 passes (all turns at once).
    """
    slots = []
    for i in range(blank["input_ids"].shape[0]):
        keep = blank["attention_mask"][i].bool()
        slots.append(_Slots.parse(blank["input_ids"][i][keep].tolist(), blank["labels"][i][keep].tolist()))
    results: list[Any] = [None] * len(slots)
    active = list(range(len(slots)))
    # Jacobi decoding fixes at least one more token per pass, so this many passes always suffice
    for _ in range(max(len(sl.ends) for sl in slots) * (max_new_tokens + 1) + 1):
        seqs = [slots[i].sequence() for i in active]
        ids, mask = _padded([s for s, _ in seqs], pad_id)
        logits = teacher(input_ids=ids, attention_mask=mask, **{k_: v[active] for k_, v in image_inputs.items()}).logits
        preds = logits.argmax(-1)
        still = []
        for r, i in enumerate(active):
            seq, starts = seqs[r]
            if not slots[i].update(preds[r].tolist(), starts, max_new_tokens):
                still.append(i)
                continue
            sl = slots[i]
            positions = [p for start, ans, end in zip(starts, sl.answers, sl.ends)
                         for p in range(start, start + len(ans) + len(end))]
            top_ids, top_logp, rest = topk_rows(logits[r], positions, temperature, k)
            tokens = torch.tensor([seq[p] for p in positions], dtype=torch.int32)
            texts = [decode(a).strip() for a in sl.answers]  # specials kept: text round-trips
            results[i] = (top_ids, top_logp, rest, tokens, texts)
        active = still
        if not active:
            break
    if active:
        stuck = [names[i] for i in active][:3] if names else active[:3]
        raise TeacherError(f"pseudo-labelling did not converge for samples {stuck}")
    return results
