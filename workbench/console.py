"""What a run prints: one header per stage, one progress line or bar, the final table.

Library chatter - Lightning's banners, tips and model summary, transformers' loading bars,
deprecation warnings - is kept off the console by default and written to the run
directory's `run.log` instead; `workbench --verbose` shows it as the libraries print it.
On a terminal the progress is a live bar (step, loss, last held-out accuracy); elsewhere (CI
logs, `nohup`, SLURM output files) it is one plain line every twentieth of the run.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl

LIBRARIES = ("pytorch_lightning", "lightning", "lightning_fabric", "lightning.pytorch", "transformers", "py.warnings")
RUN_LOG = "run.log"
_verbose = False


def configure(verbose: bool) -> None:
    """Called once by the CLI: quiet libraries (default) or everything as they print it."""
    global _verbose
    _verbose = verbose
    import transformers

    if verbose:
        transformers.utils.logging.enable_progress_bar()
    else:
        transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    logging.captureWarnings(not verbose)  # quiet: warnings become log records, for run.log
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler:
                handler.setLevel(logging.NOTSET if verbose else logging.ERROR)
        quiet = [h for h in logger.handlers if isinstance(h, _Quiet)]
        if not verbose and not logger.handlers:
            logger.addHandler(_Quiet())  # no "last resort" printing of warnings
            logger.propagate = False
        elif verbose and quiet:
            logger.removeHandler(quiet[0])
            logger.propagate = True


class _Quiet(logging.NullHandler):
    """Marks a logger this module silenced (so `--verbose` can undo it)."""


def verbose() -> bool:
    return _verbose


@contextlib.contextmanager
def run_log(folder: Path) -> Iterator[None]:
    """While a run fits: the libraries' messages (info and up) and warnings go to `run.log`."""
    handler = logging.FileHandler(Path(folder) / RUN_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in LIBRARIES]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each distinct warning once, into the log
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
        handler.close()


def header(text: str) -> None:
    print(f"[workbench] {text}", flush=True)


class StepProgress(pl.Callback):
    """Training progress by optimizer step: a tqdm bar on a terminal, else a line every
    twentieth of the run, with the last logged loss and held-out accuracy."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.bar = None
        self._every = 1
        self._start = 0.0

    def _metrics(self, trainer: pl.Trainer) -> dict[str, str]:
        values = trainer.callback_metrics
        out = {}
        if "train/loss" in values:
            out["loss"] = f"{float(values['train/loss']):.4f}"
        if "val/acc" in values:
            out["val acc"] = f"{float(values['val/acc']):.3f}"
        return out

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        total = trainer.max_steps
        self._start = time.time()
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=trainer.global_step, unit="step", file=self.stream,
                            dynamic_ncols=True, leave=True)
        else:
            self._every = max(1, total // 20)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(self._metrics(trainer), refresh=False)
            self.bar.refresh()
        elif step % self._every == 0 or step == trainer.max_steps:
            shown = "  ".join(f"{k} {v}" for k, v in self._metrics(trainer).items())
            print(f"  step {step}/{trainer.max_steps}  {shown}  ({time.time() - self._start:.0f} s)",
                  file=self.stream, flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.bar is not None and trainer.is_global_zero:
            self.bar.set_postfix(self._metrics(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
