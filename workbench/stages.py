"""Multi-stage experiments: the stages run in order inside one run directory (`stages/<name>/`).

A stage may be taught by, start from or load an earlier stage's exported student
(`stage:<name>`); loss terms that carry trained state of their own continue from the
previous stage. Under DDP only rank 0 exports, summarises and builds teacher caches; the
workers (started by rank 0's first `Trainer.fit`, they re-run the whole experiment) fit each
stage with it and wait between stages until rank 0 has exported the previous one and built
the next.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.build import Built, build
from workbench.build.student import requested_transforms, transform_key
from workbench.config import STAGE_REF, RunConfig, stage_configs, to_yaml
from workbench.device import environment
from workbench.errors import WorkbenchError
from workbench.fit import train
from workbench.interrupt import ending
from workbench.registry import TRANSFORMS
from workbench import console
from workbench.rundir import ENV, RunDir, create, is_worker_process, launcher_job_id, launcher_rank, write_json

LAUNCH_ENV = "WB_LAUNCH"  # this invocation's id, inherited by its DDP workers
STAGE_READY = ".stage-ready.json"  # rank 0: "stage <name> is built, about to fit"


def stage_refs(cfg: RunConfig, run_dir: RunDir) -> RunConfig:
    """`stage:<name>` in teacher.path / student.path / init_from / a student.kwargs path (e.g. an
    encoder-free student's `language_model`) -> that stage's exported student."""
    def resolve(value):
        if isinstance(value, str) and value.startswith(STAGE_REF):
            return str(run_dir.stage(value[len(STAGE_REF):]).student)
        return value

    teacher = replace(cfg.teacher, path=resolve(cfg.teacher.path)) if cfg.teacher else None
    kwargs = {k: resolve(v) for k, v in cfg.student.kwargs.items()}
    return replace(cfg, teacher=teacher, init_from=resolve(cfg.init_from),
                   student=replace(cfg.student, path=resolve(cfg.student.path), kwargs=kwargs))


def run_stages(cfg: RunConfig, resume_dir: RunDir | None, new_dir: Path | None = None) -> RunDir:
    """Run (or, with `resume_dir`, finish) every stage of `cfg`; returns the run directory."""
    start = time.time()
    stages = stage_configs(cfg)
    is_main = not is_worker_process()
    if launcher_rank() is not None:  # torchrun / SLURM: every rank runs this; the job is the launch
        os.environ[LAUNCH_ENV] = launcher_job_id() or ""
    elif is_main:
        os.environ[LAUNCH_ENV] = f"{os.getpid()}-{time.time_ns()}"
    first, run_dir = None, resume_dir
    if resume_dir is None:
        first = build(stage_refs(stages[0][1], RunDir(Path("/nonexistent"))))  # fail on bad input before writing
        check_later_stages(stages, first.student)
        run_dir = create(cfg.out_root, cfg.name, to_yaml(cfg), cfg.run_id, new_dir)
        if is_main:
            run_dir.config.write_text(to_yaml(cfg))
            write_json(run_dir.path / ENV, environment())
    summary = {"name": cfg.name, "run_id": run_dir.path.name, "status": "running", "stages": {}}
    if is_main:
        run_dir.write_summary(summary)
    try:
        _fit_stages(stages, run_dir, summary, first, resume_dir is not None, is_main)
    except BaseException as e:
        if is_main:
            status, reason = ending(e)
            summary.update(status=status, error=reason)
            run_dir.record(summary)
        raise
    if not is_main:
        return run_dir
    summary["results"] = stage_results(summary["stages"])
    summary.update(status="completed", wall_time_s=round(time.time() - start, 2))
    run_dir.write_summary(summary)
    run_dir.results.write_text(results_markdown(cfg.name, summary["results"]))
    run_dir.mark_latest()
    return run_dir


def check_later_stages(stages: list[tuple[str, RunConfig]], first: nn.Module) -> None:
    """Before anything trains: the transforms of each later stage that starts from the first
    stage's model as it is (`student.path: stage:<name>`, directly or through stages without
    transforms) are checked against that model by their registered `fits` (e.g. a MoD schedule
    list's length against its decoder), so a bad option fails now, not after hours of earlier
    stages. Stages that start from a folder or from a transformed stage are checked when they
    start."""
    same = {stages[0][0]}  # stages whose exported model has the first stage's structure
    for name, stage_cfg in stages[1:]:
        path = stage_cfg.student.path
        if not (isinstance(path, str) and path.startswith(STAGE_REF) and path[len(STAGE_REF):] in same):
            continue
        wanted = requested_transforms(stage_cfg)
        if not wanted:
            same.add(name)
        for transform, options in wanted.items():
            fits = TRANSFORMS.info.get(transform, {}).get("fits")
            if fits is None:
                continue
            try:
                fits(first, **options)
            except ValueError as e:
                raise WorkbenchError(f"config key 'stages.{name}.{transform_key(transform)}': {e}") from None


def _fit_stages(stages: list[tuple[str, RunConfig]], run_dir: RunDir, summary: dict[str, Any], first: Built | None,
                resuming: bool, is_main: bool) -> None:
    fitted = 0  # stages this process has trained
    for i, (name, stage_cfg) in enumerate(stages):
        stage_dir = run_dir.stage(name)
        done = stage_dir.read_summary()
        if done and done.get("status") == "completed":
            summary["stages"][name] = done
            continue
        if not is_main and fitted:
            _wait_for_stage(run_dir, name)
        stage_dir.path.mkdir(parents=True, exist_ok=True)
        if is_main:
            console.header(f"stage {name} ({i + 1} of {len(stages)})")
        stage_cfg = stage_refs(stage_cfg, run_dir)
        built = first if (i == 0 and first is not None) else build(stage_cfg)
        if i > 0:
            _carry_loss_state(built, stages[i - 1][0], run_dir.stage(stages[i - 1][0]))
        summary["stages"][name] = train(stage_cfg, built, stage_dir, resume=resuming,
                                        before_fit=lambda: _stage_ready(run_dir, name))
        fitted += 1
        if is_main:
            run_dir.write_summary(summary)


def _stage_ready(run_dir: RunDir, name: str) -> None:
    """Rank 0: stage `name` is built (the previous one exported, its teacher cache made)."""
    write_json(run_dir.path / STAGE_READY, {"stage": name, "launch": os.environ.get(LAUNCH_ENV)})


def _wait_for_stage(run_dir: RunDir, name: str, poll_s: float = 0.2) -> None:
    """DDP worker: block until rank 0 signals that stage `name` is built; stop if rank 0 failed
    or is gone (its workers are its child processes)."""
    parent, launch = os.getppid(), os.environ.get(LAUNCH_ENV)
    ready = run_dir.path / STAGE_READY
    while True:
        try:
            signal = json.loads(ready.read_text())
        except (OSError, ValueError):
            signal = None
        if signal == {"stage": name, "launch": launch}:
            return
        status = run_dir.status()
        if status in ("failed", "interrupted") or os.getppid() != parent:
            raise WorkbenchError(f"rank 0 stopped before stage {name!r} (run status: {status}); see {run_dir.path}")
        time.sleep(poll_s)


def _carry_loss_state(built: Built, previous: str, previous_dir: RunDir) -> None:
    """Loss terms with trained parts of their own that a method keeps across stages (EVE's
    patch-aligning layer lives in its model through all three) continue from the previous
    stage's last checkpoint when it had a term of the same name and shapes."""
    ckpt = previous_dir.last_checkpoint
    terms = {n: t for n, t in built.loss.terms.items() if t.carries_state}
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
    """The stages' table; token-reducing students add their FLOPs and KV proxies (dense = 1)."""
    types = sorted({k for r in rows for k in r if k.startswith("acc/")})
    proxies = [k for k in ("tokens/flops_ratio", "tokens/kv_ratio") if any(k in r for r in rows)]
    head = ["model", "params", "answer acc" if types else "accuracy", *[t.removeprefix("acc/") for t in types],
            *[{"tokens/flops_ratio": "FLOPs", "tokens/kv_ratio": "KV"}[k] for k in proxies]]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['params']:,}", _fmt(r["acc"]), *[_fmt(r.get(t)) for t in types],
                 *[_fmt(r.get(k, 1.0 if r["acc"] is not None else None)) for k in proxies]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
