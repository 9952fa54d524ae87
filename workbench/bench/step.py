"""`workbench bench step`: what the workbench adds to a distillation step.

The same student (same initial weights), frozen teacher and batch are trained two ways: by
`DistillModule` under the Lightning `Trainer` a run uses (loggers, divergence guard,
throughput and checkpoint callbacks, the target filling the teacher signal, diagnostics),
and by a hand-written torch loop (teacher forward under no_grad, student forward, CE + KD,
backward, AdamW step, schedule step). Each workbench step is paired with a hand-written step
run right beside it (on a copy of the student), so that the machine's drift hits both; the
median over pairs of their ratio is the workbench's overhead, target <= 1.05. Warm-up steps
are discarded, and the first step's losses must agree, so both train the same thing.

The default is the wind tunnel's KD recipe (`experiments/windtunnel/student_kd.yaml`) with a
randomly initialised teacher of the wind-tunnel teacher's size (weights do not change timing).
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError

TARGET = 1.05
DEFAULT_CONFIG = "experiments/windtunnel/student_kd.yaml"
TEACHER_CONFIG = "experiments/windtunnel/teacher.yaml"
IGNORE = -100


class _Paired:
    """Runs one hand-written step beside every workbench step, alternately just after a step
    and just before the next, and times both: each workbench period (one training batch's
    start to the next's, every hook and logger included) minus the hand step inside it. Pairs
    adjacent in time keep a noisy machine's drift out of the ratio."""

    def __init__(self, hand_step) -> None:
        self.hand_step = hand_step
        self.starts: list[float] = []
        self.hand: list[tuple[float, float]] = []  # (start, end) of each hand-written step
        self.first_loss: float | None = None

    def _run_hand(self) -> None:
        start = time.perf_counter()
        self.hand_step()
        self.hand.append((start, time.perf_counter()))

    def callback(self):
        import pytorch_lightning as pl

        paired = self

        class Callback(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                if batch_idx % 2:
                    paired._run_hand()
                paired.starts.append(time.perf_counter())

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                if paired.first_loss is None:
                    paired.first_loss = float(outputs["loss"])
                if batch_idx % 2 == 0:
                    paired._run_hand()

            def on_train_end(self, trainer, pl_module) -> None:
                paired.starts.append(time.perf_counter())

        return Callback()

    def times(self) -> tuple[list[float], list[float]]:
        """(workbench periods, hand-written step times), one pair per step."""
        periods = []
        for a, b in zip(self.starts, self.starts[1:]):
            inside = sum(e - s for s, e in self.hand if a <= s and e <= b)
            periods.append(b - a - inside)
        return periods, [e - s for s, e in self.hand]


def _random_teacher(work: Path, processor_dir: Path, overrides: list[str]) -> Path:
    """A randomly initialised wind-tunnel teacher, saved as a Hugging Face folder."""
    from transformers import AutoProcessor

    from workbench.build.student import processor_fields
    from workbench.config import load_config
    from workbench.registry import STUDENTS

    processor = AutoProcessor.from_pretrained(processor_dir)
    cfg = load_config(TEACHER_CONFIG, [o for o in overrides if o.startswith("data.")])
    torch.manual_seed(0)
    model = STUDENTS.build(cfg.student.type, "student.kwargs", fixed=processor_fields(processor), **cfg.student.kwargs)
    model.save_pretrained(work / "teacher")
    processor.save_pretrained(work / "teacher")
    return work / "teacher"


def _setup(config: str | None, overrides: list[str], work: Path, batch_size: int):
    """(config, built run, one collated training batch)."""
    from workbench.build import build
    from workbench.config import load_config
    from workbench.data import generate_windtunnel

    base = [f"data.root={work / 'data'}", "data.windtunnel.n_train=256", "data.windtunnel.n_val=32",
            f"out_root={work / 'runs'}", "trainer.progress_bar=false", f"data.batch_size={batch_size}"]
    if config is None:
        data_cfg = load_config(DEFAULT_CONFIG, [*base, "teacher=null"]).data
        teacher = _random_teacher(work, generate_windtunnel(data_cfg) / "processor", base)
        base.append(f"teacher.path={teacher}")
    cfg = load_config(config or DEFAULT_CONFIG, [*base, *overrides])
    _check_loss(cfg)
    built = build(cfg)
    from workbench.fit import Prepared

    prepared = Prepared(built)
    batch = prepared.train_collator([prepared.train_set[i] for i in range(min(batch_size, len(prepared.train_set)))])
    return cfg, built, batch


def _check_loss(cfg) -> None:
    """The hand-written loop implements CE + forward KL on answer tokens, dense teacher logits."""
    for name, term in cfg.loss.items():
        kind = term["type"]
        if kind not in ("ce", "forward_kl") or (kind == "forward_kl" and term.get("mask", "answer") != "answer") \
                or term.get("reduction", "mean") != "mean" or term.get("label_smoothing", 0):
            raise WorkbenchError(f"bench step compares against a hand-written CE + forward-KL loop; loss.{name} "
                                 f"({kind}) has no hand-written counterpart")
    if cfg.teacher is None or cfg.teacher.cache or cfg.trainer.fused_logits or cfg.matformer or cfg.hybrid:
        raise WorkbenchError("bench step needs an online hf_vlm teacher, unfused logits, no matformer or hybrid")
    if cfg.trainer.accumulate_grad_batches != 1 or cfg.trainer.precision not in ("32", "32-true"):
        raise WorkbenchError("bench step times float32 steps without gradient accumulation")


def _hand_loss(cfg, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE and forward KL (tau^2-scaled) averaged over answer tokens, weighted as the config says."""
    s, t, y = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
    mask = y != IGNORE
    total = student_logits.new_zeros(())
    for term in cfg.loss.values():
        if term["type"] == "ce":
            value = F.cross_entropy(s[mask], y[mask])
        else:
            tau = term.get("temperature", 1.0)
            log_s, log_t = F.log_softmax(s[mask] / tau, -1), F.log_softmax(t[mask] / tau, -1)
            value = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * tau**2
        total = total + term.get("weight", 1.0) * value
    return total


class _HandLoop:
    """The hand-written training step: teacher forward under no_grad, student forward,
    CE + KD, backward, (clipping,) AdamW step, warm-up + cosine schedule step."""

    def __init__(self, cfg, student, teacher, batch: dict) -> None:
        from workbench.batch import model_inputs

        o = cfg.optim
        self.cfg, self.student, self.teacher, self.batch = cfg, student, teacher, batch
        self.inputs = model_inputs(batch)
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=o.lr, betas=tuple(o.betas),
                                           weight_decay=o.weight_decay)
        warm, total = max(o.warmup_steps, 1), max(cfg.trainer.max_steps, 1)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda k: min((k + 1) / warm, 1.0) * 0.5 * (
            1 + math.cos(math.pi * min(k / total, 1.0))))
        self.first_loss: float | None = None
        student.train()

    def __call__(self) -> None:
        with torch.no_grad():
            teacher_logits = self.teacher(**self.inputs).logits
        loss = _hand_loss(self.cfg, self.student(**self.inputs).logits, teacher_logits, self.batch["labels"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        if self.first_loss is None:
            self.first_loss = float(loss.detach())


def bench_step(config: str | None = None, overrides: list[str] = (), steps: int = 60, warmup: int = 5,
               batch_size: int = 32, threads: int | None = None) -> dict[str, Any]:
    """Median step time of the workbench and of the hand-written loop, and their ratio."""
    from dataclasses import replace

    from torch.utils.data import DataLoader

    from workbench.bench import machine
    from workbench.fit import make_module, make_trainer
    from workbench.loggers import Throughput
    from workbench.rundir import RunDir

    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        work = Path(tmp)
        cfg, built, batch = _setup(config, list(overrides), work, batch_size)
        hand = _HandLoop(cfg, copy.deepcopy(built.student), built.teacher, batch)  # same initial weights
        total = warmup + steps
        cfg = replace(cfg, trainer=replace(cfg.trainer, max_steps=total, val_every_n_steps=total,
                                           checkpoint_every_n_steps=None))
        paired = _Paired(hand)
        trainer = make_trainer(cfg, RunDir(work / "run"), [Throughput(), *built.target.callbacks(), paired.callback()])
        trainer.fit(make_module(cfg, built), DataLoader([batch] * total, batch_size=None))
    workbench, handwritten = (t[warmup:] for t in paired.times())
    firsts = {"workbench": paired.first_loss, "hand": hand.first_loss}
    _check_same_loss(firsts)
    median = {"workbench": statistics.median(workbench), "hand": statistics.median(handwritten)}
    return {"config": config or DEFAULT_CONFIG, "overrides": list(overrides), "batch_size": int(batch["labels"].shape[0]),
            "steps": steps, "warmup": warmup, "threads": torch.get_num_threads(), "first_loss": firsts,
            "median_step_s": median, "ratio": statistics.median(w / h for w, h in zip(workbench, handwritten)),
            "target": TARGET, "machine": machine()}


def _check_same_loss(firsts: dict[str, float]) -> None:
    a, b = firsts["workbench"], firsts["hand"]
    if not math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5):
        raise RuntimeError(f"the workbench step and the hand-written loop disagree on the first loss ({a} vs {b}): "
                           "they do not train the same thing, so their times are not comparable")


def bench_step_command(config: str | None, overrides: list[str], steps: int, warmup: int, batch_size: int,
                       threads: int | None, json_out: str | None) -> None:
    import json

    result = bench_step(config, overrides, steps, warmup, batch_size, threads)
    m = result["median_step_s"]
    print(f"{result['config']}: batch {result['batch_size']}, {result['steps']} paired steps (after "
          f"{result['warmup']} warm-up), {result['threads']} threads")
    print(f"  first loss: workbench {result['first_loss']['workbench']:.5f}, hand {result['first_loss']['hand']:.5f}")
    print(f"  median step: workbench {m['workbench'] * 1e3:.2f} ms, hand-written {m['hand'] * 1e3:.2f} ms")
    ok = result["ratio"] <= TARGET
    print(f"  ratio (median over pairs) {result['ratio']:.3f} (target <= {TARGET}): {'PASS' if ok else 'FAIL'}")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
