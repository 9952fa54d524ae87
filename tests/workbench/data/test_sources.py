"""Data beyond LLaVA JSON: JSONL (LLaVA-style or `messages` + `images`), Hugging Face datasets
(save_to_disk folders, parquet; images as paths or bytes). The same wind-tunnel records in
every layout must give the same samples and train a student to exactly the same weights."""

import io
import json

import pytest
from PIL import Image

from conftest import tiny_run_args
from workbench.cli import main
from workbench.data.llava import LlavaDataset
from workbench.errors import WorkbenchError

datasets = pytest.importorskip("datasets")


def as_messages(rec: dict, images_key: bool = True) -> dict:
    out = {"id": rec["id"], "qtypes": rec["qtypes"],
           "messages": [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                        for t in rec["conversations"]]}
    if images_key:
        out["images"] = [rec["image"]]
    return out


def write_layouts(world, out):
    """The world's train/val records as JSONL messages, an HF dataset with image bytes
    (save_to_disk), and parquet with image paths."""
    for split in ("train", "val"):
        records = json.loads((world / f"{split}.json").read_text())
        (out / f"{split}.jsonl").write_text("".join(json.dumps(as_messages(r)) + "\n" for r in records))
        rows = [{**as_messages(r, images_key=False), "image": {"bytes": (world / r["image"]).read_bytes(), "path": None}}
                for r in records]
        features = datasets.Features({
            "id": datasets.Value("string"), "qtypes": datasets.List(datasets.Value("string")),
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
            "image": datasets.Image()})
        datasets.Dataset.from_list(rows, features=features).save_to_disk(str(out / f"{split}-bytes"))
        paths = [{"id": r["id"], "conv": r["conversations"], "img": r["image"], "qtypes": r["qtypes"]} for r in records]
        datasets.Dataset.from_list(paths).to_parquet(str(out / f"{split}.parquet"))


