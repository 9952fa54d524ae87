"""Read run directories back into one table and compare ablations; the last step of the flow.

`load_runs("runs/study/sweep-*")` gives one row per run: flattened `config.<key>` columns
(config.yaml) and summary columns (`student.acc`, `stages.<s>.student.acc`, ...).
`compare` keeps the settings that differ, folds seeds into `mean ± std`, and `format_table`
renders it; `workbench compare` is the CLI face. `metrics(run)` reads per-step curves.
"""

from __future__ import annotations

import difflib
import glob
import json
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from workbench.errors import WorkbenchError
from workbench.rundir import LATEST, RunDir, children

CONFIG = "config."
# Settings that differ between runs without being what the ablation varies.
_BOOKKEEPING = re.compile(r"^config\.(stages\.[^.]+\.)?(seed|run_id|name|out_root)$|^config\.sweep(\.|$)")
_SEED = "config.seed"
SCORED_ON = ("scored_on.protocol", "scored_on.data", "scored_on.teacher")  # workbench/evaluation.py scored_on
_WHAT = {"scored_on.protocol": "evaluation code (protocol)", "scored_on.data": "held-out data",
         "scored_on.teacher": "teacher"}
FORMATS = ("md", "csv", "json")


# ---------------------------------------------------------------- finding and reading runs


def is_run_dir(path: Path) -> bool:
    """A run directory holds `config.yaml` and `summary.json`."""
    return RunDir(path).is_run()


def _sweep_runs(sweep: Path) -> list[Path]:
    """The run dirs of a sweep folder, in the order `sweep.json` lists them, then any others."""
    try:
        listed = [sweep / r["dir"] for r in json.loads((sweep / "sweep.json").read_text()).get("runs", [])]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WorkbenchError(f"{sweep / 'sweep.json'} is not a valid sweep file ({e})") from None
    others = [p for p in children(sweep) if p not in listed]
    return [p for p in listed + others if is_run_dir(p)]


def _expand(path: Path, depth: int = 3) -> list[Path]:
    """A run dir, a sweep dir (all its runs) or a folder of those (`depth` levels down) -> run dirs."""
    if is_run_dir(path):
        return [path]
    if not path.is_dir():
        return []
    if (path / "sweep.json").is_file():
        return _sweep_runs(path)
    if depth == 0:
        return []
    return [run for child in children(path) for run in _expand(child, depth - 1)]


def find_runs(*paths_or_globs: str | os.PathLike) -> list[Path]:
    """Run directories named by paths, globs, sweep folders or folders of runs, without repeats.

    Raises:
        WorkbenchError: when an argument matches no run directory.
    """
    runs: dict[Path, Path] = {}
    for arg in paths_or_globs:
        text = str(arg)
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        # a glob skips `latest` (a link to a run it also matches); `.../latest` named alone is that run
        found = [run for m in matches if not (Path(m).name == LATEST and len(matches) > 1) for run in _expand(Path(m))]
        if not found:
            if not matches or not Path(matches[0]).exists():
                raise WorkbenchError(f"{text} {'matches no files' if matches == [] else 'does not exist'}")
            raise WorkbenchError(f"{text} holds no run directories (a run directory has config.yaml and summary.json)")
        for run in found:
            runs.setdefault(run.resolve(), run)
    return list(runs.values())


