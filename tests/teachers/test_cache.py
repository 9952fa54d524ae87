"""Teacher-logit cache storage (`teachers/cache.py`): shards, resume, refusal, fingerprints."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import save_file

import teachers.cache as cache_module
from teachers.cache import (
    CacheWriter,
    TeacherCache,
    diff_fingerprints,
    fingerprint_data,
    fingerprint_processor,
    fingerprint_teacher,
)
from teachers.errors import TeacherError

K = 4
LENGTHS = [5, 0, 3, 7, 1, 2, 0, 6, 4, 3]  # T per sample, two empty ones
IDS = [f"sample-{i:02d}" for i in range(len(LENGTHS))]
FINGERPRINT = {
    "teacher": {"path": "teachers/tiny", "revision": None, "weights_sha256": "3fa2" + "0" * 60},
    "tokenizer_sha256": "9b1c" + "1" * 60,
    "data": {"n_samples": 10, "sample_ids_sha256": "aa" * 32},
    "top_k": K,
    "temperature": 2.0,
}


def sample(i: int) -> dict:
    """Deterministic cache content of sample i: T = LENGTHS[i] positions, answers on odd i."""
    gen = torch.Generator().manual_seed(i)
    t = LENGTHS[i]
    logp = torch.log_softmax(torch.randn(t, 50, generator=gen) * 3, dim=-1).topk(K, dim=-1)
    return {
        "topk_ids": logp.indices,
        "topk_logp": logp.values,
        "tokens": torch.randint(0, 50, (t,), generator=gen),
        "answers": [f"answer {i}", "second"] if i % 2 else None,
    }


def write(directory, indices, shard_size=3, close=True, fingerprint=FINGERPRINT, **kwargs) -> CacheWriter:
    writer = CacheWriter(directory, fingerprint, shard_size=shard_size, **kwargs)
    for i in indices:
        if IDS[i] not in writer.done_ids():
            writer.add(IDS[i], **sample(i))
    if close:
        writer.close()
    return writer


def assert_entry(cache: TeacherCache, i: int) -> None:
    want, got = sample(i), cache.get(IDS[i])
    assert got.topk_ids.dtype == torch.long and got.tokens.dtype == torch.long
    assert got.topk_logp.dtype == torch.float32
    assert got.topk_ids.shape == (LENGTHS[i], K) and got.tokens.shape == (LENGTHS[i],)
    assert torch.equal(got.topk_ids, want["topk_ids"])
    assert torch.equal(got.topk_logp, want["topk_logp"])
    assert torch.equal(got.tokens, want["tokens"])
    assert got.answers == want["answers"] == cache.answers(IDS[i])


# ----------------------------------------------------------------------------- round trip


def test_round_trip_over_several_shards(tmp_path):
    write(tmp_path / "cache", range(10))
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == ["manifest.json", *[f"shard-0000{i}.{ext}" for i in range(4) for ext in ("json", "safetensors")]]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_samples"] == 10 and manifest["n_positions"] == sum(LENGTHS)
    assert [s["n_samples"] for s in manifest["shards"]] == [3, 3, 3, 1]

    cache = TeacherCache(tmp_path / "cache")
    assert len(cache) == 10 and cache.top_k == K and cache.temperature == 2.0
    assert cache.fingerprint == FINGERPRINT
    order = list(range(10))
    random.Random(0).shuffle(order)  # lookups by id, in any order
    for i in order:
        assert IDS[i] in cache
        assert_entry(cache, i)
    assert "sample-99" not in cache
    with pytest.raises(TeacherError, match=rf"'sample-99' is not in teacher cache {tmp_path / 'cache'}"):
        cache.get("sample-99")


def test_write_order_does_not_matter(tmp_path):
    order = [7, 2, 9, 0, 5, 1, 8, 3, 6, 4]
    write(tmp_path / "cache", order, shard_size=4)
    cache = TeacherCache(tmp_path / "cache")
    for i in range(10):
        assert_entry(cache, i)


def test_shard_without_answers_has_no_sidecar(tmp_path):
    writer = CacheWriter(tmp_path / "cache", FINGERPRINT, shard_size=2)
    for i in (0, 2, 4):  # even samples carry no answers
        writer.add(IDS[i], **sample(i))
    writer.close()
    assert not list((tmp_path / "cache").glob("*.json"))[1:]  # the manifest only
    assert TeacherCache(tmp_path / "cache").answers(IDS[2]) is None


def test_context_manager_closes_or_keeps_resumable(tmp_path):
    with CacheWriter(tmp_path / "ok", FINGERPRINT) as writer:
        writer.add(IDS[0], **sample(0))
    assert len(TeacherCache(tmp_path / "ok")) == 1
    with pytest.raises(RuntimeError), CacheWriter(tmp_path / "failed", FINGERPRINT) as writer:
        writer.add(IDS[0], **sample(0))
        raise RuntimeError("teacher crashed")
    with pytest.raises(TeacherError, match="incomplete"):
        TeacherCache(tmp_path / "failed")
    assert CacheWriter(tmp_path / "failed", FINGERPRINT).done_ids() == {IDS[0]}


# ----------------------------------------------------------------------------- resume


def test_killed_writer_leaves_incomplete_cache_that_resumes(tmp_path):
    directory = tmp_path / "cache"
    killed = write(directory, range(7), close=False)  # 2 shards written, sample 6 only buffered
    del killed
    with pytest.raises(TeacherError, match="incomplete.*run `workbench cache-teacher` again to finish it"):
        TeacherCache(directory)

    (directory / ".tmp-shard-00002.safetensors.x1y2").write_bytes(b"half a shard")  # killed mid-write
    (directory / "shard-00002.safetensors").write_bytes(b"renamed, never listed")  # killed before the manifest
    resumed = CacheWriter(directory, FINGERPRINT, shard_size=3)
    assert resumed.done_ids() == set(IDS[:6])
    assert not (directory / "shard-00002.safetensors").exists()
    assert not list(directory.glob(".tmp-*"))
    for i in range(10):
        if IDS[i] not in resumed.done_ids():
            resumed.add(IDS[i], **sample(i))
    resumed.close()
    cache = TeacherCache(directory)
    assert len(cache) == 10
    for i in range(10):
        assert_entry(cache, i)


def test_leftover_temp_file_in_a_complete_cache_is_ignored(tmp_path):
    write(tmp_path / "cache", range(10))
    (tmp_path / "cache" / ".tmp-manifest.json.abc").write_text("{not json")
    cache = TeacherCache(tmp_path / "cache")
    assert_entry(cache, 3)
    again = CacheWriter(tmp_path / "cache", FINGERPRINT)  # reopening a finished cache is harmless
    assert again.complete and again.done_ids() == set(IDS)
    again.close()
    with pytest.raises(ValueError, match="complete"):
        again.add("new", **sample(0))


def test_duplicate_ids_are_refused(tmp_path):
    writer = CacheWriter(tmp_path / "cache", FINGERPRINT, shard_size=2)
    writer.add(IDS[0], **sample(0))
    with pytest.raises(TeacherError, match="'sample-00' is already in"):
        writer.add(IDS[0], **sample(0))  # still buffered
    writer.add(IDS[1], **sample(1))  # flushes shard 0
    with pytest.raises(TeacherError, match="'sample-01' is already in"):
        writer.add(IDS[1], **sample(1))  # already written
    with pytest.raises(TeacherError, match="'sample-01' is already in"):
        CacheWriter(tmp_path / "cache", FINGERPRINT).add(IDS[1], **sample(1))  # after a resume


# ----------------------------------------------------------------------------- refusal


def test_mismatched_fingerprint_is_refused_with_keys_named(tmp_path):
    directory = tmp_path / "cache"
    write(directory, range(10))
    other = json.loads(json.dumps(FINGERPRINT))
    other["teacher"]["weights_sha256"] = "77ee" + "2" * 60
    other["data"]["n_samples"] = 11
    other["data"]["new_key"] = "x"
    cache = TeacherCache(directory)
    with pytest.raises(TeacherError) as err:
        cache.check(other)
    message = str(err.value)
    assert f"teacher cache {directory} was made for a different run" in message
    assert "teacher.weights_sha256 differs (cache 3fa20000.., run 77ee2222..)" in message
    assert "data.n_samples differs (cache 10, run 11)" in message
    assert "data.new_key differs (cache missing, run x)" in message
    assert "tokenizer_sha256" not in message and "rebuild it with `workbench cache-teacher CONFIG`" in message
    cache.check({**FINGERPRINT, "teacher": {**FINGERPRINT["teacher"]}})  # an equal one passes

    with pytest.raises(TeacherError, match="data.n_samples differs.*teacher.weights_sha256 differs"):
        CacheWriter(directory, other)
    write(tmp_path / "partial", range(4), close=False)
    with pytest.raises(TeacherError, match=r"different run: temperature differs \(cache 2.0, run 1.0\) —"):
        CacheWriter(tmp_path / "partial", {**FINGERPRINT, "temperature": 1.0})
    no_settings = {k: v for k, v in FINGERPRINT.items() if k not in ("temperature", "top_k")}
    write(tmp_path / "partial2", range(4), close=False, fingerprint=no_settings, temperature=2.0)
    with pytest.raises(TeacherError, match=r"different run: temperature differs \(cache 2.0, run 3.0\) —"):
        CacheWriter(tmp_path / "partial2", no_settings, temperature=3.0)


def test_missing_or_corrupt_cache_files_are_workbench_errors(tmp_path):
    with pytest.raises(TeacherError, match="no teacher cache.*manifest.json is missing"):
        TeacherCache(tmp_path / "nowhere")
    directory = tmp_path / "cache"
    write(directory, range(10))
    manifest = directory / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(TeacherError, match="manifest.json is corrupt"):
        TeacherCache(directory)
    with pytest.raises(TeacherError, match="manifest.json is corrupt"):
        CacheWriter(directory, FINGERPRINT)
    manifest.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(TeacherError, match="corrupt"):
        TeacherCache(directory)
    manifest.write_text(text)
    (directory / "shard-00001.safetensors").write_bytes(b"\x00" * 10)
    cache = TeacherCache(directory)  # shards are read on the first lookup
    with pytest.raises(TeacherError, match="shard-00001.safetensors is missing or corrupt"):
        cache.get(IDS[0])


def test_foreign_directory_is_not_overwritten(tmp_path):
    (tmp_path / "results.csv").write_text("a,b\n")
    with pytest.raises(TeacherError, match="not empty and holds no teacher cache"):
        CacheWriter(tmp_path, FINGERPRINT)
    assert (tmp_path / "results.csv").exists()


def test_bad_samples_are_refused(tmp_path):
    writer = CacheWriter(tmp_path / "cache", FINGERPRINT)
    good = sample(0)
    with pytest.raises(ValueError, match="log-probabilities"):
        writer.add("a", good["topk_ids"], good["topk_logp"] + 5.0, good["tokens"])  # logits, not log-probs
    with pytest.raises(ValueError, match="K = 3 but the cache has top_k = 4"):
        writer.add("b", good["topk_ids"][:, :3], good["topk_logp"][:, :3], good["tokens"])
    with pytest.raises(ValueError, match=r"tokens \(T,\)"):
        writer.add("c", good["topk_ids"], good["topk_logp"], good["tokens"][:-1])
    with pytest.raises(ValueError, match="temperature"):
        CacheWriter(tmp_path / "other", {"teacher": {}})
    writer = CacheWriter(tmp_path / "other", {"teacher": {}}, temperature=1.5)
    writer.add("a", **sample(0))
    writer.close()
    assert TeacherCache(tmp_path / "other").temperature == 1.5 and TeacherCache(tmp_path / "other").top_k == K


# ----------------------------------------------------------------------------- fingerprints


def test_diff_fingerprints_recurses_and_reads_like_json():
    a = {"x": 1, "nested": {"deep": {"v": [1, 2]}, "same": "s"}, "only_a": True}
    b = {"x": 1, "nested": {"deep": {"v": (1, 3)}, "same": "s"}, "only_b": None}
    assert diff_fingerprints(a, b) == ["nested.deep.v", "only_a", "only_b"]
    assert diff_fingerprints(a, {**a, "nested": {"deep": {"v": (1, 2)}, "same": "s"}}) == []
    with pytest.raises(ValueError, match="JSON"):
        diff_fingerprints({"x": object()}, {})


def test_fingerprint_data_is_order_independent_and_tracks_file_content(tmp_path):
    data = tmp_path / "train.json"
    data.write_text('[{"id": "a"}]')
    one = fingerprint_data(["b", "a", "c"], [data], {"split": "train"})
    assert one == fingerprint_data(("c", "a", "b"), [str(data)], {"split": "train"})
    assert one["n_samples"] == 3 and one["split"] == "train" and set(one["files"]) == {"train.json"}
    assert fingerprint_data(["a", "b"], [data])["sample_ids_sha256"] != one["sample_ids_sha256"]
    data.write_text('[{"id": "b"}]')
    assert diff_fingerprints(one, fingerprint_data(["a", "b", "c"], [data], {"split": "train"})) == ["files.train.json"]
    with pytest.raises(TeacherError, match="missing.json"):
        fingerprint_data([], [tmp_path / "missing.json"])
    with pytest.raises(ValueError, match="n_samples"):
        fingerprint_data([], [], {"n_samples": 1})


def write_model(folder, weights: dict[str, torch.Tensor], config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, folder / "model.safetensors")


def test_fingerprint_teacher_tracks_config_and_weights(tmp_path):
    weights = {"w": torch.arange(1000, dtype=torch.float32)}
    write_model(tmp_path / "m", weights, {"hidden": 8})
    first = fingerprint_teacher(str(tmp_path / "m"), None)
    assert set(first) == {"path", "revision", "config_sha256", "weights_sha256"}
    assert fingerprint_teacher(str(tmp_path / "m"), None) == first
    write_model(tmp_path / "m", weights, {"hidden": 9})
    assert diff_fingerprints(first, fingerprint_teacher(str(tmp_path / "m"), None)) == ["config_sha256"]
    write_model(tmp_path / "m", {"w": weights["w"] + 1}, {"hidden": 8})
    assert diff_fingerprints(first, fingerprint_teacher(str(tmp_path / "m"), None)) == ["weights_sha256"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="no config.json"):
        fingerprint_teacher(str(tmp_path / "empty"))
    with pytest.raises(TeacherError, match="neither a local folder nor in the local Hugging Face cache"):
        fingerprint_teacher("nobody/no-such-model-here", "main")


def test_fingerprint_teacher_samples_big_files(tmp_path, monkeypatch):
    # Shrink the limits: "big" = over 64 KiB, 16 samples of 1 KiB, over a ~400 KiB file.
    monkeypatch.setattr(cache_module, "_WHOLE_FILE_LIMIT", 64 * 1024)
    monkeypatch.setattr(cache_module, "_SAMPLE_BYTES", 1024)
    write_model(tmp_path / "m", {"w": torch.zeros(100_000)}, {})
    path = tmp_path / "m" / "model.safetensors"
    base = fingerprint_teacher(str(tmp_path / "m"))["weights_sha256"]
    raw = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    size = len(raw)

    def flipped(offset: int) -> str:
        changed = bytearray(raw)
        changed[offset] ^= 0xFF
        path.write_bytes(bytes(changed))
        return fingerprint_teacher(str(tmp_path / "m"))["weights_sha256"]

    assert flipped(header_end - 2) != base  # inside the header
    assert flipped(size - 1) != base  # the last sample ends at the end of the file
    assert flipped((size - 1024) // 15 + 2000) == base  # between two samples: not read, by design
    path.write_bytes(bytes(raw) + b"\x00")
    assert fingerprint_teacher(str(tmp_path / "m"))["weights_sha256"] != base  # the size is hashed


def test_fingerprint_processor_tells_tokenizers_apart(world_dir):
    from transformers import AutoProcessor

    def load():
        return AutoProcessor.from_pretrained(world_dir / "processor")

    same = fingerprint_processor(load())
    assert same == fingerprint_processor(load())
    assert all(isinstance(v, str) and len(v) == 64 for v in same.values())

    extra_token = load()
    extra_token.tokenizer.add_tokens(["zebra_new_word"])
    assert diff_fingerprints(same, fingerprint_processor(extra_token)) == ["tokenizer_sha256"]
    other_template = load()
    other_template.chat_template = "{{ messages[0]['content'] }}"
    assert diff_fingerprints(same, fingerprint_processor(other_template)) == ["tokenizer_sha256"]
    bigger_images = load()
    bigger_images.image_processor.crop_size = {"height": 64, "width": 64}
    assert diff_fingerprints(same, fingerprint_processor(bigger_images)) == ["processor_sha256"]
    bare = fingerprint_processor(load().tokenizer)
    assert bare["processor_sha256"] is None


def test_rest_mass_round_trips_and_is_all_or_nothing(tmp_path):
    from teachers.cache import CacheWriter, TeacherCache

    fp = {"temperature": 1.0, "top_k": 2}
    writer = CacheWriter(tmp_path / "c", fp, shard_size=2)
    for i in range(3):
        logp = torch.log(torch.tensor([[0.5, 0.3], [0.6, 0.1]]))
        writer.add(f"s{i}", torch.tensor([[1, 2], [3, 4]]), logp, torch.tensor([1, 3]),
                   rest_logp=torch.log(torch.tensor([0.2, 0.3])))
    with pytest.raises(ValueError, match="rest_logp"):
        writer.add("s9", torch.tensor([[1, 2]]), torch.log(torch.tensor([[0.5, 0.3]])), torch.tensor([1]))
    writer.close()
    entry = TeacherCache(tmp_path / "c").get("s2")
    torch.testing.assert_close(entry.rest_logp, torch.log(torch.tensor([0.2, 0.3])))


def test_a_shard_changed_in_place_is_refused_then_recomputed(tmp_path):
    """Same size, other bytes (e.g. huge log-probs written over the payload): the checksum in
    the manifest refuses the shard; reopening the writer drops it and its samples are redone."""
    directory = tmp_path / "cache"
    write(directory, range(10))
    shard = directory / "shard-00001.safetensors"  # samples 3, 4, 5
    data = bytearray(shard.read_bytes())
    data[-12:] = bytes(12 * [0x7F])
    shard.write_bytes(bytes(data))
    cache = TeacherCache(directory)
    assert_entry(cache, 0)  # other shards are fine
    with pytest.raises(TeacherError, match="shard-00001.safetensors fails its checksum.*cache-teacher"):
        cache.get(IDS[4])
    writer = CacheWriter(directory, FINGERPRINT, shard_size=3)
    assert writer.repaired == ["shard-00001.safetensors"] and not writer.complete
    assert writer.done_ids() == set(IDS) - {IDS[3], IDS[4], IDS[5]} and not shard.exists()
    for i in (3, 4, 5):
        writer.add(IDS[i], **sample(i))
    writer.close()
    manifest = json.loads((directory / "manifest.json").read_text())
    assert [e["file"] for e in manifest["shards"]][-1] == "shard-00004.safetensors" and manifest["n_samples"] == 10
    cache = TeacherCache(directory)
    for i in range(10):
        assert_entry(cache, i)
    sidecar = directory / "shard-00000.json"  # answers are checked too
    sidecar.write_text(sidecar.read_text().replace("answer 1", "answer 9"))
    with pytest.raises(TeacherError, match="sidecar .*shard-00000.json fails its checksum"):
        TeacherCache(directory).answers(IDS[1])
