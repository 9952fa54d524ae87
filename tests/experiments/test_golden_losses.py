"""Golden first losses of a short wind-tunnel run per student family: a VLM trained with CE,
a VLM distilled from a teacher (KL + CE), a Mamba hybrid (MaTVLM), the encoder-free EVE and
BREEN, a MatFormer ViT on digits, and the MatMul-free student (distilled, ternary throughout). Pinned values (recorded with the versions in
constraints.txt, before the issue-18 restructuring) catch any change of what a recipe
computes: a refactor must leave them as they are. Tolerance: 1e-4 relative (float32 on CPU;
other torch releases may move the last digits)."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import tiny_run_args
from workbench.cli import main


def _small(root, teacher, *extra):
    return [f"data.root={root}/data", "data.windtunnel.n_train=48", "data.windtunnel.n_val=16", "data.batch_size=8",
            "data.eval_batch_size=16", "trainer.max_steps=3", "trainer.val_every_n_steps=3",
            "trainer.log_every_n_steps=1", "trainer.progress_bar=false", "optim.warmup_steps=1",
            f"out_root={root}/runs", "stages.teacher=null", f"vars.teacher={teacher}", *extra]


MATVIT = ["trainer.max_steps=3", "trainer.val_every_n_steps=3", "trainer.log_every_n_steps=1", "trainer.progress_bar=false",
          "optim.warmup_steps=1", "data.limit_train=64", "data.limit_val=32", "data.batch_size=16",
          "stages.teacher.trainer.max_steps=3", "stages.teacher.student.kwargs.embed_dim=32",
          "stages.teacher.student.kwargs.depth=2", "stages.matvit.student.kwargs.depth=2", "stages.ind_1=null",
          "stages.ind_1_2=null", "stages.ind_1_4=null", "stages.ind_1_8=null"]

FAMILIES = {
    "vlm_ce": ("experiments/windtunnel/teacher.yaml", lambda root, t: tiny_run_args(root, "trainer.max_steps=3")),
    "vlm_kd": ("experiments/windtunnel/student_kd.yaml",
               lambda root, t: tiny_run_args(root, "trainer.max_steps=3", f"teacher.path={t}")),
    "hybrid_matvlm": ("experiments/windtunnel/matvlm.yaml", lambda root, t: _small(root, t, "vars.layers=[1]")),
    "eve": ("experiments/windtunnel/eve.yaml", lambda root, t: _small(root, t, "loss.align.every=2",
                                                                    "stages.pretrain=null", "stages.sft=null")),
    "breen": ("experiments/windtunnel/breen.yaml", lambda root, t: _small(root, t, "stages.pretrain=null",
                                                                        "stages.sft=null")),
    "matformer_vit": ("experiments/windtunnel/matformer_vit.yaml", lambda root, t: [f"out_root={root}/runs", *MATVIT]),
    "mmfree": ("experiments/windtunnel/mmfree.yaml", lambda root, t: _small(
        root, t, "stages.transformer=null", f"stages.mmfree.teacher.path={t}", "stages.mmfree.trainer.max_steps=3",
        "stages.mmfree.trainer.val_every_n_steps=3")),
}

GOLDEN = {  # family -> first three train/loss values of its (first) trained stage
    "vlm_ce": [3.746462106704712, 3.4515223503112793, 3.2480814456939697],
    "vlm_kd": [1.9106944799423218, 1.88410484790802, 1.8416193723678589],
    "hybrid_matvlm": [27.07045555114746, 24.38591766357422, 22.064279556274414],
    "eve": [4.871335029602051, 4.43326997756958, 4.265475749969482],
    "breen": [5.863433361053467, 5.718326568603516, 5.677765369415283],
    "matformer_vit": [4.636192798614502, 4.678216934204102, 4.790215015411377],
    "mmfree": [2.253153085708618, 1.6338143348693848, 1.4914557933807373],  # recorded 2026-12-04 (torch 2.14.1)
}


def first_losses(root, name) -> list[float]:
    (run,) = [p for p in (root / "runs").iterdir() if p.name != "teacher-cache"]
    (run_dir,) = [p for p in run.iterdir() if p.name != "latest"]
    metrics = sorted(run_dir.rglob("metrics.csv"))[0]  # the first stage by name: matvit (after its teacher)
    losses = pd.read_csv(metrics)["train/loss"].dropna()
    return [float(v) for v in losses.iloc[:3]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_golden_first_losses(family, tmp_path, tiny_vlm_dir):
    recipe, args = FAMILIES[family]
    assert main(["run", recipe, *args(tmp_path, tiny_vlm_dir)]) == 0
    got = first_losses(tmp_path, family)
    assert got == pytest.approx(GOLDEN[family], rel=1e-4), f"{family}: {got}"
