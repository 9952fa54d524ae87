"""Run directories read back into a table: load_runs, compare, formats, CLI, metrics, notebook.

A real (tiny) sweep is trained once per module: 2 learning rates x 2 seeds of the wind-tunnel
teacher recipe, laid out as a sweep folder `<root>/runs/windtunnel-teacher/sweep-test/<label>/`.
"""

import io
import json
import re
import shutil
from pathlib import Path

import nbclient
import nbformat
import pandas as pd
import pytest
import yaml

import workbench
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.results import aggregate, compare, default_metrics, format_table, load_runs, metrics, varying_keys
from conftest import REPO

NOTEBOOK = REPO / "experiments" / "notebooks" / "ablations.ipynb"
LRS = (0.001, 0.003)
SEEDS = (0, 1)
TINY_MODEL = [
    "student.kwargs.vision_hidden=32", "student.kwargs.vision_layers=1", "student.kwargs.vision_heads=2",
    "student.kwargs.text_hidden=32", "student.kwargs.text_layers=2", "student.kwargs.text_heads=2",
]


def tiny(root, *extra):
    return [
        f"data.root={root}/data",
        "data.windtunnel.n_train=48", "data.windtunnel.n_val=16", "data.batch_size=8", "data.eval_batch_size=16",
        "trainer.max_steps=4", "trainer.val_every_n_steps=2", "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false", "optim.warmup_steps=2", *TINY_MODEL, *extra,
    ]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """4 real runs (optim.lr x seed) in a sweep folder with its sweep.json."""
    root = tmp_path_factory.mktemp("results")
    sweep_dir = root / "runs" / "windtunnel-teacher" / "sweep-test"
    entries = []
    for lr in LRS:
        for seed in SEEDS:
            label = f"optim.lr={lr},seed={seed}"
            overrides = [f"out_root={sweep_dir.parent}", "name=sweep-test", f"run_id={label}",
                         f"optim.lr={lr}", f"seed={seed}"]
            assert main(["run", "experiments/windtunnel/teacher.yaml", *tiny(root, *overrides)]) == 0
            entries.append({"label": label, "overrides": {"optim.lr": lr, "seed": seed}, "dir": label,
                            "status": "completed"})
    grid = {"optim.lr": list(LRS), "seed": list(SEEDS)}
    (sweep_dir / "sweep.json").write_text(json.dumps({"grid": grid, "runs": entries}, indent=2))
    return sweep_dir


@pytest.fixture(scope="module")
def runs(sweep):
    return load_runs(sweep)


def parse_cell(text):
    """'0.512 ± 0.013' -> (0.512, 0.013); '0.512' -> (0.512, None)."""
    mean, _, std = str(text).partition(" ± ")
    return float(mean), float(std) if std else None


def test_load_runs_one_row_per_run_with_flat_columns(sweep, runs):
    assert len(runs) == 4 and runs["run"].map(lambda r: Path(r).parent).eq(sweep).all()
    assert runs.columns[0] == "run"
    expected = {"config.optim.lr", "config.seed", "config.student.kwargs.text_hidden", "config.loss.ce.weight",
                "config.data.windtunnel.n_train", "status", "student.acc", "student.acc/color", "params.student",
                "final_train.train/loss", "wall_time_s", "steps"}
    assert expected <= set(runs.columns)
    assert sorted(zip(runs["config.optim.lr"], runs["config.seed"])) == [(lr, s) for lr in LRS for s in SEEDS]
    assert (runs["status"] == "completed").all() and (runs["steps"] == 4).all()
    assert runs["config.optim.betas"].tolist() == ["[0.9, 0.999]"] * 4  # lists become hashable text
    assert "latest" not in {Path(r).name for r in runs["run"]}  # the sweep folder's `latest` link is skipped


def test_load_runs_accepts_globs_parents_and_repeats(sweep, runs):
    as_sweep = set(runs["run"])
    assert set(load_runs(str(sweep / "*"))["run"]) == as_sweep  # glob also matches `latest` and sweep.json
    assert set(load_runs(sweep.parent)["run"]) == as_sweep  # a folder holding a sweep folder
    assert set(load_runs(str(sweep.parent / "sweep-*"))["run"]) == as_sweep
    latest = load_runs(sweep / "latest")  # named alone, `latest` is the run it points to
    assert len(latest) == 1 and (sweep / "latest").resolve() == Path(latest["run"][0]).resolve()
    twice = load_runs(sweep, sweep / "optim.lr=0.001,seed=0")
    assert len(twice) == 4
    assert workbench.load_runs(sweep)["run"].tolist() == runs["run"].tolist()  # in sweep.json order


