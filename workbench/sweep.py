"""Sweeps: one run per point of a grid of config overrides, resumable and summarised.

`workbench run CONFIG --sweep optim.lr=1e-3,3e-3 --sweep seed=0,1,2` (or a `sweep:` block in
the YAML) runs every combination under `<out_root>/<name>/sweep-<hash>/<key=value,...>/`,
where the hash covers the base config and the grid, so invoking the same sweep again finds
the same folder: finished runs are skipped, interrupted ones resume from their checkpoint.
`sweep.json` lists the points and their status; `sweep.md` is the comparison table.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from workbench.config import RunConfig, load_config, to_yaml
from workbench.errors import WorkbenchError
from workbench.rundir import RunDir, write_json


def parse_sweep_args(args: list[str]) -> dict[str, list[str]]:
    """`["seed=0,1,2", "optim.lr=1e-3,3e-3"]` -> {"seed": ["0", "1", "2"], ...}."""
    grid: dict[str, list[str]] = {}
    for arg in args:
        key, sep, values = arg.partition("=")
        if not sep or not key or not values:
            raise WorkbenchError(f"--sweep {arg!r} is not of the form key=a,b,c")
        grid[key.strip()] = [v.strip() for v in values.split(",")]
    return grid


def _as_override(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def sweep_grid(cfg: RunConfig, cli: dict[str, list[str]]) -> dict[str, list[str]]:
    """The YAML `sweep:` block with the command line's keys replacing or adding to it."""
    grid = {k: [_as_override(v) for v in values] for k, values in cfg.sweep.items()}
    grid.update(cli)
    return grid


def _label(point: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items()).replace("/", "_")


def sweep_dir(cfg: RunConfig, grid: dict[str, list[str]]) -> Path:
    base = to_yaml(cfg)
    digest = hashlib.sha256((base + json.dumps(grid, sort_keys=True)).encode()).hexdigest()[:8]
    return Path(cfg.out_root) / cfg.name / f"sweep-{digest}"


def _status(run_dir: Path) -> str | None:
    return RunDir(run_dir).status()


def run_sweep(config: str | Path, overrides: list[str], cli_grid: dict[str, list[str]]) -> Path:
    """Run (or finish) every point of the grid; returns the sweep directory."""
    from workbench.run import resume, run

    loaded = load_config(config, overrides)
    grid = sweep_grid(loaded, cli_grid)
    base = replace(loaded, sweep={})
    if not grid:
        raise WorkbenchError("no sweep: give --sweep key=a,b,c or a `sweep:` block in the config")
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    # every point's config must load before anything runs
    configs = [replace(load_config(config, [*overrides, *(f"{k}={v}" for k, v in p.items())]), sweep={})
               for p in points]
    root = sweep_dir(base, grid)
    root.mkdir(parents=True, exist_ok=True)
    entries = [{"label": _label(p), "overrides": {k: yaml.safe_load(v) for k, v in p.items()},
                "dir": _label(p), "status": _status(root / _label(p)) or "pending"} for p in points]
    _write_sweep(root, grid, entries)
    print(f"[workbench] sweep {root}: {len(points)} runs")
    for entry, cfg in zip(entries, configs):
        run_dir = root / entry["dir"]
        status = _status(run_dir)
        if status == "completed":
            print(f"[workbench] {entry['label']}: already completed, skipped")
            continue
        try:
            if RunDir(run_dir).config.is_file():
                print(f"[workbench] {entry['label']}: resuming ({status})")
                resume(run_dir)
            else:
                run(cfg, run_dir=run_dir)
        finally:
            entry["status"] = _status(run_dir) or "failed"
            _write_sweep(root, grid, entries)
    _write_table(root)
    return root


def _write_sweep(root: Path, grid: dict[str, list[str]], entries: list[dict]) -> None:
    write_json(root / "sweep.json", {"grid": {k: [yaml.safe_load(v) for v in vs] for k, vs in grid.items()},
                                     "runs": entries})


def _write_table(root: Path) -> None:
    from workbench.results import compare_command

    table = compare_command([str(root)], by=None, metrics=None, fmt="md", group_seeds=True)
    (root / "sweep.md").write_text(table)
    print(table)
