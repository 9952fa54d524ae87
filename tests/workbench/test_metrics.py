"""Answer accuracy from one teacher-forced pass (`workbench/metrics.py`): hand-built logits,
and the equivalence its docstring claims with greedy `generate` on tiny (trained) models."""

import pytest
import torch
from conftest import make_tiny_vlm

from workbench.data import LlavaDataset, VLMCollator
from workbench.metrics import IGNORE_INDEX, accuracies, answer_correct, merge_scores, score_batch
from workbench.batch import model_inputs
from workbench.data.windtunnel import WorldConfig

QPI = WorldConfig().questions_per_image  # answers per wind-tunnel conversation

X = IGNORE_INDEX
V = 10


def logits_predicting(next_tokens: list[list[int]]) -> torch.Tensor:
    """(B, L, V) logits whose argmax at position t is next_tokens[b][t]."""
    ids = torch.tensor(next_tokens)  # (B, L)
    logits = torch.randn(*ids.shape, V) * 0.1
    logits.scatter_(2, ids[..., None], 5.0)
    return logits


# ---- hand-built logits -----------------------------------------------------------------------


def test_all_right_one_wrong_token_spoils_its_span():
    labels = torch.tensor([[X, X, 4, 5, X]])  # a 2-token answer at positions 2, 3
    right = logits_predicting([[0, 4, 5, 0, 0]])  # position t predicts label t+1
    correct, row = answer_correct(right, labels)
    assert correct.tolist() == [True] and row.tolist() == [0]
    for wrong in ([[0, 4, 6, 0, 0]], [[0, 6, 5, 0, 0]]):  # second or first token wrong
        assert answer_correct(logits_predicting(wrong), labels)[0].tolist() == [False]
    # predictions at non-answer positions do not matter
    assert answer_correct(logits_predicting([[9, 4, 5, 9, 9]]), labels)[0].tolist() == [True]


def test_multi_turn_rows_give_one_entry_per_span_in_order():
    labels = torch.tensor([
        [X, 1, 2, X, X, 3, X, 4],  # three spans: [1, 2], [3], [4]
        [X, X, X, X, X, X, X, X],  # no answer at all
        [X, 7, X, X, 8, 9, X, X],  # two spans
    ])
    preds = [
        [1, 2, 0, 0, 3, 0, 5, 0],  # span [4] predicted 5: wrong
        [0] * 8,
        [7, 0, 0, 8, 0, 0, 0, 0],  # span [8, 9]: second token wrong
    ]
    correct, row = answer_correct(logits_predicting(preds), labels)
    assert correct.tolist() == [True, True, False, True, False]
    assert row.tolist() == [0, 0, 0, 2, 2]


def test_span_at_row_boundary_is_not_merged_with_the_next_row():
    labels = torch.tensor([[X, X, 1, 2], [X, 3, 4, X]])
    preds = [[0, 1, 2, 0], [3, 4, 0, 0]]
    correct, row = answer_correct(logits_predicting(preds), labels)
    assert correct.tolist() == [True, True] and row.tolist() == [0, 1]


def test_score_batch_buckets_by_tag_in_span_order():
    labels = torch.tensor([[X, 1, X, 2, X, 3], [X, 4, X, 5, X, X]])
    preds = [[1, 0, 9, 0, 3, 0], [4, 0, 5, 0, 0, 0]]  # row 0: right, wrong, right; row 1: right, right
    tags = [["count", "color", "count"], ["color"]]  # row 1 tags only its first span
    scores = score_batch(logits_predicting(preds), labels, tags)
    assert scores == {"all": (4, 5), "count": (2, 2), "color": (1, 2)}
    assert score_batch(logits_predicting(preds), labels) == {"all": (4, 5)}
    total = {}
    merge_scores(total, scores)
    merge_scores(total, {"all": (0, 3), "shape": (0, 1)})
    assert total == {"all": (4, 8), "count": (2, 2), "color": (1, 2), "shape": (0, 1)}
    assert accuracies(total) == {"acc": 0.5, "acc/color": 0.5, "acc/count": 1.0, "acc/shape": 0.0}


# ---- equivalence with greedy decoding --------------------------------------------------------


