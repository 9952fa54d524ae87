"""Offline teacher cache: the teacher's top-k log-probabilities per target token, in shards.

`workbench cache-teacher` runs the teacher once and stores its output with `CacheWriter`;
training reads it with `TeacherCache` (by sample id) and feeds `LossInputs.teacher_topk`. The
manifest carries a fingerprint of teacher weights, tokenizer and data, so a cache made for a
different run is refused; every file is written atomically, so a killed job resumes; and each
shard's SHA-256 is in the manifest, checked whenever the shard is read: a shard changed after
it was written is refused, and reopening the cache with `CacheWriter` (`workbench cache-teacher`)
drops it so that it is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from teachers.errors import TeacherError

MANIFEST = "manifest.json"
FORMAT = "distill-workbench teacher cache"
VERSION = 2  # 2: per-shard sha256
_TMP_PREFIX = ".tmp-"
_SHARD_RE = re.compile(r"shard-\d{5}\.(safetensors|json)")
_SHARD_NUMBER = re.compile(r"\d+")
_REBUILD = "rebuild it with `workbench cache-teacher CONFIG`"
_MANIFEST_KEYS = ("format", "version", "fingerprint", "top_k", "temperature", "complete", "shards")
_SHARD_TENSORS = ("topk_ids", "topk_logp", "tokens", "offsets")
_INT32_MAX = 2**31 - 1

_WHOLE_FILE_LIMIT = 256 * 2**20  # weights files up to this size are hashed in full
_SAMPLE_BYTES = 2**20
_N_SAMPLES = 16
_MISSING = object()


@dataclass(frozen=True)
class CacheEntry:
    """One sample's cached teacher output.

    Attributes:
        topk_ids: (T, K) long, the teacher's top-k token ids at each of the T target positions.
        topk_logp: (T, K) float32, log_softmax(teacher_logits / tau) at those ids.
        tokens: (T,) long, the target token at each position (to check alignment with labels).
        answers: the teacher's pseudo-label answers for an unlabeled sample, or None.
        rest_logp: (T,) float32 log of the teacher's probability mass outside the top-k (exact,
            as the teacher computed it), or None for caches written without it.
    """

    topk_ids: Tensor
    topk_logp: Tensor
    tokens: Tensor
    answers: list[str] | None
    rest_logp: Tensor | None = None


# ----------------------------------------------------------------------------- files


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory, hence best-effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()


def _read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed manifest of a cache directory; TeacherError when missing or corrupt."""
    path = directory / MANIFEST
    if not path.is_file():
        raise TeacherError(f"no teacher cache at {directory} ({MANIFEST} is missing); build it with "
                             "`workbench cache-teacher CONFIG`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TeacherError(f"teacher cache manifest {path} is corrupt ({err}); delete {directory} and "
                             f"{_REBUILD}") from None
    missing = [key for key in _MANIFEST_KEYS if not isinstance(manifest, dict) or key not in manifest]
    if missing or manifest["format"] != FORMAT or not isinstance(manifest["shards"], list):
        raise TeacherError(f"teacher cache manifest {path} is corrupt (missing or bad: "
                             f"{', '.join(missing) or 'format/shards'}); delete {directory} and {_REBUILD}")
    if manifest["version"] != VERSION:
        raise TeacherError(f"teacher cache {directory} has format version {manifest['version']}, this "
                             f"workbench reads version {VERSION}; {_REBUILD}")
    return manifest


def _shard_sample_ids(path: Path) -> list[str]:
    """Sample ids stored in a shard's safetensors metadata (reads the header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["sample_ids"])
    except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as err:
        raise TeacherError(f"teacher cache shard {path} is missing or corrupt ({err}); {_REBUILD}") from None


def _read_verified(directory: Path, name: str, sha256: str | None, what: str) -> bytes:
    """A shard or sidecar's bytes, refused unless they hash to what the manifest recorded."""
    path = directory / name
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TeacherError(f"teacher cache {what} {path} is missing or unreadable ({err}); {_REBUILD}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise TeacherError(f"teacher cache {what} {path} fails its checksum (changed after it was written); "
                             f"{_REBUILD}: it recomputes that shard")
    return data


