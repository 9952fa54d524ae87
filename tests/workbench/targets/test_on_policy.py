"""The on-policy target (workbench/targets/on_policy.py): a batch is cut at one assistant turn
per record and the student's own answer replaces the rest; the loss reads exactly the
student's tokens. Greedy rollouts of a batch equal each record decoded alone; images follow
their records; the CLI trains with it (and under a bad option exits 2)."""

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import make_tiny_vlm, tiny_run_args
from losses.inputs import IGNORE_INDEX
from workbench.cli import main
from workbench.data.llava import LlavaDataset, VLMCollator
from workbench.targets.on_policy import OnPolicyTeacher, _images_of


def batch_of(processor, world_dir, n=3):
    samples = [LlavaDataset(world_dir / "val.json")[i] for i in range(n)]
    return VLMCollator(processor)(samples)


def target_for(processor, student, **options):
    o = SimpleNamespace(fraction=1.0, temperature=0.0, top_k=None, max_new_tokens=None, turn="first")
    vars(o).update(options)
    tok = processor.tokenizer
    special = {"eos": tok.eos_token_id, "pad": tok.pad_token_id, "image": processor.image_token_id}
    return OnPolicyTeacher(student, student, o, special, seed=0)


def first_answer(labels):
    return int((labels != IGNORE_INDEX).nonzero()[0])


def test_a_greedy_rollout_is_each_record_decoded_alone(processor, world_dir):
    student = make_tiny_vlm(processor, seed=3).train()
    batch = batch_of(processor, world_dir)
    original = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
    target = target_for(processor, student, max_new_tokens=5)
    target.rollout(batch)
    assert student.training and target.rewritten == 3 and target.kept == 0
    eos, pad = processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id
    for b in range(3):
        cut = first_answer(original["labels"][b])
        prompt = original["input_ids"][b, :cut]
        student.eval()
        with torch.no_grad():
            alone = student.generate(input_ids=prompt[None], attention_mask=torch.ones_like(prompt)[None],
                                     pixel_values=original["pixel_values"][b:b + 1], max_new_tokens=5,
                                     do_sample=False, eos_token_id=eos, pad_token_id=pad,
                                     suppress_tokens=[processor.image_token_id])[0, cut:]
        student.train()
        if (alone == eos).any():
            alone = alone[: int((alone == eos).nonzero()[0]) + 1]
        n = int(batch["attention_mask"][b].sum())
        row, labels = batch["input_ids"][b], batch["labels"][b]
        assert n == cut + len(alone)
        assert torch.equal(row[:cut], prompt) and torch.equal(row[cut:n], alone)
        assert torch.equal(labels[cut:n], alone) and (labels[:cut] == IGNORE_INDEX).all()
        assert (labels[n:] == IGNORE_INDEX).all() and (row[n:] == pad).all()
    assert torch.equal(batch["image_mask"], batch["input_ids"] == processor.image_token_id)
    assert torch.equal(batch["pixel_values"], original["pixel_values"])  # every record kept its image


def test_left_padded_batches_roll_out_as_right_padded_ones(processor, world_dir):
    student = make_tiny_vlm(processor, seed=3)
    right = batch_of(processor, world_dir)
    left = {k: v.clone() if torch.is_tensor(v) else v for k, v in right.items()}
    for key, fill in (("input_ids", processor.tokenizer.pad_token_id), ("labels", IGNORE_INDEX), ("attention_mask", 0)):
        for b in range(3):
            n = int(right["attention_mask"][b].sum())
            row = right[key][b]
            left[key][b] = torch.cat([row.new_full((len(row) - n,), fill), row[:n]])
    for batch in (right, left):
        target_for(processor, student, max_new_tokens=4).rollout(batch)
    for key in ("input_ids", "labels", "attention_mask", "image_mask"):
        assert torch.equal(left[key], right[key])  # rewritten rows are right-padded either way


