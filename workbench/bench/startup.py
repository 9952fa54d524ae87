"""`workbench bench first-step`: how long `workbench run` takes to reach its first training
step on a large LLaVA JSON.

The data set is the wind tunnel's training records repeated (new ids) until there are
`--records` of them, all pointing at `--images` distinct image files, as SFT mixes reuse
COCO images across many conversations. The run is a real `workbench run` in a fresh process
(the wind-tunnel teacher recipe, one step); the time is what its summary records as
`throughput.time_to_first_step_s`, measured from the process's start.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_S = 60.0
RECIPE = "experiments/windtunnel/teacher.yaml"


def write_big_llava(out: Path, records: int, images: int, seed: int = 0) -> tuple[Path, Path]:
    """(train JSON of `records` records over `images` image files, the world folder)."""
    from workbench.data.windtunnel import write_windtunnel

    world = write_windtunnel(out / "world", n_train=images, n_val=64, seed=seed)
    base = json.loads((world / "train.json").read_text())
    big = [{**base[i % len(base)], "id": f"r{i}"} for i in range(records)]
    path = world / f"train-{records}.json"
    path.write_text(json.dumps(big))
    return path, world


def bench_first_step(records: int = 200_000, images: int = 3000, overrides: list[str] = ()) -> dict[str, Any]:
    from workbench.bench import machine

    with tempfile.TemporaryDirectory(prefix="bench-first-step-") as tmp:
        tmp = Path(tmp)
        train, world = write_big_llava(tmp, records, images)
        args = [sys.executable, "-m", "workbench.cli", "run", RECIPE, "data.type=llava", f"data.train={train}",
                f"data.val={world / 'val.json'}", f"student.processor={world / 'processor'}", f"out_root={tmp / 'runs'}",
                "trainer.max_steps=1", "trainer.val_every_n_steps=1", "trainer.progress_bar=false", *overrides]
        start = time.time()
        done = subprocess.run(args, capture_output=True, text=True)
        wall = time.time() - start
        if done.returncode != 0:
            raise RuntimeError(f"workbench run failed ({done.returncode}):\n{done.stderr[-2000:]}")
        summary = json.loads((tmp / "runs" / "windtunnel-teacher" / "latest" / "summary.json").read_text())
        size = train.stat().st_size
    return {"records": records, "images": images, "json_mib": round(size / 2**20, 1),
            "time_to_first_step_s": summary["throughput"]["time_to_first_step_s"], "run_wall_s": round(wall, 2),
            "target_s": TARGET_S, "overrides": list(overrides), "machine": machine()}


def bench_first_step_command(records: int, images: int, overrides: list[str], json_out: str | None) -> None:
    result = bench_first_step(records, images, overrides)
    ok = result["time_to_first_step_s"] <= TARGET_S
    print(f"{result['records']:,} records over {result['images']:,} images ({result['json_mib']} MiB of JSON): "
          f"first training step {result['time_to_first_step_s']:.1f} s after `workbench run` started "
          f"(target <= {TARGET_S:.0f} s): {'PASS' if ok else 'FAIL'}; whole run {result['run_wall_s']:.1f} s")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
