"""What the student learns from: labelled records, a teacher-logit cache, pseudo-labels.

`attach_teacher` (called by `build`) decides between an online teacher (loaded, run every
step) and a teacher cache (`teacher.cache`, or needed because unlabeled records get the
teacher's answers): the cache is made once per fingerprint (`make_teacher_cache`, also
`workbench cache-teacher`) and the student then trains without the teacher in memory.
Pseudo-labels are the teacher's greedy answers, found by Jacobi iteration: whole-sequence
teacher passes until every answer is a fixed point of greedy decoding.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from losses.combine import IGNORE_INDEX
from teachers.cache import CacheWriter, TeacherCache, fingerprint_data, fingerprint_processor, fingerprint_teacher
from workbench.data.llava import LlavaDataset, VLMCollator
from workbench.errors import WorkbenchError
from workbench.metrics import answer_correct
from workbench.module import model_inputs

CACHE_FORMAT = 1


# ---------------------------------------------------------------------------- the split


@dataclass
class LabelSplit:
    """Which training records keep their answers; the rest are dropped or pseudo-labelled."""

    labeled: list[int]
    unlabeled: list[int]
    mode: str  # pseudo | drop

    @property
    def labeled_ids_sha256(self) -> str:
        return hashlib.sha256(json.dumps(sorted(self.labeled)).encode()).hexdigest()


def label_split(records: list[dict], fraction: float, seed: int, mode: str) -> LabelSplit:
    """A `fraction` of the records, chosen by `seed` independently of the records' order."""
    order = sorted(range(len(records)), key=lambda i: str(records[i].get("id", i)))
    n = round(fraction * len(records))
    labeled = sorted(random.Random(seed).sample(order, n)) if n < len(records) else order
    chosen = set(labeled)
    return LabelSplit(sorted(labeled), [i for i in order if i not in chosen], mode)


# ---------------------------------------------------------------------------- attach


def unlabeled_mode(cfg) -> str:
    """`data.unlabeled` with `auto` resolved: pseudo-labels when there is a teacher."""
    if cfg.data.unlabeled != "auto":
        return cfg.data.unlabeled
    return "pseudo" if cfg.teacher is not None else "drop"


def _kd_temperature(cfg) -> float:
    temps = {t.temperature for t in cfg.loss.values() if t.type != "ce" and t.weight}
    if len(temps) > 1:
        raise WorkbenchError(
            f"a teacher cache holds one temperature, but the loss terms use {sorted(temps)}; use one value"
        )
    masks = {t.mask for t in cfg.loss.values() if t.type in ("forward_kl", "reverse_kl", "jsd", "tvd") and t.weight}
    if masks - {None, "answer"}:  # None: the divergences' default, answer
        raise WorkbenchError("a teacher cache holds answer positions only; set the divergence terms' mask to answer")
    return temps.pop() if temps else 1.0


