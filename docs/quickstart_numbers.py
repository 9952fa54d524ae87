"""The README's quickstart numbers, regenerated from a run with the versions it ran with.

    python docs/quickstart_numbers.py                 # runs the quickstart, prints the block
    python docs/quickstart_numbers.py RUN_DIR --write  # from a finished quickstart run, into README.md

The block between the `quickstart-numbers` markers in README.md is the run's results table
(answer accuracy per model and question type), the KD - CE gap, and what it ran on: the
packages of the run's env.json, the CPU threads, the date and the wall time of the command.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- quickstart-numbers:begin -->", "<!-- quickstart-numbers:end -->"
PACKAGES = ("torch", "transformers", "pytorch-lightning", "timm", "tokenizers")


def render(run: Path) -> str:
    """The README block for a completed quickstart run directory."""
    from workbench.stages import results_markdown

    summary = json.loads((run / "summary.json").read_text())
    if summary.get("status") != "completed":
        raise SystemExit(f"{run} did not complete (status {summary.get('status')})")
    env = json.loads((run / "env.json").read_text())
    rows = summary["results"]
    table = results_markdown("", rows).split("\n", 2)[2].rstrip()
    acc = {r["model"]: r["acc"] for r in rows}
    versions = ", ".join(f"{name} {env['packages'].get(name)}" for name in PACKAGES if env["packages"].get(name))
    stamp = summary["run_id"][:8]
    date = f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}" if stamp.isdigit() else "unknown date"
    minutes, seconds = divmod(round(summary["wall_time_s"]), 60)
    lines = [
        table, "",
        f"KD − CE: **{acc['kd'] - acc['ce']:+.3f}** answer accuracy; teacher − KD: {acc['teacher'] - acc['kd']:+.3f}.",
        f"Measured {date} with {versions} (python {env['python']}, {env['cpu_threads']} CPU threads, commit "
        f"{(env.get('git_commit') or 'unknown')[:8]}): {minutes} min {seconds:02d} s for the run. "
        f"Regenerate with `python docs/quickstart_numbers.py runs/windtunnel-quickstart/latest --write`.",
    ]
    return "\n".join(lines)


def write(readme: Path, block: str) -> None:
    text = readme.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} block")
    readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{block}\n{END}", text))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="a finished quickstart run directory (default: run the quickstart now)")
    p.add_argument("--write", action="store_true", help="replace the block in README.md")
    p.add_argument("--readme", default=str(REPO / "README.md"))
    args = p.parse_args(argv)
    run = Path(args.run) if args.run else None
    if run is None:
        subprocess.run([sys.executable, "-m", "workbench.cli", "run", "experiments/windtunnel/quickstart.yaml"],
                       cwd=REPO, check=True)
        run = REPO / "runs" / "windtunnel-quickstart" / "latest"
    block = render(run)
    print(block)
    if args.write:
        write(Path(args.readme), block)


if __name__ == "__main__":
    main()
