"""Fit one built run (or one stage) inside its run directory: loaders, trainer, export, summary.

`train` writes config.yaml and a `running` summary.json, fits with Lightning (checkpoints
atomically, divergence guard, graceful signals), then on rank 0 refuses non-finite weights,
exports the student and completes the summary. A failure or interrupt is recorded as such
and never marks the run `completed`.
"""

from __future__ import annotations

import errno
import os
import time
import warnings
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from workbench import console
from workbench.build import Built
from workbench.checkpoint import AtomicCheckpointIO
from workbench.config import RunConfig, to_yaml
from workbench.data.sampler import SamplerState, StepBatchSampler
from workbench.errors import WorkbenchError
from workbench.guard import Diverged, DivergenceGuard, first_nonfinite
from workbench.interrupt import ending, fitting, reraise
from workbench.loggers import Throughput, finish_loggers, make_loggers
from workbench.evaluation import data_fingerprint, evaluate, scored_on, teacher_fingerprint
from workbench.module import DistillModule, VisionDistillModule
from workbench.rundir import RunDir, handed_to_workers, is_worker_process

# Our run directory is always new; CSVLogger's warning about a non-empty folder is noise.
warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)  # the disk, not the run: a message, not a traceback


class Prepared:
    """A built run with its target prepared: the training set and collators it trains with."""

    def __init__(self, built: Built):
        self.built = built
        self.notes = built.target.prepare()  # may run the teacher over the data (a cache)
        self.train_set = built.target.train_set(built.splits.train, built.split)
        self.train_collator = built.target.train_collator(built.collator)
        self.eval_collator = built.target.eval_collator(built.collator)
        self.pool_fn = built.target.pool_fn(built.student, self.train_set, built.collator)


def loaders(cfg: RunConfig, prepared: Prepared) -> tuple[DataLoader, DataLoader | None, StepBatchSampler]:
    """Training batches are a function of the step (resumable); held-out batches in file order."""
    d = cfg.data
    common = dict(num_workers=d.num_workers, persistent_workers=d.num_workers > 0)
    sampler = StepBatchSampler(len(prepared.train_set), d.batch_size, cfg.seed,
                               cfg.trainer.max_steps * cfg.trainer.accumulate_grad_batches, prepared.pool_fn)
    train = DataLoader(prepared.train_set, batch_sampler=sampler, collate_fn=prepared.train_collator, **common)
    val = None
    if prepared.built.splits.val is not None:
        val = DataLoader(prepared.built.splits.val, batch_size=d.eval_batch_size, shuffle=False,
                         collate_fn=prepared.eval_collator, **common)
    return train, val, sampler


def count_params(model: torch.nn.Module | None, trainable: bool = False) -> int | None:
    if model is None:
        return None
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def make_trainer(cfg: RunConfig, run_dir: RunDir, callbacks: list[pl.Callback]) -> pl.Trainer:
    t = cfg.trainer
    checkpoint = ModelCheckpoint(dirpath=run_dir.checkpoints, filename="step{step}", auto_insert_metric_name=False,
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
        num_nodes=t.num_nodes,
        strategy=_strategy(t),
        precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip or None,
        num_sanity_val_steps=0,
        logger=make_loggers(cfg, run_dir),
        callbacks=[DivergenceGuard(t.on_nonfinite, t.max_skipped_steps), checkpoint, *callbacks,
                   *([console.StepProgress()] if t.progress_bar else [])],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # StepBatchSampler shards batches across ranks itself
        enable_progress_bar=False,  # our StepProgress: steps, loss, held-out accuracy (plain lines off a terminal)
        enable_model_summary=console.verbose(),
        default_root_dir=run_dir.path,
    )


def _strategy(t):
    """`fsdp` is FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning's
    ModelParallelStrategy, which also runs on CPU processes; checkpoints are whole files
    (gathered on rank 0), so they load anywhere. Other names go to Lightning as they are."""
    if t.strategy != "fsdp":
        return t.strategy
    from pytorch_lightning.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=t.devices * t.num_nodes, tensor_parallel_size=1,
                                 save_distributed_checkpoint=False)


def full_state_dict(cfg: RunConfig, student: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Under FSDP, the student's whole state gathered to CPU on rank 0 (every rank must call
    this: it is a collective); None otherwise."""
    if cfg.trainer.strategy != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_student(built: Built, out, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """A standalone folder `students.load` reads: save_pretrained of the student and the shared
    processor (plus the remote code of custom structures, so stock transformers loads it too),
    or a timm classifier in timm's hub format with the class names."""
    import students

    if built.classification:
        students.export_timm(built.student, out, built.splits.classes, built.splits.preprocess)
        return
    built.student.save_pretrained(out, state_dict=state_dict)
    built.processor.save_pretrained(out)
    students.write_remote_code(built.student, out)  # loads without this project (trust_remote_code)


