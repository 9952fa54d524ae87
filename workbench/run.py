"""Run an experiment: build, open a fresh run directory, fit with Lightning, export, summarise.

Run directory (`<out_root>/<name>/<run-id>/`): config.yaml (resolved), env.json, metrics.csv
(per step, Lightning's CSVLogger), checkpoints/, student/ (save_pretrained + the processor),
summary.json; multi-stage experiments put one such directory per stage under `stages/<name>/`
and a results table in results.md. A run directory is never reused except by `resume`, which
continues from `checkpoints/last.ckpt`; `<out_root>/<name>/latest` links to the newest
completed run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from workbench.build import Built, build
from workbench.data.sampler import SamplerState, StepBatchSampler
from workbench.checkpoint import AtomicCheckpointIO
from workbench.config import STAGE_REF, RunConfig, load_config, stage_configs, to_yaml
from workbench.device import environment
from workbench.errors import WorkbenchError
from workbench.guard import Diverged, DivergenceGuard, first_nonfinite
from workbench.interrupt import ending, fitting, reraise
from workbench.metrics import accuracies, merge_scores, score_outputs
from workbench.module import DistillModule, VisionDistillModule, model_inputs

# Our run directory is always new; CSVLogger's warning about a non-empty folder is noise.
warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)  # the disk, not the run: a message, not a traceback
RUN_DIR_ENV = "WB_RUN_DIR"  # hands rank 0's run directory to DDP worker processes
LAUNCH_ENV = "WB_LAUNCH"  # this invocation's id, inherited by its DDP workers
STAGE_READY = ".stage-ready.json"  # rank 0: "stage <name> is built, about to fit" (multi-stage DDP)


def _is_worker_process() -> bool:
    """True in the extra processes Lightning's DDP launcher starts (they re-run the CLI)."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def open_run_dir(cfg: RunConfig, run_dir: Path | None = None) -> Path:
    """Create `<out_root>/<name>/<run-id>` (or `run_dir`) exclusively; an existing one is an error."""
    if _is_worker_process() and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    chosen = run_dir is not None or cfg.run_id is not None
    if run_dir is None:
        digest = hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:6]
        run_dir = Path(cfg.out_root) / cfg.name / (cfg.run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{digest}")
    if chosen and run_dir.exists():
        raise WorkbenchError(f"run directory {run_dir} already exists; choose another run_id (nothing was written)")
    base = run_dir
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        for n in range(2, 10_000):
            try:
                run_dir.mkdir()  # exclusive: of two identical runs started together, one gets `-2`
                break
            except FileExistsError:
                if chosen:
                    raise WorkbenchError(f"run directory {run_dir} already exists; choose another run_id") from None
                run_dir = base.with_name(f"{base.name}-{n}")
    except OSError as e:  # read-only, not a folder, no permission, disk full
        raise WorkbenchError(f"cannot create run directory {run_dir} ({e.strerror or e}); check out_root") from None
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
    return run_dir


def loaders(cfg: RunConfig, built: Built) -> tuple[DataLoader, DataLoader | None, StepBatchSampler]:
    """Training batches are a function of the step (resumable); held-out batches in file order."""
    d = cfg.data
    common = dict(collate_fn=built.collator, num_workers=d.num_workers, persistent_workers=d.num_workers > 0)
    sampler = StepBatchSampler(len(built.splits.train), d.batch_size, cfg.seed,
                               cfg.trainer.max_steps * cfg.trainer.accumulate_grad_batches, built.pool_fn)
    train = DataLoader(built.splits.train, batch_sampler=sampler, **common)
    val = None
    if built.splits.val is not None:
        val = DataLoader(built.splits.val, batch_size=d.eval_batch_size, shuffle=False,
                         **{**common, "collate_fn": built.eval_collator or built.collator})
    return train, val, sampler


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    """Answer accuracy (overall and per question type) of any VLM, or top-1 accuracy of an
    image classifier, on a held-out loader."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: dict[str, tuple[int, int]] = {}
    for batch in loader:
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
        merge_scores(scores, score_outputs(model(**inputs), batch))
    model.train(was_training)
    return accuracies(scores)


def count_params(model: torch.nn.Module | None, trainable: bool = False) -> int | None:
    if model is None:
        return None
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def make_trainer(cfg: RunConfig, run_dir: Path, callbacks: list[pl.Callback]) -> pl.Trainer:
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
        callbacks=[DivergenceGuard(t.on_nonfinite, t.max_skipped_steps), checkpoint, *callbacks],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # StepBatchSampler shards batches across ranks itself
        enable_progress_bar=t.progress_bar,
        default_root_dir=run_dir,
    )


def export_student(built: Built, out: Path) -> None:
    """A standalone folder `students.load` reads: save_pretrained of the student and the shared
    processor, or a timm classifier in timm's hub format with the class names."""
    if built.classification:
        import students

        students.export_timm(built.student, out, built.splits.classes, built.splits.preprocess)
        return
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


def _record(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write how a run ended; a disk that is full or read-only must not hide the reason."""
    try:
        _write_json(run_dir / "summary.json", summary)
    except OSError as e:
        print(f"[workbench] could not record status {summary['status']!r} in {run_dir}/summary.json ({e}); "
              f"reason: {summary.get('error')}", file=sys.stderr)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _merge_metrics(run_dir: Path, earlier: Path, resumed_step: int) -> None:
    """After a resume: the rows logged before the checkpoint, then the resumed run's rows."""
    import pandas as pd

    if not earlier.is_file():
        return
    old = pd.read_csv(earlier)
    old = old[old["step"] < resumed_step]
    new_path = run_dir / "metrics.csv"
    new = pd.read_csv(new_path) if new_path.is_file() else old.iloc[:0]
    merged = pd.concat([old, new], ignore_index=True)
    tmp = run_dir / "metrics.csv.tmp"
    merged.to_csv(tmp, index=False)
    os.replace(tmp, new_path)
    earlier.unlink()


def _checkpoint_step(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
    except Exception as e:  # noqa: BLE001 - truncated zip, unpickling refusal, missing key
        raise WorkbenchError(f"checkpoint {ckpt} is unreadable ({type(e).__name__}); was the run killed while "
                             "writing it? Remove it to restart this stage from scratch") from None


def train(cfg: RunConfig, built: Built, run_dir: Path, resume: bool = False,
          before_fit: Callable[[], None] | None = None) -> dict[str, Any]:
    """Fit `built` as `cfg` says inside `run_dir` (a run or a stage directory); returns its summary.

    With `resume`, continues from `run_dir/checkpoints/last.ckpt` when there is one (optimizer,
    schedule, step and data position included) and keeps the metrics logged before it.
    `before_fit` runs on rank 0 just before `Trainer.fit` (multi-stage DDP: release the workers).
    """
    start = time.time()
    train_loader, val_loader, sampler = loaders(cfg, built)
    is_main = not _is_worker_process()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ckpt = ckpt if resume and ckpt.is_file() else None
    resumed_step = _checkpoint_step(ckpt) if ckpt else 0
    summary: dict[str, Any] = {"name": cfg.name, "run_id": run_dir.name, "status": "running",
                               "params": {"student": count_params(built.student),
                                          "student_trainable": count_params(built.student, trainable=True),
                                          "teacher": count_params(built.teacher),
                                          "projectors": count_params(built.loss, trainable=True)},
                               **built.notes}
    earlier_metrics = run_dir / "metrics.before-resume.csv"
    if is_main:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        if (run_dir / "metrics.csv").is_file():  # Lightning's CSV logger would delete it
            os.replace(run_dir / "metrics.csv", earlier_metrics)
        if (built.teacher is not None and cfg.eval_teacher and val_loader is not None
                and not getattr(built.teacher, "feature_teacher", False)):  # a vision encoder answers nothing
            summary["teacher"] = evaluate(built.teacher, val_loader)
        _write_json(run_dir / "summary.json", summary)
    print(f"[workbench] {run_dir}: training {summary['params']['student_trainable']:,} of "
          f"{summary['params']['student']:,} student parameters"
          + (f" (+{summary['params']['projectors']:,} in projectors, not exported)" if summary['params']['projectors'] else "")
          + (f", resuming from step {resumed_step}" if ckpt else ""))

    try:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        tags = sorted({t for rec in getattr(built.splits.val, "records", []) for t in rec.get("qtypes", [])})
        module_cls = VisionDistillModule if built.classification else DistillModule
        module = module_cls(built.student, built.loss, cfg.optim, cfg.trainer.max_steps, built.teacher, tuple(tags),
                            fused_logits=cfg.trainer.fused_logits, matformer=cfg.matformer)
        trainer = make_trainer(cfg, run_dir, [SamplerState(sampler, cfg.trainer.accumulate_grad_batches),
                                              *built.callbacks])
        if is_main and before_fit is not None:
            before_fit()
        fit_start = time.time()
        try:
            with fitting():
                trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt)
        finally:
            if is_main:
                _merge_metrics(run_dir, earlier_metrics, resumed_step)
        if not trainer.is_global_zero:
            return summary
        _finish(cfg, built, run_dir, trainer, module, summary, time.time() - fit_start, val_loader)
        summary["wall_time_s"] = round(time.time() - start, 2)
        _write_json(run_dir / "summary.json", summary)
        return summary
    except BaseException as e:
        if is_main:
            status, reason = ending(e)
            summary.update(status=status, error=reason, wall_time_s=round(time.time() - start, 2))
            _record(run_dir, summary)
        whole_run = run_dir.parent.parent if run_dir.parent.name == "stages" else run_dir  # what --resume takes
        replacement = reraise(e, whole_run)
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            replacement = WorkbenchError(f"{e}; the last checkpoint is whole: free space (or make {run_dir} "
                                         f"writable) and resume with `workbench run --resume {whole_run}`")
        if replacement is e:
            raise
        raise replacement from None


def _finish(cfg: RunConfig, built: Built, run_dir: Path, trainer: pl.Trainer, module: DistillModule,
            summary: dict[str, Any], train_time: float, val_loader: DataLoader | None) -> None:
    """Rank 0 after a fit: refuse non-finite weights, export the student, fill the summary
    (steps, throughput, final losses, held-out scores, every MatFormer granularity)."""
    bad = first_nonfinite(built.student.state_dict().items())
    if bad is not None:  # e.g. the last step's update overflowed after its checkpoint was checked
        raise Diverged(f"training diverged: weight {bad} is not finite after step {trainer.global_step}; "
                       "nothing was exported")
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
    guard = next(cb for cb in trainer.callbacks if isinstance(cb, DivergenceGuard))
    if guard.skipped:
        summary["skipped_steps"] = guard.skipped
    if val_loader is not None:
        summary["student"] = evaluate(built.student, val_loader)
        if cfg.matformer is not None:  # every uniform granularity of the universal model
            from students.matformer import active_config, set_uniform, submodel_params

            summary["granularities"] = {}
            for g in sorted(cfg.matformer.granularities, reverse=True):
                set_uniform(built.student, g)
                params = submodel_params(built.student, active_config(built.student))
                summary["granularities"][f"{g:g}"] = {"params": params, **evaluate(built.student, val_loader)}
            set_uniform(built.student, 1.0)


def run(cfg: RunConfig, run_dir: Path | None = None) -> Path:
    """Train as `cfg` says in a new run directory (default `<out_root>/<name>/<run-id>`);
    returns it. Multi-stage configs run every stage."""
    if cfg.stages:
        return _run_stages(cfg, None, run_dir)
    start = time.time()
    built = build(cfg)  # every config/data/checkpoint error surfaces here, before any write
    run_dir = open_run_dir(cfg, run_dir)
    _write_json(run_dir / "env.json", environment())
    summary = train(cfg, built, run_dir)
    if summary["status"] == "completed":
        summary["wall_time_s"] = round(time.time() - start, 2)
        _write_json(run_dir / "summary.json", summary)
        mark_latest(run_dir)
    return run_dir


def resume(run_dir: str | Path) -> Path:
    """Continue an interrupted run (any stage) from its last checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise WorkbenchError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    done = read_summary(run_dir)
    if done and done.get("status") == "completed":
        raise WorkbenchError(f"run {run_dir} already completed; nothing to resume")
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
    if cfg.stages:
        return _run_stages(cfg, run_dir)
    summary = train(cfg, build(cfg), run_dir, resume=True)
    if summary["status"] == "completed":
        mark_latest(run_dir)
    return run_dir


def _stage_refs(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """`stage:<name>` in teacher.path / student.path / init_from / a student.kwargs path (e.g. an
    encoder-free student's `language_model`) -> that stage's exported student."""
    def resolve(value):
        if isinstance(value, str) and value.startswith(STAGE_REF):
            return str(run_dir / "stages" / value[len(STAGE_REF):] / "student")
        return value

    teacher = replace(cfg.teacher, path=resolve(cfg.teacher.path)) if cfg.teacher else None
    kwargs = {k: resolve(v) for k, v in cfg.student.kwargs.items()}
    return replace(cfg, teacher=teacher, init_from=resolve(cfg.init_from),
                   student=replace(cfg.student, path=resolve(cfg.student.path), kwargs=kwargs))


def _run_stages(cfg: RunConfig, resume_dir: Path | None, new_dir: Path | None = None) -> Path:
    """Run the stages in order inside one run directory (`stages/<name>/`).

    Under DDP only rank 0 exports, summarises and builds teacher caches. The workers (started
    by rank 0's first `Trainer.fit`, they re-run this function) fit each stage with it and
    wait between stages until rank 0 has exported the previous one and built the next.
    """
    start = time.time()
    stages = stage_configs(cfg)
    is_main = not _is_worker_process()
    if is_main:
        os.environ[LAUNCH_ENV] = f"{os.getpid()}-{time.time_ns()}"
    if resume_dir is None:
        first = build(_stage_refs(stages[0][1], Path("/nonexistent")))  # fail on bad input before writing
        run_dir = open_run_dir(cfg, new_dir)
        if is_main:
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
            _write_json(run_dir / "env.json", environment())
    else:
        first, run_dir = None, resume_dir
    summary = {"name": cfg.name, "run_id": run_dir.name, "status": "running", "stages": {}}
    if is_main:
        _write_json(run_dir / "summary.json", summary)
    fitted = 0  # stages this process has trained
    try:
        for i, (name, stage_cfg) in enumerate(stages):
            stage_dir = run_dir / "stages" / name
            done = read_summary(stage_dir)
            if done and done.get("status") == "completed":
                summary["stages"][name] = done
                continue
            if not is_main and fitted:
                _wait_for_stage(run_dir, name)
            stage_dir.mkdir(parents=True, exist_ok=True)
            stage_cfg = _stage_refs(stage_cfg, run_dir)
            built = first if (i == 0 and first is not None) else build(stage_cfg)
            if i > 0:
                _carry_loss_state(built, stages[i - 1][0], run_dir / "stages" / stages[i - 1][0])
            summary["stages"][name] = train(stage_cfg, built, stage_dir, resume=resume_dir is not None,
                                            before_fit=lambda: _stage_ready(run_dir, name))
            fitted += 1
            if is_main:
                _write_json(run_dir / "summary.json", summary)
    except BaseException as e:
        if is_main:
            status, reason = ending(e)
            summary.update(status=status, error=reason)
            _record(run_dir, summary)
        raise
    if not is_main:
        return run_dir
    summary["results"] = stage_results(summary["stages"])
    summary.update(status="completed", wall_time_s=round(time.time() - start, 2))
    _write_json(run_dir / "summary.json", summary)
    (run_dir / "results.md").write_text(results_markdown(cfg.name, summary["results"]))
    mark_latest(run_dir)
    return run_dir


def _stage_ready(run_dir: Path, name: str) -> None:
    """Rank 0: stage `name` is built (the previous one exported, its teacher cache made)."""
    _write_json(run_dir / STAGE_READY, {"stage": name, "launch": os.environ.get(LAUNCH_ENV)})


def _wait_for_stage(run_dir: Path, name: str, poll_s: float = 0.2) -> None:
    """DDP worker: block until rank 0 signals that stage `name` is built; stop if rank 0 failed
    or is gone (its workers are its child processes)."""
    parent, launch = os.getppid(), os.environ.get(LAUNCH_ENV)
    ready = run_dir / STAGE_READY
    while True:
        try:
            signal = json.loads(ready.read_text())
        except (OSError, ValueError):
            signal = None
        if signal == {"stage": name, "launch": launch}:
            return
        status = (read_summary(run_dir) or {}).get("status")
        if status in ("failed", "interrupted") or os.getppid() != parent:
            raise WorkbenchError(f"rank 0 stopped before stage {name!r} (run status: {status}); see {run_dir}")
        time.sleep(poll_s)


def _carry_loss_state(built: Built, previous: str, previous_dir: Path) -> None:
    """Loss terms with trained parts of their own that a method keeps across stages (EVE's
    patch-aligning layer lives in its model through all three) continue from the previous
    stage's last checkpoint when it had a term of the same name and shapes."""
    ckpt = previous_dir / "checkpoints" / "last.ckpt"
    terms = {n: t for n, t in built.loss.terms.items() if getattr(t, "carries_over", False)}
    if not terms or not ckpt.is_file():
        return
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    carried = []
    for name, term in terms.items():
        prefix = f"loss.terms.{name}."
        theirs = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        own = term.state_dict()
        if theirs.keys() == own.keys() and all(theirs[k].shape == own[k].shape for k in own):
            term.load_state_dict(theirs)
            carried.append(name)
    if carried:
        built.notes["loss_carried"] = {"from": previous, "terms": carried}


def stage_results(stages: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per stage: the stage's model, its parameters and its held-out answer accuracy."""
    rows = []
    for name, s in stages.items():
        acc = s.get("student", {})
        rows.append({"model": name, "params": s["params"]["student"], "acc": acc.get("acc"),
                     **{k: v for k, v in acc.items() if k != "acc"}})
    return rows


def results_markdown(title: str, rows: list[dict[str, Any]]) -> str:
    types = sorted({k for r in rows for k in r if k.startswith("acc/")})
    head = ["model", "params", "answer acc" if types else "accuracy", *[t.removeprefix("acc/") for t in types]]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['params']:,}", _fmt(r["acc"]), *[_fmt(r.get(t)) for t in types]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
