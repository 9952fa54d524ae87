"""On-policy distillation: the student answers, the teacher scores the student's own tokens.

With `on_policy:` in a config (docs/methods.md §16), each training batch (a `fraction` of
them) is rewritten before the teacher and the student see it: every record is cut at the start
of one assistant turn (`turn: random | first`), the student samples that turn's answer from
its current weights (`temperature`, `top_k`, up to `max_new_tokens` or the longest answer in
the batch; an answer ends at the tokenizer's end-of-sequence token), and the answer tokens
become the positions the loss reads. The teacher then runs on the rewritten batch as an
online teacher does, so a divergence term (forward KL, TVD, ...) pulls the student towards the
teacher exactly where the student would go at decoding time - DistillSpec's recipe for drafts
that the target accepts, and GKD's on-policy setting. The records' own answers are not used
(every training record is a prompt, labelled or not).

Records with an image after the chosen turn keep their own answers in that batch (the cut
would drop an image the batch's pixels still hold); `rewritten` and `kept` count the records.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from losses.combine import WeightedLoss
from losses.inputs import IGNORE_INDEX, LossInputs
from workbench.data.label_split import LabelSplit
from workbench.errors import WorkbenchError
from workbench.targets.base import TargetContext
from workbench.targets.online import OnlineTeacher

TURNS = ("random", "first")


class OnPolicyTeacher(OnlineTeacher):
    """An online teacher scoring answers the student samples itself."""

    name = "on_policy"
    priority = 30

    def __init__(self, teacher: nn.Module, student: nn.Module, options: Any, special: dict[str, int | None],
                 seed: int, device: str = "auto"):
        super().__init__(teacher, device)
        self.student = student
        self.options = options
        self.special = special  # eos, pad and image token ids
        self.rng = random.Random(seed)
        self.rewritten = 0
        self.kept = 0

    @classmethod
    def applies(cls, ctx: TargetContext) -> bool:
        return ctx.cfg.on_policy is not None and super().applies(ctx)

    @classmethod
    def create(cls, ctx: TargetContext) -> OnPolicyTeacher:
        o = ctx.cfg.on_policy
        if o is None:
            raise WorkbenchError("config key 'target': on_policy needs an 'on_policy:' block (its options)")
        if ctx.classification or ctx.cfg.teacher is None:
            raise WorkbenchError("config key 'on_policy': on-policy distillation needs a VLM teacher and student")
        if ctx.cfg.teacher.cache is not None:
            raise WorkbenchError("config key 'teacher.cache': a cache holds the teacher on the records' answers, but "
                                 "on-policy answers are the student's own; unset teacher.cache")
        if getattr(ctx.student, "is_draft_head", False):
            raise WorkbenchError("config key 'on_policy': a draft head does not generate on its own; train it with "
                                 "its EAGLE loss (experiments/windtunnel/eagle.yaml)")
        if ctx.cfg.trainer.strategy == "fsdp":
            raise WorkbenchError("config key 'on_policy': the student samples whole answers, which a sharded "
                                 "(FSDP) student does not do here; use trainer.strategy=ddp")
        checks = [("fraction", 0 < o.fraction <= 1, "in (0, 1]"), ("temperature", o.temperature >= 0, ">= 0"),
                  ("top_k", o.top_k is None or o.top_k >= 1, ">= 1 or null"),
                  ("max_new_tokens", o.max_new_tokens is None or o.max_new_tokens >= 1, ">= 1 or null"),
                  ("turn", o.turn in TURNS, " | ".join(TURNS))]
        for key, ok, want in checks:
            if not ok:
                raise WorkbenchError(f"config key 'on_policy.{key}' must be {want}, got {getattr(o, key)!r}")
        online = OnlineTeacher.create(ctx)
        tok = ctx.processor.tokenizer
        special = {"eos": tok.eos_token_id, "pad": tok.pad_token_id if tok.pad_token_id is not None else 0,
                   "image": getattr(ctx.processor, "image_token_id", None)}
        return cls(online.teacher, ctx.student, o, special, ctx.cfg.seed, online.device)

    def train_set(self, train: Any, split: LabelSplit | None) -> Any:
        return train  # every record is a prompt: the student writes the answers

    def fill(self, batch: dict[str, Any], inputs: LossInputs, loss: WeightedLoss, fused: bool) -> None:
        if self.student.training and self.rng.random() < self.options.fraction:
            self.rollout(batch)
            inputs.labels, inputs.attention_mask, inputs.image_mask = (batch["labels"], batch["attention_mask"],
                                                                       batch["image_mask"])
        super().fill(batch, inputs, loss, fused)

    def cuts(self, labels: torch.Tensor, input_ids: torch.Tensor) -> list[int | None]:
        """Per record, where the chosen answer starts (None: keep the record as it is)."""
        out = []
        for row, ids in zip(labels, input_ids):
            answer = row != IGNORE_INDEX
            starts = (answer & ~torch.cat([answer.new_zeros(1), answer[:-1]])).nonzero().flatten().tolist()
            if not starts:
                out.append(None)
                continue
            start = starts[0] if self.options.turn == "first" else self.rng.choice(starts)
            image = self.special["image"]
            out.append(None if image is not None and bool((ids[start:] == image).any()) else start)
        return out

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any]) -> None:
        """Rewrite `batch` in place: each record cut at its chosen turn plus the student's answer."""
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        cuts = self.cuts(labels, ids)
        chosen = [b for b, c in enumerate(cuts) if c is not None]
        self.kept += len(cuts) - len(chosen)
        if not chosen:
            return
        answers = self.sample(ids, mask, batch, cuts, chosen)
        rows = []
        for b in range(ids.shape[0]):
            if cuts[b] is None:
                rows.append((ids[b][mask[b].bool()], labels[b][mask[b].bool()]))
                continue
            prompt, answer = _prompt(ids[b], mask[b], cuts[b]), answers[chosen.index(b)]
            rows.append((torch.cat([prompt, answer]),
                         torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer])))
        self.rewritten += len(chosen)
        width = max(len(r) for r, _ in rows)
        batch["input_ids"] = torch.stack([_pad(r, width, self.special["pad"]) for r, _ in rows])
        batch["labels"] = torch.stack([_pad(l, width, IGNORE_INDEX) for _, l in rows])
        batch["attention_mask"] = torch.stack([_pad(torch.ones_like(r), width, 0) for r, _ in rows])
        image = self.special["image"]
        batch["image_mask"] = batch["input_ids"] == image if image is not None else torch.zeros_like(
            batch["input_ids"], dtype=torch.bool)

    def sample(self, ids: torch.Tensor, mask: torch.Tensor, batch: dict[str, Any], cuts: list[int | None],
               chosen: list[int]) -> list[torch.Tensor]:
        """The student's answers for the chosen records (left-padded prompts, one generate call)."""
        o = self.options
        lengths = [int(((batch["labels"][b][cuts[b]:] != IGNORE_INDEX).cumprod(0)).sum()) for b in chosen]
        budget = o.max_new_tokens or max(lengths)
        prompts = [_prompt(ids[b], mask[b], cuts[b]) for b in chosen]
        width = max(len(p) for p in prompts)
        left = torch.stack([_pad(p, width, self.special["pad"], left=True) for p in prompts])
        attention = torch.stack([_pad(torch.ones_like(p), width, 0, left=True) for p in prompts])
        extra = _images_of(batch, chosen, self.special["image"])
        was = self.student.training
        self.student.eval()
        try:
            out = self.student.generate(input_ids=left, attention_mask=attention, max_new_tokens=budget,
                                        do_sample=o.temperature > 0, temperature=o.temperature or None,
                                        top_k=o.top_k, eos_token_id=self.special["eos"],
                                        pad_token_id=self.special["pad"], **extra,
                                        # an image token in an answer would ask for an image the batch lacks
                                        **({"suppress_tokens": [self.special["image"]]}
                                           if self.special["image"] is not None else {}))
        finally:
            self.student.train(was)
        answers = []
        for row in out[:, width:]:
            eos = (row == self.special["eos"]).nonzero().flatten()
            answers.append(row[: int(eos[0]) + 1] if len(eos) else row)
        return answers


def _prompt(ids: torch.Tensor, mask: torch.Tensor, cut: int) -> torch.Tensor:
    """The real tokens before position `cut` of a padded row (either padding side)."""
    return ids[:cut][mask[:cut].bool()]


def _pad(row: torch.Tensor, width: int, value: int, left: bool = False) -> torch.Tensor:
    fill = row.new_full((width - len(row),), value)
    return torch.cat([fill, row] if left else [row, fill])


def _images_of(batch: dict[str, Any], chosen: list[int], image_token: int | None) -> dict[str, Any]:
    """The image inputs of the chosen records: the collator flattens a batch's images in record
    order, each taking the same number of image tokens."""
    pixels = batch.get("pixel_values")
    if pixels is None or image_token is None or not len(pixels):
        return {}
    tokens = (batch["input_ids"] == image_token).sum(1)
    per_image = int(tokens.sum()) // len(pixels)
    starts = torch.cat([tokens.new_zeros(1), (tokens // per_image).cumsum(0)]).tolist()
    index = [i for b in chosen for i in range(starts[b], starts[b + 1])]
    return {k: v[index] for k, v in batch.items()
            if k in ("pixel_values", "image_sizes", "pixel_mask") and torch.is_tensor(v) and len(v) == len(pixels)}