def _merge_metrics(run_dir: RunDir, earlier, resumed_step: int, row: dict[str, Any] | None = None) -> None:
    """After a resume: the rows logged before the checkpoint, then the resumed run's rows. `row`
    is the checkpoint's own step's row (DistillModule.on_save_checkpoint): it goes back in when
    the run was killed before writing it."""
    import pandas as pd

    if not earlier.is_file():
        return
    old = pd.read_csv(earlier)
    old = old[old["step"] < resumed_step]
    if row is not None and row["step"] == resumed_step - 1 and not (old["step"] == row["step"]).any():
        old = pd.concat([old, pd.DataFrame([row])], ignore_index=True)
    new = pd.read_csv(run_dir.metrics) if run_dir.metrics.is_file() else old.iloc[:0]
    merged = pd.concat([old, new], ignore_index=True)
    tmp = run_dir.path / "metrics.csv.tmp"
    merged.to_csv(tmp, index=False)
    os.replace(tmp, run_dir.metrics)
    earlier.unlink()


def _checkpoint_step(ckpt) -> tuple[int, dict[str, Any] | None]:
    """The checkpoint's step and its metrics row (if it carries one)."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        return int(state["global_step"]), state.get("workbench_metrics_row")
    except Exception as e:  # noqa: BLE001 - truncated zip, unpickling refusal, missing key
        raise WorkbenchError(f"checkpoint {ckpt} is unreadable ({type(e).__name__}); was the run killed while "
                             "writing it? Remove it to restart this stage from scratch") from None


def _params(built: Built) -> dict[str, int | None]:
    return {"student": count_params(built.student), "student_trainable": count_params(built.student, trainable=True),
            "teacher": count_params(built.teacher), "projectors": count_params(built.loss, trainable=True)}


def make_module(cfg: RunConfig, built: Built) -> DistillModule:
    tags = sorted({t for rec in getattr(built.splits.val, "records", []) for t in rec.get("qtypes", [])})
    module_cls = VisionDistillModule if built.classification else DistillModule
    return module_cls(built.student, built.loss, built.target, cfg.optim, cfg.trainer.max_steps, tuple(tags),
                      fused_logits=cfg.trainer.fused_logits, matformer=cfg.matformer,
                      fsdp=cfg.trainer.strategy == "fsdp")


def train(cfg: RunConfig, built: Built, run_dir: RunDir, resume: bool = False,
          before_fit: Callable[[], None] | None = None) -> dict[str, Any]:
    """Fit `built` as `cfg` says inside `run_dir` (a run or a stage directory); returns its summary.

    With `resume`, continues from `run_dir/checkpoints/last.ckpt` when there is one (optimizer,
    schedule, step and data position included) and keeps the metrics logged before it.
    `before_fit` runs on rank 0 just before `Trainer.fit` (multi-stage DDP: release the workers).
    """
    start, is_main = time.time(), not is_worker_process()
    ckpt = run_dir.last_checkpoint if resume and run_dir.last_checkpoint.is_file() else None
    resumed_step, resumed_row = _checkpoint_step(ckpt) if ckpt else (0, None)
    summary: dict[str, Any] = {"name": cfg.name, "run_id": run_dir.path.name, "status": "running",
                               "target": built.target.name, **built.notes}
    earlier_metrics = run_dir.path / "metrics.before-resume.csv"
    try:
        if is_main:
            run_dir.config.write_text(to_yaml(cfg))  # first: a run that fails from here on can be resumed
        prepared = Prepared(built)  # may run the teacher over the data set (a cache)
        train_loader, val_loader, sampler = loaders(cfg, prepared)
        summary.update(params=_params(built), **prepared.notes)
        if is_main:
            _begin(cfg, built, run_dir, summary, val_loader, earlier_metrics)
        if is_main:
            _announce(cfg, run_dir, summary, resumed_step if ckpt else None)
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        module = make_module(cfg, built)
        callbacks = [SamplerState(sampler, cfg.trainer.accumulate_grad_batches), Throughput(),
                     *built.target.callbacks()]
        with console.run_log(run_dir.path):  # the libraries' messages: into run.log, not onto the console
            trainer = make_trainer(cfg, run_dir, callbacks)
        if is_main and before_fit is not None:
            before_fit()
        fit_start = time.time()
        try:
            with fitting(), handed_to_workers(run_dir), console.run_log(run_dir.path):
                trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt)
        finally:
            finish_loggers(trainer.loggers)
            if is_main:
                _merge_metrics(run_dir, earlier_metrics, resumed_step, resumed_row)
        full_state = full_state_dict(cfg, built.student)  # FSDP: gathered from every rank
        if trainer.is_global_zero:
            _finish(cfg, built, run_dir, trainer, module, summary, time.time() - fit_start, val_loader, full_state)
            summary["wall_time_s"] = round(time.time() - start, 2)
            run_dir.write_summary(summary)
        return summary
    except BaseException as e:
        raise _ended(e, run_dir, summary, start, is_main) from None


def _begin(cfg: RunConfig, built: Built, run_dir: RunDir, summary: dict[str, Any], val_loader, earlier) -> None:
    """Rank 0 before fitting: the metrics so far (kept aside), the teacher's score."""
    if run_dir.metrics.is_file():  # Lightning's CSV logger would delete it
        os.replace(run_dir.metrics, earlier)
    teacher = built.target.answering_teacher
    if val_loader is not None:
        summary["scored_on"] = scored_on(data_fingerprint(built.splits.val, built.processor),
                                         teacher_fingerprint(cfg), built.classification)
    if teacher is not None and cfg.eval_teacher and val_loader is not None:
        summary["teacher"] = evaluate(teacher, val_loader)
    run_dir.write_summary(summary)


