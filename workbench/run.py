"""Run an experiment: build, open a fresh run directory, fit, export, summarise.

`run(cfg)` trains a one-stage config in a new run directory (`workbench/rundir.py` has the
layout) or hands a multi-stage one to `workbench/stages.py`; `resume(run_dir)` continues an
interrupted run from its last checkpoint. A run becomes `latest` only once completed.
"""

from __future__ import annotations

import time
from pathlib import Path

from workbench.build import build
from workbench.config import RunConfig, load_config, to_yaml
from workbench.device import environment
from workbench.errors import WorkbenchError
from workbench.fit import train
from workbench.rundir import ENV, RunDir, create, write_json
from workbench.stages import run_stages


def run(cfg: RunConfig, run_dir: Path | None = None) -> Path:
    """Train as `cfg` says in a new run directory (default `<out_root>/<name>/<run-id>`);
    returns it. Multi-stage configs run every stage."""
    if cfg.stages:
        return run_stages(cfg, None, run_dir).path
    start = time.time()
    built = build(cfg)  # every config/data/checkpoint error surfaces here, before any write
    directory = create(cfg.out_root, cfg.name, to_yaml(cfg), cfg.run_id, run_dir)
    write_json(directory.path / ENV, environment())
    summary = train(cfg, built, directory)
    if summary["status"] == "completed":
        summary["wall_time_s"] = round(time.time() - start, 2)
        directory.write_summary(summary)
        directory.mark_latest()
    return directory.path


def resume(run_dir: str | Path) -> Path:
    """Continue an interrupted run (any stage) from its last checkpoint."""
    directory = RunDir(Path(run_dir))
    if not directory.config.is_file():
        raise WorkbenchError(f"{directory.path} is not a run directory (no config.yaml)")
    cfg = load_config(directory.config)
    if directory.status() == "completed":
        raise WorkbenchError(f"run {directory.path} already completed; nothing to resume")
    if cfg.stages:
        return run_stages(cfg, directory).path
    summary = train(cfg, build(cfg), directory, resume=True)
    if summary["status"] == "completed":
        directory.mark_latest()
    return directory.path
