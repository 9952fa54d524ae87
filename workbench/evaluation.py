"""Held-out scoring of any model, and a record of what it was scored on.

`evaluate(model, loader)` gives answer accuracy (overall and per question type) of a VLM, or
top-1 accuracy of an image classifier. For a VLM the LM head runs on the answer positions only
(`logits_to_keep`): no (B, L, V) logits are built. `scored_on(...)` names the held-out data,
the teacher and the scoring protocol by short hashes; every run records it in summary.json and
`workbench compare` refuses to average runs whose records differ. `eval_command` is
`workbench eval`: score a run's or a folder's model, and the teacher beside it, into eval.json.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from workbench.batch import model_inputs
from workbench.data.sources import image_paths
from workbench.errors import WorkbenchError
from workbench.metrics import accuracies, answer_predictions, merge_scores, score_outputs, score_spans, spans_correct
from workbench.rundir import run_dir_of_model, write_json

# Bump a protocol when what counts as a correct answer changes; runs scored under different
# protocols are not averaged by `workbench compare`.
PROTOCOLS = {"vlm": "answer-exact-match/1", "classifier": "top1/1"}
EVAL_FILE = "eval.json"


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    """{"acc", "acc/<question type>"}: exact-match answer accuracy of a VLM (greedy decoding,
    from one teacher-forced pass at the answer positions), or top-1 accuracy of a classifier.
    A model that skips tokens (a mixture-of-depths student) adds `tokens/flops_ratio` and
    `tokens/kv_ratio`: its processed-token FLOPs and KV-cache proxies against the dense model
    on the same inputs (`students.mod.TokenCounter`)."""
    from contextlib import nullcontext

    from students.mod import count_tokens, mod_state

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: dict[str, tuple[int, int]] = {}
    with count_tokens(model) if mod_state(model) is not None else nullcontext() as counter:
        for batch in loader:
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
            labels = batch["labels"].to(device)
            if labels.dim() == 1:  # class labels
                merge_scores(scores, score_outputs(model(**inputs), batch))
            else:
                predictions = answer_predictions(model, inputs, labels)
                merge_scores(scores, score_spans(*spans_correct(predictions, labels), batch.get("qtypes")))
    model.train(was_training)
    out = accuracies(scores)
    if counter is not None and counter.summary():
        out.update({f"tokens/{k}": counter.summary()[k] for k in ("flops_ratio", "kv_ratio")})
    return out


# ---------------------------------------------------------------- fingerprints


def short_hash(value: Any) -> str:
    """16 hex digits of the sha256 of a JSON value: enough to tell two fingerprints apart."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(dataset: Dataset, processor: Any = None) -> dict[str, Any]:
    """What identifies a held-out split: its file (hashed in full), its sample ids, its images
    (relative path and size each; not their bytes, so that large sets fingerprint in seconds)
    and the tokenizer and processor that turn it into inputs."""
    from teachers.cache import fingerprint_data, fingerprint_processor

    base = getattr(dataset, "dataset", dataset)  # a Subset (limit_val)
    if hasattr(base, "json_path"):  # LLaVA-format records
        images = sorted({(p, _size(base.image_path(p))) for r in base.records for p in image_paths(r)})
        fingerprint = fingerprint_data([str(r.get("id", i)) for i, r in enumerate(base.records)],
                                       base.source_files(), {"images_sha256": short_hash(images)})
    elif hasattr(base, "reader"):  # a timm image folder
        samples = [(str(Path(p).relative_to(base.reader.root)), _size(Path(p)), int(c))
                   for p, c in base.reader.samples]
        fingerprint = {"n_samples": len(samples), "samples_sha256": short_hash(sorted(samples))}
    else:  # an in-memory set (digits): its tensors
        fingerprint = {"n_samples": len(dataset), "samples_sha256": short_hash(
            [hashlib.sha256(torch.as_tensor(dataset[i][0]).numpy().tobytes()).hexdigest() for i in range(len(dataset))])}
    fingerprint["n_samples"] = len(dataset)
    if processor is not None:
        fingerprint["processor"] = fingerprint_processor(processor)
    return fingerprint


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else -1


def model_fingerprint(path: str | Path) -> dict[str, Any]:
    """A model folder's config and weights (see `teachers.cache.fingerprint_teacher`); a
    checkpoint file's bytes; or, for a model named by the hub or timm, its name."""
    from teachers.cache import fingerprint_teacher, weights_digest
    from teachers.errors import TeacherError

    p = Path(path)
    if p.is_file():
        return {"path": str(path), "weights_sha256": weights_digest(p)}
    try:
        return fingerprint_teacher(str(path))
    except TeacherError:
        return {"path": str(path)}  # a timm name, or a hub id that is not cached


