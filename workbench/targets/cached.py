"""A cached teacher: its top-k answer-token logits, made once per fingerprint, and pseudo-labels.

Used when `teacher.cache` is set, or when unlabelled records get the teacher's answers
(`data.unlabeled: pseudo`). The cache lives under `<out_root>/teacher-cache/<fingerprint>`
(`auto`) or in the folder `teacher.cache` names; `workbench cache-teacher` makes it ahead of
a run. At build time a finished cache is only checked against the run's fingerprint (an
unfinished one is reopened and its teacher loaded); the teacher runs over the data in
`prepare`, after the run directory exists. The student then trains without the teacher in
memory; batches carry `teacher_topk`, looked up by sample id and checked token by token.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from losses.combine import WeightedLoss
from losses.inputs import IGNORE_INDEX, LossInputs
from teachers.cache import CacheWriter, TeacherCache, fingerprint_data, fingerprint_processor, fingerprint_teacher
from teachers.pseudo_label import pseudo_label, teacher_forced
from workbench.batch import model_inputs
from workbench.build.teacher import build_teacher, check_vocabularies, is_feature_teacher
from workbench.data.disagreement import DisagreementPool, LogDisagreements
from workbench.data.label_split import LabelSplit, split_for, with_answers, with_records
from workbench.data.llava import LlavaDataset, VLMCollator
from workbench.errors import WorkbenchError
from workbench.targets.base import Target, TargetContext

CACHE_FORMAT = 1


def kd_temperature(loss) -> float:
    """The one temperature the loss reads a cached teacher at (1 when no term reads one)."""
    temps = loss.cache_temperatures()
    if len(temps) > 1:
        raise WorkbenchError(
            f"a teacher cache holds one temperature, but the loss terms use {sorted(temps)}; use one value"
        )
    return temps.pop() if temps else 1.0


def cache_fingerprint(cfg, processor, train: LlavaDataset, split: LabelSplit, temperature: float) -> dict[str, Any]:
    t = cfg.teacher
    return {
        "format": CACHE_FORMAT,
        "teacher": fingerprint_teacher(t.path, t.revision),
        "processor": fingerprint_processor(processor),
        "data": fingerprint_data(
            [str(r.get("id", i)) for i, r in enumerate(train.records)], train.source_files(),
            {"labeled_fraction": cfg.data.labeled_fraction, "labeled_ids_sha256": split.labeled_ids_sha256,
             "unlabeled": split.mode, "limit_train": cfg.data.limit_train, "max_length": cfg.data.max_length,
             "max_new_tokens": cfg.data.max_new_tokens},
        ),
        "top_k": t.top_k,
        "temperature": temperature,
        "quantize": t.quantize,
        "dtype": t.dtype,
    }


def cache_dir_for(cfg, fingerprint: dict[str, Any]) -> Path:
    """`teacher.cache` if it names a folder; for `auto`, one folder per fingerprint under out_root."""
    if cfg.teacher.cache and cfg.teacher.cache != "auto":
        path = Path(cfg.teacher.cache)
        if path.exists() and not path.is_dir():
            raise WorkbenchError(f"teacher.cache (--out) {path} is a file; name a folder for the cache")
        return path
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(cfg.out_root) / "teacher-cache" / digest


def _manifest_says_complete(directory: Path) -> bool:
    try:
        return bool(json.loads((directory / "manifest.json").read_text()).get("complete", False))
    except (OSError, ValueError, AttributeError):
        return False


def checked_teacher(cfg):
    """The teacher, built, with `teacher.top_k` checked against its vocabulary."""
    teacher = build_teacher(cfg)
    vocab = getattr(teacher, "vocab_size", None)
    if vocab is not None and cfg.teacher.top_k > vocab:
        raise WorkbenchError(f"teacher.top_k (--top-k) is {cfg.teacher.top_k} but the teacher's vocabulary has "
                             f"{vocab} tokens")
    return teacher


@dataclass
class CacheJob:
    """Everything needed to make (or finish, or repair) one teacher cache."""

    teacher: Any
    collator: VLMCollator
    train: LlavaDataset
    split: LabelSplit
    writer: CacheWriter
    batch_size: int
    max_new_tokens: int

    def run(self) -> dict[str, Any]:
        """Run the teacher once over the training records into the sharded cache; resumes a
        partial one (and recomputes shards the writer dropped for failing their checksum)."""
        start, writer = time.time(), self.writer
        done = writer.done_ids()
        k, tau = writer.fingerprint["top_k"], writer.fingerprint["temperature"]
        jobs = [(i, False) for i in self.split.labeled] + \
               [(i, True) for i in self.split.unlabeled if self.split.mode == "pseudo"]
        jobs = [(i, p) for i, p in jobs if str(self.train.records[i].get("id", i)) not in done]
        self.teacher.eval()
        with tqdm(total=len(jobs), desc=f"teacher cache {writer.directory.name}", unit="sample") as bar:
            for pseudo in (False, True):
                todo = [i for i, p in jobs if p == pseudo]
                for b in range(0, len(todo), self.batch_size):
                    samples = [self.train[i] for i in todo[b:b + self.batch_size]]
                    for s, (ids, logp, rest, tokens, answers) in zip(samples, self.rows(samples, pseudo, tau, k)):
                        writer.add(s["id"], ids, logp, tokens, answers=answers, rest_logp=rest)
                    bar.update(len(samples))
        writer.close()
        stats = {"teacher_time_s": round(time.time() - start, 2), "samples_computed": len(jobs)}
        if writer.repaired:
            print(f"[workbench] teacher cache {writer.directory}: recomputed {', '.join(writer.repaired)} "
                  "(changed after they were written)")
            stats["repaired_shards"] = writer.repaired
        return stats

    def rows(self, samples: list[dict], pseudo: bool, tau: float, k: int):
        """Cache rows for `samples`: along their answers, or (`pseudo`) along the teacher's own."""
        if not pseudo:
            enc = self.collator(samples)
            return teacher_forced(self.teacher, model_inputs(enc), enc["labels"], tau, k)
        enc = self.collator([_blank(s) for s in samples])
        images = {key: v for key, v in model_inputs(enc).items()
                  if torch.is_tensor(v) and key not in ("input_ids", "attention_mask")}
        tok = self.collator.tokenizer
        return pseudo_label(self.teacher, enc, images, tau, k, tok.decode, tok.pad_token_id or 0,
                            self.max_new_tokens, [s["id"] for s in samples])