def _announce(cfg: RunConfig, run_dir: RunDir, summary: dict[str, Any], resumed_step: int | None) -> None:
    """The run's one-line header: where, what the student learns from, what trains, how long."""
    params = summary["params"]
    loss = " + ".join(f"{term.get('weight', 1.0):g} {name}" for name, term in cfg.loss.items())
    console.header(f"{run_dir.path}: {cfg.trainer.max_steps:,} steps of {loss} (target {summary['target']}), "
                   f"training {params['student_trainable']:,} of {params['student']:,} student parameters"
                   + (f" (+{params['projectors']:,} in projectors, not exported)" if params["projectors"] else "")
                   + (f", resuming from step {resumed_step}" if resumed_step is not None else ""))


def _ended(e: BaseException, run_dir: RunDir, summary: dict[str, Any], start: float, is_main: bool) -> BaseException:
    """Record how the run ended (rank 0) and what to raise: signals become `Interrupted`, a
    full or read-only disk a message naming the run to resume."""
    if is_main:
        status, reason = ending(e)
        summary.update(status=status, error=reason, wall_time_s=round(time.time() - start, 2))
        run_dir.record(summary)
    whole_run = run_dir.whole_run.path  # what --resume takes
    replacement = reraise(e, whole_run)
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        replacement = WorkbenchError(f"{e}; the last checkpoint is whole: free space (or make {run_dir.path} "
                                     f"writable) and resume with `workbench run --resume {whole_run}`")
    return replacement


def _finish(cfg: RunConfig, built: Built, run_dir: RunDir, trainer: pl.Trainer, module: DistillModule,
            summary: dict[str, Any], train_time: float, val_loader: DataLoader | None,
            full_state: dict[str, torch.Tensor] | None = None) -> None:
    """Rank 0 after a fit: refuse non-finite weights, export the student, fill the summary
    (steps, throughput, final losses, held-out scores, every MatFormer granularity). Under
    FSDP (`full_state`: the gathered weights) the export is what gets scored."""
    bad = first_nonfinite((full_state if full_state is not None else built.student.state_dict()).items())
    if bad is not None:  # e.g. the last step's update overflowed after its checkpoint was checked
        raise Diverged(f"training diverged: weight {bad} is not finite after step {trainer.global_step}; "
                       "nothing was exported")
    if full_state is None:
        built.student.cpu()
    export_student(built, run_dir.student, full_state)
    scored = built.student
    if full_state is not None:
        import students

        scored = students.load(run_dir.student)
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
    throughput = next(cb for cb in trainer.callbacks if isinstance(cb, Throughput)).summary()
    if throughput:
        summary["throughput"] = throughput  # medians over training steps
    guard = next(cb for cb in trainer.callbacks if isinstance(cb, DivergenceGuard))
    if guard.skipped:
        summary["skipped_steps"] = guard.skipped
    if val_loader is not None:
        summary["student"] = evaluate(scored, val_loader)
        if cfg.matformer is not None:
            summary["granularities"] = _granularities(cfg, scored, val_loader)


def _granularities(cfg: RunConfig, student: torch.nn.Module, val_loader: DataLoader) -> dict[str, Any]:
    """Every uniform granularity of the universal model: its parameters and held-out scores."""
    from students.matformer import active_config, set_uniform, submodel_params

    out = {}
    for g in sorted(cfg.matformer.granularities, reverse=True):
        set_uniform(student, g)
        out[f"{g:g}"] = {"params": submodel_params(student, active_config(student)), **evaluate(student, val_loader)}
    set_uniform(student, 1.0)
    return out
