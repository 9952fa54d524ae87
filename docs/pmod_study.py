"""The wind-tunnel token-reduction study of docs/benchmarks.md ("p-MoD at <= 0.56 FLOPs"), from
one `workbench bench tokens --json` file per seed.

    workbench bench tokens RUN/stages/teacher --mod RUN/stages/pmod_ce --mod RUN/stages/pmod_kd \
        --mod GMOD_RUN/stages/gmod_kd --reduce attention_prune:layer=0,keep=0.4714,queries=last_token \
        --reduce random_prune:layer=0,keep=0.4714 --reduce framefusion:cost=0.5375 --json tokens<seed>.json
    python docs/pmod_study.py tokens0.json tokens1.json tokens2.json --plot docs/pmod_study.png

Prints, per variant, held-out answer accuracy (mean ± std over the files, then per file), the
answer-token KL to the dense model and the FLOPs and KV proxies averaged over the held-out split;
`--plot` draws, per variant and paired with each seed's dense model, the accuracy difference
and the KL to dense.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def fail(message: str) -> None:
    """A short error and exit code 2, as the workbench CLI does for bad input."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load(paths: list[Path]) -> dict[str, list[dict]]:
    """variant -> its row from each file, in file order; every file must list the same variants."""
    by_variant: dict[str, list[dict]] = {}
    names = None
    for path in paths:
        try:
            rows = json.loads(path.read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            fail(f"{path}: not a `workbench bench tokens --json` file ({type(e).__name__}: {e})")
        these = [r["variant"] for r in rows]
        if names is not None and these != names:
            fail(f"{path} lists variants {these}, the first file {names}")
        names = these
        for r in rows:
            by_variant.setdefault(r["variant"], []).append(r)
    return by_variant


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(by_variant: dict[str, list[dict]]) -> str:
    lines = ["| variant | acc (mean ± std) | per seed | KL to dense | FLOPs proxy | KV proxy |",
             "|---|---|---|---|---|---|"]
    for name, rows in by_variant.items():
        acc, sd = mean_std([r["acc"] for r in rows])
        seeds = " / ".join(f"{r['acc']:.3f}" for r in rows)
        kl = statistics.fmean(r["kl"] for r in rows)
        flops = statistics.fmean(r["flops_ratio"] for r in rows)
        kv = statistics.fmean(r["kv_ratio"] for r in rows)
        lines.append(f"| {name} | {acc:.3f} ± {sd:.3f} | {seeds} | {kl:.4f} | {flops:.3f} | {kv:.3f} |")
    return "\n".join(lines)


def plot(by_variant: dict[str, list[dict]], out: Path) -> None:
    """Per variant, paired with the dense model of the same seed: accuracy minus dense accuracy
    (left) and answer-token KL to dense (right); a dot per seed, a bar for the mean. The seeds'
    own spread (their dense models differ by several points) would hide the differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = [r["acc"] for r in by_variant["dense"]]
    names = [n for n in by_variant if n != "dense"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, name in enumerate(names):
        rows = by_variant[name]
        deltas = [100 * (r["acc"] - d) for r, d in zip(rows, dense)]
        kls = [r["kl"] for r in rows]
        for ax, values in ((left, deltas), (right, kls)):
            ax.bar(i, statistics.fmean(values), color=f"C{i}", alpha=0.5)
            ax.plot([i] * len(values), values, "o", color=f"C{i}")
    flops = [statistics.fmean(r["flops_ratio"] for r in by_variant[n]) for n in names]
    labels = [f"{n.split(',queries')[0]}\nFLOPs {f:.3f}" for n, f in zip(names, flops)]
    for ax in (left, right):
        ax.set_xticks(range(len(names)), labels, rotation=30, ha="right", fontsize=7)
    left.axhline(0, color="k", lw=0.8)
    left.set_ylabel("accuracy minus the dense model's (points)")
    right.set_ylabel("answer-token KL to the dense model")
    fig.suptitle(f"fewer image tokens at one budget, {len(dense)} seeds (dots: seeds, bars: mean)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="`bench tokens --json` files, one per seed")
    parser.add_argument("--plot", type=Path, help="accuracy difference and KL to the dense model, per seed")
    args = parser.parse_args(argv)
    by_variant = load(args.files)
    print(table(by_variant))
    if args.plot:
        plot(by_variant, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