def _blank(sample: dict) -> dict:
    """The sample with empty assistant answers (the slots pseudo-labelling fills)."""
    messages = [{**m, "content": [{"type": "text", "text": ""}]} if m["role"] == "assistant" else m
                for m in sample["messages"]]
    return {**sample, "messages": messages}


@dataclass
class CachedTargets:
    """Wraps a collator: adds the cached teacher top-k for every answer token of the batch.

    Entries are looked up by sample id (never by step or rank) and checked token by token
    against the batch's labels, so a cache never silently drifts from the data.
    """

    collator: VLMCollator
    cache: TeacherCache

    def __getattr__(self, name):  # processor, tokenizer, ... of the wrapped collator
        if name in ("collator", "cache"):
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        batch = self.collator(samples)
        ids, logp, rest = [], [], []
        for row, sample_id in enumerate(batch["ids"]):
            entry = self.cache.get(sample_id)
            targets = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
            if not torch.equal(targets.long(), entry.tokens.long()):
                raise WorkbenchError(
                    f"teacher cache {self.cache.directory}: sample {sample_id} has {len(entry.tokens)} cached answer "
                    f"tokens that differ from the batch's {len(targets)} (data or tokenizer changed; rebuild the cache)"
                )
            ids.append(entry.topk_ids)
            logp.append(entry.topk_logp)
            rest.append(entry.rest_logp)
        batch["teacher_topk"] = (torch.cat(ids).long(), torch.cat(logp).float())
        if all(r is not None for r in rest):  # the exact remaining mass, when the cache has it
            batch["teacher_topk"] += (torch.cat(rest).float(),)
        return batch


