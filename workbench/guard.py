"""The divergence guard: a non-finite loss, loss term, gradient or weight stops the run before
anything non-finite reaches an optimizer step, a checkpoint or an export.

`trainer.on_nonfinite: stop` (default) raises `Diverged` naming the step and the term (or the
parameter whose gradient or weight is not finite); the run ends `failed` and its last finite
checkpoint stays as it was. `skip` drops that optimizer step instead (every gradient cleared,
so AdamW moves nothing) up to `trainer.max_skipped_steps` times, then stops. Under DDP the
gradients are already all-reduced when the guard looks, so every rank takes the same decision.
With fp16 mixed precision, gradient overflows are the GradScaler's to skip; loss terms and
weights are still checked.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytorch_lightning as pl
import torch

from workbench.errors import WorkbenchError


class Diverged(WorkbenchError):
    """Training produced a non-finite loss, gradient or weight."""

    exit_code = 3


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor | None]]) -> str | None:
    """The name of the first tensor with a nan or inf, or None."""
    for name, value in named:
        if value is not None and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element is finite, with one synchronisation: the largest magnitude (an
    inf-norm, which a nan or inf propagates into and large finite values cannot overflow)."""
    if not tensors:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=float("inf"))))


class DivergenceGuard(pl.Callback):
    """Checks what `DistillModule` logged this step (`step_values`), the gradients before each
    optimizer step and the weights before each checkpoint."""

    def __init__(self, mode: str = "stop", max_skips: int = 10):
        self.mode, self.max_skips, self.skipped = mode, max_skips, 0
        self._params: list[torch.nn.Parameter] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._params = [p for p in pl_module.parameters() if p.requires_grad]  # walking the modules every step costs

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        values, pl_module.step_values = pl_module.step_values, []
        bad = None
        if not _all_finite([v for _, v in values]):
            bad = first_nonfinite(values)
            what = f"loss term {bad!r}"
        elif getattr(trainer.precision_plugin, "scaler", None) is None and not _all_finite(
                [p.grad for p in self._params or pl_module.parameters() if p.grad is not None]):
            bad = first_nonfinite((n, p.grad) for n, p in pl_module.named_parameters())
            what = f"the gradient of {bad}"
        # else: fp16 mixed precision - an inf gradient is the loss scale overflowing, and the
        # GradScaler skips that step and lowers the scale itself; the weights are still checked
        if bad is None:
            return
        step = trainer.global_step
        if self.mode == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            print(f"[workbench] step {step}: {what} is not finite; step skipped "
                  f"({self.skipped} of at most {self.max_skips}, trainer.max_skipped_steps)")
            return
        more = f" after {self.skipped} skipped steps" if self.skipped else ""
        raise Diverged(f"training diverged at step {step}{more}: {what} is not finite (nan or inf); the last "
                       "finite checkpoint is kept. Lower optim.lr, check loss weights and temperatures, or set "
                       "trainer.on_nonfinite=skip")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        bad = first_nonfinite(checkpoint["state_dict"].items())
        if bad is not None:
            raise Diverged(f"training diverged at step {trainer.global_step}: weight {bad} is not finite; the "
                           "checkpoint was not written and the last finite one is kept")
