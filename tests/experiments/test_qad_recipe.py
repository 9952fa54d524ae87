"""The wind-tunnel QAD recipe end to end on a trained teacher (slow: a few minutes): the
quality ordering of the presets, and 4-bit QAD against 4-bit post-training quantization."""

import json

import pytest
import torch

from conftest import REPO
from workbench.cli import main

RECIPE = REPO / "experiments" / "windtunnel" / "qad.yaml"


@pytest.fixture(scope="module")
def qad_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qad")
    args = [f"out_root={root}/runs", f"data.root={root}/data", "data.windtunnel.n_train=3000",
            "data.windtunnel.n_val=200", "trainer.max_steps=400", "trainer.val_every_n_steps=200",
            "trainer.progress_bar=false", "stages.fp_more.trainer.max_steps=80", "stages.qad.trainer.max_steps=80",
            "stages.fp_more.trainer.val_every_n_steps=80", "stages.qad.trainer.val_every_n_steps=80"]
    assert main(["run", str(RECIPE), *args]) == 0
    return root, (root / "runs" / "windtunnel-qad" / "latest").resolve()


@pytest.mark.slow
def test_int8_is_closer_to_full_precision_than_nf4_on_a_trained_teacher(qad_run):
    import students
    from workbench.bench.compress import quality
    from workbench.compress import compress
    from workbench.config import load_config
    from workbench.evaluation import held_out_from_config

    root, run = qad_run
    fp_dir = run / "stages" / "fp" / "student"
    assert json.loads((run / "stages" / "fp" / "summary.json").read_text())["student"]["acc"] > 0.6  # it learned
    held_out = held_out_from_config(load_config(run / "config.yaml"))
    full = students.load(fp_dir).eval()
    scores = {}
    for preset in ("int8", "nf4", "int4"):
        compress(fp_dir, root / preset, preset=preset)
        scores[preset] = quality(full, students.load(root / preset), held_out.loader(64))
    assert scores["int8"]["kl"] < scores["nf4"]["kl"]
    assert scores["int8"]["agreement"] >= 0.95


@pytest.mark.slow
def test_qad_at_4_bits_is_at_least_ptq_and_converts_exactly(qad_run):
    import students
    from workbench.compress import compress
    from workbench.config import load_config
    from workbench.evaluation import evaluate, held_out_from_config

    root, run = qad_run
    held_out = held_out_from_config(load_config(run / "config.yaml"))
    compress(run / "stages" / "fp_more" / "student", root / "ptq", preset="int4")
    compress(run / "stages" / "qad" / "student", root / "qad_int4")
    trained, converted = students.load(run / "stages" / "qad" / "student"), students.load(root / "qad_int4")
    batch = next(iter(held_out.loader(8)))
    from workbench.batch import model_inputs

    with torch.no_grad():
        assert (trained(**model_inputs(batch)).logits - converted(**model_inputs(batch)).logits).abs().max() < 1e-5
    ptq = evaluate(students.load(root / "ptq"), held_out.loader(64))["acc"]
    qad = evaluate(converted, held_out.loader(64))["acc"]
    assert qad >= ptq, (qad, ptq)