def cache_fingerprint(cfg, processor, train: LlavaDataset, split: LabelSplit) -> dict[str, Any]:
    t = cfg.teacher
    return {
        "format": CACHE_FORMAT,
        "teacher": fingerprint_teacher(t.path, t.revision),
        "processor": fingerprint_processor(processor),
        "data": fingerprint_data(
            [str(r.get("id", i)) for i, r in enumerate(train.records)], [train.json_path],
            {"labeled_fraction": cfg.data.labeled_fraction, "labeled_ids_sha256": split.labeled_ids_sha256,
             "unlabeled": split.mode, "limit_train": cfg.data.limit_train, "max_length": cfg.data.max_length,
             "max_new_tokens": cfg.data.max_new_tokens},
        ),
        "top_k": t.top_k,
        "temperature": _kd_temperature(cfg),
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


def _existing_writer(directory: Path, fingerprint: dict[str, Any]) -> CacheWriter | None:
    """The cache at `directory` reopened (checksums verified, changed shards dropped), or None."""
    return CacheWriter(directory, fingerprint) if (directory / "manifest.json").is_file() else None


def _manifest_says_complete(directory: Path) -> bool:
    try:
        return bool(json.loads((directory / "manifest.json").read_text()).get("complete", False))
    except (OSError, ValueError, AttributeError):
        return False


def _checked_teacher(cfg):
    """The teacher, built, with `teacher.top_k` checked against its vocabulary."""
    from workbench.build import build_teacher

    teacher = build_teacher(cfg)
    vocab = getattr(teacher, "vocab_size", None)
    if vocab is not None and cfg.teacher.top_k > vocab:
        raise WorkbenchError(f"teacher.top_k (--top-k) is {cfg.teacher.top_k} but the teacher's vocabulary has "
                             f"{vocab} tokens")
    return teacher


def attach_teacher(cfg, built):
    """Give `built` its teacher signal: an online teacher, or cached targets (+ pseudo-labels)."""
    from workbench.build import build_teacher, check_vocabularies

    train = built.splits.train
    has_teacher = cfg.teacher is not None
    mode = unlabeled_mode(cfg)
    if mode == "pseudo" and not has_teacher:
        raise WorkbenchError("config key 'data.unlabeled' is 'pseudo' but there is no teacher to label them")
    split = label_split(train.records, cfg.data.labeled_fraction, cfg.data.split_seed, mode)
    if cfg.data.labeled_fraction < 1:
        built.notes["data"] = {"labeled": len(split.labeled), "unlabeled": len(split.unlabeled), "unlabeled_use": mode}
    use_cache = has_teacher and (cfg.teacher.cache is not None or (mode == "pseudo" and split.unlabeled))
    dense = built.loss.dense_teacher_terms()
    if use_cache and dense:
        why = "teacher.cache is set" if cfg.teacher.cache is not None else "unlabeled records get cached pseudo-labels"
        raise WorkbenchError(
            f"loss terms {', '.join(dense)} need the teacher loaded (its features, or logits outside answer "
            f"tokens), but {why} and a teacher cache holds answer-token top-k logits only; unset teacher.cache "
            "(and use data.unlabeled=drop) or drop those terms"
        )
    if not use_cache:
        if has_teacher:
            built.teacher = build_teacher(cfg)
            if getattr(built.teacher, "feature_teacher", False):  # a vision encoder: it reads the images
                if built.loss.needs_teacher:
                    built.collator.teacher_images = built.teacher.preprocess
            else:
                check_vocabularies(built.student, built.processor, built.teacher)
        built.splits.train = _subset(train, split.labeled)
        return built

    fingerprint = cache_fingerprint(cfg, built.processor, train, split)
    directory = cache_dir_for(cfg, fingerprint)
    note = {"dir": str(directory), "made_by_this_run": False}
    if cfg.teacher.cache not in (None, "auto") and not directory.exists():
        raise WorkbenchError(f"config key 'teacher.cache': {directory} does not exist; "
                             "make it with `workbench cache-teacher CONFIG` or set teacher.cache=auto")
    # A finished cache is read as it is (each shard checked against its SHA-256 when first
    # loaded, refused if changed); an unfinished one is resumed here.
    if not _manifest_says_complete(directory):
        writer = _existing_writer(directory, fingerprint)
        teacher = _checked_teacher(cfg)
        check_vocabularies(built.student, built.processor, teacher)
        writer = writer or CacheWriter(directory, fingerprint)
        note.update(made_by_this_run=True, **make_teacher_cache(cfg, teacher, built.collator, train, split, writer))
        del teacher
    cache = TeacherCache(directory)
    cache.check(fingerprint)
    built.notes["teacher_cache"] = note
    records = [train.records[i] for i in split.labeled]
    pseudo_rows = []
    if mode == "pseudo":
        for i in split.unlabeled:
            rec = train.records[i]
            pseudo_rows.append(len(records))
            records.append(with_answers(rec, cache.answers(str(rec.get("id", i)))))
    built.splits.train = _with_records(train, records)
    built.eval_collator = built.collator
    built.collator = CachedTargets(built.collator, cache)
    if cfg.data.disagreement_only:
        if not pseudo_rows:
            raise WorkbenchError("config key 'data.disagreement_only' needs pseudo-labelled records "
                                 "(data.labeled_fraction < 1 with a teacher)")
        built.pool_fn = DisagreementPool(built.student, built.collator, built.splits.train, pseudo_rows,
                                         cfg.data.eval_batch_size)
        built.callbacks.append(built.pool_fn.logger())
    return built


def cache_teacher(cfg, stage: str | None = None, top_k: int | None = None,
                  out: str | None = None) -> tuple[Path, dict[str, Any]]:
    """`workbench cache-teacher`: make (or finish, or repair) the cache a run of `cfg` would read;
    `top_k` and `out` override the (stage's) `teacher.top_k` and `teacher.cache`."""
    from dataclasses import replace

    from workbench.build import resolve_processor
    from workbench.config import STAGE_REF, stage_configs
    from workbench.registry import DATASETS

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
    if top_k is not None and top_k < 1:
        raise WorkbenchError(f"--top-k must be >= 1, got {top_k}")
    cfg = replace(cfg, teacher=replace(cfg.teacher, top_k=top_k or cfg.teacher.top_k,
                                       cache=out if out is not None else cfg.teacher.cache))
    from workbench.build import is_feature_teacher

    if is_feature_teacher(cfg.teacher):
        raise WorkbenchError(f"teacher.type {cfg.teacher.type!r} gives image features, not answer logits: "
                             "there is nothing to cache (it runs beside the student)")
    splits = DATASETS.get(cfg.data.type, "data.type")(cfg.data)
    processor = resolve_processor(cfg, splits)
    mode = unlabeled_mode(cfg)
    split = label_split(splits.train.records, cfg.data.labeled_fraction, cfg.data.split_seed, mode)
    fingerprint = cache_fingerprint(cfg, processor, splits.train, split)
    directory = cache_dir_for(cfg, fingerprint)
    writer = _existing_writer(directory, fingerprint)
    if writer is not None and writer.complete:
        return directory, {"status": "already complete"}
    teacher = _checked_teacher(cfg)
    writer = writer or CacheWriter(directory, fingerprint)
    stats = make_teacher_cache(cfg, teacher, VLMCollator(processor, max_length=cfg.data.max_length),
                               splits.train, split, writer)
    return directory, stats


def _with_records(ds: LlavaDataset, records: list[dict]) -> LlavaDataset:
    out = copy.copy(ds)
    out.records = records
    return out


def _subset(ds: LlavaDataset, indices: list[int]) -> LlavaDataset:
    if len(indices) == len(ds.records):
        return ds
    if not indices:
        raise WorkbenchError("data.labeled_fraction leaves no training record; raise it or use pseudo-labels")
    return _with_records(ds, [ds.records[i] for i in indices])


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


# ---------------------------------------------------------------------------- cached targets


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


# ---------------------------------------------------------------------------- making a cache


def _image_inputs(enc: dict[str, Any], rows: list[int] | None = None) -> dict[str, Any]:
    """The model inputs other than the token sequence (pixel values, ...), optionally for some rows."""
    return {k: v if rows is None else v[rows] for k, v in model_inputs(enc).items()
            if torch.is_tensor(v) and k not in ("input_ids", "attention_mask")}


def _topk(logits: torch.Tensor, positions: list[int], temperature: float, k: int):
    """Top-k ids and log-probabilities at tau of the predictions for `positions` (made at
    position - 1), and the log of the mass outside the top-k, computed exactly."""
    rows = logits[torch.tensor(positions, dtype=torch.long) - 1].float() / temperature  # (T, V)
    logp = torch.log_softmax(rows, dim=-1)
    vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (T, K)
    rest = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), dim=-1)  # (T,)
    return idx.to(torch.int32), vals, rest