class CachedTeacher(Target):
    """Top-k teacher logits read from a cache (+ pseudo-labelled records)."""

    name = "cached_teacher"
    priority = 20
    scores_validation = False  # the cache holds training records only

    def __init__(self, directory: Path, fingerprint: dict[str, Any], job: CacheJob | None, disagreement_only: bool,
                 eval_batch_size: int):
        self.directory, self.fingerprint, self.job = directory, fingerprint, job
        self.disagreement_only, self.eval_batch_size = disagreement_only, eval_batch_size
        self.cache: TeacherCache | None = None
        self._pool: DisagreementPool | None = None

    @classmethod
    def applies(cls, ctx: TargetContext) -> bool:
        t = ctx.cfg.teacher
        return (t is not None and not is_feature_teacher(t) and not ctx.classification
                and (t.cache is not None or ctx.split.pseudo_labels))

    @classmethod
    def create(cls, ctx: TargetContext) -> CachedTeacher:
        cfg = ctx.cfg
        if ctx.classification or cfg.teacher is None:
            raise WorkbenchError("a teacher cache holds a VLM teacher's answer tokens; it needs one (unset "
                                 "teacher.cache for image classification)")
        dense = ctx.loss.dense_teacher_terms()
        if dense:
            why = "teacher.cache is set" if cfg.teacher.cache is not None else "unlabeled records get cached pseudo-labels"
            raise WorkbenchError(
                f"loss terms {', '.join(dense)} need the teacher loaded (its features, or logits outside answer "
                f"tokens), but {why} and a teacher cache holds answer-token top-k logits only; unset teacher.cache "
                "(and use data.unlabeled=drop) or drop those terms")
        fingerprint = cache_fingerprint(cfg, ctx.processor, ctx.train, ctx.split, kd_temperature(ctx.loss))
        directory = cache_dir_for(cfg, fingerprint)
        if cfg.teacher.cache not in (None, "auto") and not directory.exists():
            raise WorkbenchError(f"config key 'teacher.cache': {directory} does not exist; "
                                 "make it with `workbench cache-teacher CONFIG` or set teacher.cache=auto")
        job = None
        if _manifest_says_complete(directory):  # read as it is; each shard checked when first loaded
            TeacherCache(directory).check(fingerprint)
        else:  # unfinished: reopened (checksums verified, changed shards dropped), made in `prepare`
            writer = CacheWriter(directory, fingerprint) if (directory / "manifest.json").is_file() else None
            teacher = checked_teacher(cfg)
            check_vocabularies(ctx.student, ctx.processor, teacher)
            job = CacheJob(teacher, ctx.collator, ctx.train, ctx.split, writer or CacheWriter(directory, fingerprint),
                           cfg.data.eval_batch_size, cfg.data.max_new_tokens)
        if cfg.data.disagreement_only and not ctx.split.pseudo_labels:
            raise WorkbenchError("config key 'data.disagreement_only' needs pseudo-labelled records "
                                 "(data.labeled_fraction < 1 with a teacher)")
        return cls(directory, fingerprint, job, cfg.data.disagreement_only, cfg.data.eval_batch_size)

    def prepare(self) -> dict[str, Any]:
        note: dict[str, Any] = {"dir": str(self.directory), "made_by_this_run": self.job is not None}
        if self.job is not None:
            note.update(self.job.run())
            self.job = None  # drops the teacher
        self.cache = TeacherCache(self.directory)
        self.cache.check(self.fingerprint)
        return {"teacher_cache": note}

    def train_set(self, train: LlavaDataset, split: LabelSplit | None) -> LlavaDataset:
        if self.cache is None:
            raise RuntimeError("CachedTeacher.train_set before prepare()")
        records = [train.records[i] for i in split.labeled]
        self._pseudo_rows = []
        if split.mode == "pseudo":
            for i in split.unlabeled:
                rec = train.records[i]
                self._pseudo_rows.append(len(records))
                records.append(with_answers(rec, self.cache.answers(str(rec.get("id", i)))))
        return with_records(train, records)

    def train_size(self, train: LlavaDataset, split: LabelSplit | None) -> int:
        return len(split.labeled) + (len(split.unlabeled) if split.mode == "pseudo" else 0)

    def train_collator(self, collator: Any) -> Any:
        return CachedTargets(collator, self.cache)

    def pool_fn(self, student, train, collator) -> DisagreementPool | None:
        if self.disagreement_only:
            self._pool = DisagreementPool(student, collator, train, self._pseudo_rows, self.eval_batch_size)
        return self._pool

    def callbacks(self) -> list[Any]:
        return [LogDisagreements(self._pool)] if self._pool is not None else []

    def fill(self, batch: dict[str, Any], inputs: LossInputs, loss: WeightedLoss, fused: bool) -> None:
        if "teacher_topk" in batch:  # training batches (held-out ones have no cache rows)
            inputs.teacher_topk = batch["teacher_topk"]
            inputs.check_teacher_topk()


