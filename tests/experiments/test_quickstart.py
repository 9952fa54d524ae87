"""Multi-stage runs, the quickstart study, teacher caches, sweeps and kill-and-resume, end to end
at tiny size and read back from disk."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import QUICKSTART, quick, tiny_run_args as tiny
from workbench.cli import main
from workbench.config import load_config



@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    root = tmp_path_factory.mktemp("quick")
    assert main(["run", QUICKSTART, *quick(root)]) == 0
    return root, (root / "runs" / "windtunnel-quickstart" / "latest").resolve()


def test_quickstart_writes_the_study(quickstart):
    root, run_dir = quickstart
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [r["model"] for r in summary["results"]] == ["teacher", "kd", "ce"]
    assert set(summary["stages"]) == {"teacher", "kd", "ce"}
    for name in ("teacher", "kd", "ce"):
        stage = run_dir / "stages" / name
        assert {"config.yaml", "summary.json", "metrics.csv", "checkpoints", "student"} <= {p.name for p in stage.iterdir()}
        assert summary["stages"][name]["status"] == "completed"
    table = (run_dir / "results.md").read_text()
    assert "| teacher |" in table and "| kd |" in table and "| ce |" in table
    # the students see 20% of the 40 records with labels; KD also sees the rest, answered by the teacher
    kd, ce = summary["stages"]["kd"], summary["stages"]["ce"]
    assert kd["data"] == {"labeled": 8, "unlabeled": 32, "unlabeled_use": "pseudo"}
    assert ce["data"] == {"labeled": 8, "unlabeled": 32, "unlabeled_use": "drop"}
    assert kd["teacher_cache"]["made_by_this_run"] is True
    assert kd["params"]["student"] == ce["params"]["student"] < summary["stages"]["teacher"]["params"]["student"]
    assert {"train/kd", "train/ce"} <= set(kd["final_train"]) and set(ce["final_train"]) == {"train/loss", "train/ce"}
    # the KD stage was taught by the teacher stage's export
    kd_cfg = load_config(run_dir / "stages" / "kd" / "config.yaml")
    assert kd_cfg.teacher.path == str(run_dir / "stages" / "teacher" / "student")


def test_teacher_cache_holds_pseudo_labels_and_top_k(quickstart):
    from teachers.cache import TeacherCache

    root, run_dir = quickstart
    summary = json.loads((run_dir / "summary.json").read_text())
    cache = TeacherCache(summary["stages"]["kd"]["teacher_cache"]["dir"])
    assert len(cache) == 40 and cache.top_k == 8 and cache.temperature == 1.0
    records = json.loads((root / "data").glob("windtunnel-*/train.json").__next__().read_text())
    n_pseudo = sum(cache.answers(r["id"]) is not None for r in records)
    assert n_pseudo == 32
    for r in records:
        entry = cache.get(r["id"])
        assert entry.topk_ids.shape == entry.topk_logp.shape and entry.topk_ids.shape[1] == 8
        assert entry.topk_ids.shape[0] == entry.tokens.shape[0] > 0
        p = entry.topk_logp.exp()
        assert torch.all(p[:, :-1] >= p[:, 1:]) and torch.all(p.sum(-1) <= 1 + 1e-5)
        torch.testing.assert_close(p.sum(-1) + entry.rest_logp.exp(), torch.ones(len(p)), rtol=0, atol=1e-5)
        answers = cache.answers(r["id"])
        if answers is not None:  # one answer per assistant turn
            assert len(answers) == sum(t["from"] == "gpt" for t in r["conversations"])


def test_cached_run_reuses_the_cache_without_loading_the_teacher(quickstart, monkeypatch, capsys):
    from workbench.registry import TEACHERS

    root, run_dir = quickstart

    def no_teacher(**_):
        raise AssertionError("the teacher was loaded although its cache is complete")

    TEACHERS.get("hf_vlm")
    monkeypatch.setitem(TEACHERS._builders, "hf_vlm", no_teacher)
    teacher = run_dir / "stages" / "teacher" / "student"
    args = quick(root, "stages=null", "teacher.cache=auto", f"teacher.path={teacher}", "teacher.top_k=8",
                 "loss.kd.type=forward_kl", "loss.ce.type=ce", "loss.ce.weight=0.5", "run_id=from-cache")
    assert main(["run", QUICKSTART, *args]) == 0
    summary = json.loads((root / "runs" / "windtunnel-quickstart" / "from-cache" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["teacher_cache"]["made_by_this_run"] is False


def test_cache_for_other_data_or_tokenizer_is_refused(quickstart, capsys, tmp_path):
    root, run_dir = quickstart
    summary = json.loads((run_dir / "summary.json").read_text())
    cache_dir = summary["stages"]["kd"]["teacher_cache"]["dir"]
    teacher = run_dir / "stages" / "teacher" / "student"
    base = quick(root, "stages=null", f"teacher.cache={cache_dir}", f"teacher.path={teacher}", "teacher.top_k=8",
                 "loss.kd.type=forward_kl", "loss.ce.type=ce")
    runs_before = sorted((root / "runs" / "windtunnel-quickstart").iterdir())
    # another data set: a different world
    assert main(["run", QUICKSTART, *base, "data.windtunnel.seed=1"]) == 2
    err = capsys.readouterr().err
    assert "data." in err and "differs" in err and "cache-teacher" in err
    # another tokenizer: the teacher folder with one token more
    other = tmp_path / "teacher"
    other.mkdir()
    for f in teacher.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zebra"] = max(tok["model"]["vocab"].values()) + 1
    (other / "tokenizer.json").write_text(json.dumps(tok))
    assert main(["run", QUICKSTART, *base, f"teacher.path={other}"]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert sorted((root / "runs" / "windtunnel-quickstart").iterdir()) == runs_before  # refused before writing


def test_cache_teacher_command_makes_and_finds_a_cache(quickstart, capsys):
    root, run_dir = quickstart
    teacher = run_dir / "stages" / "teacher" / "student"
    args = quick(root, "stages=null", f"teacher.path={teacher}", "loss.kd.type=forward_kl", "loss.ce.type=ce")
    assert main(["cache-teacher", QUICKSTART, *args, "--top-k", "4", "--out", str(root / "c4")]) == 0
    assert "samples_computed" in capsys.readouterr().out
    assert main(["cache-teacher", QUICKSTART, *args, "--top-k", "4", "--out", str(root / "c4")]) == 0
    assert "already complete" in capsys.readouterr().out
    manifest = json.loads((root / "c4" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["fingerprint"]["top_k"] == 4
    shard = root / "c4" / manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(8 * [0x7F])  # changed in place, same size
    shard.write_bytes(bytes(data))
    assert main(["cache-teacher", QUICKSTART, *args, "--top-k", "4", "--out", str(root / "c4")]) == 0
    out = capsys.readouterr().out
    assert f"recomputed {shard.name}" in out and "'samples_computed': " in out and "repaired_shards" in out
    assert main(["cache-teacher", QUICKSTART, *args, "--top-k", "4", "--out", str(root / "c4")]) == 0
    assert "already complete" in capsys.readouterr().out


def test_stages_init_from_and_trainable(quickstart, tmp_path):
    root, run_dir = quickstart
    teacher = run_dir / "stages" / "teacher" / "student"
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump({
        "base": os.path.abspath("experiments/windtunnel/teacher.yaml"),
        "student": {"kwargs": {"text_hidden": 48, "text_layers": 2, "vision_hidden": 32, "vision_layers": 1,
                               "text_heads": 2, "vision_heads": 2}},
        "stages": [
            {"name": "self", "init_from": str(teacher), "trainable": ["model.language_model.*"]},
            {"name": "tune", "init_from": "stage:self", "teacher": {"path": "stage:self"},
             "loss": {"kd": {"type": "reverse_kl"}}},
        ],
    }, sort_keys=False))
    args = tiny(root, f"out_root={tmp_path}/runs", "run_id=two", "data.windtunnel.n_train=40")
    args = [a for a in args if not a.startswith("student.kwargs")]
    assert main(["run", str(cfg), *args]) == 0
    run = tmp_path / "runs" / "windtunnel-teacher" / "two"
    first = json.loads((run / "stages" / "self" / "summary.json").read_text())
    assert first["init_from"]["kept"] == 0 and first["params"]["student_trainable"] < first["params"]["student"]
    before, after = load_file(teacher / "model.safetensors"), load_file(run / "stages" / "self" / "student" / "model.safetensors")
    vision = [k for k in after if "vision" in k]
    lm = [k for k in after if "language_model" in k and "embed" not in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)  # frozen
    assert any(not torch.equal(before[k], after[k]) for k in lm)  # trained
    tune_cfg = load_config(run / "stages" / "tune" / "config.yaml")
    assert tune_cfg.teacher.path == str(run / "stages" / "self" / "student") and list(tune_cfg.loss) == ["kd"]


def test_stage_referring_to_a_later_stage_is_refused(capsys, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"base": os.path.abspath("experiments/windtunnel/teacher.yaml"), "stages": {
        "a": {"init_from": "stage:b"}, "b": {}}}))
    assert main(["run", str(cfg), f"out_root={tmp_path}"]) == 2
    assert "stages.a.init_from" in capsys.readouterr().err
    assert not (tmp_path / "windtunnel-teacher").exists()


# ---------------------------------------------------------------------------- sweeps


def test_sweep_runs_the_grid_and_skips_finished_runs(tmp_path, capsys):
    args = tiny(tmp_path, "trainer.max_steps=3", "trainer.val_every_n_steps=3")
    argv = ["run", "experiments/windtunnel/teacher.yaml", *args, "--sweep", "seed=0,1", "--sweep", "optim.lr=0.001,0.002"]
    assert main(argv) == 0
    (sweep,) = (tmp_path / "runs" / "windtunnel-teacher").glob("sweep-*")
    info = json.loads((sweep / "sweep.json").read_text())
    assert info["grid"] == {"seed": [0, 1], "optim.lr": [0.001, 0.002]}
    assert [r["status"] for r in info["runs"]] == ["completed"] * 4
    for r in info["runs"]:
        cfg = load_config(sweep / r["dir"] / "config.yaml")
        assert (cfg.seed, cfg.optim.lr) == (r["overrides"]["seed"], r["overrides"]["optim.lr"])
    table = (sweep / "sweep.md").read_text()
    assert "optim.lr" in table and "±" in table
    mtimes = {r["dir"]: (sweep / r["dir"] / "summary.json").stat().st_mtime for r in info["runs"]}
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("already completed, skipped") == 4
    assert mtimes == {r["dir"]: (sweep / r["dir"] / "summary.json").stat().st_mtime for r in info["runs"]}


# ---------------------------------------------------------------------------- kill and resume


def _start(args, env):
    return subprocess.Popen([sys.executable, "-m", "workbench.cli", "run", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    """Two stages; killed inside the second after its first checkpoint; resumed; same weights."""
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump({
        "base": os.path.abspath("experiments/windtunnel/teacher.yaml"),
        "stages": {"warm": {"trainer": {"max_steps": 4}},
                   "main": {"init_from": "stage:warm", "trainer": {"max_steps": 40, "checkpoint_every_n_steps": 5}}},
    }, sort_keys=False))
    args = [str(cfg), *tiny(tmp_path, "trainer.val_every_n_steps=10", "optim.lr=0.003")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    assert subprocess.run([sys.executable, "-m", "workbench.cli", "run", *args, "run_id=straight"], env=env,
                          capture_output=True).returncode == 0

    killed = tmp_path / "runs" / "windtunnel-teacher" / "killed"
    proc = _start([*args, "run_id=killed"], env)
    ckpt = killed / "stages" / "main" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # let the checkpoint write finish
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "running", "the run finished before it could be killed"
    assert not (killed / "stages" / "main" / "student").exists()

    out = subprocess.run([sys.executable, "-m", "workbench.cli", "run", "--resume", str(killed)], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    straight = tmp_path / "runs" / "windtunnel-teacher" / "straight"
    a = load_file(straight / "stages" / "main" / "student" / "model.safetensors")
    b = load_file(killed / "stages" / "main" / "student" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    def logged(run):
        return pd.read_csv(run / "stages" / "main" / "metrics.csv").dropna(subset=["train/loss"])["step"].tolist()

    assert logged(killed) == logged(straight)  # one row per step, from before and after the kill
    assert json.loads((killed / "summary.json").read_text())["status"] == "completed"


def test_resume_refuses_a_completed_run(quickstart, capsys):
    _, run_dir = quickstart
    assert main(["run", "--resume", str(run_dir)]) == 2
    assert "already completed" in capsys.readouterr().err


def test_compare_on_a_quickstart_sweep(tmp_path, capsys):
    assert main(["run", QUICKSTART, *quick(tmp_path), "--sweep", "data.labeled_fraction=0.2,0.4"]) == 0
    (sweep,) = (tmp_path / "runs" / "windtunnel-quickstart").glob("sweep-*")
    capsys.readouterr()
    assert main(["compare", str(sweep), "--format", "csv"]) == 0
    table = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert "config.data.labeled_fraction" in table.columns or "data.labeled_fraction" in table.columns
    assert {"stages.kd.student.acc", "stages.ce.student.acc", "stages.teacher.student.acc"} <= set(table.columns)
    assert len(table) == 2


def test_readme_numbers_are_regenerated_from_the_run_with_its_versions(quickstart, tmp_path):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("quickstart_numbers", REPO / "docs" / "quickstart_numbers.py")
    numbers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(numbers)
    _, run = quickstart
    env = json.loads((run / "env.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    block = numbers.render(run)
    assert f"torch {env['packages']['torch']}" in block and f"transformers {env['packages']['transformers']}" in block
    for row in summary["results"]:
        assert f"| {row['model']} | {row['params']:,} | {row['acc']:.3f} |" in block
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{numbers.BEGIN}\nold numbers\n{numbers.END}\noutro\n")
    numbers.write(readme, block)
    numbers.write(readme, block)  # idempotent
    assert readme.read_text() == f"intro\n{numbers.BEGIN}\n{block}\n{numbers.END}\noutro\n"
    assert numbers.BEGIN in (REPO / "README.md").read_text()  # the README has the block to fill