def answer_spans(labels_row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each contiguous run of answer labels."""
    pos = (labels_row != IGNORE_INDEX).nonzero().squeeze(1).tolist()
    spans = []
    for p in pos:
        if spans and spans[-1][1] == p:
            spans[-1][1] = p + 1
        else:
            spans.append([p, p + 1])
    return [tuple(s) for s in spans]


def greedy_correct(model, batch, eos_id: int, pad_id: int) -> list[bool]:
    """Exact match of `generate` (greedy) against each answer + </s>, given the gold history."""
    out = []
    for i, row in enumerate(batch["labels"]):
        for start, end in answer_spans(row):
            target = row[start:end].tolist()
            assert target[-1] == eos_id  # the end-of-turn token is part of the answer
            generated = model.generate(
                input_ids=batch["input_ids"][i:i + 1, :start],
                attention_mask=batch["attention_mask"][i:i + 1, :start],
                pixel_values=batch["pixel_values"][i:i + 1],
                do_sample=False, max_new_tokens=len(target), eos_token_id=eos_id, pad_token_id=pad_id,
            )
            out.append(generated[0, start:].tolist() == target)
    return out


@pytest.fixture(scope="module")
def batch(world_dir, processor):
    data = LlavaDataset(world_dir / "val.json", limit=6)
    return VLMCollator(processor)([data[i] for i in range(len(data))])


@pytest.fixture(scope="module")
def models(processor, batch):
    """A random model and the same model after 8 and 20 AdamW steps on the batch."""
    torch.manual_seed(0)
    model = make_tiny_vlm(processor, seed=1, vision_hidden=16, text_hidden=16, text_layers=1)
    snapshots = {"random": make_tiny_vlm(processor, seed=1, vision_hidden=16, text_hidden=16, text_layers=1)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs = model_inputs(batch)
    for step in range(1, 21):
        loss = model(**inputs, labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in (8, 20):
            snapshot = make_tiny_vlm(processor, seed=1, vision_hidden=16, text_hidden=16, text_layers=1)
            snapshot.load_state_dict(model.state_dict())
            snapshots[f"step{step}"] = snapshot
    return {name: m.eval() for name, m in snapshots.items()}


def test_answer_correct_equals_greedy_generate(models, batch, processor):
    tok = processor.tokenizer
    n_right, n_partly_right = {}, 0
    for name, model in models.items():
        with torch.no_grad():
            logits = model(**model_inputs(batch)).logits
        correct, row = answer_correct(logits, batch["labels"])
        token_right = logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]  # (B, L-1)
        for i, labels_row in enumerate(batch["labels"]):
            for start, end in answer_spans(labels_row):
                hits = token_right[i, start - 1:end - 1]
                n_partly_right += bool(hits.any() and not hits.all())
        expected = greedy_correct(model, batch, tok.eos_token_id, tok.pad_token_id)
        assert len(expected) == QPI * len(batch["ids"])
        assert correct.tolist() == expected, name
        assert row.tolist() == [r for r in range(len(batch["ids"])) for _ in range(QPI)]
        n_right[name] = int(correct.sum())
    # the comparison covers right and wrong answers, not just a model that gets nothing right
    assert 0 < sum(n_right.values()) < 3 * len(correct), n_right
    assert n_partly_right > 0  # spans with a right first or last token that are still wrong
    assert n_right["step20"] > n_right["random"]


def test_score_batch_on_a_model_matches_per_span_results(models, batch):
    with torch.no_grad():
        logits = models["step20"](**model_inputs(batch)).logits
    correct, row = answer_correct(logits, batch["labels"])
    expected: dict[str, tuple[int, int]] = {"all": (int(correct.sum()), len(correct))}
    flat_tags = [tag for tags in batch["qtypes"] for tag in tags]
    assert len(flat_tags) == len(correct)
    for tag, ok in zip(flat_tags, correct.tolist()):
        c, n = expected.get(tag, (0, 0))
        expected[tag] = (c + ok, n + 1)
    assert score_batch(logits, batch["labels"], batch["qtypes"]) == expected
    assert sum(n for tag, (_, n) in expected.items() if tag != "all") == len(correct)