def cache_teacher(cfg, stage: str | None = None, top_k: int | None = None,
                  out: str | None = None) -> tuple[Path, dict[str, Any]]:
    """`workbench cache-teacher`: make (or finish, or repair) the cache a run of `cfg` would read;
    `top_k` and `out` override the (stage's) `teacher.top_k` and `teacher.cache`."""
    from workbench.build.data import build_data
    from workbench.build.loss import build_loss

    cfg = _cache_config(cfg, stage)
    if top_k is not None and top_k < 1:
        raise WorkbenchError(f"--top-k must be >= 1, got {top_k}")
    cfg = replace(cfg, teacher=replace(cfg.teacher, top_k=top_k or cfg.teacher.top_k,
                                       cache=out if out is not None else cfg.teacher.cache))
    if is_feature_teacher(cfg.teacher):
        raise WorkbenchError(f"teacher.type {cfg.teacher.type!r} gives image features, not answer logits: "
                             "there is nothing to cache (it runs beside the student)")
    data = build_data(cfg)
    split = split_for(cfg, data.splits.train)
    fingerprint = cache_fingerprint(cfg, data.processor, data.splits.train, split,
                                    kd_temperature(build_loss(cfg, has_teacher=True)))
    directory = cache_dir_for(cfg, fingerprint)
    writer = CacheWriter(directory, fingerprint) if (directory / "manifest.json").is_file() else None
    if writer is not None and writer.complete:
        return directory, {"status": "already complete"}
    job = CacheJob(checked_teacher(cfg), VLMCollator(data.processor, max_length=cfg.data.max_length),
                   data.splits.train, split, writer or CacheWriter(directory, fingerprint),
                   cfg.data.eval_batch_size, cfg.data.max_new_tokens)
    return directory, job.run()


def _cache_config(cfg, stage: str | None):
    """The (stage's) config whose teacher `cache-teacher` runs."""
    from workbench.config import STAGE_REF, stage_configs

    if cfg.stages:
        stages = dict(stage_configs(cfg))
        with_teacher = [n for n, c in stages.items() if c.teacher is not None]
        if stage is None and len(with_teacher) != 1:
            raise WorkbenchError(f"this experiment has stages with teachers ({', '.join(with_teacher) or 'none'}); "
                                 "choose one with --stage")
        name = stage or with_teacher[0]
        if name not in stages:
            raise WorkbenchError(f"--stage {name!r}: stages are {', '.join(stages)}")
        cfg = stages[name]
        if cfg.teacher is not None and cfg.teacher.path.startswith(STAGE_REF):
            raise WorkbenchError(f"stage {name!r} is taught by {cfg.teacher.path}, which exists only inside a run; "
                                 "its cache is made by the run itself (teacher.cache=auto)")
    if cfg.teacher is None:
        raise WorkbenchError("config key 'teacher' is null: there is no teacher to cache")
    return cfg
