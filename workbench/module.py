"""`DistillModule`: the LightningModule that trains a student, optionally from a frozen teacher.

The teacher is deliberately *not* a registered submodule: it stays out of `state_dict` (and
so out of checkpoints), out of the optimizer and out of DDP/FSDP wrapping and gradient sync.
It is moved to the student's device when fitting starts and always runs under no_grad.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from losses.combine import LossInputs, WeightedLoss
from workbench.config import MatFormerConfig, OptimConfig
from workbench.metrics import accuracies, merge_scores, score_outputs
from workbench.optim import make_optimizer
from workbench.taps import FeatureTaps, TapPoint

NON_MODEL_KEYS = ("labels", "image_mask", "ids", "qtypes", "teacher_topk", "teacher_pixel_values")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a collated batch that the model's forward takes (timm classifiers take
    the images as `x`)."""
    if "input_ids" not in batch and "pixel_values" in batch:
        return {"x": batch["pixel_values"]}
    return {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}


class DistillModule(pl.LightningModule):
    """Student + weighted loss terms (+ frozen teacher); validation scores answer accuracy.

    Args:
        student: the model being trained (a Hugging Face VLM).
        loss: the weighted objective; terms that need a teacher get its logits.
        optim: optimizer and schedule settings.
        total_steps: length of the LR schedule.
        teacher: frozen model with the student's vocabulary, or None for supervised training.
        val_tags: every answer tag (question type) in the held-out split, so that all ranks
            reduce the same list of counts.
    """

    def __init__(self, student: nn.Module, loss: WeightedLoss, optim: OptimConfig, total_steps: int,
                 teacher: nn.Module | None = None, val_tags: tuple[str, ...] = (), fused_logits: bool = False,
                 matformer: MatFormerConfig | None = None):
        super().__init__()
        self.matformer = matformer
        self.student = student
        self.loss = loss  # a submodule: projectors of feature terms train with the student
        self.optim = optim
        self.total_steps = total_steps
        object.__setattr__(self, "teacher", teacher)  # not a submodule, see module docstring
        self.val_keys = ["all", *sorted(set(val_tags))]
        self.step_values: list[tuple[str, torch.Tensor]] = []  # this step's logged values, for the DivergenceGuard
        self._val_scores: dict[str, tuple[int, int]] = {}
        self.fused_logits = fused_logits
        student_points, teacher_points = loss.tap_points()
        self._decoder_tap = None
        if fused_logits:
            names = {id(m): n for n, m in student.named_modules()}
            self._decoder_tap = TapPoint(names[id(student.get_decoder())])  # its output: the LM head's input
            student_points = [*student_points, str(self._decoder_tap)]
        self._student_taps = FeatureTaps(student, [TapPoint.parse(p) for p in student_points], "student")
        self._teacher_taps = None
        if teacher is not None and teacher_points:
            self._teacher_taps = FeatureTaps(getattr(teacher, "model", teacher),
                                             [TapPoint.parse(p) for p in teacher_points], "teacher")

    def on_fit_start(self) -> None:
        # from_pretrained returns models in eval mode, and Lightning keeps each module's mode:
        # without this a student loaded from a folder would train with dropout off
        self.student.train()
        if self.teacher is not None:
            self.teacher.to(self.device)

    def _loss_inputs(self, batch: dict[str, Any], fused: bool = False) -> LossInputs:
        """Run student (and teacher) on a batch with the feature taps the loss reads.

        With `fused`, the student computes no logits (`logits_to_keep` keeps none), the logit
        terms work from its final hidden states through `kernels.fused_linear_kd`, and the
        teacher returns logits only at the positions those terms read.
        """
        inputs = model_inputs(batch)
        loss_inputs = self._student_pass(batch, inputs, fused)
        if self.teacher is not None and self.loss.needs_teacher and getattr(self.teacher, "feature_teacher", False):
            # a vision encoder teaching an encoder-free student: its patch features on the images
            loss_inputs.vision_features = self.teacher(batch["teacher_pixel_values"])
            loss_inputs.vision_grid = self.teacher.grid
        elif self.teacher is not None and self.loss.needs_teacher:
            # fused: the teacher too computes logits only where a term reads them
            keep = self.loss.teacher_logit_positions(loss_inputs) if fused else None
            with torch.no_grad(), contextlib.ExitStack() as stack:
                found_t = stack.enter_context(self._teacher_taps.capture()) if self._teacher_taps else {}
                teacher_logits = self.teacher(**inputs, **({} if keep is None else {"logits_to_keep": keep})).logits
            if keep is not None and teacher_logits.shape[0] != int(keep.sum()):
                raise RuntimeError(f"the teacher returned logits of shape {tuple(teacher_logits.shape)} for "
                                   f"{int(keep.sum())} kept positions: its forward ignores `logits_to_keep`; "
                                   "set trainer.fused_logits=false")
            loss_inputs.teacher_logits, loss_inputs.teacher_keep = teacher_logits, keep
            loss_inputs.teacher_features = {str(p): v for p, v in found_t.items()}
        return loss_inputs

    def _student_pass(self, batch: dict[str, Any], inputs: dict[str, Any], fused: bool) -> LossInputs:
        """The student's forward with its taps, as `LossInputs` (no teacher yet)."""
        extra = {"logits_to_keep": torch.zeros_like(batch["attention_mask"], dtype=torch.bool)} if fused else {}
        if self.loss.needs_hidden_states:
            extra["output_hidden_states"] = True
        with self._student_taps.capture() as found:
            out = self.student(**inputs, **extra)
        student_features = {str(p): v for p, v in found.items()}
        hidden = student_features.pop(str(self._decoder_tap)) if self._decoder_tap is not None else None
        grids = None
        if hasattr(self.student, "image_grids") and batch.get("pixel_values") is not None:
            grids = self.student.image_grids(batch["pixel_values"], batch.get("pixel_mask"))
        return LossInputs(student_logits=None if fused else out.logits, labels=batch["labels"],
                          attention_mask=batch["attention_mask"], image_mask=batch["image_mask"],
                          teacher_topk=batch.get("teacher_topk"), student_hidden=hidden if fused else None,
                          student_head=self.student.get_output_embeddings() if fused else None,
                          student_features=student_features, image_grids=grids,
                          student_hidden_states=out.hidden_states if self.loss.needs_hidden_states else None)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        n = batch["labels"].shape[0]
        if self.matformer is not None:
            total = self._matformer_step(batch, n)
        else:
            total, terms = self.loss(self._loss_inputs(batch, fused=self.fused_logits))
            for name, value in terms.items():
                self._log_train(name, value, n)
        self._log_train("loss", total, n, prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        return total

    def _log_train(self, name: str, value: torch.Tensor, n: int, **kwargs: Any) -> None:
        """Log `train/<name>` and keep it for the divergence guard (workbench/guard.py)."""
        self.log(f"train/{name}", value, batch_size=n, **kwargs)
        self.step_values.append((name, value.detach()))

    def _matformer_step(self, batch: dict[str, Any], n: int) -> torch.Tensor:
        """MatFormer joint training: the loss of every granularity on the same batch (or of the
        full width + `sample` others), summed; smaller ones may also distil from the full width.
        Logs `train/g<fraction>/<term>` per granularity. All graphs live until the backward."""
        import random

        from students.matformer import set_uniform

        m = self.matformer
        grans = sorted(m.granularities, reverse=True)
        if m.sample is not None:  # reproducible per step, so a resumed run draws the same ones
            grans = [grans[0], *sorted(random.Random(f"{self.global_step}").sample(grans[1:], m.sample), reverse=True)]
        total, full_logits = 0.0, None
        for g in grans:
            set_uniform(self.student, g)
            inputs = self._loss_inputs(batch, fused=self.fused_logits)
            loss, terms = self.loss(inputs)
            if g == 1.0:
                full_logits = None if inputs.fused else inputs.student_logits.detach()
            elif m.self_distill and full_logits is not None:
                sd = self._self_distill(inputs, full_logits)
                loss, terms = loss + m.self_distill * sd, {**terms, "self_distill": sd.detach()}
            for name, value in {"loss": loss.detach(), **terms}.items():
                self._log_train(f"g{g:g}/{name}", value, n)
            total = total + loss
        set_uniform(self.student, 1.0)
        return total

    def _self_distill(self, inputs: LossInputs, full_logits: torch.Tensor) -> torch.Tensor:
        from dataclasses import replace

        from losses.combine import LogitDivergenceTerm

        term = LogitDivergenceTerm("forward_kl", temperature=self.matformer.temperature)
        return term(replace(inputs, teacher_logits=full_logits, teacher_topk=None, teacher_keep=None))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        inputs = self._loss_inputs(batch)
        if (inputs.teacher_logits is not None or inputs.teacher_topk is not None or inputs.vision_features is not None
                or not self.loss.needs_teacher):
            total, _ = self.loss(inputs)
            self.log("val/loss", total, batch_size=batch["labels"].shape[0], sync_dist=True)
        # else: the teacher signal comes from a training-set cache; held-out batches have none
        merge_scores(self._val_scores, score_outputs(inputs.student_logits, batch))

    def on_validation_epoch_end(self) -> None:
        keys = self.val_keys
        counts = torch.tensor([self._val_scores.get(k, (0, 0)) for k in keys], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            counts = self.all_gather(counts).sum(0)
        scores = {k: (int(c), int(n)) for k, (c, n) in zip(keys, counts.tolist())}
        for name, value in accuracies(scores).items():
            self.log(f"val/{name}", value, prog_bar=name == "acc", rank_zero_only=True)
        self._val_scores = {}

    def on_fit_end(self) -> None:
        """Under DDP, check that every rank ends with the same student and a grad-free teacher."""
        self.distributed_check = None
        if self.trainer.world_size == 1:
            return
        params = [p.detach().double().flatten() for p in self.student.parameters()]
        flat = torch.cat(params)
        weights = torch.arange(flat.numel(), device=flat.device, dtype=flat.dtype)  # position-sensitive checksum
        probe = torch.tensor([flat.sum(), (flat * weights).sum(),
                              float(any(p.grad is not None for p in (self.teacher.parameters() if self.teacher else [])))],
                             device=self.device)
        probes = self.all_gather(probe)  # (world_size, 3)
        self.distributed_check = {
            "world_size": self.trainer.world_size,
            "student_weights_in_sync": bool(torch.equal(probes[:, :2], probes[:1, :2].expand_as(probes[:, :2]))),
            "teacher_grads": bool(probes[:, 2].any()),
        }

    def configure_optimizers(self):
        o = self.optim
        # student + the loss terms' projectors; the teacher is not a submodule, so never included
        optimizer, scheduler = make_optimizer(self, o.lr, o.weight_decay, o.betas, o.schedule,
                                              self.total_steps, o.warmup_steps, o.decay_fraction, o.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class VisionDistillModule(DistillModule):
    """`DistillModule` for image classification: a timm student on `pixel_values`, class
    logits (B, C) for the logit terms, top-1 accuracy as `val/acc`."""

    def _student_pass(self, batch: dict[str, Any], inputs: dict[str, Any], fused: bool) -> LossInputs:
        with self._student_taps.capture() as found:
            logits = self.student(**inputs)  # (B, C)
        return LossInputs(student_logits=logits, labels=batch["labels"],
                          student_features={str(p): v for p, v in found.items()})
