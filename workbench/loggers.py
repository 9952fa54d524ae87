"""Where a run's curves go: Lightning's loggers by name (`trainer.loggers`), and the per-step
throughput and teacher-agreement diagnostics that every run logs.

`csv` is always on (the run directory's `metrics.csv`, which `workbench compare` and
`results.metrics` read); `tensorboard` writes event files to `<run>/tensorboard/`, `wandb` a
run under `<run>/wandb/` (offline unless `WANDB_API_KEY` is set; `wandb sync` uploads it
later), `mlflow` a file store under `<run>/mlruns/` (or `MLFLOW_TRACKING_URI`). The last three need the `loggers` extra.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, Logger, MLFlowLogger, WandbLogger

from workbench.errors import WorkbenchError
from workbench.rundir import RunDir

LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")


def _tensorboard(cfg, run_dir: RunDir) -> Logger:
    from pytorch_lightning.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=run_dir.path, name="tensorboard", version="", default_hp_metric=False)


def _wandb(cfg, run_dir: RunDir) -> Logger:
    from pytorch_lightning.loggers import WandbLogger

    offline = not os.environ.get("WANDB_API_KEY")
    return WandbLogger(save_dir=str(run_dir.path), project=cfg.name, name=run_dir.path.name, offline=offline,
                       log_model=False)


class DottedMLFlowLogger(MLFlowLogger):
    """MLflow metric keys with '.' for '/' (`val.acc.cell`): MLflow's file store keeps one file
    per key, so `val/acc` and `val/acc/cell` would collide."""

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics({k.replace("/", "."): v for k, v in metrics.items()}, step)


def _mlflow(cfg, run_dir: RunDir) -> Logger:
    """`MLFLOW_TRACKING_URI` (a server or database) when set; else a file store in the run
    directory (MLflow keeps that backend in maintenance mode and asks for an explicit opt-in)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (run_dir.path / "mlruns").resolve().as_uri()
    return DottedMLFlowLogger(experiment_name=cfg.name, run_name=run_dir.path.name, tracking_uri=uri)


_MAKERS = {"tensorboard": (_tensorboard, "tensorboard"), "wandb": (_wandb, "wandb"), "mlflow": (_mlflow, "mlflow")}


def make_loggers(cfg, run_dir: RunDir) -> list[Logger]:
    """The CSV logger (always, first: `trainer.log_dir` is the run directory) and the others
    `trainer.loggers` names; a missing package is a short error naming the extra."""
    import importlib.util

    out: list[Logger] = [CSVLogger(run_dir.path, name="", version="")]
    for name in dict.fromkeys(cfg.trainer.loggers):
        if name == "csv":
            continue
        make, package = _MAKERS[name]
        if importlib.util.find_spec(package) is None:
            raise WorkbenchError(f"config key 'trainer.loggers': {name!r} needs the {package} package; "
                                 "pip install -e \".[loggers]\"")
        out.append(make(cfg, run_dir))
    return out


def finish_loggers(loggers: list[Logger]) -> None:
    """End what Lightning leaves open: a W&B run is finished (its summary written, offline
    runs ready for `wandb sync`) whether the fit completed or not."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def logs_this_step(trainer: pl.Trainer, step: int) -> bool:
    """Whether training values of optimizer step `step` (1-based) reach the loggers: every
    `log_every_n_steps` steps, and the last step (its values end up in the summary)."""
    return step % max(trainer.log_every_n_steps, 1) == 0 or (trainer.max_steps > 0 and step >= trainer.max_steps)


class Throughput(pl.Callback):
    """Logs `perf/step_time_s`, `perf/samples_per_s` and `perf/tokens_per_s` (non-padding
    tokens, all ranks) for every training batch; `summary()` gives the medians and the time
    from the process's start (`workbench run`) to the first training step."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, float]] = []
        self._start = 0.0
        self.first_step_s: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_step_s is None:
            import psutil

            self.first_step_s = time.time() - psutil.Process().create_time()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = max(time.perf_counter() - self._start, 1e-9)
        samples = batch["labels"].shape[0] * trainer.world_size
        mask = batch.get("attention_mask")
        tokens = (int(mask.sum()) if mask is not None else 0) * trainer.world_size
        self.rows.append((seconds, samples / seconds, tokens / seconds))
        if not logs_this_step(trainer, trainer.global_step):
            return
        values = {"perf/step_time_s": seconds, "perf/samples_per_s": samples / seconds}
        if mask is not None:
            values["perf/tokens_per_s"] = tokens / seconds
        pl_module.log_dict(values, batch_size=batch["labels"].shape[0])

    def summary(self) -> dict[str, float]:
        if not self.rows:
            return {}
        step, samples, tokens = (statistics.median(r[i] for r in self.rows) for i in range(3))
        out = {"step_time_s": round(step, 4), "samples_per_s": round(samples, 2),
               "time_to_first_step_s": round(self.first_step_s, 2)}
        return {**out, "tokens_per_s": round(tokens, 1)} if tokens else out


@torch.no_grad()
def diagnostics(inputs) -> dict[str, torch.Tensor]:
    """Cheap distribution diagnostics at the answer positions of a VLM batch with a teacher
    signal: the student's mean entropy (nats), how often its argmax is the teacher's, and
    the teacher mass outside a cached top-k (when the cache stores it)."""
    if inputs.classification or inputs.student_logits is None:
        return {}
    mask = inputs.token_mask("answer")
    if not mask.any():
        return {}
    student = inputs.shifted_student_logits[mask].float()  # (N, V)
    logp = torch.log_softmax(student, dim=-1)
    out = {"diag/student_entropy": -(logp.exp() * logp).sum(-1).mean()}
    if inputs.teacher_logits is not None and inputs.teacher_keep is None:
        teacher_top = inputs.shifted_teacher_logits[mask].argmax(-1)
        out["diag/top1_agreement"] = (student.argmax(-1) == teacher_top).float().mean()
    elif inputs.teacher_topk is not None:
        ids, _, rest = inputs.sparse_teacher_rows()
        out["diag/top1_agreement"] = (student.argmax(-1) == ids[:, 0]).float().mean()
        if rest is not None:
            out["diag/teacher_rest_mass"] = rest.float().exp().mean()
    return out
