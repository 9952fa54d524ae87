"""The wind tunnel (seeded, self-consistent, in the processor's vocabulary), the LLaVA
collator (labels only on answers + end-of-turn, image-token expansion and placement) and
`LlavaDataset` on hand-written LLaVA-format files."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vlm
from PIL import Image

from workbench.data import LlavaDataset, VLMCollator
from workbench.data.llava import IGNORE_INDEX
from workbench.data.windtunnel import (
    COLOURS, COLS, NUMBERS, QUESTION_TYPES, ROWS, SHAPES, WorldConfig, write_windtunnel,
)
from workbench.errors import WorkbenchError

SMALL = dict(n_train=6, n_val=3, n_classification=4)
COLOUR_NAMES = list(COLOURS)
COLOUR_RGB = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=float)  # (6, 3)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def records(world: Path) -> list[dict]:
    return json.loads((world / "train.json").read_text()) + json.loads((world / "val.json").read_text())


def qa_pairs(rec: dict) -> list[tuple[str, str]]:
    conv = rec["conversations"]
    return [(q["value"].replace("<image>", "").strip(), a["value"]) for q, a in zip(conv[::2], conv[1::2])]


def objects_in_cells(image: Image.Image, grid: int = 3) -> dict[tuple[int, int], str]:
    """(row, col) -> nearest named colour, for every grid cell that holds a shape.

    Shapes sit inside one cell on a dark background (every colour has a channel >= 200).
    """
    a = np.asarray(image, dtype=float)  # (H, W, 3)
    cell = a.shape[0] // grid
    found = {}
    for r in range(grid):
        for c in range(grid):
            pixels = a[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].reshape(-1, 3)
            bright = pixels[pixels.max(1) > 130]
            if len(bright) >= 8:
                found[(r, c)] = COLOUR_NAMES[int(np.linalg.norm(COLOUR_RGB - bright.mean(0), axis=1).argmin())]
    return found


@pytest.fixture(scope="module")
def collator(processor):
    return VLMCollator(processor)


@pytest.fixture(scope="module")
def train_set(world_dir):
    return LlavaDataset(world_dir / "train.json")


# ---- the wind tunnel -------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_world(tmp_path):
    a = write_windtunnel(tmp_path / "a", seed=7, **SMALL)
    b = write_windtunnel(tmp_path / "b", seed=7, **SMALL)
    c = write_windtunnel(tmp_path / "c", seed=8, **SMALL)
    fa, fb, fc = files(a), files(b), files(c)
    assert fa == fb  # every image, JSON and processor file
    assert sum(k.startswith("images/") for k in fa) == SMALL["n_train"] + SMALL["n_val"]
    assert fa["train.json"] != fc["train.json"] and fa["val.json"] != fc["val.json"]
    images = [k for k in fa if k.startswith("images/")]
    assert images == [k for k in fc if k.startswith("images/")]  # same names ...
    assert all(fa[k] != fc[k] for k in images)  # ... different pixels
    assert fa["train.json"] != fa["val.json"]


def test_world_manifest_and_refusal(tmp_path):
    out = write_windtunnel(tmp_path / "w", seed=3, n_train=2, n_val=1)
    manifest = json.loads((out / "world.json").read_text())
    assert (manifest["seed"], manifest["n_train"], manifest["n_val"]) == (3, 2, 1)
    with pytest.raises(FileExistsError, match="world.json"):
        write_windtunnel(out, n_train=2, n_val=1)


def test_a_high_resolution_world_has_16_image_tokens_per_cell(tmp_path):
    """`data.windtunnel.patch_size=4`: the same pictures, 4-pixel patches (144 image tokens on a
    3x3 grid), a folder of its own; the default keeps the folder worlds were made in before."""
    from transformers import AutoProcessor

    from workbench.config import DataConfig, WindTunnelConfig
    from workbench.data import generate_windtunnel, windtunnel_dir

    cfg = DataConfig(type="windtunnel", root=str(tmp_path), windtunnel=WindTunnelConfig(n_train=2, n_val=1))
    fine = DataConfig(type="windtunnel", root=str(tmp_path),
                      windtunnel=WindTunnelConfig(n_train=2, n_val=1, patch_size=4))
    assert windtunnel_dir(fine) != windtunnel_dir(cfg)
    out = generate_windtunnel(fine)
    processor = AutoProcessor.from_pretrained(out / "processor")
    assert processor.patch_size == 4 and json.loads((out / "world.json").read_text())["patch_size"] == 4
    batch = VLMCollator(processor)([LlavaDataset(out / "train.json")[0]])
    assert int(batch["image_mask"].sum()) == (48 // 4) ** 2


def test_a_clip_world_shows_one_scene_in_frames_and_asks_about_the_last(tmp_path):
    """`frames: 3`: each record is three images with a shared background, the same objects
    (moving between cells) and fresh noise; positions are asked about the last frame."""
    world = WorldConfig(frames=3, motion=0.5)
    out = write_windtunnel(tmp_path / "clips", n_train=24, n_val=2, world=world)
    assert json.loads((out / "world.json").read_text())["frames"] == 3
    moved = 0
    for rec in json.loads((out / "train.json").read_text()):
        assert len(rec["image"]) == 3 and rec["conversations"][0]["value"].startswith("<image>\n" * 3)
        frames = []
        for name in rec["image"]:
            with Image.open(out / name) as im:
                frames.append(objects_in_cells(im.convert("RGB")))
        assert len({tuple(sorted(f.values())) for f in frames}) == 1  # the same objects in every frame
        moved += frames[0] != frames[-1]
        for qtype, (question, answer) in zip(rec["qtypes"], qa_pairs(rec)):
            if qtype == "position":
                row, col = answer.split()
                assert frames[-1].get((ROWS.index(row), COLS.index(col))) == question.split()[3]
    assert moved >= 6  # objects do move
    still = write_windtunnel(tmp_path / "still", n_train=4, n_val=1, world=WorldConfig(frames=2, motion=0.0))
    for rec in json.loads((still / "train.json").read_text()):
        a, b = (np.asarray(Image.open(still / name), dtype=float) for name in rec["image"])
        assert np.abs(a - b).mean() < 20  # the same picture up to noise and jitter
    varied = write_windtunnel(tmp_path / "varied", n_train=24, n_val=1, world=WorldConfig(frames=4, min_frames=1))
    counts = [len(rec["image"]) for rec in json.loads((varied / "train.json").read_text())]
    assert set(counts) == {1, 2, 3, 4}  # clips of 1..4 frames, a placeholder each
    assert all(r["conversations"][0]["value"].count("<image>") == len(r["image"])
               for r in json.loads((varied / "train.json").read_text()))
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out / "processor")
    batch = VLMCollator(processor)([LlavaDataset(out / "val.json")[0], LlavaDataset(out / "val.json")[1]])
    assert batch["pixel_values"].shape[0] == 6 and batch["image_mask"].sum(1).tolist() == [27, 27]
    with torch.no_grad():
        assert make_tiny_vlm(processor)(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
                                        ).logits.shape[:2] == batch["input_ids"].shape


def test_half_empty_scenes_and_the_patches_that_show_objects(tmp_path):
    """min_shapes = max_shapes = 2 on the 2x2 grid: every picture half empty; `object_patches`
    finds exactly the occupied cells from the processed pixels (at 16- and 8-pixel patches)."""
    from transformers import AutoProcessor

    from workbench.data.windtunnel import object_patches

    out = write_windtunnel(tmp_path / "half", n_train=2, n_val=12, world=WorldConfig(grid=2, min_shapes=2, max_shapes=2))
    processor = AutoProcessor.from_pretrained(out / "processor")
    data = LlavaDataset(out / "val.json")
    batch = VLMCollator(processor)([data[i] for i in range(len(data))])
    ip = processor.image_processor
    flags = object_patches(batch["pixel_values"], 16, ip.image_mean, ip.image_std)
    fine = object_patches(batch["pixel_values"], 8, ip.image_mean, ip.image_std).view(-1, 4, 4)
    for i, rec in enumerate(json.loads((out / "val.json").read_text())):
        with Image.open(out / rec["image"]) as im:
            cells = objects_in_cells(im.convert("RGB"), grid=2)
        assert sorted(flags[i].nonzero().squeeze(1).tolist()) == sorted(r * 2 + c for r, c in cells)
        # every 8-pixel quarter of an occupied cell shows part of its shape; empty cells none
        quarters = fine[i].view(2, 2, 2, 2).transpose(1, 2).reshape(4, 4)
        assert quarters.all(1).tolist() == flags[i].tolist() and not quarters[~flags[i]].any()


def test_describe_questions_list_every_object_in_reading_order(tmp_path, processor):
    """The extra question type "describe": a long answer that the pixels fix word for word;
    only worlds that ask it extend the vocabulary (after every other word)."""
    from transformers import AutoProcessor

    from workbench.data.windtunnel import vocabulary

    out = write_windtunnel(tmp_path / "d", n_train=16, n_val=1,
                           world=WorldConfig(question_types=("describe", "count"), questions_per_image=2))
    for rec in json.loads((out / "train.json").read_text()):
        with Image.open(out / rec["image"]) as im:
            cells = objects_in_cells(im.convert("RGB"))
        answer = dict(zip(rec["qtypes"], (a for _, a in qa_pairs(rec))))["describe"]
        parts = answer.split(" and ")
        assert len(parts) == len(cells)
        for part, (cell, colour) in zip(parts, sorted(cells.items())):
            c, _, row, col = part.split()
            assert (c, (ROWS.index(row), COLS.index(col))) == (colour, cell)
    described = AutoProcessor.from_pretrained(out / "processor").tokenizer
    assert len(described) == len(processor.tokenizer) + 3 == len(vocabulary(extra=True))
    assert described.convert_tokens_to_ids("red") == processor.tokenizer.convert_tokens_to_ids("red")


def test_world_shape_of_records(world_dir):
    recs = json.loads((world_dir / "train.json").read_text())
    assert len(recs) == 64 and len(json.loads((world_dir / "val.json").read_text())) == 16
    assert len({r["id"] for r in records(world_dir)}) == 80
    for rec in recs:
        conv = rec["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * WorldConfig().questions_per_image
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in conv) == 1
        assert len(rec["qtypes"]) == WorldConfig().questions_per_image and set(rec["qtypes"]) <= set(QUESTION_TYPES)
        assert (world_dir / rec["image"]).is_file()


def test_answers_are_well_formed(world_dir):
    counts = {t: 0 for t in QUESTION_TYPES}
    for rec in records(world_dir):
        for qtype, (question, answer) in zip(rec["qtypes"], qa_pairs(rec)):
            counts[qtype] += 1
            if qtype == "count":
                assert question == "how many shapes are there ?" and answer in NUMBERS[1:4]
            elif qtype == "presence":
                assert re.fullmatch(r"is there a (\w+) (\w+) \?", question) and answer in ("yes", "no")
            elif qtype == "color":
                assert question.split()[-2] in SHAPES and answer in COLOURS
            elif qtype == "shape":
                assert question.split()[-3] in COLOURS and answer in SHAPES
            elif qtype == "cell":  # "what is in the <row> <col> ?" -> "<colour> <shape>" | "nothing"
                assert question.split()[-3] in ROWS and question.split()[-2] in COLS
                assert answer == "nothing" or (answer.split()[0] in COLOURS and answer.split()[1] in SHAPES)
            else:
                assert qtype == "position"
                row, col = answer.split()
                assert row in ROWS and col in COLS
    assert all(counts.values()), counts  # every question type occurs


def test_answers_agree_with_the_pixels(world_dir):
    """Count, position and colour answers checked against the rendered image."""
    for rec in records(world_dir):
        with Image.open(world_dir / rec["image"]) as im:
            assert im.size == (48, 48)
            cells = objects_in_cells(im.convert("RGB"))
        colours_seen = set(cells.values())
        for qtype, (question, answer) in zip(rec["qtypes"], qa_pairs(rec)):
            words = question.split()
            if qtype == "count":
                assert NUMBERS.index(answer) == len(cells), (rec["id"], cells)
            elif qtype == "position":  # "where is the <colour> <shape> ?"
                row, col = answer.split()
                assert cells.get((ROWS.index(row), COLS.index(col))) == words[3], (rec["id"], cells)
            elif qtype == "color":
                assert answer in colours_seen
            elif qtype == "shape":  # "what shape is the <colour> one ?"
                assert words[4] in colours_seen
            elif answer == "yes":  # "is there a <colour> <shape> ?"
                assert words[3] in colours_seen


def test_answers_agree_across_turns(world_dir):
    """Within one conversation, facts stated twice agree (same scene behind every turn)."""
    for rec in records(world_dir):
        where, colour_of, shape_of, present = {}, {}, {}, {}
        for qtype, (question, answer) in zip(rec["qtypes"], qa_pairs(rec)):
            w = question.split()
            if qtype == "position":
                where.setdefault((w[3], w[4]), answer)
                assert where[(w[3], w[4])] == answer
                present[(w[3], w[4])] = "yes"
            elif qtype == "color":
                colour_of[w[4]] = answer
            elif qtype == "shape":
                shape_of[w[4]] = answer
            elif qtype == "presence":
                assert present.setdefault((w[3], w[4]), answer) == answer
        for shape, colour in colour_of.items():  # "the <shape>" is unique, and it is <colour>
            assert all(c == colour for (c, s) in where if s == shape)
            assert present.get((colour, shape), "yes") == "yes"
        for colour, shape in shape_of.items():
            assert all(s == shape for (c, s) in where if c == colour)


def test_every_word_is_in_the_vocabulary(world_dir, processor, collator, train_set):
    vocab = processor.tokenizer.get_vocab()
    for rec in records(world_dir):
        for question, answer in qa_pairs(rec):
            assert set((question + " " + answer).split()) <= set(vocab), (question, answer)
    unk = processor.tokenizer.unk_token_id
    val_set = LlavaDataset(world_dir / "val.json")
    for data in (train_set, val_set):
        for start in range(0, len(data), 32):
            batch = collator([data[i] for i in range(start, min(start + 32, len(data)))])
            assert not (batch["input_ids"] == unk).any()


def test_question_first_world(tmp_path, processor, collator):
    out = write_windtunnel(tmp_path / "qf", n_train=3, n_val=1, world=WorldConfig(question_first=True))
    recs = json.loads((out / "train.json").read_text())
    assert all(r["conversations"][0]["value"].endswith("?\n<image>") for r in recs)
    batch = collator([LlavaDataset(out / "train.json")[i] for i in range(3)])
    for row, rec in zip(batch["input_ids"], recs):
        tokens = processor.tokenizer.convert_ids_to_tokens(row)
        first_image = tokens.index("<image>")
        question = rec["conversations"][0]["value"].split("\n")[0].split()
        assert tokens[first_image - len(question):first_image] == question


def test_classification_folders(world_dir):
    root = world_dir / "classification"
    classes = {f"{c}_{s}" for c in COLOURS for s in SHAPES}
    for split, n in (("train", 40), ("val", 8)):
        folders = sorted(p for p in (root / split).iterdir())
        assert folders and all(p.is_dir() and p.name in classes for p in folders)
        images = sorted((root / split).glob("*/*.png"))
        assert len(images) == n
        for path in images:
            with Image.open(path) as im:
                assert im.size == (48, 48) and im.mode == "RGB"
                cells = objects_in_cells(im)
            assert list(cells.values()) == [path.parent.name.split("_")[0]]  # one shape, of the folder's colour
    assert len({p.parent.name for p in (root / "train").glob("*/*.png")}) > 6  # not one class only


# ---- the collator ----------------------------------------------------------------------------


def answer_text(rec: dict) -> list[str]:
    return [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]


def test_labels_cover_exactly_answers_and_end_of_turn(processor, collator, train_set):
    batch = collator([train_set[i] for i in range(4)])
    tok = processor.tokenizer
    eos = tok.eos_token_id
    for i in range(4):
        labels, ids, keep = batch["labels"][i], batch["input_ids"][i], batch["attention_mask"][i].bool()
        supervised = labels != IGNORE_INDEX
        assert torch.equal(labels[supervised], ids[supervised])  # labels are not shifted
        assert not (supervised & ~keep).any()  # never on padding
        answers = answer_text(train_set.records[i])
        expected = " ".join(f"{a} </s>" for a in answers)
        assert tok.decode(labels[supervised]) == expected
        # every supervised run starts right after "ASSISTANT :" and ends with </s>
        tokens = tok.convert_ids_to_tokens(ids)
        positions = supervised.nonzero().squeeze(1).tolist()
        starts = [p for p in positions if p - 1 not in positions]
        ends = [p for p in positions if p + 1 not in positions]
        assert len(starts) == len(answers) == int((ids == eos).sum())
        assert all(tokens[p - 2:p] == ["ASSISTANT", ":"] for p in starts)
        assert all(ids[p] == eos for p in ends)


def test_image_tokens_expanded_and_masked(processor, collator, train_set):
    batch = collator([train_set[i] for i in range(3)])
    n_image = (48 // processor.patch_size) ** 2
    image_id = processor.image_token_id
    assert batch["pixel_values"].shape == (3, 3, 48, 48)
    assert torch.equal(batch["image_mask"], batch["input_ids"] == image_id)
    assert batch["image_mask"].sum(1).tolist() == [n_image] * 3
    for row in batch["image_mask"]:
        pos = row.nonzero().squeeze(1)
        assert torch.equal(pos, torch.arange(pos[0], pos[0] + n_image))  # one contiguous run
    assert not (batch["labels"][batch["image_mask"]] != IGNORE_INDEX).any()
    assert [s == train_set[i]["qtypes"] for i, s in enumerate(batch["qtypes"])] == [True] * 3


def write_records(folder: Path, recs: list[dict], name: str = "data.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(recs))
    return path


def test_image_after_question_keeps_order_and_text_only_rows(tmp_path, world_dir, processor, collator):
    image = str(world_dir / "images" / "train-000000.png")
    recs = [
        {"id": "late-image", "image": image, "conversations": [
            {"from": "human", "value": "how many shapes are there ?\n<image>"}, {"from": "gpt", "value": "two"}]},
        {"id": "text-only", "conversations": [
            {"from": "human", "value": "how many shapes are there ?"}, {"from": "gpt", "value": "two"},
            {"from": "human", "value": f"is there a red {SHAPES[0]} ?"}, {"from": "gpt", "value": "no"}]},
    ]
    data = LlavaDataset(write_records(tmp_path, recs), absolute_images=True)
    assert data[1]["image"] is None
    batch = collator([data[0], data[1]])
    tok = processor.tokenizer
    tokens = tok.convert_ids_to_tokens(batch["input_ids"][0])
    first = tokens.index("<image>")
    assert tokens[:2] == ["USER", ":"] and tokens[2:first] == "how many shapes are there ?".split()
    assert tokens[first + 9:first + 11] == ["ASSISTANT", ":"]
    assert batch["pixel_values"].shape[0] == 1  # only the one image
    assert batch["image_mask"].sum(1).tolist() == [9, 0]
    text_labels = batch["labels"][1][batch["labels"][1] != IGNORE_INDEX]
    assert tok.decode(text_labels) == "two </s> no </s>"

    only_text = collator([data[1]])
    assert "pixel_values" not in only_text and not only_text["image_mask"].any()
    assert torch.equal(only_text["labels"][0], batch["labels"][1][: only_text["labels"].shape[1]])

    # the mixed batch is a valid model input: the text-only row gets the same logits alone
    model = make_tiny_vlm(processor).eval()
    with torch.no_grad():
        mixed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"]).logits
        alone = model(input_ids=only_text["input_ids"], attention_mask=only_text["attention_mask"]).logits
    n = int(only_text["attention_mask"].sum())
    torch.testing.assert_close(mixed[1, :n], alone[0, :n], rtol=1e-4, atol=1e-5)


def test_max_length_truncates_but_never_cuts_image_tokens(processor, train_set):
    samples = [train_set[i] for i in range(2)]
    full = VLMCollator(processor)(samples)
    first_answer = int((full["labels"] != IGNORE_INDEX).int().argmax(1).max())  # both keep an answer token
    n = first_answer + 1
    cut = VLMCollator(processor, max_length=n)(samples)
    assert cut["input_ids"].shape[1] == n
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(cut[key], full[key][:, :n])
    with pytest.raises(WorkbenchError, match="max_length=5"):
        VLMCollator(processor, max_length=5)(samples)
    shortest = int((full["labels"] != IGNORE_INDEX).int().argmax(1).min())  # before every answer of one sample
    with pytest.raises(WorkbenchError, match=f"max_length={shortest} cuts off every answer token"):
        VLMCollator(processor, max_length=shortest)(samples)


# ---- LlavaDataset on real-format files -------------------------------------------------------


REAL_STYLE = [
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
    {"id": "i6IyJda_0", "conversations": [  # ShareGPT-style text-only record
        {"from": "human", "value": "How to make a cake?"}, {"from": "gpt", "value": "Mix, then bake."}]},
    {"id": 42, "image": "ocr_vqa/images/grey.png", "conversations": [
        {"from": "human", "value": "Who wrote this book?\n<image>"}, {"from": "gpt", "value": "Nobody."}]},
]


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "coco" / "train2017").mkdir(parents=True)
    (folder / "ocr_vqa" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 40), (200, 10, 10)).save(folder / "coco" / "train2017" / "000000033471.jpg")
    Image.new("L", (30, 30), 128).save(folder / "ocr_vqa" / "images" / "grey.png")
    return folder


def test_llava_dataset_reads_real_format(tmp_path, image_folder):
    recs = [dict(r) for r in REAL_STYLE]
    recs.append({"id": "abs", "image": str(image_folder / "ocr_vqa" / "images" / "grey.png"),  # absolute path
                 "conversations": [{"from": "user", "value": "<image>"}, {"from": "assistant", "value": "grey"}]})
    with pytest.raises(WorkbenchError, match="record 3 .*'abs'.* is absolute.*data.absolute_images=true"):
        LlavaDataset(write_records(tmp_path, recs, "llava_v1_5_mix.json"), image_folder)
    data = LlavaDataset(tmp_path / "llava_v1_5_mix.json", image_folder, absolute_images=True)
    assert len(data) == 4
    bus = data[0]
    assert bus["id"] == "000000033471" and bus["qtypes"] == []
    assert bus["image"].size == (64, 40) and bus["image"].mode == "RGB"
    assert [m["role"] for m in bus["messages"]] == ["user", "assistant", "user", "assistant"]
    assert bus["messages"][0]["content"] == [
        {"type": "image"}, {"type": "text", "text": "What are the colors of the bus in the image?"}]
    assert bus["messages"][1]["content"] == [{"type": "text", "text": "The bus in the image is white and red."}]
    text_only = data[1]
    assert text_only["image"] is None and text_only["messages"][0]["content"] == [
        {"type": "text", "text": "How to make a cake?"}]
    book = data[2]
    assert book["id"] == "42" and book["image"].mode == "RGB"  # grey image converted
    assert book["messages"][0]["content"] == [{"type": "text", "text": "Who wrote this book?"}, {"type": "image"}]
    assert data[3]["messages"][0]["content"] == [{"type": "image"}]
    assert len(LlavaDataset(tmp_path / "llava_v1_5_mix.json", image_folder, limit=2)) == 2


def test_llava_dataset_images_relative_to_json_by_default(tmp_path, image_folder):
    data = LlavaDataset(write_records(image_folder, REAL_STYLE[:1]))  # no image_folder: the JSON's folder
    assert data[0]["image"].size == (64, 40)
    with pytest.raises(WorkbenchError, match="000000033471.jpg"):
        LlavaDataset(write_records(tmp_path, REAL_STYLE[:1]))  # JSON one level up: image not found


@pytest.mark.parametrize("broken, words", [
    ({"image": "coco/train2017/missing.jpg"}, ["record 0", "'000000033471'", "missing.jpg", "does not exist"]),
    ({"conversations": []}, ["record 0", "conversations"]),
    ({"conversations": [{"from": "human", "value": "<image>\nhi"}]}, ["record 0", "assistant"]),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, ["record 0", "'from'"]),
    ({"conversations": [{"from": "gpt", "value": 3}]}, ["record 0", "'value'"]),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
     ["record 0", "'000000033471'", "<image>"]),  # an image the text never places
    ({"image": ["coco/train2017/000000033471.jpg"] * 2}, ["record 0", "2 images but 1 '<image>'"]),
    ({"image": []}, ["record 0", "non-empty list"]),
    ({"image": ["coco/train2017/000000033471.jpg", 3]}, ["record 0", "path string or a non-empty list"]),
    ({"image": ["coco/train2017/000000033471.jpg", "coco/train2017/gone.jpg"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nsame?"}, {"from": "gpt", "value": "no"}]},
     ["record 0", "gone.jpg", "does not exist"]),  # each frame of a multi-image record is checked
])
def test_llava_dataset_validates_records(tmp_path, image_folder, broken, words):
    path = write_records(tmp_path, [{**REAL_STYLE[0], **broken}, REAL_STYLE[1]])
    with pytest.raises(WorkbenchError) as info:
        LlavaDataset(path, image_folder)
    assert all(w in str(info.value) for w in [str(path), *words]), str(info.value)


@pytest.mark.parametrize("content, words", [
    ("[]", ["no records"]), ("{}", ["JSON list"]), ("[{", ["not valid JSON"]), (None, ["does not exist"]),
])
def test_llava_dataset_refuses_bad_files(tmp_path, content, words):
    path = tmp_path / "d.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(WorkbenchError) as info:
        LlavaDataset(path)
    assert all(w in str(info.value) for w in [str(path), *words])