def scored_on(data: dict[str, Any], teacher: dict[str, Any] | None, classification: bool) -> dict[str, Any]:
    """What a score depends on besides the model, as short hashes: `protocol`, `data`, `teacher`."""
    weights = None if teacher is None else {k: v for k, v in teacher.items() if k.endswith("sha256")} or teacher
    return {"protocol": PROTOCOLS["classifier" if classification else "vlm"], "data": short_hash(data),
            "teacher": None if teacher is None else short_hash(weights)}


def teacher_fingerprint(cfg) -> dict[str, Any] | None:
    """The teacher of a run config, fingerprinted by its weights (None without one)."""
    if cfg.teacher is None:
        return None
    return {"type": cfg.teacher.type, **model_fingerprint(cfg.teacher.path)}


# ---------------------------------------------------------------- the held-out split


@dataclass
class HeldOut:
    """A held-out split ready to score: its dataset, collator and fingerprint."""

    dataset: Dataset
    collator: Any
    fingerprint: dict[str, Any]
    classification: bool
    source: str

    def loader(self, batch_size: int) -> DataLoader:
        return DataLoader(self.dataset, batch_size=batch_size, shuffle=False, collate_fn=self.collator)


def held_out_from_config(cfg) -> HeldOut:
    """The held-out split (`data.val`) of an experiment config, with the processor it trains with."""
    from workbench.build.data import build_data
    from workbench.data.llava import VLMCollator
    from workbench.data.vision import ImageCollator

    data = build_data(cfg)
    if data.splits.val is None:
        raise WorkbenchError("the config has no held-out split: set data.val (or give --data)")
    collator = ImageCollator() if data.classification else VLMCollator(data.processor, max_length=cfg.data.max_length)
    return HeldOut(data.splits.val, collator, data_fingerprint(data.splits.val, data.processor),
                   data.classification, f"data.val of {cfg.name}")


def held_out_from_path(path: str, model_dir: Path | None, processor_dir: str | None = None,
                       image_folder: str | None = None) -> HeldOut:
    """`--data`: a LLaVA-format JSON (the processor from `--processor` or the model's folder),
    or for an image classifier a folder of <class>/<image> files (classes and preprocessing
    from the model's config.json)."""
    from workbench.build.data import load_processor
    from workbench.data.llava import LlavaDataset, VLMCollator

    if Path(path).is_dir():
        return _image_folder(path, model_dir)
    if processor_dir is None and model_dir is None:
        raise WorkbenchError("--data needs a processor: give --processor DIR or a model folder that has one")
    processor = load_processor(processor_dir or model_dir, "--processor" if processor_dir else "model")
    dataset = LlavaDataset(path, image_folder)
    return HeldOut(dataset, VLMCollator(processor), data_fingerprint(dataset, processor), False, str(path))


def _image_folder(path: str, model_dir: Path | None) -> HeldOut:
    from timm.data import create_dataset, create_transform, resolve_data_config

    from workbench.data.vision import ImageCollator

    config = json.loads((model_dir / "config.json").read_text()) if model_dir is not None else {}
    classes = config.get("label_names")
    if not classes:
        raise WorkbenchError(f"--data {path} is an image folder, but {model_dir} is not an image classifier "
                             "exported with its class names (label_names in config.json)")
    ds = create_dataset("", root=path, is_training=False, class_map={c: i for i, c in enumerate(classes)})
    if len(ds) == 0:
        raise WorkbenchError(f"--data {path} holds no images (expected <class>/<image> files)")
    ds.transform = create_transform(**resolve_data_config(pretrained_cfg=config.get("pretrained_cfg", {})))
    return HeldOut(ds, ImageCollator(), data_fingerprint(ds), True, str(path))


# ---------------------------------------------------------------- `workbench eval`


@dataclass
class Scored:
    """One model's scores and what identifies it."""

    role: str
    path: str
    params: int
    scores: dict[str, float]
    fingerprint: dict[str, Any]
    reducer: str | None = None


def load_model(model_dir: Path) -> torch.nn.Module:
    import students

    try:
        return students.load(model_dir).eval()
    except students.StudentLoadError as e:
        raise WorkbenchError(str(e)) from None


def _score(role: str, path: str, model: torch.nn.Module, held_out: HeldOut, batch_size: int,
           fingerprint: dict[str, Any]) -> Scored:
    print(f"[workbench] scoring the {role} {path} on {len(held_out.dataset):,} held-out samples")
    return Scored(role, path, sum(p.numel() for p in model.parameters()),
                  evaluate(model, held_out.loader(batch_size)), fingerprint)


