"""The run directory: the one module that knows where a run's files live.

`<out_root>/<name>/<run-id>/` holds config.yaml (resolved), env.json, metrics.csv (per step),
checkpoints/ (`last.ckpt` and periodic ones), student/ (the exported model) and summary.json
(status, scores, notes). A multi-stage run holds one such directory per stage under
`stages/<name>/` plus a results table in results.md. `<out_root>/<name>/latest` links to the
newest completed run. A run directory is created exclusively and never reused, except by
`resume`. Writers and readers (results, extract, sweeps, benchmarks, the CLI) all go through
`RunDir`; JSON is written atomically (temporary file + rename).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

CONFIG, SUMMARY, ENV, METRICS, RESULTS = "config.yaml", "summary.json", "env.json", "metrics.csv", "results.md"
STUDENT, CHECKPOINTS, STAGES, LATEST = "student", "checkpoints", "stages", "latest"
LAUNCH_FILE = ".launch"  # in a run directory made under torchrun / SLURM: the job it belongs to
RUN_DIR_ENV = "WB_RUN_DIR"  # set while fitting: DDP worker processes re-run the CLI and open this directory


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as JSON to `path` atomically (a reader sees the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def launcher_rank() -> int | None:
    """The global rank an external launcher gave this process (torchrun: RANK; SLURM srun:
    SLURM_PROCID), or None when Lightning starts the other processes itself."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit() and os.environ.get("WORLD_SIZE" if key == "RANK" else "SLURM_NTASKS"):
            return int(os.environ[key])
    return None


def launcher_job_id() -> str | None:
    """What every rank of one torchrun / SLURM launch shares: the job's id."""
    for key in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(key)
        if value and value != "none":
            return value
    return None


def is_worker_process() -> bool:
    """True in every process but rank 0: the extra processes Lightning's DDP launcher starts
    (they re-run the CLI), or ranks > 0 of a torchrun / SLURM launch."""
    rank = launcher_rank()
    if rank is not None:
        return rank != 0
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


@dataclass(frozen=True)
class RunDir:
    """A run's (or a stage's) directory and the files in it."""

    path: Path

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def student(self) -> Path:
        return self.path / STUDENT

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def results(self) -> Path:
        return self.path / RESULTS

    def stage(self, name: str) -> RunDir:
        return RunDir(self.path / STAGES / name)

    @property
    def whole_run(self) -> RunDir:
        """The run a stage directory belongs to (what `--resume` takes); itself otherwise."""
        return RunDir(self.path.parent.parent) if self.path.parent.name == STAGES else self

    def is_run(self) -> bool:
        """A run directory holds config.yaml and summary.json."""
        return self.config.is_file() and self.summary_path.is_file()

    def read_summary(self) -> dict[str, Any] | None:
        return read_json(self.summary_path)

    def status(self) -> str | None:
        return (self.read_summary() or {}).get("status")

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary_path, summary)

    def record(self, summary: dict[str, Any]) -> None:
        """Write how a run ended; a disk that is full or read-only must not hide the reason."""
        try:
            self.write_summary(summary)
        except OSError as e:
            print(f"[workbench] could not record status {summary['status']!r} in {self.summary_path} ({e}); "
                  f"reason: {summary.get('error')}", file=sys.stderr)

    def stage_names(self) -> list[str]:
        """Stage folders on disk: in the order the summary lists them, then any others."""
        on_disk = [p.name for p in children(self.path / STAGES)] if (self.path / STAGES).is_dir() else []
        listed = [s for s in (self.read_summary() or {}).get("stages", {}) if s in on_disk]
        return listed + [s for s in on_disk if s not in listed]

    def exported_student(self) -> Path | None:
        """The run's exported model: its own `student/`, or its last stage's that has one."""
        if (self.student / "config.json").is_file():
            return self.student
        for name in reversed(list((self.read_summary() or {}).get("stages", {}))):
            if (self.stage(name).student / "config.json").is_file():
                return self.stage(name).student
        return None

    def mark_latest(self) -> None:
        """Point `<out_root>/<name>/latest` at this completed run, so configs can name it."""
        link = self.path.parent / LATEST
        tmp = self.path.parent / f".{LATEST}-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(self.path.name, tmp)
        os.replace(tmp, link)


def children(folder: Path) -> list[Path]:
    """Sub-folders worth looking at: not `latest` (a link to a sibling) and not dot-folders."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name != LATEST and not p.name.startswith("."))


def run_dir_of_model(model_dir: Path) -> RunDir | None:
    """The run (or stage) directory a model folder was exported into, if it is one."""
    parent = RunDir(Path(model_dir).parent)
    return parent if Path(model_dir).name == STUDENT and parent.config.is_file() else None


def create(out_root: str | Path, name: str, config_text: str, run_id: str | None = None,
           path: Path | None = None) -> RunDir:
    """Create `<out_root>/<name>/<run-id>` (or `path`) exclusively; a chosen one that exists is an
    error, a generated one that another run took gets a `-2`, `-3`, ... suffix."""
    if is_worker_process() and os.environ.get(RUN_DIR_ENV):
        return RunDir(Path(os.environ[RUN_DIR_ENV]))
    rank = launcher_rank()
    if rank is not None:  # torchrun / srun start every rank: they agree on one directory by its name
        run_id = run_id or (f"job-{launcher_job_id()}" if launcher_job_id() else None)
        if path is None and run_id is None:
            raise WorkbenchError("under torchrun or SLURM every rank must name the same run directory: set run_id=...")
        path = path or Path(out_root) / name / run_id
        if rank != 0:
            return _opened_by_rank_0(path)
    chosen = path is not None or run_id is not None
    if path is None:
        digest = hashlib.sha256(config_text.encode()).hexdigest()[:6]
        path = Path(out_root) / name / (run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{digest}")
    if chosen and path.exists():
        raise WorkbenchError(f"run directory {path} already exists; choose another run_id (nothing was written)")
    base = path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for n in range(2, 10_000):
            try:
                path.mkdir()  # exclusive: of two identical runs started together, one gets `-2`
                break
            except FileExistsError:
                if chosen:
                    raise WorkbenchError(f"run directory {path} already exists; choose another run_id") from None
                path = base.with_name(f"{base.name}-{n}")
    except OSError as e:  # read-only, not a folder, no permission, disk full
        raise WorkbenchError(f"cannot create run directory {path} ({e.strerror or e}); check out_root") from None
    if rank is not None:
        (path / LAUNCH_FILE).write_text(launcher_job_id() or "")
    return RunDir(path)


def _opened_by_rank_0(path: Path, timeout_s: float = 600.0) -> RunDir:
    """Ranks > 0 of an external launch: the directory rank 0 creates for this launch."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        marker = path / LAUNCH_FILE
        if marker.is_file() and marker.read_text() == (launcher_job_id() or ""):
            return RunDir(path)
        time.sleep(0.2)
    raise WorkbenchError(f"rank 0 did not create run directory {path} within {timeout_s:.0f} s")


@contextlib.contextmanager
def handed_to_workers(run_dir: RunDir) -> Iterator[None]:
    """While fitting, DDP workers (started by rank 0's `Trainer.fit`, they re-run the CLI) find
    the whole run's directory in `WB_RUN_DIR`; the variable is restored afterwards."""
    before = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir.whole_run.path.resolve())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = before
