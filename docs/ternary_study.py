"""The wind-tunnel ternary studies of docs/benchmarks.md ("Ternary students"), from a finished sweep.

    workbench run experiments/windtunnel/bitcpm4.yaml --sweep seed=0,1,2
    python docs/ternary_study.py runs/windtunnel-bitcpm4/sweep-<hash> --plot docs/ternary_study.png
    workbench run experiments/windtunnel/mmfree.yaml --sweep seed=0,1,2
    python docs/ternary_study.py runs/windtunnel-mmfree/sweep-<hash> --packed mmfree --plot docs/mmfree_study.png

Prints held-out answer accuracy per stage (mean ± std over the seeds that finished) and the
packed size of the ternary student (`workbench compress` of the `--packed` stage, default kd:
2-bit codes four to a byte plus fp32 scales) against its ternary weights in bf16; `--plot` draws the training CE of
every stage against the steps since the run started from scratch (a stage continuing another
starts where that one ended), mean over the seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml


def packed_size(folder: Path) -> dict[str, float]:
    """The `workbench compress` report's bytes for the ternary student in `folder`."""
    from workbench.compress import compress

    with tempfile.TemporaryDirectory() as tmp:
        report = compress(folder, Path(tmp) / "packed")
    b = report["bytes"]
    return {"bf16_bytes": b["linear_bf16"], "packed_bytes": b["linear_quantized"], "ratio": b["linear_bf16_ratio"],
            "weight_scale": report["request"]["weight_scale"], "layers": report["layers"]["ternary"]}


def stage_offsets(run: Path) -> dict[str, tuple[int, int]]:
    """stage -> (first step counted from scratch, steps): a stage started from `stage:X` begins
    where X ended."""
    spans: dict[str, tuple[int, int]] = {}
    for stage in sorted((run / "stages").iterdir(), key=lambda d: (d / "summary.json").stat().st_mtime):
        cfg = yaml.safe_load((stage / "config.yaml").read_text())
        source = (cfg.get("student") or {}).get("path") or ""
        parent = source.removeprefix("stage:") if source.startswith("stage:") else Path(source).parent.name
        start = sum(spans[parent]) if parent in spans else 0
        spans[stage.name] = (start, int(cfg["trainer"]["max_steps"]))
    return spans


def curves(runs: list[Path]) -> dict[str, list[tuple[int, float]]]:
    """stage -> [(step from scratch, mean train CE over the seeds)]."""
    by_stage: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        for stage, (start, _) in stage_offsets(run).items():
            with open(run / "stages" / stage / "metrics.csv") as f:
                for row in csv.DictReader(f):
                    if row.get("train/ce"):
                        by_stage.setdefault(stage, {}).setdefault(start + int(row["step"]), []).append(
                            float(row["train/ce"]))
    return {s: sorted((k, statistics.mean(v)) for k, v in points.items()) for s, points in by_stage.items()}


def plot(data: dict[str, list[tuple[int, float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for stage, points in data.items():
        steps, values = zip(*points)
        smooth = [statistics.mean(values[max(0, i - 4):i + 1]) for i in range(len(values))]
        ax.plot(steps, smooth, label=stage)
    ax.set_xlabel("training steps since the start from scratch")
    ax.set_ylabel("train CE (mean of seeds, 5-point running mean)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path)
    p.add_argument("--plot", type=Path, help="write the loss curves here")
    p.add_argument("--packed", default="kd", help="the stage whose ternary student is packed (default kd)")
    args = p.parse_args(argv)
    runs = sorted(d for d in args.sweep.iterdir()
                  if not d.is_symlink() and (d / "summary.json").is_file()
                  and json.loads((d / "summary.json").read_text()).get("status") == "completed")
    if not runs:
        raise SystemExit(f"{args.sweep} holds no completed run")
    accs: dict[str, list[float]] = {}
    for run in runs:
        for row in json.loads((run / "summary.json").read_text())["results"]:
            accs.setdefault(row["model"], []).append(row["acc"])
    print(f"| stage | held-out answer accuracy ({len(runs)} seeds: {', '.join(r.name for r in runs)}) |\n|---|---|")
    for model, values in accs.items():
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        print(f"| {model} | {statistics.mean(values):.3f}{spread} |")
    size = packed_size(runs[0] / "stages" / args.packed / "student")
    print(f"\nternary layers ({size['layers']}, {size['weight_scale']} scales): bf16 {size['bf16_bytes']:,} B; packed "
          f"{size['packed_bytes']:,} B ({size['ratio']:.2f}x smaller)")
    if args.plot:
        plot(curves(runs), args.plot)
        print(f"plot written to {args.plot}")
    (args.sweep / "study.json").write_text(json.dumps({"seeds": [r.name for r in runs], "acc": accs,
                                                               "bytes": size}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