def _leaf(value: Any) -> Any:
    """Lists and empty mappings become strings, so every cell can be hashed and compared."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}, "c": [1, 2]}` -> `{"a.b": 1, "c": "[1, 2]"}` (dotted keys to leaves)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _leaf(value)
    return flat


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """One run as a flat row: `run`, `config.<key>` for config.yaml, `<key>` for summary.json."""
    run_dir = Path(run_dir)
    try:
        config = yaml.safe_load(RunDir(run_dir).config.read_text()) or {}
        summary = RunDir(run_dir).read_summary()
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise WorkbenchError(f"run directory {run_dir} has an unreadable config.yaml or summary.json: {e}") from None
    return {"run": str(run_dir), **flatten(config, CONFIG), **flatten(summary)}


def load_runs(*paths_or_globs: str | os.PathLike) -> pd.DataFrame:
    """Load runs into one DataFrame, one row per run.

    Args:
        *paths_or_globs: run directories, globs of them (`"runs/study/sweep-*/*"`), sweep
            folders (with `sweep.json`: all their runs) or folders of runs (`runs/study`).

    Returns:
        Columns `run` (the directory), `config.<dotted key>` for every leaf of config.yaml and
        `<dotted key>` for every leaf of summary.json (`status`, `student.acc`,
        `stages.<stage>.student.acc`, `wall_time_s`, ...). Lists are JSON strings.

    Raises:
        WorkbenchError: when an argument matches no run directory.
    """
    if not paths_or_globs:
        raise WorkbenchError("name at least one run directory, sweep folder or glob")
    rows = [read_run(run) for run in find_runs(*paths_or_globs)]
    frame = pd.DataFrame(rows)
    config = [c for c in frame.columns if c.startswith(CONFIG)]
    summary = [c for c in frame.columns if c != "run" and not c.startswith(CONFIG)]
    return frame[["run", *config, *summary]]


def metrics(run: str | os.PathLike | Mapping[str, Any], stage: str | None = None) -> pd.DataFrame:
    """Per-step metrics of a run (its `metrics.csv`), one row per step.

    Lightning's CSVLogger writes train and validation values of a step on separate rows; they
    are merged, so `m.dropna(subset=["val/acc"])` are the validation points.

    Args:
        run: a run directory, or a row of `load_runs` (anything with a `run` entry).
        stage: for multi-stage runs, the stage to read (`stages/<stage>/metrics.csv`). Without
            it a multi-stage run gives all stages in order with a `stage` column.

    Returns:
        A DataFrame with a `step` column and one column per logged metric
        (`train/loss`, `val/acc`, `val/acc/<qtype>`, `lr`, ...).
    """
    run_dir = RunDir(Path(run["run"] if isinstance(run, (Mapping, pd.Series)) else run))
    if stage is not None:
        return _read_metrics(run_dir.stage(stage).metrics, run_dir, stage)
    stages = run_dir.stage_names()
    if run_dir.metrics.is_file() or not stages:
        return _read_metrics(run_dir.metrics, run_dir)
    parts = [_read_metrics(run_dir.stage(s).metrics, run_dir, s).assign(stage=s) for s in stages]
    return pd.concat(parts, ignore_index=True)


def _read_metrics(path: Path, run_dir: RunDir, stage: str | None = None) -> pd.DataFrame:
    if not path.is_file():
        stages = run_dir.stage_names()
        hint = f"; its stages are {', '.join(stages)}" if stages and stage not in stages else ""
        raise WorkbenchError(f"{path} does not exist{hint}")
    frame = pd.read_csv(path)
    if "step" not in frame.columns:
        raise WorkbenchError(f"{path} has no 'step' column")
    return frame.groupby("step", as_index=False, sort=True).first()


# ---------------------------------------------------------------- comparing


def _cell(value: Any) -> Any:
    """NaN (a key missing from some runs) and None compare equal; everything else as is."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return None
    return value


def _same_place(value: Any, anchors: dict[str, Any]) -> Any:
    """A path inside the run's own directory or out_root, written so that runs elsewhere agree."""
    if not isinstance(value, str) or not (os.path.isabs(value) or os.path.exists(value)):
        return value
    text = os.path.abspath(value)  # not realpath: `latest` links would turn into different run ids
    for name, anchor in anchors.items():
        if isinstance(anchor, str) and anchor:
            text = text.replace(os.path.abspath(anchor) + os.sep, name + os.sep)
    return text


def varying_keys(df: pd.DataFrame) -> list[str]:
    """The `config.` columns whose values differ between runs (seed and bookkeeping excluded).

    Paths that differ only because runs live in different folders (inside their own run
    directory or `out_root`) do not count as differences.
    """
    def column(name: str) -> list[Any]:
        return list(df[name]) if name in df.columns else [None] * len(df)

    anchors = [{"<run>": r, "<out_root>": o} for r, o in zip(column("run"), column("config.out_root"))]
    keys = []
    for col in df.columns:
        if not col.startswith(CONFIG) or _BOOKKEEPING.match(col):
            continue
        values = {_same_place(_cell(v), a) for v, a in zip(df[col], anchors)}
        if len(values) > 1:
            keys.append(col)
    return keys


def default_metrics(df: pd.DataFrame) -> list[str]:
    """Overall accuracies present (`student.acc`, `teacher.acc`, `stages.<s>.student.acc`) + wall time."""
    stage_acc = re.compile(r"^stages\.[^.]+\.student\.acc$")
    accs = [c for c in ("student.acc", "teacher.acc") if c in df.columns and df[c].notna().any()]
    accs += [c for c in df.columns if stage_acc.match(c) and df[c].notna().any()]
    return accs + [c for c in ("wall_time_s",) if c in df.columns]