@pytest.fixture(scope="module")
def layouts(world_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    write_layouts(world_dir, out)
    return out


def same_samples(a: LlavaDataset, b: LlavaDataset) -> None:
    assert len(a) == len(b)
    for i in (0, len(a) - 1):
        x, y = a[i], b[i]
        assert (x["id"], x["messages"], x["qtypes"]) == (y["id"], y["messages"], y["qtypes"])
        assert list(x["image"].getdata()) == list(y["image"].getdata())


def test_every_layout_gives_the_llava_samples(world_dir, layouts):
    from workbench.data.sources import hf_records, load_hf_dataset

    reference = LlavaDataset(world_dir / "val.json")
    same_samples(reference, LlavaDataset(layouts / "val.jsonl", world_dir))
    ds = load_hf_dataset(str(layouts / "val-bytes"), "data.val")
    records, images = hf_records(ds, {}, "val-bytes")
    assert images is not None and images.lazy  # bytes: decoded when read
    same_samples(reference, LlavaDataset(layouts / "val-bytes", records=records, images=images))
    ds = load_hf_dataset(str(layouts / "val.parquet"), "data.val")
    records, images = hf_records(ds, {"conversations": "conv", "image": "img"}, "val.parquet")
    assert images is None  # paths: header-checked files
    same_samples(reference, LlavaDataset(layouts / "val.parquet", world_dir, records=records))


def test_hf_dataset_and_jsonl_train_exactly_like_llava_json(world_dir, layouts, tmp_path):
    def run(name, *data):
        args = tiny_run_args(tmp_path, f"name={name}", "data.windtunnel.n_train=64", "trainer.max_steps=4",
                             f"student.processor={world_dir / 'processor'}", *data)
        assert main(["run", "experiments/windtunnel/teacher.yaml", *args]) == 0
        return json.loads((tmp_path / "runs" / name / "latest" / "summary.json").read_text())

    llava = run("json", "data.type=llava", f"data.train={world_dir / 'train.json'}", f"data.val={world_dir / 'val.json'}")
    jsonl = run("jsonl", "data.type=llava", f"data.train={layouts / 'train.jsonl'}",
                f"data.val={layouts / 'val.jsonl'}", f"data.image_folder={world_dir}")
    hf = run("hf", "data.type=hf_dataset", f"data.train={layouts / 'train-bytes'}", f"data.val={layouts / 'val-bytes'}")
    parquet = run("parquet", "data.type=hf_dataset", f"data.train={layouts / 'train.parquet'}",
                  f"data.val={layouts / 'val.parquet'}", "data.columns.conversations=conv", "data.columns.image=img",
                  f"data.image_folder={world_dir}")
    for other in (jsonl, hf, parquet):
        assert other["student"] == llava["student"]
        assert other["final_train"] == pytest.approx(llava["final_train"], rel=1e-6)


def test_lazily_decoded_bad_images_follow_the_bad_image_policy(world_dir, tmp_path):
    from workbench.data.sources import hf_records

    recs = json.loads((world_dir / "val.json").read_text())[:3]
    good = (world_dir / recs[0]["image"]).read_bytes()
    rows = [{"id": r["id"], "conversations": r["conversations"], "image": data}
            for r, data in zip(recs, [good, b"\x89PNG\r\n\x1a\n broken", good])]
    ds = datasets.Dataset.from_list(rows)  # a binary column
    records, images = hf_records(ds, {}, "mem")
    with pytest.raises(WorkbenchError, match="image of row 1 of mem .*cannot be decoded"):
        LlavaDataset("mem", records=records, images=images)[1]
    skipping = LlavaDataset("mem", records=records, images=images, bad_images="skip")
    assert skipping[1]["id"] == str(recs[2]["id"]) and skipping.skipped_images[0]["id"] == str(recs[1]["id"])


def test_images_shared_by_many_records_are_checked_once(world_dir, tmp_path, monkeypatch):
    import workbench.data.sources as sources

    recs = json.loads((world_dir / "train.json").read_text())[:4]
    many = [{**recs[i % 4], "id": f"r{i}"} for i in range(400)]
    (tmp_path / "many.json").write_text(json.dumps(many))
    opened = []
    original = sources._file_problem
    monkeypatch.setattr(sources, "_file_problem", lambda p: opened.append(p) or original(p))
    assert len(LlavaDataset(tmp_path / "many.json", world_dir)) == 400
    assert len(opened) == 4


@pytest.mark.parametrize("text, words", [
    ('{"messages": [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "yo"}], '
     '"images": ["a.png", "b.png"]}', ["record 0", "2 images but 1"]),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', ["record 0", "'role'"]),
    ('{"messages": [{"role": "user", "content": [{"type": "video"}]}]}', ["record 0", "neither text nor image"]),
    ('{"messages": []}', ["record 0", "non-empty 'messages'"]),
    ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n{oops',
     ["line 2", "not valid JSON"]),
])
def test_jsonl_refuses_broken_records(tmp_path, text, words):
    path = tmp_path / "d.jsonl"
    path.write_text(text + "\n")
    with pytest.raises(WorkbenchError) as info:
        LlavaDataset(path, tmp_path)
    assert all(w in str(info.value) for w in [str(path), *words]), str(info.value)


def test_hf_dataset_inputs_that_exit_2(layouts, world_dir, tmp_path, capsys):
    datasets.DatasetDict({"train": datasets.load_from_disk(str(layouts / "val-bytes"))}).save_to_disk(
        str(tmp_path / "dict"))
    (tmp_path / "notes.txt").write_text("x")
    base = ["run", "experiments/windtunnel/teacher.yaml", *tiny_run_args(tmp_path), "data.type=hf_dataset",
            f"student.processor={world_dir / 'processor'}"]
    cases = [
        ([f"data.train={tmp_path / 'dict'}"], "holds the splits ['train']"),
        ([f"data.train={tmp_path / 'nope.parquet'}"], "does not exist"),
        ([f"data.train={tmp_path / 'notes.txt'}"], "expected a save_to_disk folder"),
        ([f"data.train={layouts / 'train.parquet'}"], "no 'conversations' or 'messages' column"),
        ([f"data.train={layouts / 'train.parquet'}", "data.columns.conversations=dialog"], "no column 'dialog'"),
        ([f"data.train={layouts / 'train.parquet'}", "data.columns.answer=x"], "unknown field"),
    ]
    for overrides, words in cases:
        assert main([*base, *overrides]) == 2, overrides
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()