def _teacher(cfg, teacher_path: str | None) -> tuple[torch.nn.Module | None, str | None, dict | None]:
    """The teacher to score beside the model: `--teacher`, else the config's answering teacher."""
    from workbench.build.teacher import build_teacher, is_feature_teacher
    from workbench.registry import TEACHERS

    if teacher_path == "none":
        return None, None, None
    if teacher_path is not None:
        return TEACHERS.get("hf_vlm")(path=teacher_path), teacher_path, model_fingerprint(teacher_path)
    if cfg is None or cfg.teacher is None or is_feature_teacher(cfg.teacher):
        return None, None, None
    return build_teacher(cfg), cfg.teacher.path, teacher_fingerprint(cfg)


def held_out_for(model_dir: Path, config: str | None = None, overrides: list[str] = (), data: str | None = None,
                 processor: str | None = None, image_folder: str | None = None) -> tuple[HeldOut, Any]:
    """The held-out split to score `model_dir` on - `--data`, a CONFIG's data.val, or the data.val
    of the run the model belongs to - and the config it came from (None for --data)."""
    from workbench.config import load_config

    run = run_dir_of_model(model_dir)
    if data is not None and config is not None:
        raise WorkbenchError("give either --data or a CONFIG, not both")
    cfg = load_config(config, overrides) if config else (load_config(run.config, overrides) if run else None)
    if data is not None:
        return held_out_from_path(data, model_dir, processor, image_folder), cfg
    if cfg is not None:
        return held_out_from_config(cfg), cfg
    raise WorkbenchError(f"{model_dir} is not inside a run directory: give --data FILE or a CONFIG to score it on")


def eval_command(source: str, config: str | None = None, overrides: list[str] = (), data: str | None = None,
                 processor: str | None = None, image_folder: str | None = None, teacher: str | None = None,
                 out: str | None = None, batch_size: int | None = None, reduce: str | None = None) -> dict[str, Any]:
    """Score the model of a run (its exported student, a multi-stage run's last) or a folder on
    a held-out split, and the teacher beside it; write eval.json and print both. With `reduce`,
    the model runs with that training-free token reducer (`students.reduce`)."""
    from workbench.elastic import resolve_model_dir

    model_dir = resolve_model_dir(source)
    run = run_dir_of_model(model_dir)
    held_out, cfg = held_out_for(model_dir, config, overrides, data, processor, image_folder)
    size = batch_size or (cfg.data.eval_batch_size if cfg is not None else 32)
    role = "student" if run is not None else "model"
    model = load_model(model_dir)
    if reduce is not None:
        from students.reduce import apply_reducer

        try:
            apply_reducer(model, reduce)
        except ValueError as e:
            raise WorkbenchError(f"--reduce {reduce}: {e}") from None
    scored = [_score(role, str(model_dir), model, held_out, size, model_fingerprint(model_dir))]
    scored[0].reducer = reduce
    teacher_model, teacher_path, teacher_fp = _teacher(cfg, teacher)
    if teacher_model is not None:
        scored.append(_score("teacher", teacher_path, teacher_model, held_out, size, teacher_fp))
    report = _report(held_out, scored, teacher_fp)
    path = Path(out) if out else (run.path if run is not None else Path.cwd()) / EVAL_FILE
    write_json(path, report)
    _print(report, path)
    return report


def _report(held_out: HeldOut, scored: list[Scored], teacher_fp: dict | None) -> dict[str, Any]:
    from workbench.device import environment

    env = environment()
    return {
        "scored_on": scored_on(held_out.fingerprint, teacher_fp, held_out.classification),
        "data": {"source": held_out.source, "fingerprint": held_out.fingerprint},
        "models": {s.role: {"path": s.path, "params": s.params, "scores": s.scores, "fingerprint": s.fingerprint,
                            **({"reducer": s.reducer} if s.reducer else {})}
                   for s in scored},
        "packages": {k: v for k, v in env["packages"].items() if k in ("torch", "transformers", "timm")},
        "git_commit": env["git_commit"],
    }


def _print(report: dict[str, Any], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    models = report["models"]
    table = Table(title=f"held-out: {report['data']['source']} ({report['data']['fingerprint']['n_samples']:,} samples)")
    table.add_column("metric")
    for role in models:
        table.add_column(role, justify="right")
    table.add_row("params", *(f"{m['params']:,}" for m in models.values()))
    for name in sorted({k for m in models.values() for k in m["scores"]}, key=lambda k: (k != "acc", k)):
        table.add_row(name, *(f"{m['scores'][name]:.3f}" if name in m["scores"] else "-" for m in models.values()))
    Console().print(table)
    print(f"written to {path}")