def _resolve(names: Iterable[str], columns: list[str], what: str, config_prefix: bool) -> list[str]:
    """Match user-given names to columns (optionally without `config.`), suggesting near misses."""
    resolved = []
    for name in names:
        candidates = [name, f"{CONFIG}{name}"] if config_prefix else [name]
        hit = next((c for c in candidates if c in columns), None)
        if hit is None:
            pool = [c.removeprefix(CONFIG) for c in columns] if config_prefix else columns
            close = difflib.get_close_matches(name.removeprefix(CONFIG), pool, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise WorkbenchError(f"no run has the {what} '{name}'{hint}")
        resolved.append(hit)
    return resolved


def _sort_key(key: tuple) -> tuple:
    """Order rows by their settings: None first, then numbers, then text."""
    return tuple((0, 0, "") if v is None else (1, v, "") if isinstance(v, numbers.Number) else (2, 0, str(v))
                 for v in key)


def aggregate(df: pd.DataFrame, by: list[str] | None = None, metrics: list[str] | None = None,
              group_seeds: bool = True, mixed: bool = False) -> pd.DataFrame:
    """Group runs by their settings and average the metrics over seeds (numbers, not text).

    Args:
        df: runs from `load_runs`.
        by: config keys to group by (with or without `config.`); default: `varying_keys(df)`.
        metrics: summary keys (`student.acc`, `final_train.train/loss`); default: `default_metrics(df)`.
        group_seeds: fold runs with the same settings into one row; False keeps one row per run
            and adds `config.seed`.
        mixed: average runs of one row even when they were scored on different held-out data,
            teachers or evaluation code (their `scored_on` records differ).

    Returns:
        Columns: the keys, `n` (runs in the row), `status` when some run is not completed,
        `scored_on` when rows were scored on different data, teachers or code (which differ,
        by short hash), then `<metric>` (mean) and `<metric>.std` per metric (std is NaN for a
        single run; non-numeric metrics list their distinct values).

    Raises:
        WorkbenchError: for a key or metric that no run has; for a row whose runs were scored
            differently, unless `mixed`.
    """
    config_cols = [c for c in df.columns if c.startswith(CONFIG)]
    summary_cols = [c for c in df.columns if c != "run" and not c.startswith(CONFIG)]
    keys = _resolve(by, config_cols, "config key", True) if by else varying_keys(df)
    names = _resolve(metrics, summary_cols, "metric", False) if metrics else default_metrics(df)
    if not group_seeds and _SEED in df.columns and _SEED not in keys:
        keys = [*keys, _SEED]
    groups: dict[tuple, list[int]] = {}
    for i, (_, row) in enumerate(df.iterrows()):
        key = tuple(_cell(row[k]) for k in keys) if group_seeds else (*(_cell(row[k]) for k in keys), i)
        groups.setdefault(key, []).append(i)
    scored = [c for c in SCORED_ON if c in df.columns and len({_cell(v) for v in df[c]}) > 1]
    rows = []
    for key in sorted(groups, key=_sort_key):
        part = df.iloc[groups[key]]
        if not mixed:
            _refuse_mixed(part, dict(zip(keys, key)), scored)
        row: dict[str, Any] = dict(zip(keys, key)) | {"n": len(part), "status": _statuses(part),
                                                       "scored_on": _scored_on(part, scored)}
        for name in names:
            row[name], row[f"{name}.std"] = _mean_std(part[name])
        rows.append(row)
    extra = [c for c, needed in (("status", any(r["status"] != "completed" for r in rows)), ("scored_on", scored))
             if needed]
    return pd.DataFrame(rows, columns=[*keys, "n", *extra, *(c for m in names for c in (m, f"{m}.std"))])


def _statuses(part: pd.DataFrame) -> str:
    """"completed", or the count of each status ("2 completed, 1 failed") when they differ."""
    if "status" not in part.columns:
        return "unknown"
    counts = part["status"].fillna("unknown").value_counts()
    if list(counts.index) == ["completed"]:
        return "completed"
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def _scored_on(part: pd.DataFrame, columns: list[str]) -> str:
    """The `scored_on` hashes that differ between rows, e.g. "data 1a2b3c4d, teacher 9f8e7d6c"."""
    return "; ".join(f"{c.split('.')[1]} " + ",".join(sorted({str(_cell(v))[:8] for v in part[c]})) for c in columns)


def _refuse_mixed(part: pd.DataFrame, setting: dict[str, Any], columns: list[str]) -> None:
    for column in columns:
        values = {_cell(v) for v in part[column]}
        if len(values) > 1:
            label = ", ".join(f"{k.removeprefix(CONFIG)}={v}" for k, v in setting.items()) or "all runs"
            runs = ", ".join(Path(r).name for r in part["run"])
            raise WorkbenchError(f"the runs of one row ({label}: {runs}) were scored on different {_WHAT[column]}; "
                                 "their mean would mix incomparable numbers. Compare them with --per-run, or "
                                 "pass --mixed to average anyway")


def _mean_std(values: pd.Series) -> tuple[Any, float]:
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().sum() == values.notna().sum():  # numeric (or all missing)
        present = numbers.dropna()
        return (present.mean() if len(present) else math.nan,
                present.std(ddof=1) if len(present) > 1 else math.nan)
    return ", ".join(sorted({str(v) for v in values.dropna()})), math.nan


def _is_accuracy(metric: str) -> bool:
    """`student.acc`, `student.acc/color`, `stages.sft.student.acc`: shown to 3 decimals."""
    return any(part.startswith("acc") for part in re.split(r"[./]", metric))


def _decimals(mean: float, std: float, accuracy: bool) -> int:
    """3 for accuracies, none for whole numbers, else 4 significant digits (at most 3 decimals above 0.1)."""
    if accuracy or not mean:
        return 3
    if float(mean).is_integer() and (math.isnan(std) or float(std).is_integer()):
        return 0
    digits = max(0, 3 - math.floor(math.log10(abs(mean))))
    return min(digits, 3) if abs(mean) >= 0.1 else digits


def compare(df: pd.DataFrame, by: list[str] | None = None, metrics: list[str] | None = None,
            group_seeds: bool = True, mixed: bool = False) -> pd.DataFrame:
    """The ablation table: the settings that differ, then metrics as `mean ± std` over seeds.

    Args:
        df: runs from `load_runs`.
        by: config keys to show (with or without `config.`); default: those that differ.
        metrics: summary keys; default: overall accuracies and `wall_time_s`.
        group_seeds: fold runs that differ only by seed into one row with `n` = their count.
        mixed: see `aggregate`.

    Returns:
        One row per setting: key columns with their values, `n`, `status` and `scored_on`
        (see `aggregate`), and one text column per
        metric (`"0.512 ± 0.013"`; accuracies to 3 decimals; no `±` for a single run;
        None where no run of the row has the metric).
    """
    agg = aggregate(df, by, metrics, group_seeds, mixed)
    names = [c for c in agg.columns if f"{c}.std" in agg.columns]
    table = agg.drop(columns=[f"{m}.std" for m in names])
    for name in names:
        table[name] = [_format_cell(mean, std, _is_accuracy(name)) for mean, std in zip(agg[name], agg[f"{name}.std"])]
    return table


def _format_cell(mean: Any, std: float, accuracy: bool) -> str | None:
    if isinstance(mean, str):
        return mean
    if mean is None or math.isnan(mean):
        return None
    d = _decimals(mean, std, accuracy)
    return f"{mean:.{d}f}" if math.isnan(std) else f"{mean:.{d}f} ± {std:.{d}f}"


def run_labels(df: pd.DataFrame, keys: list[str] | None = None) -> list[str]:
    """Short legend labels: `optim.lr=0.001, seed=1` from the varying keys (and seed, if it varies)."""
    if keys is None:
        keys = varying_keys(df)
        if _SEED in df.columns and df[_SEED].nunique() > 1:
            keys = [*keys, _SEED]
    if not keys:
        return [Path(r).name for r in df["run"]] if "run" in df.columns else ["all"] * len(df)
    return [", ".join(f"{k.removeprefix(CONFIG)}={_cell(row[k])}" for k in keys) for _, row in df.iterrows()]


# ---------------------------------------------------------------- rendering and the CLI


def _text(value: Any, missing: str) -> str:
    value = _cell(value)
    return missing if value is None else str(value)


def format_table(df: pd.DataFrame, fmt: str = "md") -> str:
    """Render a table as GitHub markdown (`md`), `csv` or `json` (a list of records)."""
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        records = [{k: _cell(v) for k, v in row.items()} for row in df.to_dict(orient="records")]
        return json.dumps(records, indent=2, default=str)
    if fmt != "md":
        raise WorkbenchError(f"unknown table format '{fmt}'; choose one of {', '.join(FORMATS)}")
    cells = [[_text(v, "-").replace("|", "\\|") for v in row] for row in df.itertuples(index=False)]
    header = [str(c).replace("|", "\\|") for c in df.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def compare_command(paths: list[str], by: list[str] | None = None, metrics: list[str] | None = None,
                    fmt: str = "md", group_seeds: bool = True, mixed: bool = False) -> str:
    """What `workbench compare` prints: load, compare, render."""
    table = compare(load_runs(*paths), by=by, metrics=metrics, group_seeds=group_seeds, mixed=mixed)
    return format_table(table, fmt)