@torch.no_grad()
def teacher_forced(teacher, collator: VLMCollator, samples: list[dict], temperature: float, k: int):
    """Cache rows for labelled samples: the teacher's top-k at every answer token."""
    enc = collator(samples)
    logits = teacher(**model_inputs(enc)).logits
    out = []
    for i in range(len(samples)):
        positions = (enc["labels"][i] != IGNORE_INDEX).nonzero().squeeze(1).tolist()
        ids, logp, rest = _topk(logits[i], positions, temperature, k)
        out.append((ids, logp, rest, enc["labels"][i][positions].to(torch.int32), None))
    return out


def _blank(sample: dict) -> dict:
    messages = [{**m, "content": [{"type": "text", "text": ""}]} if m["role"] == "assistant" else m
                for m in sample["messages"]]
    return {**sample, "messages": messages}


@dataclass
class _Slots:
    """One sample's token sequence as prompts and answer slots (answer tokens + end-of-turn)."""

    prompts: list[list[int]]
    ends: list[list[int]]
    tail: list[int]
    answers: list[list[int]] = field(default_factory=list)

    def sequence(self) -> tuple[list[int], list[list[int]]]:
        seq, starts = [], []
        for prompt, ans, end in zip(self.prompts, self.answers, self.ends):
            seq += prompt
            starts.append(len(seq))
            seq += ans + end
        return seq + self.tail, starts


def _slots(input_ids: list[int], labels: list[int]) -> _Slots:
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
    return _Slots(prompts, ends, cur, [[] for _ in ends])


