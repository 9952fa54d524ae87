"""`workbench compare --plot OUT.png`: the pictures an ablation notebook would otherwise draw.

Left: held-out accuracy against training step, one line per row of the comparison (the mean
over its seeds, a band for their spread). Right, when the rows differ in student size:
final accuracy against parameters (or against `--x`, any numeric summary key such as a
measured latency), with the Pareto front — the best accuracy at each size or below — drawn
through the points. Multi-stage runs are drawn by their last stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from workbench.errors import WorkbenchError
from workbench.results import aggregate, metrics, run_labels, varying_keys

VAL_ACC = "val/acc"


def _last_stage(row: pd.Series) -> str | None:
    stages = [c.split(".")[1] for c in row.index if c.startswith("stages.") and c.endswith(".status")
              and pd.notna(row[c])]
    return stages[-1] if stages else None


def _value(row: pd.Series, key: str) -> Any:
    """A summary key of the run, or of its last stage for a multi-stage run."""
    stage = _last_stage(row)
    for column in ([f"stages.{stage}.{key}"] if stage else []) + [key]:
        if column in row.index and pd.notna(row[column]):
            return row[column]
    return None


def _curve(row: pd.Series) -> pd.Series | None:
    """Validation accuracy by step of one run (its last stage's), or None without any."""
    try:
        frame = metrics(row)
    except WorkbenchError:
        return None
    if "stage" in frame.columns:
        frame = frame[frame["stage"] == frame["stage"].iloc[-1]]
    if VAL_ACC not in frame.columns:
        return None
    points = frame.dropna(subset=[VAL_ACC])
    return pd.Series(points[VAL_ACC].to_numpy(), index=points["step"].to_numpy())


def _groups(df: pd.DataFrame, by: list[str] | None) -> list[tuple[str, pd.DataFrame]]:
    keys = [f"config.{k}" if not k.startswith("config.") else k for k in by] if by else varying_keys(df)
    if not keys:
        return [("all runs", df)]
    labels = run_labels(df, keys)
    return [(label, df[[lab == label for lab in labels]]) for label in dict.fromkeys(labels)]


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no smaller point beats: increasing size, strictly increasing accuracy."""
    front, best = [], float("-inf")
    for x, y in sorted(points):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot_compare(df: pd.DataFrame, out: str | Path, by: list[str] | None = None, x: str = "params.student",
                 mixed: bool = False) -> dict[str, Any]:
    """Draw the comparison of `df` (from `load_runs`) to `out`; returns what was drawn.

    Raises:
        WorkbenchError: no run logged a validation accuracy, or `x` is not a summary key.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aggregate(df, by, metrics=None, mixed=mixed)  # the same refusals as the table
    groups = _groups(df, by)
    curves = {label: [c for c in (_curve(r) for _, r in part.iterrows()) if c is not None] for label, part in groups}
    if not any(curves.values()):
        raise WorkbenchError("no run logged a validation accuracy (val/acc in metrics.csv): nothing to plot")
    sizes = {label: [_value(r, x) for _, r in part.iterrows()] for label, part in groups}
    finals = {label: [_value(r, "student.acc") for _, r in part.iterrows()] for label, part in groups}
    if all(v is None for vs in sizes.values() for v in vs) and x != "params.student":
        raise WorkbenchError(f"no run's summary has '{x}'")
    differ = len({v for vs in sizes.values() for v in vs if v is not None}) > 1
    fig, axes = plt.subplots(1, 2 if differ else 1, figsize=(11 if differ else 6, 4), squeeze=False)
    _draw_curves(axes[0][0], curves)
    drawn: dict[str, Any] = {"curves": {k: len(v) for k, v in curves.items()}}
    if differ:
        drawn["points"] = _draw_size(axes[0][1], sizes, finals, x)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return drawn


def _draw_curves(ax, curves: dict[str, list[pd.Series]]) -> None:
    for label, runs in curves.items():
        if not runs:
            continue
        table = pd.concat(runs, axis=1).sort_index()
        mean, std = table.mean(axis=1), table.std(axis=1)
        line, = ax.plot(mean.index, mean.to_numpy(), marker="o", markersize=3, label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(mean.index, (mean - std).to_numpy(), (mean + std).to_numpy(), alpha=0.2,
                            color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=7)


def _draw_size(ax, sizes: dict[str, list], finals: dict[str, list], x: str) -> list[tuple[str, float, float]]:
    points = []
    for label in sizes:
        pairs = [(s, a) for s, a in zip(sizes[label], finals[label]) if s is not None and a is not None]
        if not pairs:
            continue
        xs, ys = zip(*pairs)
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        err = pd.Series(ys).std() if len(ys) > 1 else 0.0
        ax.errorbar([mean_x], [mean_y], yerr=[err], marker="o", capsize=3, label=label)
        points.append((label, mean_x, mean_y))
    front = _pareto([(px, py) for _, px, py in points])
    if len(front) > 1:
        ax.plot(*zip(*front), linestyle="--", color="grey", label="Pareto front")
    ax.set_xscale("log" if x.startswith("params") else "linear")
    ax.set_xlabel("parameters" if x == "params.student" else x)
    ax.set_ylabel("final held-out accuracy")
    ax.legend(fontsize=7)
    return points