def _entry_intact(directory: Path, entry: dict[str, Any]) -> bool:
    """Whether a manifest entry's shard (and sidecar) are on disk exactly as written."""
    try:
        _read_verified(directory, entry["file"], entry.get("sha256"), "shard")
        if entry.get("sidecar"):
            _read_verified(directory, entry["sidecar"], entry.get("sidecar_sha256"), "sidecar")
    except TeacherError:
        return False
    return True


# ----------------------------------------------------------------------------- fingerprints


def _canonical(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint as it reads back from JSON (tuples -> lists, paths -> str, int keys -> str)."""

    def default(value: Any) -> str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise TypeError(f"fingerprint values must be JSON data, got {type(value).__name__}: {value!r}")

    try:
        return json.loads(json.dumps(dict(fingerprint), sort_keys=True, default=default))
    except TypeError as err:
        raise ValueError(str(err)) from None


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) for every leaf that differs; _MISSING marks absence."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        name, value_a, value_b = f"{prefix}{key}", a.get(key, _MISSING), b.get(key, _MISSING)
        if isinstance(value_a, Mapping) and isinstance(value_b, Mapping):
            out += _differences(value_a, value_b, f"{name}.")
        elif value_a != value_b:
            out.append((name, value_a, value_b))
    return out


def diff_fingerprints(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two fingerprints, recursing into nested dicts.

    Both are compared as they read back from JSON, so a tuple equals the list it is stored as.
    A key present on one side only counts as differing.

    Args:
        a, b: JSON-like fingerprints (nested dicts of str, numbers, bools, None, lists).
    Returns:
        Sorted dotted keys, e.g. ["data.sample_ids_sha256", "tokenizer_sha256"]; empty if equal.
    """
    return [key for key, _, _ in _differences(_canonical(a), _canonical(b))]


def _short(value: Any) -> str:
    if value is _MISSING:
        return "missing"
    text = value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{16,}", value):
        return f"{value[:8]}.."  # a hash: the first characters tell two apart
    return text if len(text) <= 40 else f"{text[:37]}..."


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_SAMPLE_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(path: Path) -> str:
    """sha256 of a weights file: whole content up to 256 MiB, else size + header + 16 samples."""
    size = path.stat().st_size
    if size <= _WHOLE_FILE_LIMIT:
        return _sha256_file(path)
    digest = hashlib.sha256(f"size={size}\n".encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            head = f.read(8)  # little-endian u64 header length, then the JSON header
            header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            digest.update(head + f.read(min(header_len, size - 8)))
        for i in range(_N_SAMPLES):
            f.seek(i * max(size - _SAMPLE_BYTES, 0) // (_N_SAMPLES - 1))
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _model_folder(path: str, revision: str | None) -> Path:
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, revision=revision, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - any failure means "not available locally"
        raise TeacherError(
            f"teacher {path!r} (revision {revision}) is neither a local folder nor in the local Hugging Face "
            f"cache ({type(err).__name__}); download it first, e.g. `huggingface-cli download {path}`"
        ) from None


def fingerprint_teacher(path: str, revision: str | None = None) -> dict[str, Any]:
    """What identifies a teacher checkpoint: its config and the bytes of its weights.

    Every top-level `*.safetensors` / `*.bin` file is hashed. Files up to 256 MiB are hashed in
    full; bigger ones by their size, their safetensors header (tensor names, dtypes, shapes,
    offsets) and 16 evenly spaced 1 MiB samples, so a multi-GB teacher is fingerprinted in
    well under a second. That catches a different checkpoint, not a single flipped byte.

    Args:
        path: a local model folder, or a Hub repo id already in the local Hugging Face cache.
        revision: the Hub revision (branch, tag or commit) for a repo id; recorded as given.
    Returns:
        {"path", "revision", "config_sha256", "weights_sha256"}.
    Raises:
        TeacherError: the model is not available locally, or has no config.json or weights.
    """
    folder = _model_folder(path, revision)
    config = folder / "config.json"
    if not config.is_file():
        raise TeacherError(f"teacher folder {folder} has no config.json; is it a Hugging Face model folder?")
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".safetensors", ".bin")))
    if not weights:
        raise TeacherError(f"teacher folder {folder} has no *.safetensors or *.bin weights")
    digest = hashlib.sha256()
    for file in weights:
        digest.update(f"{file.name}\0{weights_digest(file)}\n".encode())
    return {
        "path": str(path), "revision": revision,
        "config_sha256": _sha256_file(config), "weights_sha256": digest.hexdigest(),
    }


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_processor(processor: Any) -> dict[str, str | None]:
    """What identifies a tokenizer and processor: the meaning of every token id and the inputs.

    The tokenizer hash covers the vocabulary (token -> id, added tokens included), the special
    tokens and the chat templates of tokenizer and processor. Tokenization rules such as BPE
    merges are not hashed; the cache's per-position `tokens` catch those at training time.
    The processor hash covers the rest of the processor's config (e.g. image size, patch size,
    normalisation) from its `to_dict()`.

    Args:
        processor: a Hugging Face processor with a `.tokenizer`, or a bare tokenizer.
    Returns:
        {"tokenizer_sha256", "processor_sha256"}; processor_sha256 is None for a bare tokenizer.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer_state = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special_tokens": {name: str(getattr(tokenizer, name, None))
                           for name in ("bos_token", "eos_token", "unk_token", "pad_token")},
        "all_special_tokens": sorted(map(str, tokenizer.all_special_tokens)),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "processor_chat_template": getattr(processor, "chat_template", None) if processor is not tokenizer else None,
    }
    processor_sha256 = None
    if processor is not tokenizer:
        config = processor.to_dict() if hasattr(processor, "to_dict") else {}
        config = {key: value for key, value in config.items() if "tokenizer" not in key and key != "chat_template"}
        processor_sha256 = _sha256_json(config)
    return {"tokenizer_sha256": _sha256_json(tokenizer_state), "processor_sha256": processor_sha256}


def fingerprint_data(
    ids: Iterable[str], files: Iterable[str | os.PathLike], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What identifies the cached data: the files' contents and the set of sample ids.

    Args:
        ids: sample ids; their order does not matter (the hash is over the sorted ids).
        files: data files (e.g. a LLaVA-format JSON), hashed in full and keyed by file name.
        extra: more JSON values to include (e.g. {"split": "train", "max_length": 2048}).
    Returns:
        {"files": {name: sha256}, "sample_ids_sha256", "n_samples", **extra}.
    """
    ids = sorted(str(i) for i in ids)
    hashes = {}
    for file in map(Path, files):
        if file.name in hashes:
            raise ValueError(f"two data files are named {file.name!r}; fingerprints key files by name")
        if not file.is_file():
            raise TeacherError(f"data file {file} does not exist")
        hashes[file.name] = _sha256_file(file)
    extra = dict(extra or {})
    clash = {"files", "sample_ids_sha256", "n_samples"} & set(extra)
    if clash:
        raise ValueError(f"extra may not set {', '.join(sorted(clash))}")
    ids_sha256 = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    return {"files": hashes, "sample_ids_sha256": ids_sha256, "n_samples": len(ids), **extra}