@torch.no_grad()
def pseudo_label(teacher, collator: VLMCollator, samples: list[dict], temperature: float, k: int,
                 max_new_tokens: int = 32):
    """The teacher's greedy answer to every question, and its top-k along those answers.

    Jacobi iteration on whole sequences: each pass reads the teacher's argmax at every answer
    slot given the current guesses; a sample is done when every answer reproduces itself and
    is followed by the end-of-turn token, i.e. it is exactly what greedy decoding turn by
    turn would produce. Answers of n tokens take about n + 1 passes (all turns at once).
    """
    enc = collator([_blank(s) for s in samples])
    pad = collator.tokenizer.pad_token_id or 0
    slots = []
    for i in range(len(samples)):
        keep = enc["attention_mask"][i].bool()
        slots.append(_slots(enc["input_ids"][i][keep].tolist(), enc["labels"][i][keep].tolist()))
    results: list[Any] = [None] * len(samples)
    active = list(range(len(samples)))
    # Jacobi decoding fixes at least one more token per pass, so this many passes always suffice
    passes = max(len(sl.ends) for sl in slots) * (max_new_tokens + 1) + 1
    for _ in range(passes):
        seqs = [slots[i].sequence() for i in active]
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((len(active), width), pad, dtype=torch.long)
        mask = torch.zeros((len(active), width), dtype=torch.long)
        for r, (s, _) in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        logits = teacher(input_ids=ids, attention_mask=mask, **_image_inputs(enc, active)).logits
        preds = logits.argmax(-1)
        still = []
        for r, i in enumerate(active):
            sl, (seq, starts) = slots[i], seqs[r]
            done = True
            for t, start in enumerate(starts):
                ans, end = sl.answers[t], sl.ends[t]
                guess = preds[r, start - 1:start + len(ans)].tolist()  # predictions for len(ans) + 1 tokens
                new = guess[:guess.index(end[0])] if end[0] in guess else guess
                fixed = new == ans  # reproduces itself and, being shorter than guess, ends the turn
                if len(new) > max_new_tokens:  # too long: cut, and accept once the cut prefix is stable
                    new = new[:max_new_tokens]
                    fixed = new == ans
                sl.answers[t] = new
                done = done and fixed
            if done:
                positions = [p for start, ans, end in zip(starts, sl.answers, sl.ends)
                             for p in range(start, start + len(ans) + len(end))]
                top_ids, top_logp, rest = _topk(logits[r], positions, temperature, k)
                tokens = torch.tensor([seq[p] for p in positions], dtype=torch.int32)
                texts = [collator.tokenizer.decode(a).strip() for a in sl.answers]  # specials kept: text round-trips
                results[i] = (top_ids, top_logp, rest, tokens, texts)
            else:
                still.append(i)
        active = still
        if not active:
            break
    if active:
        raise WorkbenchError(f"pseudo-labelling did not converge for samples {[samples[i]['id'] for i in active][:3]}")
    return results


def make_teacher_cache(cfg, teacher, collator: VLMCollator, train: LlavaDataset, split: LabelSplit,
                       writer: CacheWriter) -> dict[str, Any]:
    """Run the teacher once over the training records into a sharded cache; resumes a partial
    one (and recomputes shards the writer dropped for failing their checksum)."""
    start = time.time()
    done = writer.done_ids()
    directory = writer.directory
    k, tau = writer.fingerprint["top_k"], writer.fingerprint["temperature"]
    bs = cfg.data.eval_batch_size
    jobs = [(i, False) for i in split.labeled] + [(i, True) for i in split.unlabeled if split.mode == "pseudo"]
    jobs = [(i, p) for i, p in jobs if str(train.records[i].get("id", i)) not in done]
    teacher.eval()
    with tqdm(total=len(jobs), desc=f"teacher cache {directory.name}", unit="sample") as bar:
        for pseudo in (False, True):
            todo = [i for i, p in jobs if p == pseudo]
            for b in range(0, len(todo), bs):
                samples = [train[i] for i in todo[b:b + bs]]
                rows = (pseudo_label(teacher, collator, samples, tau, k, cfg.data.max_new_tokens) if pseudo
                        else teacher_forced(teacher, collator, samples, tau, k))
                for s, (ids, logp, rest, tokens, answers) in zip(samples, rows):
                    writer.add(s["id"], ids, logp, tokens, answers=answers, rest_logp=rest)
                bar.update(len(samples))
    writer.close()
    stats = {"teacher_time_s": round(time.time() - start, 2), "samples_computed": len(jobs)}
    if writer.repaired:
        print(f"[workbench] teacher cache {directory}: recomputed {', '.join(writer.repaired)} "
              "(changed after they were written)")
        stats["repaired_shards"] = writer.repaired
    return stats


# ---------------------------------------------------------------------------- parity alignment


class DisagreementPool:
    """Parity alignment: each epoch, train on the labelled records plus the pseudo-labelled
    records whose teacher answers the student does not yet reproduce (greedy, exact match)."""

    def __init__(self, student, collator, train: LlavaDataset, pseudo_rows: list[int], batch_size: int):
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
            batch = self.collator.collator([self.train[i] for i in rows])
            inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
            logits = self.student(**inputs).logits.cpu()
            correct, row = answer_correct(logits, batch["labels"])
            wrong = set(row[~correct].tolist())
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

    def logger(self):
        from pytorch_lightning.callbacks import Callback

        pool = self

        class _LogPool(Callback):
            def on_train_batch_end(self, trainer, pl_module, *args) -> None:
                if pool.history:
                    pl_module.log("data/disagreements", float(pool.history[-1]["disagreements"]))

        return _LogPool()
