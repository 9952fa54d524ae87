"""The wind-tunnel BitCPM4 study of docs/benchmarks.md ("Ternary students"), from a finished sweep.

    workbench run experiments/windtunnel/bitcpm4.yaml --sweep seed=0,1,2
    python docs/ternary_study.py runs/windtunnel-bitcpm4/sweep-<hash>

Prints held-out answer accuracy per stage (mean ± std over the seeds that finished) and the
storage of the ternary student's BitLinear weights: 2-bit codes packed four to a byte plus one
scale per group (fp32 as trained, or bf16), against the same weights in bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def ternary_bytes(folder: Path) -> dict[str, float]:
    """Packed and bf16 bytes of every BitLinear weight of the student in `folder`."""
    import math

    import students
    from students.bitlinear import BitLinear

    model = students.load(folder)
    n = packed = scales = 0
    for layer in model.modules():
        if isinstance(layer, BitLinear):
            numel = layer.weight.numel()
            n += numel
            packed += math.ceil(numel / 4)
            scales += 1 if layer.group is None else numel // layer.group
    return {"weights": n, "bf16_bytes": 2 * n, "packed_fp32_scales": packed + 4 * scales,
            "packed_bf16_scales": packed + 2 * scales}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path)
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
    print(f"| stage | held-out answer accuracy ({len(runs)} seeds) |\n|---|---|")
    for model, values in accs.items():
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        print(f"| {model} | {statistics.mean(values):.3f}{spread} |")
    size = ternary_bytes(runs[0] / "stages" / "qat" / "student")
    print(f"\nternary layers: {size['weights']:,} weights; bf16 {size['bf16_bytes']:,} B; packed with fp32 scales "
          f"{size['packed_fp32_scales']:,} B ({size['bf16_bytes'] / size['packed_fp32_scales']:.2f}x smaller), "
          f"with bf16 scales {size['packed_bf16_scales']:,} B ({size['bf16_bytes'] / size['packed_bf16_scales']:.2f}x)")
    (args.sweep / "ternary_study.json").write_text(json.dumps({"seeds": [r.name for r in runs], "acc": accs,
                                                               "bytes": size}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
