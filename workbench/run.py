"""Run one experiment: build, open a fresh run directory, fit with Lightning, export, summarise.

Run directory (`<out_root>/<name>/<run-id>/`): config.yaml (resolved), env.json,
metrics.csv (per step, Lightning's CSVLogger), checkpoints/, student/ (exported with
save_pretrained + the processor), summary.json. An existing run directory is never reused; `<out_root>/<name>/latest` links to
the newest completed run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from workbench.build import Built, build
from workbench.config import RunConfig, to_yaml
from workbench.device import environment
from workbench.errors import WorkbenchError
from workbench.metrics import accuracies, merge_scores, score_batch
from workbench.module import DistillModule, model_inputs

# Our run directory is always new; CSVLogger's warning about a non-empty folder is noise.
warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
RUN_DIR_ENV = "WB_RUN_DIR"  # hands rank 0's run directory to DDP worker processes


def _is_worker_process() -> bool:
    """True in the extra processes Lightning's DDP launcher starts (they re-run the CLI)."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def open_run_dir(cfg: RunConfig) -> Path:
    """Create `<out_root>/<name>/<run-id>` exclusively; an existing one is an error."""
    if _is_worker_process() and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    digest = hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:6]
    run_id = cfg.run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{digest}"
    run_dir = Path(cfg.out_root) / cfg.name / run_id
    if run_dir.exists():
        raise WorkbenchError(f"run directory {run_dir} already exists; choose another run_id (nothing was written)")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
    except FileExistsError:
        raise WorkbenchError(f"run directory {run_dir} already exists; choose another run_id") from None
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
    return run_dir


def loaders(cfg: RunConfig, built: Built) -> tuple[DataLoader, DataLoader | None]:
    d = cfg.data
    common = dict(collate_fn=built.collator, num_workers=d.num_workers, persistent_workers=d.num_workers > 0)
    train = DataLoader(built.splits.train, batch_size=d.batch_size, shuffle=True, drop_last=True,
                       generator=torch.Generator().manual_seed(cfg.seed), **common)
    if len(train) == 0:
        raise WorkbenchError(
            f"data.batch_size={d.batch_size} is larger than the training set ({len(built.splits.train)} samples)"
        )
    val = None
    if built.splits.val is not None:
        val = DataLoader(built.splits.val, batch_size=d.eval_batch_size, shuffle=False, **common)
    return train, val


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    """Answer accuracy (overall and per question type) of any VLM on a held-out loader."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: dict[str, tuple[int, int]] = {}
    for batch in loader:
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
        logits = model(**inputs).logits
        merge_scores(scores, score_batch(logits.cpu(), batch["labels"], batch["qtypes"]))
    model.train(was_training)
    return accuracies(scores)


def count_params(model: torch.nn.Module | None, trainable: bool = False) -> int | None:
    if model is None:
        return None
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def make_trainer(cfg: RunConfig, run_dir: Path) -> pl.Trainer:
    t = cfg.trainer
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step}", auto_insert_metric_name=False,
                                 save_last=True, save_top_k=0,
                                 every_n_train_steps=t.checkpoint_every_n_steps or t.val_every_n_steps)
    return pl.Trainer(
        max_steps=t.max_steps,
        max_time={"minutes": t.max_time_minutes} if t.max_time_minutes else None,
        val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every_n_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip or None,
        num_sanity_val_steps=0,
        logger=CSVLogger(run_dir, name="", version=""),
        callbacks=[checkpoint],
        enable_progress_bar=t.progress_bar,
        default_root_dir=run_dir,
    )


def export_student(built: Built, out: Path) -> None:
    """save_pretrained of the student and the shared processor: a standalone HF folder."""
    built.student.save_pretrained(out)
    built.processor.save_pretrained(out)


def mark_latest(run_dir: Path) -> None:
    """Point `<out_root>/<name>/latest` at a completed run, so configs can name it."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def run(cfg: RunConfig) -> Path:
    """Train as `cfg` says; returns the run directory."""
    start = time.time()
    built = build(cfg)  # every config/data/checkpoint error surfaces here, before any write
    train_loader, val_loader = loaders(cfg, built)
    run_dir = open_run_dir(cfg)
    is_main = not _is_worker_process()
    summary: dict[str, Any] = {"name": cfg.name, "run_id": run_dir.name, "status": "running",
                               "params": {"student": count_params(built.student),
                                          "student_trainable": count_params(built.student, trainable=True),
                                          "teacher": count_params(built.teacher)}}
    if is_main:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        _write_json(run_dir / "env.json", environment())
        if built.teacher is not None and cfg.eval_teacher and val_loader is not None:
            summary["teacher"] = evaluate(built.teacher, val_loader)
        _write_json(run_dir / "summary.json", summary)

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    tags = sorted({t for rec in (built.splits.val.records if built.splits.val else []) for t in rec.get("qtypes", [])})
    module = DistillModule(built.student, built.loss, cfg.optim, cfg.trainer.max_steps, built.teacher, tuple(tags))
    trainer = make_trainer(cfg, run_dir)
    fit_start = time.time()
    try:
        trainer.fit(module, train_loader, val_loader)
    except BaseException as e:
        if is_main:
            summary.update(status="failed", error=f"{type(e).__name__}: {e}", wall_time_s=time.time() - start)
            _write_json(run_dir / "summary.json", summary)
        raise
    if not trainer.is_global_zero:
        return run_dir
    train_time = time.time() - fit_start
    built.student.cpu()
    export_student(built, run_dir / "student")
    samples = trainer.global_step * cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * trainer.world_size
    summary.update(
        status="completed",
        steps=trainer.global_step,
        samples_seen=samples,
        train_time_s=round(train_time, 2),
        samples_per_s=round(samples / max(train_time, 1e-9), 2),
        final_train={k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")},
    )
    if getattr(module, "distributed_check", None):
        summary["distributed"] = module.distributed_check
    if val_loader is not None:
        summary["student"] = evaluate(built.student, val_loader)
    summary["wall_time_s"] = round(time.time() - start, 2)
    _write_json(run_dir / "summary.json", summary)
    mark_latest(run_dir)
    return run_dir
