"""Which training records keep their answers (`data.labeled_fraction`), and what the others become.

The split is chosen by `data.split_seed` from the records' ids, independently of their order
and of the run's `seed`, so seed sweeps share it. Unlabelled records are dropped or, with a
teacher, get the teacher's answers (`data.unlabeled: pseudo`, see `workbench/targets/cached.py`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from dataclasses import dataclass

from workbench.data.llava import LlavaDataset
from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class LabelSplit:
    """Which training records keep their answers; the rest are dropped or pseudo-labelled."""

    labeled: list[int]
    unlabeled: list[int]
    mode: str  # pseudo | drop

    @property
    def labeled_ids_sha256(self) -> str:
        return hashlib.sha256(json.dumps(sorted(self.labeled)).encode()).hexdigest()

    @property
    def pseudo_labels(self) -> bool:
        """Whether some records get the teacher's answers."""
        return self.mode == "pseudo" and bool(self.unlabeled)

    def notes(self) -> dict[str, object]:
        return {"labeled": len(self.labeled), "unlabeled": len(self.unlabeled), "unlabeled_use": self.mode}


def label_split(records: list[dict], fraction: float, seed: int, mode: str) -> LabelSplit:
    """A `fraction` of the records, chosen by `seed` independently of the records' order."""
    order = sorted(range(len(records)), key=lambda i: str(records[i].get("id", i)))
    n = round(fraction * len(records))
    labeled = sorted(random.Random(seed).sample(order, n)) if n < len(records) else order
    chosen = set(labeled)
    return LabelSplit(sorted(labeled), [i for i in order if i not in chosen], mode)


def unlabeled_mode(cfg) -> str:
    """`data.unlabeled` with `auto` resolved: pseudo-labels when there is a teacher."""
    if cfg.data.unlabeled != "auto":
        return cfg.data.unlabeled
    return "pseudo" if cfg.teacher is not None else "drop"


def split_for(cfg, train: LlavaDataset) -> LabelSplit:
    """The label split of a run's training records, checked against the teacher it has."""
    mode = unlabeled_mode(cfg)
    if mode == "pseudo" and cfg.teacher is None:
        raise WorkbenchError("config key 'data.unlabeled' is 'pseudo' but there is no teacher to label them")
    return label_split(train.records, cfg.data.labeled_fraction, cfg.data.split_seed, mode)


def with_records(ds: LlavaDataset, records: list[dict]) -> LlavaDataset:
    """A copy of `ds` over `records`."""
    out = copy.copy(ds)
    out.records = records
    return out


def labeled_subset(ds: LlavaDataset, split: LabelSplit) -> LlavaDataset:
    """The training set without its unlabelled records."""
    if len(split.labeled) == len(ds.records):
        return ds
    if not split.labeled:
        raise WorkbenchError("data.labeled_fraction leaves no training record; raise it or use pseudo-labels")
    return with_records(ds, [ds.records[i] for i in split.labeled])


def with_answers(record: dict, answers: list[str] | None) -> dict:
    """The record with its assistant turns replaced by `answers` (the teacher's)."""
    if answers is None:
        raise WorkbenchError(f"teacher cache has no pseudo-label answers for record {record.get('id')!r}")
    out, k = [], 0
    for turn in record["conversations"]:
        if turn["from"] in ("gpt", "assistant"):
            turn = {**turn, "value": answers[k]}
            k += 1
        out.append(turn)
    return {**record, "conversations": out, "pseudo_labeled": True}
