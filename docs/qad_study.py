"""The wind-tunnel QAD study of docs/benchmarks.md ("Quantized students"), from a finished sweep.

    workbench run experiments/windtunnel/qad.yaml --sweep seed=0,1,2
    python docs/qad_study.py runs/windtunnel-qad/sweep-<hash> [--group-size 32]

Per seed it converts the three stages to int4 (torchao weight-only, the `int4` preset: LLM and
vision tower, groups of --group-size): `fp` and `fp_more` by post-training quantization, `qad` with
the request it trained under; scores every model on the run's held-out split; and, on `fp`,
quantizes one part at a time (BlueLM-V-3B's rule: the vision side tolerates 8 bits, the LLM is
the sensitive part). Prints markdown tables (mean ± std over seeds) and writes qad_study.json
into the sweep folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# one part at a time: (name, compress options)
PARTS = [
    ("vision+projector int8", dict(method="int8", scopes=["vision", "connector"])),
    ("vision+projector int4", dict(method="int4", scopes=["vision", "connector"])),
    ("LLM int8", dict(method="int8", scopes=["llm"])),
    ("LLM int4", dict(method="int4", scopes=["llm"])),
    ("bluelm_mixed", dict(preset="bluelm_mixed")),
    ("nf4", dict(preset="nf4")),
    ("int8", dict(preset="int8")),
]


def seed_rows(run: Path, group_size: int) -> dict[str, dict[str, float]]:
    """{model: {"acc", "kl", "agreement"}}: held-out accuracy, and KL(fp || model) and argmax
    agreement with fp (the QAD teacher) on the held-out answer tokens."""
    from workbench.bench.compress import quality
    from workbench.compress import compress
    from workbench.config import load_config
    from workbench.evaluation import held_out_from_config, load_model

    held_out = held_out_from_config(load_config(run / "config.yaml"))
    stages, out = run / "stages", run / "compressed"
    fp = load_model(stages / "fp" / "student")

    def score(folder: Path) -> dict[str, float]:
        q = quality(fp, load_model(folder), held_out.loader(128))
        return {"acc": q["acc"], "kl": q["kl"], "agreement": q["agreement"]}

    rows = {name: score(stages / name / "student") for name in ("fp", "fp_more", "qad")}
    for name, source, options in (("ptq", "fp", dict(preset="int4", group_size=group_size)),
                                  ("ptq_more", "fp_more", dict(preset="int4", group_size=group_size)),
                                  ("qad_int4", "qad", {})):
        compress(stages / source / "student", out / name, force=True, **options)
        rows[name] = score(out / name)
    for name, options in PARTS:
        folder = out / name.replace(" ", "_").replace("+", "_")
        compress(stages / "fp" / "student", folder, force=True, **options)
        rows[f"fp {name}"] = score(folder)
    return rows


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path, help="the sweep folder of experiments/windtunnel/qad.yaml")
    p.add_argument("--group-size", type=int, default=32)
    args = p.parse_args(argv)
    runs = sorted(d for d in args.sweep.iterdir() if not d.is_symlink() and (d / "summary.json").is_file())
    if not runs:
        raise SystemExit(f"{args.sweep} holds no finished run")
    per_seed = {run.name: seed_rows(run, args.group_size) for run in runs}
    names = list(next(iter(per_seed.values())))
    print(f"| model ({len(runs)} seeds) | held-out answer accuracy | KL(fp ‖ model) × 1e3 | argmax agreement with fp |")
    print("|---|---|---|---|")
    for name in names:
        cells = [mean_std([rows[name][k] * (1e3 if k == "kl" else 1) for rows in per_seed.values()])
                 for k in ("acc", "kl", "agreement")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    lost = [r["fp_more"]["acc"] - r["ptq_more"]["acc"] for r in per_seed.values()]
    gained = [r["qad_int4"]["acc"] - r["ptq_more"]["acc"] for r in per_seed.values()]
    kl_cut = [1 - r["qad_int4"]["kl"] / r["ptq"]["kl"] for r in per_seed.values()]
    print(f"\nint4 PTQ accuracy loss at equal steps (fp_more - ptq_more): {mean_std(lost)}; QAD's accuracy over "
          f"it (qad_int4 - ptq_more): {mean_std(gained)}; QAD's KL to fp below PTQ's: {mean_std(kl_cut)}")
    (args.sweep / "qad_study.json").write_text(json.dumps({"group_size": args.group_size, "seeds": per_seed}, indent=2))
    print(f"written to {args.sweep / 'qad_study.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