def _mismatch_message(directory: Path, differences: list[tuple[str, Any, Any]]) -> str:
    shown = [f"{key} differs (cache {_short(a)}, run {_short(b)})" for key, a, b in differences[:6]]
    more = f" and {len(differences) - 6} more" if len(differences) > 6 else ""
    return f"teacher cache {directory} was made for a different run: {', '.join(shown)}{more} — {_REBUILD}"


# ----------------------------------------------------------------------------- writer


class CacheWriter:
    """Writes a teacher cache shard by shard; reopening an unfinished one resumes it.

    Layout: `manifest.json` plus `shard-00000.safetensors` ... holding `topk_ids` int32 (T, K),
    `topk_logp` float32 (T, K), optionally `rest_logp` float32 (T,) (log of the mass outside
    the top-k), `tokens` int32 (T,) and `offsets` int64 (n + 1,) over the
    shard's n samples (their ids in the safetensors metadata), with `shard-00000.json` beside
    it when some sample has pseudo-label answers. Each shard is written atomically before the
    manifest lists it, and the manifest is replaced atomically, so a killed job leaves a valid,
    incomplete cache: `done_ids()` are the samples it need not compute again.

    Args:
        directory: the cache folder; created if needed.
        fingerprint: JSON-like dict identifying teacher, processor and data (see the
            `fingerprint_*` helpers). An existing cache with a different one is refused.
        shard_size: samples per shard; a shard is written once this many are buffered.
        temperature: the tau of `topk_logp`; defaults to fingerprint["temperature"].
        top_k: K; defaults to fingerprint["top_k"] when present, else to the first sample's K.
    Raises:
        TeacherError: the folder holds a different cache, a corrupt one, or other files.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        fingerprint: Mapping[str, Any],
        shard_size: int = 1024,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.directory = Path(directory)
        self.fingerprint = _canonical(fingerprint)
        self.shard_size = shard_size
        temperature = self._setting("temperature", temperature, required=True)
        top_k = self._setting("top_k", top_k, required=False)
        self._buffer: list[tuple[str, Tensor, Tensor, Tensor, list[str] | None]] = []
        self._buffered_ids: set[str] = set()
        self._done: set[str] = set()
        self.repaired: list[str] = []  # shards that failed their checksum on reopening, to be recomputed
        if (self.directory / MANIFEST).exists():
            self.manifest = self._reopen(float(temperature), top_k)
        else:
            self._prepare_empty_directory()
            self.manifest = {
                "format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "top_k": top_k,
                "temperature": float(temperature), "shard_size": shard_size, "complete": False,
                "n_samples": 0, "n_positions": 0, "shards": [],
            }
            write_atomic(self.directory / MANIFEST, _json_bytes(self.manifest))

    def _setting(self, name: str, value: Any, required: bool) -> Any:
        in_fingerprint = self.fingerprint.get(name)
        if value is not None and in_fingerprint is not None and value != in_fingerprint:
            raise ValueError(f"{name}={value} but the fingerprint says {name}={in_fingerprint}")
        value = in_fingerprint if value is None else value
        if required and value is None:
            raise ValueError(f"CacheWriter needs the {name} of topk_logp: pass {name}=... or put it in the fingerprint")
        return value

    def _prepare_empty_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        others = [p.name for p in self.directory.iterdir() if not p.name.startswith(_TMP_PREFIX)]
        if others:
            raise TeacherError(f"{self.directory} is not empty and holds no teacher cache ({MANIFEST} is missing); "
                                 "choose another cache directory or remove it")
        self._remove_leftovers(listed=set())

    def _reopen(self, temperature: float, top_k: int | None) -> dict[str, Any]:
        manifest = _read_manifest(self.directory)
        differences = _differences(manifest["fingerprint"], self.fingerprint)
        named = {key for key, _, _ in differences}
        for name, mine in (("temperature", temperature), ("top_k", top_k)):
            if name not in named and None not in (mine, manifest[name]) and manifest[name] != mine:
                differences.append((name, manifest[name], mine))
        if differences:
            raise TeacherError(_mismatch_message(self.directory, differences))
        bad = [entry for entry in manifest["shards"] if not _entry_intact(self.directory, entry)]
        if bad:  # changed after they were written: drop them, their samples are computed again
            manifest["shards"] = [entry for entry in manifest["shards"] if entry not in bad]
            manifest["complete"] = False
            manifest["n_samples"] = sum(entry["n_samples"] for entry in manifest["shards"])
            manifest["n_positions"] = sum(entry["n_positions"] for entry in manifest["shards"])
            write_atomic(self.directory / MANIFEST, _json_bytes(manifest))
            self.repaired = [entry["file"] for entry in bad]
        listed = {entry[key] for entry in manifest["shards"] for key in ("file", "sidecar") if entry.get(key)}
        if not manifest["complete"]:
            self._remove_leftovers(listed)
        for entry in manifest["shards"]:
            self._done.update(_shard_sample_ids(self.directory / entry["file"]))
        return manifest

    def _remove_leftovers(self, listed: set[str]) -> None:
        # Temp files of a killed write, and shards written but never listed (killed between the
        # shard's rename and the manifest's); both are redone.
        for path in self.directory.iterdir():
            if path.name.startswith(_TMP_PREFIX) or (_SHARD_RE.fullmatch(path.name) and path.name not in listed):
                path.unlink(missing_ok=True)

    @property
    def complete(self) -> bool:
        """Whether the cache is finished (closed now or by an earlier job)."""
        return bool(self.manifest["complete"])

    def done_ids(self) -> set[str]:
        """Ids of the samples in written shards: an interrupted job skips these on resume."""
        return set(self._done)

    def add(
        self,
        sample_id: str,
        topk_ids: Tensor,
        topk_logp: Tensor,
        tokens: Tensor,
        answers: list[str] | None = None,
        rest_logp: Tensor | None = None,
    ) -> None:
        """Buffer one sample; writes a shard once `shard_size` samples are buffered.

        Args:
            sample_id: the sample's id in the data set; unique in the cache.
            topk_ids: (T, K) integer top-k token ids at the sample's T target positions.
            topk_logp: (T, K) log_softmax(teacher_logits / tau) at those ids (full vocabulary).
            tokens: (T,) the target token at each position.
            answers: pseudo-label answers the teacher generated for an unlabeled sample.
            rest_logp: (T,) log of the teacher's mass outside the top-k at each position; give
                it for every sample of a cache or for none.
        Raises:
            TeacherError: the id is already in the cache.
            ValueError: wrong shapes or dtypes, NaN or positive log-probabilities, or the
                cache is already complete.
        """
        if self.complete:
            raise ValueError(f"teacher cache {self.directory} is complete; nothing more can be added")
        if not isinstance(sample_id, str) or not sample_id:
            raise ValueError(f"sample_id must be a non-empty str, got {sample_id!r}")
        if sample_id in self._done or sample_id in self._buffered_ids:
            raise TeacherError(f"sample id {sample_id!r} is already in teacher cache {self.directory}; "
                                 "sample ids must be unique")
        topk_ids, topk_logp, tokens = self._checked(sample_id, topk_ids, topk_logp, tokens, answers)
        if rest_logp is not None:
            if rest_logp.shape != tokens.shape or rest_logp.isnan().any() or (rest_logp > 1e-4).any():
                raise ValueError(f"sample {sample_id!r}: rest_logp must be (T,) log-probabilities")
            rest_logp = rest_logp.detach().to(device="cpu", dtype=torch.float32)
        if self._buffer and (self._buffer[0][5] is None) != (rest_logp is None):
            raise ValueError(f"sample {sample_id!r}: give rest_logp for every sample of a cache or for none")
        self._buffer.append((sample_id, topk_ids, topk_logp, tokens, None if answers is None else list(answers),
                             rest_logp))
        self._buffered_ids.add(sample_id)
        if len(self._buffer) >= self.shard_size:
            self._flush()

    def _checked(
        self, sample_id: str, topk_ids: Tensor, topk_logp: Tensor, tokens: Tensor, answers: list[str] | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        where = f"sample {sample_id!r}"
        if topk_ids.dim() != 2 or topk_logp.shape != topk_ids.shape or tokens.shape != topk_ids.shape[:1]:
            raise ValueError(f"{where}: expected topk_ids (T, K), topk_logp (T, K), tokens (T,), got "
                             f"{tuple(topk_ids.shape)}, {tuple(topk_logp.shape)}, {tuple(tokens.shape)}")
        if topk_ids.dtype.is_floating_point or tokens.dtype.is_floating_point:
            raise ValueError(f"{where}: topk_ids and tokens must be integer tensors")
        k = topk_ids.shape[1]
        if self.manifest["top_k"] not in (None, k):
            raise ValueError(f"{where}: K = {k} but the cache has top_k = {self.manifest['top_k']}")
        if topk_ids.numel() and (topk_ids.min() < 0 or topk_ids.max() > _INT32_MAX):
            raise ValueError(f"{where}: topk_ids outside [0, 2**31)")
        if topk_logp.isnan().any() or (topk_logp > 1e-4).any():
            raise ValueError(f"{where}: topk_logp must be log-probabilities (<= 0, no NaN); were logits passed?")
        if answers is not None and not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: answers must be a list of str or None")
        self.manifest["top_k"] = k
        return (
            topk_ids.detach().to(device="cpu", dtype=torch.int32),
            topk_logp.detach().to(device="cpu", dtype=torch.float32),
            tokens.detach().to(device="cpu", dtype=torch.int32),
        )

    def _flush(self) -> None:
        """Write the buffered samples as the next shard, then list it in the manifest."""
        if not self._buffer:
            return
        ids = [sample[0] for sample in self._buffer]
        lengths = torch.tensor([sample[3].shape[0] for sample in self._buffer], dtype=torch.int64)
        tensors = {
            "topk_ids": torch.cat([sample[1] for sample in self._buffer]),  # (T_shard, K)
            "topk_logp": torch.cat([sample[2] for sample in self._buffer]),  # (T_shard, K)
            "tokens": torch.cat([sample[3] for sample in self._buffer]),  # (T_shard,)
            "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),  # (n + 1,)
        }
        if self._buffer[0][5] is not None:
            tensors["rest_logp"] = torch.cat([sample[5] for sample in self._buffer])  # (T_shard,)
        taken = [int(_SHARD_NUMBER.search(e["file"])[0]) for e in self.manifest["shards"]]
        name = f"shard-{max(taken, default=-1) + 1:05d}"  # never a dropped shard's number while its file exists
        data = save_safetensors(tensors, metadata={"sample_ids": json.dumps(ids)})
        entry = {"file": f"{name}.safetensors", "sha256": hashlib.sha256(data).hexdigest(), "sidecar": None,
                 "n_samples": len(ids), "n_positions": int(lengths.sum())}
        answers = [sample[4] for sample in self._buffer]
        if any(a is not None for a in answers):
            sidecar = _json_bytes({"sample_ids": ids, "answers": answers})
            entry.update(sidecar=f"{name}.json", sidecar_sha256=hashlib.sha256(sidecar).hexdigest())
            write_atomic(self.directory / entry["sidecar"], sidecar)
        write_atomic(self.directory / entry["file"], data)
        self.manifest["shards"].append(entry)
        self.manifest["n_samples"] += entry["n_samples"]
        self.manifest["n_positions"] += entry["n_positions"]
        write_atomic(self.directory / MANIFEST, _json_bytes(self.manifest))
        self._done.update(ids)
        self._buffer, self._buffered_ids = [], set()

    def close(self) -> None:
        """Write the last shard and mark the cache complete; a second call does nothing."""
        if self.complete:
            return
        self._flush()
        self.manifest["complete"] = True
        write_atomic(self.directory / MANIFEST, _json_bytes(self.manifest))

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        # On an error the buffered (whole) samples are still written, but the cache stays
        # incomplete so the next job resumes it.
        if exc_type is None:
            self.close()
        else:
            self._flush()


# ----------------------------------------------------------------------------- reader


class TeacherCache:
    """A finished teacher cache, read by sample id; shards are loaded on first use and kept.

    Args:
        directory: the cache folder written by `CacheWriter`.
    Raises:
        TeacherError: no cache there, a corrupt manifest, or an unfinished cache.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.manifest = _read_manifest(self.directory)
        if not self.manifest["complete"]:
            raise TeacherError(
                f"teacher cache {self.directory} is incomplete ({self.manifest.get('n_samples', 0)} samples in "
                f"{len(self.manifest['shards'])} shards so far); run `workbench cache-teacher` again to finish it"
            )
        self._index: dict[str, tuple[int, int]] | None = None
        self._shards: dict[int, dict[str, Tensor]] = {}
        self._answers: dict[int, list[list[str] | None] | None] = {}

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The fingerprint the cache was written with."""
        return self.manifest["fingerprint"]

    @property
    def top_k(self) -> int:
        """K, the number of token ids kept per position."""
        return self.manifest["top_k"]

    @property
    def temperature(self) -> float:
        """tau of the cached log-probabilities; a loss term must use the same one."""
        return self.manifest["temperature"]

    def __len__(self) -> int:
        return sum(entry["n_samples"] for entry in self.manifest["shards"])

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._sample_index()

    def _sample_index(self) -> dict[str, tuple[int, int]]:
        """sample id -> (shard number, position in shard), from the shard headers."""
        if self._index is None:
            index = {}
            for shard, entry in enumerate(self.manifest["shards"]):
                ids = _shard_sample_ids(self.directory / entry["file"])
                if len(ids) != entry["n_samples"]:
                    raise TeacherError(f"teacher cache shard {self.directory / entry['file']} holds {len(ids)} "
                                         f"samples, the manifest says {entry['n_samples']}; {_REBUILD}")
                for position, sample_id in enumerate(ids):
                    if sample_id in index:
                        raise TeacherError(f"teacher cache {self.directory} lists sample {sample_id!r} twice; "
                                             f"{_REBUILD}")
                    index[sample_id] = (shard, position)
            self._index = index
        return self._index

    def _shard(self, shard: int) -> dict[str, Tensor]:
        if shard not in self._shards:
            entry = self.manifest["shards"][shard]
            path = self.directory / entry["file"]
            data = _read_verified(self.directory, entry["file"], entry.get("sha256"), "shard")
            try:
                tensors = load_safetensors(data)
            except (OSError, SafetensorError) as err:
                raise TeacherError(f"teacher cache shard {path} is missing or corrupt ({err}); {_REBUILD}") from None
            offsets = tensors.get("offsets")
            if (any(key not in tensors for key in _SHARD_TENSORS) or offsets.shape != (entry["n_samples"] + 1,)
                    or offsets[-1] != tensors["tokens"].shape[0]):
                raise TeacherError(f"teacher cache shard {path} does not match its manifest entry; {_REBUILD}")
            self._shards[shard] = tensors
            self._answers[shard] = self._read_sidecar(entry)
        return self._shards[shard]

    def _read_sidecar(self, entry: dict[str, Any]) -> list[list[str] | None] | None:
        if not entry.get("sidecar"):
            return None
        path = self.directory / entry["sidecar"]
        data = _read_verified(self.directory, entry["sidecar"], entry.get("sidecar_sha256"), "sidecar")
        try:
            answers = json.loads(data)["answers"]
        except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TeacherError(f"teacher cache sidecar {path} is missing or corrupt ({err}); {_REBUILD}") from None
        if len(answers) != entry["n_samples"]:
            raise TeacherError(f"teacher cache sidecar {path} does not match its manifest entry; {_REBUILD}")
        return answers

    def _locate(self, sample_id: str) -> tuple[int, int]:
        try:
            return self._sample_index()[sample_id]
        except KeyError:
            raise TeacherError(f"sample {sample_id!r} is not in teacher cache {self.directory}; {_REBUILD}") from None

    def get(self, sample_id: str) -> CacheEntry:
        """The cached teacher output of one sample.

        Args:
            sample_id: the sample's id (lookups are by id only, never by position).
        Returns:
            CacheEntry with topk_ids (T, K) long, topk_logp (T, K) float32, tokens (T,) long.
        Raises:
            TeacherError: the id is not in the cache.
        """
        shard, position = self._locate(sample_id)
        tensors = self._shard(shard)
        start, end = tensors["offsets"][position : position + 2].tolist()
        return CacheEntry(
            topk_ids=tensors["topk_ids"][start:end].long(),  # (T, K)
            topk_logp=tensors["topk_logp"][start:end].clone(),  # (T, K)
            tokens=tensors["tokens"][start:end].long(),  # (T,)
            answers=self.answers(sample_id),
            rest_logp=tensors["rest_logp"][start:end].clone() if "rest_logp" in tensors else None,  # (T,)
        )

    def answers(self, sample_id: str) -> list[str] | None:
        """The teacher's pseudo-label answers for a sample, or None if it has none."""
        shard, position = self._locate(sample_id)
        self._shard(shard)
        answers = self._answers[shard]
        return None if answers is None or answers[position] is None else list(answers[position])

    def check(self, fingerprint: Mapping[str, Any]) -> None:
        """Refuse the cache when it was made for a different run.

        Args:
            fingerprint: the current run's fingerprint, built like the one the cache was written with.
        Raises:
            TeacherError: naming every differing dotted key with both values.
        """
        differences = _differences(self.fingerprint, _canonical(fingerprint))
        if differences:
            raise TeacherError(_mismatch_message(self.directory, differences))