def test_compare_shows_the_varying_key_and_folds_seeds(runs):
    assert varying_keys(runs) == ["config.optim.lr"]
    table = compare(runs, metrics=["student.acc", "final_train.train/loss"])
    assert list(table.columns) == ["config.optim.lr", "n", "student.acc", "final_train.train/loss"]
    assert table["config.optim.lr"].tolist() == list(LRS) and table["n"].tolist() == [2, 2]
    for _, row in table.iterrows():
        group = runs[runs["config.optim.lr"] == row["config.optim.lr"]]
        loss_mean, loss_std = parse_cell(row["final_train.train/loss"])
        assert loss_mean == pytest.approx(group["final_train.train/loss"].mean(), abs=1e-3)
        assert loss_std == pytest.approx(group["final_train.train/loss"].std(), abs=1e-3)
        acc_mean, _ = parse_cell(row["student.acc"])
        assert re.fullmatch(r"\d\.\d{3} ± \d\.\d{3}", row["student.acc"])  # accuracies to 3 decimals
        assert acc_mean == pytest.approx(group["student.acc"].mean(), abs=5e-4)


def test_compare_defaults_by_and_per_run(runs):
    assert default_metrics(runs) == ["student.acc", "wall_time_s"]  # no teacher in these runs
    assert list(compare(runs).columns) == ["config.optim.lr", "n", "student.acc", "wall_time_s"]
    by = compare(runs, by=["optim.lr"], metrics=["student.acc"])
    assert by.equals(compare(runs, by=["config.optim.lr"], metrics=["student.acc"]))
    per_run = compare(runs, metrics=["final_train.train/loss"], group_seeds=False)
    assert list(per_run.columns) == ["config.optim.lr", "config.seed", "n", "final_train.train/loss"]
    assert len(per_run) == 4 and (per_run["n"] == 1).all()
    assert not per_run["final_train.train/loss"].str.contains("±").any()
    numbers = aggregate(runs, metrics=["student.acc"])
    assert numbers["student.acc"].tolist() == pytest.approx(runs.groupby("config.optim.lr")["student.acc"].mean().tolist())


def test_formats_parse_back(runs):
    table = compare(runs, metrics=["student.acc", "final_train.train/loss"])
    as_text = table.astype(str)

    lines = format_table(table, "md").strip().splitlines()
    assert re.fullmatch(r"\|(---\|)+", lines[1])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert rows[0] == list(table.columns) and rows[2:] == as_text.values.tolist()

    back = pd.read_csv(io.StringIO(format_table(table, "csv")), dtype=str)
    assert back.values.tolist() == as_text.values.tolist() and list(back.columns) == list(table.columns)

    records = json.loads(format_table(table, "json"))
    assert [r["config.optim.lr"] for r in records] == list(LRS) and [r["n"] for r in records] == [2, 2]
    assert [r["student.acc"] for r in records] == table["student.acc"].tolist()

    with pytest.raises(WorkbenchError, match="unknown table format"):
        format_table(table, "xlsx")


def test_cli_compare(sweep, capsys):
    assert main(["compare", str(sweep), "--metric", "student.acc", "--by", "optim.lr", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["config.optim.lr"], r["n"]) for r in records] == [(LRS[0], 2), (LRS[1], 2)]
    assert main(["compare", str(sweep / "*"), "--per-run", "--format", "csv"]) == 0
    assert len(pd.read_csv(io.StringIO(capsys.readouterr().out))) == 4


