"""Loss and accuracy curves of the MaTVLM init study (docs/benchmarks.md), mean +- std over seeds:
    python docs/matvlm_init_study.py docs/matvlm_init_study.png
"""
import glob
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from workbench.results import metrics

runs = sorted(p for p in glob.glob("runs/windtunnel-matvlm/sweep-*/vars.init=*") if "latest" not in p)
frames = []
for run in runs:
    init = run.split("vars.init=")[1].split(",")[0]
    df = metrics(run, stage="matvlm")
    df["init"] = init
    df["run"] = run
    frames.append(df)
df = pd.concat(frames)
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for init, color in (("attention", "C0"), ("random", "C1")):
    d = df[df.init == init]
    for ax, col in zip(axes, ("train/loss", "val/loss", "val/acc")):
        rows = d.dropna(subset=[col])
        per_step = rows.groupby("step")[col].agg(["mean", "std", "count"])
        ax.plot(per_step.index, per_step["mean"], color=color, label=f"{init} (n={int(per_step['count'].max())})")
        ax.fill_between(per_step.index, per_step["mean"] - per_step["std"].fillna(0),
                        per_step["mean"] + per_step["std"].fillna(0), color=color, alpha=0.2)
        ax.set_title(col)
        ax.set_xlabel("step")
axes[0].set_yscale("log")
axes[2].legend()
fig.tight_layout()
fig.savefig(sys.argv[1], dpi=110)
summary = df.dropna(subset=["val/acc"]).groupby(["init", "step"])["val/acc"].agg(["mean", "std", "count"])
print(summary.to_string())
print(df.dropna(subset=["val/loss"]).groupby(["init", "step"])["val/loss"].agg(["mean", "std"]).to_string())
