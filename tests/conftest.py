"""Shared fixtures: a tiny wind tunnel and a tiny saved VLM, built once per test session."""

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any `import triton`
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]  # the repository root

TINY_STUDENT = dict(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=2, text_heads=2)
TINY_MODEL = [f"student.kwargs.{k}={v}" for k, v in TINY_STUDENT.items()]


def subprocess_env() -> dict[str, str]:
    """The environment for a `workbench` child process: no DDP rank or run-directory hand-over
    variables leaking in from the test process."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WB_RUN_DIR", "WB_LAUNCH"):
        env.pop(key, None)
    return env


def tiny_run_args(root, *extra) -> list[str]:
    """Overrides that shrink a wind-tunnel recipe to seconds: 48 + 16 records, 6 steps, a tiny model."""
    return [
        f"out_root={root}/runs", f"data.root={root}/data",
        "data.windtunnel.n_train=48", "data.windtunnel.n_val=16", "data.batch_size=8", "data.eval_batch_size=16",
        "trainer.max_steps=6", "trainer.val_every_n_steps=3", "trainer.log_every_n_steps=1", "trainer.progress_bar=false",
        "optim.warmup_steps=2", *TINY_MODEL, *extra,
    ]


QUICKSTART = "experiments/windtunnel/quickstart.yaml"


def quick(root, *extra):
    """The quickstart at tiny size: 40 training images, 20% labelled, a few steps per stage."""
    args = [
        f"out_root={root}/runs", f"data.root={root}/data", "data.windtunnel.n_train=40", "data.windtunnel.n_val=16",
        "data.batch_size=8", "data.eval_batch_size=16", "data.labeled_fraction=0.2", "data.max_new_tokens=3",
        "student.kwargs.text_hidden=32", "student.kwargs.vision_hidden=32", "student.kwargs.text_heads=2",
        "student.kwargs.vision_heads=2",
        "trainer.max_steps=4", "trainer.val_every_n_steps=2", "trainer.log_every_n_steps=1",
        "stages.teacher.trainer.max_steps=6", "stages.teacher.trainer.val_every_n_steps=3",
        "stages.teacher.student.kwargs.text_hidden=48", "stages.teacher.student.kwargs.text_layers=2",
        "stages.teacher.student.kwargs.vision_hidden=32", "stages.teacher.student.kwargs.vision_layers=1",
        "stages.teacher.student.kwargs.text_heads=2", "stages.teacher.student.kwargs.vision_heads=2",
        *extra,
    ]
    if "stages=null" in extra:  # the experiment's top level alone
        args = [a for a in args if not a.startswith("stages.")]
    return args


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    """A small wind tunnel: 64 train / 16 val images, 40 classification images per class split."""
    from workbench.data.windtunnel import write_windtunnel

    return write_windtunnel(tmp_path_factory.mktemp("world") / "wt", n_train=64, n_val=16, seed=0, n_classification=40)


@pytest.fixture(scope="session")
def processor(world_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(world_dir / "processor")


def make_tiny_vlm(processor, seed: int = 0, **overrides):
    """A randomly initialised tiny LLaVA that shares `processor`'s vocabulary."""
    from students.vlm import tiny_llava

    torch.manual_seed(seed)
    tok = processor.tokenizer
    kwargs = dict(
        vocab_size=len(tok), image_token_id=processor.image_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        image_size=processor.image_processor.crop_size["height"], patch_size=processor.patch_size,
    )
    return tiny_llava(**{**kwargs, **TINY_STUDENT, **overrides})


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory):
    """A finished tiny wind-tunnel teacher run (4 decoder layers), for the commands that read a
    run: analyze, bench tokens. Tests write only their own files into it."""
    from workbench.cli import main

    root = tmp_path_factory.mktemp("teacher_run")
    assert main(["run", "experiments/windtunnel/teacher.yaml", *tiny_run_args(root, "run_id=r",
                                                                           "student.kwargs.text_layers=4")]) == 0
    return root / "runs" / "windtunnel-teacher" / "r"


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory, processor):
    """A tiny LLaVA saved as a Hugging Face folder (model + processor), like a hub checkpoint."""
    path = tmp_path_factory.mktemp("tiny_vlm") / "model"
    model = make_tiny_vlm(processor, seed=0, text_hidden=48, text_layers=2)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def vlm_inputs(processor, world_dir, n=2, left_pad=0):
    """Two wind-tunnel prompts with their images; with `left_pad`, the second one is that many
    tokens shorter (its last text tokens dropped) and padded on the left, as batched
    generation pads."""
    from workbench.data.llava import LlavaDataset, VLMCollator

    samples = [LlavaDataset(world_dir / "val.json")[i] for i in range(n)]
    batch = VLMCollator(processor)(samples)
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    if left_pad:
        pad = processor.tokenizer.pad_token_id
        ids[1] = torch.cat([torch.full((left_pad,), pad), ids[1, :-left_pad]])
        mask[1] = torch.cat([torch.zeros(left_pad, dtype=mask.dtype), mask[1, :-left_pad]])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": batch["pixel_values"]}


def assert_cached_generation_is_recomputation(model, inputs, steps, pad_token_id):
    """Greedy `generate` with its cache equals greedy decoding that runs the whole sequence
    again at every step (left padding included): what caches that differ per layer must keep."""
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None,
                                   pad_token_id=pad_token_id)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(steps):
            nxt = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"]).logits[:, -1].argmax(-1)
            ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(generated, ids)


def fake_inputs(length=9, vocab=23, width=8, fused=False, seed=0, **extra):
    """Loss inputs of two hand-made sequences (image tokens at 1..3, answers near the end) with
    a random LM head over random hidden states and random dense teacher logits; with `fused`
    the student logits are left to the head. Returns (inputs, hidden, head) unfused."""
    from torch import nn

    from losses.inputs import IGNORE_INDEX, LossInputs

    g = torch.Generator().manual_seed(seed)
    b = 2
    labels = torch.full((b, length), IGNORE_INDEX)
    labels[0, 5:8] = torch.randint(0, vocab, (3,), generator=g)
    labels[1, 6:] = torch.randint(0, vocab, (length - 6,), generator=g)
    image_mask = torch.zeros(b, length, dtype=torch.bool)
    image_mask[:, 1:4] = True
    head = nn.Linear(width, vocab, bias=True)
    hidden = torch.randn(b, length, width, generator=g, requires_grad=True)
    teacher = torch.randn(b, length, vocab, generator=g)
    common = dict(labels=labels, attention_mask=torch.ones(b, length, dtype=torch.long), image_mask=image_mask,
                  teacher_logits=teacher, **extra)
    if fused:
        return LossInputs(student_logits=None, student_hidden=hidden, student_head=head, **common)
    return LossInputs(student_logits=head(hidden), **common), hidden, head
