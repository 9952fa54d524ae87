"""Pseudo-labels (Jacobi decoding == greedy generation), the labelled split, parity alignment."""

import json

import pytest
import torch

from conftest import make_tiny_vlm
from conftest import quick
from workbench.cli import main
from workbench.data.llava import LlavaDataset, VLMCollator
from workbench.data.disagreement import DisagreementPool
from workbench.data.label_split import label_split, with_answers
from workbench.targets.cached import CacheJob


def pseudo_label(model, collator, samples, temperature, k, max_new_tokens=32):
    return CacheJob(model, collator, None, None, None, len(samples), max_new_tokens).rows(samples, True, temperature, k)


def teacher_forced(model, collator, samples, temperature, k):
    return CacheJob(model, collator, None, None, None, len(samples), 32).rows(samples, False, temperature, k)


@pytest.fixture(scope="module")
def samples(world_dir):
    ds = LlavaDataset(world_dir / "train.json")
    return ds, [ds[i] for i in range(5)]


def _greedy_turn_by_turn(model, processor, sample, eot: int, max_new_tokens: int) -> list[list[int]]:
    """Reference: render each prompt with the chat template and call `generate`, one turn at a time."""
    answers, messages = [], []
    for m in sample["messages"]:
        if m["role"] == "user":
            messages.append(m)
            continue
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = processor(text=[prompt], images=[sample["image"]], return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eot,
                             pad_token_id=processor.tokenizer.pad_token_id)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        new = new[:new.index(eot)] if eot in new else new
        answers.append(new)
        text = processor.tokenizer.decode(new)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    return answers


@pytest.mark.parametrize("seed", [0, 1])
def test_jacobi_pseudo_labels_equal_greedy_generation(processor, samples, seed):
    _, batch = samples
    model = make_tiny_vlm(processor, seed=seed).eval()
    collator = VLMCollator(processor)
    eot = processor.tokenizer.convert_tokens_to_ids("</s>")
    rows = pseudo_label(model, collator, batch, temperature=1.0, k=4, max_new_tokens=3)
    for sample, (ids, logp, rest, tokens, texts) in zip(batch, rows):
        reference = _greedy_turn_by_turn(model, processor, sample, eot, 3)
        # the cached target tokens are each answer followed by its end-of-turn token
        expected = [t for ans in reference for t in (*ans, eot)]
        assert tokens.tolist() == expected
        assert len(texts) == len(reference)
        assert ids.shape == logp.shape == (len(expected), 4)
        # the top-k rows are the teacher's distribution along its own answers
        pseudo = {**sample, "messages": with_answers_messages(sample["messages"], texts)}
        (ids2, logp2, rest2, tokens2, _), = teacher_forced(model, collator, [pseudo], 1.0, 4)
        assert torch.equal(tokens2, tokens) and torch.equal(ids2, ids)
        torch.testing.assert_close(logp2, logp, rtol=1e-5, atol=1e-5)
        # the stored remaining mass is exactly what the top-k leave over
        torch.testing.assert_close(rest.exp() + logp.exp().sum(-1), torch.ones(len(rest)), rtol=0, atol=1e-5)
        torch.testing.assert_close(rest2, rest, rtol=1e-5, atol=1e-5)


def with_answers_messages(messages, texts):
    out, k = [], 0
    for m in messages:
        if m["role"] == "assistant":
            m = {**m, "content": [{"type": "text", "text": texts[k]}]}
            k += 1
        out.append(m)
    return out


def test_label_split_is_seeded_and_order_independent():
    records = [{"id": f"r{i}"} for i in range(50)]
    a = label_split(records, 0.2, seed=3, mode="pseudo")
    b = label_split(list(reversed(records)), 0.2, seed=3, mode="pseudo")
    ids = lambda split, recs: sorted(recs[i]["id"] for i in split.labeled)  # noqa: E731
    assert ids(a, records) == ids(b, list(reversed(records))) and len(a.labeled) == 10
    assert sorted(a.labeled + a.unlabeled) == list(range(50))
    assert ids(label_split(records, 0.2, seed=4, mode="pseudo"), records) != ids(a, records)
    assert label_split(records, 1.0, 0, "drop").unlabeled == []


def test_disagreement_pool_is_empty_when_the_student_is_the_teacher(processor, samples):
    ds, batch = samples
    model = make_tiny_vlm(processor, seed=0).eval()
    # a random tiny model rarely ends a turn within a few tokens; favour the end-of-turn token a
    # little so that some answers end on their own (capped answers never match exactly)
    eot = processor.tokenizer.convert_tokens_to_ids("</s>")
    bias = torch.zeros(len(processor.tokenizer))
    bias[eot] = 0.3
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    collator = VLMCollator(processor)
    rows = pseudo_label(model, collator, batch, 1.0, 4, max_new_tokens=6)
    lengths = [len(t.split()) for *_, texts in rows for t in texts]
    assert min(lengths) < 6, lengths  # some answers end on their own
    records = [with_answers(ds.records[i], texts) for i, (*_, texts) in enumerate(rows)]
    pseudo_ds = LlavaDataset.__new__(LlavaDataset)
    pseudo_ds.__dict__.update(ds.__dict__, records=records)

    ended = [i for i, (*_, texts) in enumerate(rows) if all(len(t.split()) < 6 for t in texts)]
    capped = sorted(set(range(5)) - set(ended))
    pool = DisagreementPool(model, VLMCollator(processor), pseudo_ds, list(range(5)), batch_size=4)
    # a model reproduces its own greedy answers exactly, except where they were cut short
    assert pool.disagreements() == capped
    other = DisagreementPool(make_tiny_vlm(processor, seed=7).eval(), VLMCollator(processor), pseudo_ds, list(range(5)), 4)
    assert len(other.disagreements()) > 0
    assert pool(1) == (capped or list(range(5)))
    assert pool.history == [{"epoch": 1, "disagreements": len(capped), "pool": len(capped)}]


def test_parity_run_trains_on_teacher_labels_only(tmp_path_factory):
    from conftest import QUICKSTART

    root = tmp_path_factory.mktemp("parity")
    # the quickstart gives a teacher folder
    assert main(["run", QUICKSTART, *quick(root, "run_id=t")]) == 0
    teacher = root / "runs" / "windtunnel-quickstart" / "t" / "stages" / "teacher" / "student"
    args = [f"out_root={root}/runs", f"data.root={root}/data", "data.windtunnel.n_train=40",
            "data.windtunnel.n_val=16", "data.batch_size=8", "data.eval_batch_size=16", "data.max_new_tokens=3",
            f"teacher.path={teacher}", "trainer.max_steps=12", "trainer.val_every_n_steps=6",
            "trainer.log_every_n_steps=1", "student.kwargs.text_hidden=32", "student.kwargs.vision_hidden=32",
            "student.kwargs.text_heads=2", "student.kwargs.vision_heads=2", "run_id=p"]
    assert main(["run", "experiments/windtunnel/parity.yaml", *args]) == 0
    run = root / "runs" / "windtunnel-parity" / "p"
    summary = json.loads((run / "summary.json").read_text())
    for name in ("all", "parity"):
        stage = summary["stages"][name]
        assert stage["status"] == "completed"
        assert stage["data"] == {"labeled": 0, "unlabeled": 40, "unlabeled_use": "pseudo"}
    import pandas as pd

    metrics = pd.read_csv(run / "stages" / "parity" / "metrics.csv")
    # 40 records / batch 8: a new epoch (and a new disagreement pool) after 5 steps
    assert metrics["data/disagreements"].notna().any()
    assert "data/disagreements" not in pd.read_csv(run / "stages" / "all" / "metrics.csv")