def test_cli_bad_path_and_unknown_metric_exit_2(sweep, tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nope-*")]) == 2
    assert "matches no files" in capsys.readouterr().err
    assert main(["compare", str(tmp_path)]) == 2
    assert "holds no run directories" in capsys.readouterr().err
    assert main(["compare", str(sweep), "--metric", "studnt.acc"]) == 2
    err = capsys.readouterr().err
    assert "studnt.acc" in err and "did you mean student.acc" in err and "Traceback" not in err
    assert main(["compare", str(sweep), "--by", "optim.lrr"]) == 2
    assert "did you mean optim.lr" in capsys.readouterr().err


def test_metrics_has_one_row_per_step(runs):
    steps = metrics(runs.iloc[0])
    assert steps["step"].tolist() == [0, 1, 2, 3]
    assert steps["train/loss"].notna().all()
    assert steps.dropna(subset=["val/acc"])["step"].tolist() == [1, 3]  # validation every 2 steps
    assert metrics(runs.iloc[0]["run"]).equals(steps)
    with pytest.raises(WorkbenchError, match="does not exist"):
        metrics(runs.iloc[0], stage="sft")


def test_multi_stage_run_flattens_per_stage(runs, tmp_path):
    """A multi-stage run dir assembled from two real runs, in the documented layout."""
    run_dir = tmp_path / "two-stage" / "run"
    stage_names = ("pretrain", "sft")
    summaries = {}
    for name, (_, row) in zip(stage_names, runs.iloc[:2].iterrows()):
        stage = run_dir / "stages" / name
        stage.mkdir(parents=True)
        for f in ("config.yaml", "summary.json", "metrics.csv"):
            shutil.copy(Path(row["run"]) / f, stage / f)
        summaries[name] = json.loads((stage / "summary.json").read_text())
    config = yaml.safe_load((Path(runs.iloc[0]["run"]) / "config.yaml").read_text())
    config["stages"] = {"pretrain": {"optim": {"lr": 0.001}}, "sft": {"optim": {"lr": 0.0003}}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    results = [{"model": s, "params": summaries[s]["params"]["student"], "acc": summaries[s]["student"]["acc"]}
               for s in stage_names]
    (run_dir / "summary.json").write_text(json.dumps({
        "name": "two-stage", "run_id": "run", "status": "completed", "stages": summaries,
        "results": results, "wall_time_s": 1.0}))

    table = load_runs(run_dir.parent)
    assert len(table) == 1
    assert {"stages.pretrain.student.acc", "stages.sft.final_train.train/loss", "config.stages.sft.optim.lr"} <= set(
        table.columns)
    assert default_metrics(table) == ["stages.pretrain.student.acc", "stages.sft.student.acc", "wall_time_s"]
    assert json.loads(table["results"].iloc[0]) == results
    assert metrics(table.iloc[0], stage="sft").equals(metrics(runs.iloc[1]))
    both = metrics(run_dir)
    assert both["stage"].tolist() == ["pretrain"] * 4 + ["sft"] * 4
    with pytest.raises(WorkbenchError, match="its stages are pretrain, sft"):
        metrics(run_dir, stage="dft")


def test_paths_that_follow_the_run_dir_are_not_differences():
    frame = pd.DataFrame({
        "run": ["/a/exp/r1", "/b/exp/r2"],
        "config.out_root": ["/a", "/b"],
        "config.teacher.cache": ["/a/exp/r1/cache", "/b/exp/r2/cache"],
        "config.data.root": ["/a/data", "/b/data"],
        "config.data.train": ["/shared/one.json", "/shared/two.json"],
        "config.seed": [0, 1],
    })
    assert varying_keys(frame) == ["config.data.train"]


def test_notebook_runs_on_the_sweep(sweep, tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in notebook.cells if c.cell_type == "code")
    figure = tmp_path / "figure.png"
    monkeypatch.setenv("WB_SWEEP", str(sweep.parent / "sweep-*"))
    monkeypatch.setenv("WB_FIGURE", str(figure))
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert "4 runs" in printed and "optim.lr" in printed


def test_pareto_front_keeps_points_no_smaller_point_beats():
    from workbench.compare_plot import _pareto

    assert _pareto([(4, 0.5), (1, 0.2), (2, 0.6), (3, 0.4), (8, 0.9)]) == [(1, 0.2), (2, 0.6), (8, 0.9)]


def test_compare_plot_curves_per_row_and_accuracy_against_size(sweep, tmp_path, capsys):
    from workbench.compare_plot import plot_compare

    out = tmp_path / "compare.png"
    assert main(["compare", str(sweep), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "plot written to" in capsys.readouterr().out
    drawn = plot_compare(load_runs(sweep), out)
    assert drawn == {"curves": {"optim.lr=0.001": 2, "optim.lr=0.003": 2}}  # one size: no size panel

    study = tmp_path / "study"  # the same runs, one learning rate's claiming twice the parameters
    for run in load_runs(sweep)["run"]:
        copy = shutil.copytree(run, study / Path(run).name, ignore=shutil.ignore_patterns("checkpoints", "student"))
        summary = json.loads((copy / "summary.json").read_text())
        if "lr=0.003" in copy.name:
            summary["params"]["student"] *= 2
        (copy / "summary.json").write_text(json.dumps(summary))
    runs = load_runs(study)
    drawn = plot_compare(runs, out)
    sizes = {label: x for label, x, _ in drawn["points"]}
    base = runs["params.student"].min()
    assert sizes == {"optim.lr=0.001": base, "optim.lr=0.003": 2 * base}
    accs = {label: y for label, _, y in drawn["points"]}
    assert accs["optim.lr=0.001"] == pytest.approx(runs[runs["config.optim.lr"] == 0.001]["student.acc"].mean())
    with pytest.raises(WorkbenchError, match="no run's summary has 'latency_ms'"):
        plot_compare(runs, out, x="latency_ms")
