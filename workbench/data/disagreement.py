"""Parity alignment (`data.disagreement_only`): train where the student still disagrees.

Each epoch the pool is the labelled records plus the pseudo-labelled records whose teacher
answers the student does not yet reproduce (greedy, exact match); `DisagreementPool` is the
per-epoch pool function of `StepBatchSampler`, and `LogDisagreements` logs its size.
"""

from __future__ import annotations

import torch
from pytorch_lightning.callbacks import Callback

from workbench.batch import model_inputs
from workbench.metrics import answer_predictions, spans_correct


class DisagreementPool:
    """The per-epoch training pool of parity alignment.

    Args:
        student: the model being trained.
        collator: builds held-out style batches (labels included) from records.
        train: the training set (labelled records and pseudo-labelled ones).
        pseudo_rows: indices of the pseudo-labelled records in `train`.
        batch_size: records per scoring batch.
    """

    def __init__(self, student, collator, train, pseudo_rows: list[int], batch_size: int):
        self.student, self.collator, self.train = student, collator, train
        self.pseudo_rows = pseudo_rows
        self.labeled_rows = sorted(set(range(len(train))) - set(pseudo_rows))
        self.batch_size = batch_size
        self.history: list[dict[str, int]] = []

    @torch.no_grad()
    def disagreements(self) -> list[int]:
        was_training = self.student.training
        self.student.eval()
        device = next(self.student.parameters()).device
        out = []
        for b in range(0, len(self.pseudo_rows), self.batch_size):
            rows = self.pseudo_rows[b:b + self.batch_size]
            batch = self.collator([self.train[i] for i in rows])
            inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
            labels = batch["labels"].to(device)
            correct, row = spans_correct(answer_predictions(self.student, inputs, labels), labels)
            wrong = set(row[~correct].cpu().tolist())
            out += [rows[r] for r in sorted(wrong)]
        self.student.train(was_training)
        return out

    def __call__(self, epoch: int) -> list[int]:
        wrong = self.disagreements()
        pool = self.labeled_rows + wrong
        self.history.append({"epoch": epoch, "disagreements": len(wrong), "pool": len(pool)})
        print(f"[workbench] parity epoch {epoch}: student disagrees with the teacher on {len(wrong)} of "
              f"{len(self.pseudo_rows)} pseudo-labelled records")
        return pool or list(range(len(self.train)))


class LogDisagreements(Callback):
    """Logs `data/disagreements`: how many pseudo-labelled records the pool holds this epoch."""

    def __init__(self, pool: DisagreementPool):
        self.pool = pool

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.pool.history:
            pl_module.log("data/disagreements", float(self.pool.history[-1]["disagreements"]))