def test_the_default_budget_is_the_longest_chosen_answer_and_turns_are_answer_starts(processor, world_dir):
    student = make_tiny_vlm(processor, seed=4)
    batch = batch_of(processor, world_dir)
    target = target_for(processor, student, turn="random")
    cuts = target.cuts(batch["labels"], batch["input_ids"])
    for b, cut in enumerate(cuts):
        labels = batch["labels"][b]
        assert labels[cut] != IGNORE_INDEX and labels[cut - 1] == IGNORE_INDEX  # the start of an answer
    longest = max(int(((batch["labels"][b][c:] != IGNORE_INDEX).cumprod(0)).sum()) for b, c in enumerate(cuts))
    answers = target.sample(batch["input_ids"], batch["attention_mask"], batch, cuts, [0, 1, 2])
    assert max(len(a) for a in answers) <= longest


def test_a_record_with_an_image_after_its_turn_keeps_its_answers(processor, world_dir):
    student = make_tiny_vlm(processor, seed=5)
    batch = batch_of(processor, world_dir, n=2)
    image = processor.image_token_id
    batch["labels"][1] = IGNORE_INDEX
    first_image = int((batch["input_ids"][1] == image).nonzero()[0])
    batch["labels"][1, first_image - 2: first_image - 1] = 7  # an "answer" before the picture
    kept = batch["input_ids"][1][batch["attention_mask"][1].bool()].clone()
    target = target_for(processor, student, max_new_tokens=3)
    target.rollout(batch)
    assert target.kept == 1 and target.rewritten == 1
    assert torch.equal(batch["input_ids"][1][: len(kept)], kept)


def test_images_follow_their_records():
    ids = torch.tensor([[9, 9, 1], [1, 1, 1], [9, 9, 9]])  # 1, 0 and... images of 2 tokens: 1, 0, 1 (+ a stray)
    ids[2, 2] = 1
    batch = {"input_ids": ids, "pixel_values": torch.arange(2.0)[:, None]}
    assert _images_of(batch, [2], 9)["pixel_values"].tolist() == [[1.0]]
    assert _images_of(batch, [0, 1], 9)["pixel_values"].tolist() == [[0.0]]
    assert _images_of({"input_ids": ids}, [0], 9) == {}


TINY_STUDENT = ["student.kwargs.text_layers=1"]


def test_a_run_trains_on_its_own_answers(tmp_path, teacher_run):
    args = tiny_run_args(tmp_path, f"teacher.path={teacher_run}/student", "on_policy={temperature: 1.0}",
                         "loss.ce.weight=0", "loss.kd={type: tvd}", "run_id=op", *TINY_STUDENT)
    assert main(["run", "experiments/windtunnel/teacher.yaml", *args]) == 0
    summary = json.loads((tmp_path / "runs" / "windtunnel-teacher" / "op" / "summary.json").read_text())
    assert summary["status"] == "completed" and "train/kd" in summary["final_train"]
    assert summary["target"] == "on_policy"


@pytest.mark.parametrize("extra, words", [
    (["on_policy={fraction: 0}"], "'on_policy.fraction' must be in (0, 1]"),
    (["on_policy={turn: last}"], "'on_policy.turn' must be random | first"),
    (["on_policy={temperature: -1}"], "'on_policy.temperature' must be >= 0"),
    (["target=on_policy"], "on_policy needs an 'on_policy:' block"),
])
def test_bad_on_policy_options_exit_2(tmp_path, teacher_run, capsys, extra, words):
    args = tiny_run_args(tmp_path, f"teacher.path={teacher_run}/student", "loss.ce.weight=0", "loss.kd={type: tvd}",
                         *extra)
    assert main(["run", "experiments/windtunnel/teacher.yaml", *args]) == 2
    assert words in capsys.readouterr().err
    assert not list((tmp_path / "runs").rglob("summary.json")) if (tmp_path / "runs").exists() else True
