"""Curves and table of the encoder-free study (docs/benchmarks.md): EVE and BREEN students with
and without vision-feature supervision and the encoder-based reference, on the wind tunnel,
three stages of 150 steps each, mean +- std over seeds. After the runs
(docs/benchmarks.md lists the commands):
    python docs/encoder_free_study.py docs/encoder_free_study.png
"""
import glob
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from workbench.results import metrics

STAGES = ("pre_align", "pretrain", "sft")
VARIANTS = {  # label -> (run glob, colour)
    "EVE + alignment": ("runs/windtunnel-eve/sweep-*/vars.align=1.0,seed=*", "C0"),
    "EVE, no alignment": ("runs/windtunnel-eve/sweep-*/vars.align=0.0,seed=*", "C1"),
    "EVE + alignment to CLIP's last layer": ("runs/windtunnel-eve/sweep-*/teacher.layer=-1,seed=*", "C4"),
    "BREEN + queries": ("runs/windtunnel-breen/sweep-*/vars.query=1.0,seed=*", "C2"),
    "BREEN, no query loss": ("runs/windtunnel-breen/sweep-*/vars.query=0.0,seed=*", "C3"),
    "encoder-based (LLaVA)": ("runs/windtunnel-encoder-based/sweep-*/seed=*", "C7"),
}


def run_curves(run: str) -> pd.DataFrame:
    """The run's stages one after the other, on one step axis."""
    frames, offset = [], 0
    for stage in STAGES:
        df = metrics(run, stage=stage)
        df["step"] = df["step"] + offset + 1
        df["stage"] = stage
        offset = int(df["step"].max())
        frames.append(df)
    return pd.concat(frames)


frames = []
for label, (pattern, _) in VARIANTS.items():
    for run in sorted(glob.glob(pattern)):
        df = run_curves(run)
        df["variant"], df["run"] = label, run
        frames.append(df)
df = pd.concat(frames)
columns = ("train/ce", "val/acc", "train/align", "train/query")
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
for label, (_, color) in VARIANTS.items():
    d = df[df.variant == label]
    for ax, col in zip(axes, ("train/ce", "val/acc")):
        rows = d.dropna(subset=[col])
        per_step = rows.groupby("step")[col].agg(["mean", "std", "count"])
        if col == "train/ce":  # smooth the per-batch loss over 5 logged points
            per_step = per_step.rolling(5, min_periods=1).mean()
        ax.plot(per_step.index, per_step["mean"], color=color, label=f"{label} (n={int(per_step['count'].max())})")
        ax.fill_between(per_step.index, per_step["mean"] - per_step["std"].fillna(0),
                        per_step["mean"] + per_step["std"].fillna(0), color=color, alpha=0.15)
        ax.set_title(col)
    for col, style in (("train/align", "-"), ("train/query", "--")):
        rows = d.dropna(subset=[col]) if col in d else d.iloc[:0]
        if len(rows):
            per_step = rows.groupby("step")[col].mean().rolling(5, min_periods=1).mean()
            axes[2].plot(per_step.index, per_step.values, style, color=color, label=f"{label}: {col}")
axes[2].set_title("vision-feature loss (1 - cos)")
for ax in axes:
    ax.set_xlabel("step (pre_align | pretrain | sft)")
    for x in (150, 300):
        ax.axvline(x, color="grey", lw=0.5)
axes[0].set_yscale("log")
axes[1].legend(fontsize=7)
axes[2].legend(fontsize=7)
fig.tight_layout()
fig.savefig(sys.argv[1], dpi=110)
acc = df.dropna(subset=["val/acc"]).groupby(["variant", "step"])["val/acc"].agg(["mean", "std", "count"])
print(acc.round(3).to_string())
