"""`DistillModule`: the LightningModule that trains a student from what its target gives.

A step is "student pass + fill the targets": the student runs with the taps the loss reads,
then the target (`workbench/targets/`) puts the teacher side in (online logits and taps, a
cached top-k, vision features, or nothing) and the loss combines. A teacher is deliberately
*not* a registered submodule: it stays out of `state_dict` (and so out of checkpoints), out
of the optimizer and out of DDP/FSDP wrapping and gradient sync. It is moved to the
student's device when fitting starts and always runs under no_grad.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from losses.combine import WeightedLoss
from losses.inputs import LossInputs
from workbench.config import MatFormerConfig, OptimConfig
from workbench.metrics import accuracies, merge_scores, score_outputs
from workbench.optim import make_optimizer
from workbench.batch import model_inputs
from workbench.loggers import diagnostics, logs_this_step
from workbench.targets import Target
from workbench.taps import FeatureTaps, TapPoint


class DistillModule(pl.LightningModule):
    """Student + weighted loss terms + target; validation scores answer accuracy.

    Args:
        student: the model being trained (a Hugging Face VLM).
        loss: the weighted objective.
        target: what the student learns from besides labels (fills the teacher side).
        optim: optimizer and schedule settings.
        total_steps: length of the LR schedule.
        val_tags: every answer tag (question type) in the held-out split, so that all ranks
            reduce the same list of counts.
    """

    def __init__(self, student: nn.Module, loss: WeightedLoss, target: Target, optim: OptimConfig, total_steps: int,
                 val_tags: tuple[str, ...] = (), fused_logits: bool = False,
                 matformer: MatFormerConfig | None = None, fsdp: bool = False):
        super().__init__()
        self.matformer = matformer
        self.fsdp = fsdp  # trainer.strategy=fsdp: `configure_model` shards the student
        self.student = student
        self.loss = loss  # a submodule: projectors of feature terms train with the student
        self.optim = optim
        self.total_steps = total_steps
        object.__setattr__(self, "target", target)  # its teacher is not a submodule, see module docstring
        self.val_keys = ["all", *sorted(set(val_tags))]
        self.step_values: list[tuple[str, torch.Tensor]] = []  # this step's logged values, for the DivergenceGuard
        self._logging = True  # whether this training step logs (see `logs_this_step`)
        self._row: dict[str, torch.Tensor] = {}  # this step's training values for the loggers (see on_save_checkpoint)
        self._val_scores: dict[str, tuple[int, int]] = {}
        self.fused_logits = fused_logits
        student_points, _ = loss.tap_points()
        self._decoder_tap = None
        if fused_logits:
            names = {id(m): n for n, m in student.named_modules()}
            self._decoder_tap = TapPoint(names[id(student.get_decoder())])  # its output: the LM head's input
            student_points = [*student_points, str(self._decoder_tap)]
        self._student_taps = FeatureTaps(student, [TapPoint.parse(p) for p in student_points], "student")

    @property
    def teacher(self) -> nn.Module | None:
        return self.target.teacher

    def on_fit_start(self) -> None:
        # from_pretrained returns models in eval mode, and Lightning keeps each module's mode:
        # without this a student loaded from a folder would train with dropout off
        self.student.train()
        self.target.to(self.device)

    def _loss_inputs(self, batch: dict[str, Any], fused: bool = False) -> LossInputs:
        """The target's signal, then the student pass with the taps the loss reads.

        The teacher runs first so that its activations are freed before the student's graph
        is built (on CPU a step is up to a third faster in this order: `workbench bench step`).
        With `fused`, the student computes no logits (`logits_to_keep` keeps none), the logit
        terms work from its final hidden states through `kernels.fused_linear_kd`, and an
        online teacher returns logits only at the positions those terms read.
        """
        inputs = LossInputs.before_student(batch["labels"], batch.get("attention_mask"), batch.get("image_mask"))
        self.target.fill(batch, inputs, self.loss, fused)
        given = model_inputs(batch)
        for name, tap in getattr(self.student, "teacher_reads", {}).items():  # a draft head reads its target
            given[name] = inputs.teacher_features[tap]
        return replace(inputs, **self._student_pass(batch, given, fused))

    def _student_pass(self, batch: dict[str, Any], inputs: dict[str, Any], fused: bool) -> dict[str, Any]:
        """The student's forward with its taps: the student fields of `LossInputs`."""
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
        return dict(student_logits=None if fused else out.logits, student_hidden=hidden if fused else None,
                    student_head=self.student.get_output_embeddings() if fused else None,
                    student_features=student_features, image_grids=grids,
                    student_hidden_states=out.hidden_states if self.loss.needs_hidden_states else None)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        n = batch["labels"].shape[0]
        self._logging = logs_this_step(self.trainer, self.global_step + 1)
        self._row = {}
        if self.matformer is not None:
            total = self._matformer_step(batch, n)
        else:
            inputs = self._loss_inputs(batch, fused=self.fused_logits)
            total, terms = self.loss(inputs)
            for name, value in terms.items():
                self._log_train(name, value, n)
            if self.loss.needs_teacher and self._logging:
                self.log_dict(diagnostics(inputs), batch_size=n)
        self._log_train("loss", total, n, prog_bar=True)
        if self._logging:
            lr = self.optimizers().param_groups[0]["lr"]
            self.log("lr", lr, batch_size=n)
            self._row["lr"] = torch.tensor(lr)
        return total

    def _log_train(self, name: str, value: torch.Tensor, n: int, **kwargs: Any) -> None:
        """Keep `train/<name>` for the divergence guard (workbench/guard.py), and log it on
        the steps Lightning writes (a `self.log` costs ~0.5 ms on CPU; others skip it)."""
        if self._logging:
            self.log(f"train/{name}", value, batch_size=n, **kwargs)
            self._row[f"train/{name}"] = value.detach()
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

        from losses.divergence import LogitDivergenceTerm

        term = LogitDivergenceTerm("forward_kl", temperature=self.matformer.temperature)
        return term(replace(inputs, teacher_logits=full_logits, teacher_topk=None, teacher_keep=None))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        inputs = self._loss_inputs(batch)
        if self.target.scores_validation or not self.loss.needs_teacher:
            total, terms = self.loss(inputs)
            n = batch["labels"].shape[0]
            self.log("val/loss", total, batch_size=n, sync_dist=True)
            self.log_dict({f"val/{name}": value for name, value in terms.items()}, batch_size=n, sync_dist=True)
        merge_scores(self._val_scores, score_outputs(inputs.student_logits, batch))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning saves a step's checkpoint before it hands that step's values to the loggers,
        so a run killed in between would lose one metrics row for good (the resumed run starts at
        the next step). The checkpoint carries the row; a resume puts it back if it is missing."""
        if self._logging and self._row:
            checkpoint["workbench_metrics_row"] = {"step": self.global_step - 1, "epoch": self.current_epoch,
                                                   **{k: float(v) for k, v in self._row.items()}}

    def on_validation_epoch_end(self) -> None:
        keys = self.val_keys
        counts = torch.tensor([self._val_scores.get(k, (0, 0)) for k in keys], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            counts = self.all_gather(counts).sum(0)
        scores = {k: (int(c), int(n)) for k, (c, n) in zip(keys, counts.tolist())}
        for name, value in accuracies(scores).items():
            self.log(f"val/{name}", value, prog_bar=name == "acc", rank_zero_only=True)
        self._val_scores = {}

    def configure_model(self) -> None:
        """trainer.strategy=fsdp (FSDP2 through Lightning's ModelParallelStrategy): shard each
        transformer block of the student (its `_no_split_modules`), then the rest of it, and
        the loss terms' projectors over the data-parallel mesh. The teacher is not a
        submodule: it is never sharded and never in the optimizer."""
        if not self.fsdp or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        blocks = set(getattr(self.student, "_no_split_modules", None) or ())
        for module in list(self.student.modules()):
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(self.student, mesh=mesh)
        if any(p.requires_grad for p in self.loss.parameters()):
            fully_shard(self.loss, mesh=mesh)
        self._sharded = True

    def on_fit_end(self) -> None:
        """Under DDP, check that every rank ends with the same student and a grad-free teacher
        (under FSDP the ranks hold different shards by design: the teacher only)."""
        self.distributed_check = None
        if self.trainer.world_size == 1:
            return
        teacher_grads = float(any(p.grad is not None for p in (self.teacher.parameters() if self.teacher else [])))
        if self.fsdp:  # what this rank holds of the student: about 1 / world_size when sharded
            local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in self.student.parameters())
            total = sum(p.numel() for p in self.student.parameters())
            probes = self.all_gather(torch.tensor([local / total, 0.0, teacher_grads], device=self.device))
            self.distributed_check = {"world_size": self.trainer.world_size, "sharded": True,
                                      "student_share_per_rank": [round(float(x), 3) for x in probes[:, 0]],
                                      "teacher_grads": bool(probes[:, 2].any())}
            return
        params = [p.detach().double().flatten() for p in self.student.parameters()]
        flat = torch.cat(params)
        weights = torch.arange(flat.numel(), device=flat.device, dtype=flat.dtype)  # position-sensitive checksum
        probe = torch.tensor([flat.sum(), (flat * weights).sum(), teacher_grads], device=self.device)
        probes = self.all_gather(probe)  # (world_size, 3)
        self.distributed_check = {
            "world_size": self.trainer.world_size,
            "student_weights_in_sync": bool(torch.equal(probes[:, :2], probes[:1, :2].expand_as(probes[:, :2]))),
            "teacher_grads": bool(probes[:, 2].any()),
        }

    def configure_optimizers(self):
        o = self.optim
        # student + the loss terms' projectors; the teacher is not a submodule, so never included
        optimizer, scheduler = make_optimizer(self, o, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class VisionDistillModule(DistillModule):
    """`DistillModule` for image classification: a timm student on `pixel_values`, class
    logits (B, C) for the logit terms, top-1 accuracy as `val/acc`."""

    def _student_pass(self, batch: dict[str, Any], inputs: dict[str, Any], fused: bool) -> dict[str, Any]:
        with self._student_taps.capture() as found:
            logits = self.student(**inputs)  # (B, C)
        return dict(student_logits=logits, student_features={str(p): v for p, v in found.items()})
