"""LLaVA-format conversation data: a dataset that reads it and a collator that tokenises it.

Reads the format LLaVA, ShareGPT4V and most VLM SFT mixes use: a JSON list of
`{"id", "image", "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}` with image
paths relative to an image folder. The collator renders each conversation with the model's
own chat template, lets the model's processor expand image tokens, and keeps only the
assistant answers (and the end-of-turn token) in `labels`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from losses.inputs import IGNORE_INDEX
from workbench.data.sources import IMAGE_PLACEHOLDER, FileImages, image_paths, read_json_records
from workbench.errors import WorkbenchError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use marks around answers while rendering


def _to_messages(conversations: list[dict], n_images: int) -> list[dict]:
    """LLaVA `conversations` -> chat messages with typed content parts: one image part for each
    of the first `n_images` `<image>` placeholders of the user turns, where the text puts it
    (placeholders beyond the images are dropped)."""
    messages, left = [], n_images
    for turn in conversations:
        role = ROLES[turn["from"]]
        text = turn["value"]
        content = []
        if role == "user" and IMAGE_PLACEHOLDER in text:
            pieces = [part.strip() for part in text.split(IMAGE_PLACEHOLDER)]
            for k, piece in enumerate(pieces):
                last = k == len(pieces) - 1
                if last and piece:
                    break  # the text after the last image: appended below
                content += [{"type": "text", "text": piece}] if piece else []
                if not last and left:
                    content.append({"type": "image"})
                    left -= 1
            text = pieces[-1]
        if text or not content:
            content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    return messages


class LlavaDataset(Dataset):
    """Conversation records (see `workbench/data/sources.py` for the layouts read) and their
    images, checked up front.

    Every record's structure is checked when the dataset is built, and every image file's
    header once per distinct file, so a broken record fails before training starts with its
    id in the message; images stored as bytes in a dataset are checked when decoded.

    Args:
        json_path: a LLaVA JSON list, or a JSONL file; with `records`, what they came from.
        image_folder: where `record["image"]` paths are relative to (default: the file's folder).
            `image` is one path, or a list of paths (a multi-image record: frames of a clip),
            each with its own `<image>` placeholder in the human turns, in order.
        limit: keep only the first `limit` records (quick experiments).
        bad_images: "error" or "skip" (counted in `skipped_images`; a lazily decoded image
            that fails is replaced by the next record that decodes).
        records, images: records already read (`sources.hf_records`) and their image source.
    """

    def __init__(self, json_path: str | Path, image_folder: str | Path | None = None, limit: int | None = None,
                 bad_images: str = "error", absolute_images: bool = False, records: list | None = None,
                 images: Any = None):
        self.json_path = Path(json_path)
        if records is None:
            if not self.json_path.is_file():
                raise WorkbenchError(f"data file {self.json_path} does not exist")
            records = read_json_records(self.json_path)
        self.image_folder = Path(image_folder) if image_folder else (
            self.json_path if self.json_path.is_dir() else self.json_path.parent)
        self.absolute_images, self.bad_images = absolute_images, bad_images
        self.images = images or FileImages(self.image_folder)
        self._inside: dict[str, bool] = {}
        records = records[:limit] if limit else records
        if not records:
            raise WorkbenchError(f"data file {self.json_path} holds no records (empty dataset)")
        self._keep(records)

    def _keep(self, records: list) -> None:
        seen: dict[str, int] = {}
        self.records, self.skipped_images = [], []
        for i, rec in enumerate(records):
            self._check(i, rec)
            key = str(rec.get("id", i))
            if key in seen:
                raise WorkbenchError(f"{self.json_path} records {seen[key]} and {i} share the id {key!r}; ids must be "
                                     "unique (teacher caches and pseudo-labels are looked up by id)")
            seen[key] = i
            problem = self.images.problem(rec) if rec.get("image") else None
            if problem is None:
                self.records.append(rec)
            elif self.bad_images == "skip":
                self.skipped_images.append({"id": key, "problem": problem})
            else:
                raise WorkbenchError(f"{self.json_path} record {i} (id {key!r}): {problem}; fix or remove it, or set "
                                     "data.bad_images=skip")
        if not self.records:
            raise WorkbenchError(f"data file {self.json_path}: every record's image was skipped (data.bad_images=skip)")

    def _check(self, i: int, rec: Any) -> None:
        """The record's structure: turns, roles, answers, the image field."""
        where = f"{self.json_path} record {i}"
        if not isinstance(rec, dict):
            raise WorkbenchError(f"{where}: is a {type(rec).__name__}, not a JSON object")
        where = f"{where} (id {rec.get('id', i)!r})"
        turns = rec.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise WorkbenchError(f"{where}: needs a non-empty 'conversations' list (or 'messages')")
        for turn in turns:
            if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
                raise WorkbenchError(f"{where}: each turn must be an object with 'from' in {sorted(ROLES)} and a "
                                     f"string 'value', got {str(turn)[:60]!r}")
        answers = [t["value"] for t in turns if ROLES[t["from"]] == "assistant"]
        if not answers:
            raise WorkbenchError(f"{where}: has no assistant ('gpt') turn to learn from")
        if any(not a.strip() for a in answers):
            raise WorkbenchError(f"{where}: has an empty assistant answer (nothing to learn from it)")
        image = rec.get("image")
        frames = isinstance(image, list)
        if image is not None and not isinstance(image, str) and not (
                frames and image and all(isinstance(p, str) and p for p in image)):
            raise WorkbenchError(f"{where}: 'image' must be a path string or a non-empty list of them, got "
                                 f"{type(image).__name__} {str(image)[:60]}")
        placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns if ROLES[t["from"]] == "user")
        if image and not placeholders:
            raise WorkbenchError(f"{where}: has an image but no '<image>' in a human turn")
        if frames and placeholders != len(image):
            raise WorkbenchError(f"{where}: has {len(image)} images but {placeholders} '<image>' placeholders in its "
                                 "human turns; a multi-image record needs one per image, in order")
        if image and isinstance(self.images, FileImages):
            for path in image_paths(rec):
                self._check_path(where, path)

    def _check_path(self, where: str, image: str) -> None:
        if Path(image).is_absolute():
            if not self.absolute_images:
                raise WorkbenchError(f"{where}: image path {image} is absolute; image paths are relative to "
                                     f"data.image_folder ({self.image_folder}) unless data.absolute_images=true")
            return
        if image not in self._inside:  # resolving is a few system calls: once per distinct image
            self._inside[image] = self.image_path(image).resolve().is_relative_to(self.image_folder.resolve())
        if not self._inside[image]:
            raise WorkbenchError(f"{where}: image path {image!r} leaves data.image_folder ({self.image_folder})")

    def source_files(self) -> list[Path]:
        """The files the records were read from (a dataset's arrow files), for fingerprints."""
        files = getattr(getattr(self.images, "dataset", None), "cache_files", None)
        if files:
            return [Path(f["filename"]) for f in files]
        return [self.json_path]

    def image_path(self, image: str) -> Path:
        return Path(image) if Path(image).is_absolute() else self.image_folder / image

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        """`{"id", "images" (PIL, in order), "image" (the first or None), "messages", "qtypes"}`."""
        for k in range(len(self.records)):  # a lazily checked image that fails is replaced by the next record's
            rec = self.records[(i + k) % len(self.records)]
            images = self._open(rec) if rec.get("image") else []
            if images is not None:
                break
        else:
            raise WorkbenchError(f"{self.json_path}: no record's image decodes (data.bad_images=skip)")
        return {
            "id": str(rec.get("id", i)),
            "images": images,
            "image": images[0] if images else None,
            "messages": _to_messages(rec["conversations"], len(images)),
            "qtypes": rec.get("qtypes", []),  # optional per-answer tags, e.g. question types
        }

    def _open(self, rec: dict):
        try:
            return self.images.open(rec)
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # a header that parses over a bad body
            if self.images.lazy and self.bad_images == "skip":
                self.skipped_images.append({"id": str(rec.get("id")), "problem": f"{type(e).__name__}"})
                return None
            raise WorkbenchError(f"{self.images.describe(rec)} (record id {rec.get('id')!r}) cannot be decoded: "
                                 f"{e}") from None


@dataclass
class VLMCollator:
    """Batches samples with a model's processor; labels keep only assistant answers.

    Output keys: `input_ids`, `attention_mask`, `pixel_values` (+ any other processor
    outputs), `labels` (IGNORE_INDEX outside answers), `image_mask` (image-token positions),
    `ids`, `qtypes`, and with `teacher_images` set, `teacher_pixel_values` (the images as a
    vision-encoder teacher takes them).
    """

    processor: Any
    max_length: int | None = None
    teacher_images: Any = None  # PIL images -> a vision teacher's pixel values (`teacher_pixel_values`)

    def __post_init__(self):
        self._label_cache: dict[tuple[str, str, int], list[int]] = {}
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.image_token_id = getattr(self.processor, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)

    def _render(self, messages: list[dict], **kw) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, **kw)

    def _answer_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """Character spans of `text` that are assistant answers (incl. end-of-turn)."""
        return self._answer_spans_marked(messages, text) or self._answer_spans_by_prefix(messages, text)

    def _answer_spans_marked(self, messages: list[dict], text: str) -> list[tuple[int, int]] | None:
        """One render with every answer wrapped in private-use marks (the fast path).

        Returns None when the template does not reproduce `text` once the marks are removed
        or does not end answers with the end-of-turn suffix it uses elsewhere; the caller
        then falls back to rendering prefix by prefix.
        """
        frame = self._end_of_turn()
        if frame is None:
            return None
        lead, eot = frame
        marked = [
            {**m, "content": [{**p, "text": f"{_OPEN}{p['text']}{_CLOSE}"} if p.get("type") == "text" else p
                              for p in m["content"]]} if m["role"] == "assistant" else m
            for m in messages
        ]
        rendered = self._render(marked)
        if rendered.replace(_OPEN, "").replace(_CLOSE, "") != text:
            return None
        spans, removed = [], 0
        for match in re.finditer(f"{_OPEN}(.*?){_CLOSE}", rendered, flags=re.S):
            start = match.start() - removed
            end = start + len(match.group(1))
            removed += 2
            if text[start - len(lead):start] != lead or text[end:end + len(eot)] != eot:
                return None
            spans.append((start - len(lead), end + len(eot.rstrip())))
        return spans if len(spans) == sum(m["role"] == "assistant" for m in messages) else None

    def _end_of_turn(self) -> tuple[str, str] | None:
        """What the template writes between the generation prompt and an answer, and after
        the answer (e.g. `" "` and `"</s> "`); probed once, None if the probe is ambiguous."""
        if not hasattr(self, "_turn_frame"):
            user = {"role": "user", "content": [{"type": "text", "text": "q"}]}
            reply = {"role": "assistant", "content": [{"type": "text", "text": _OPEN}]}
            start = self._render([user], add_generation_prompt=True)
            end = self._render([user, reply])
            rest = end[len(start):]
            ok = end.startswith(start) and rest.count(_OPEN) == 1
            self._turn_frame = tuple(rest.split(_OPEN)) if ok else None
        return self._turn_frame

    def _answer_spans_by_prefix(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = self._render(messages[:k], add_generation_prompt=True)
            end = self._render(messages[: k + 1])
            if not text.startswith(end) or not end.startswith(start):
                raise WorkbenchError(
                    "the processor's chat template does not render conversations prefix by prefix; "
                    "answer tokens cannot be located for the labels"
                )
            spans.append((len(start), len(end.rstrip())))
        return spans

    def _labels(self, text: str, spans, expanded: list[int], sample_id: str) -> list[int]:
        enc = self.tokenizer(text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels, j = [], 0
        for tok, (a, b) in zip(ids, offsets):
            if tok == self.image_token_id:  # one placeholder -> a run of image tokens
                while j < len(expanded) and expanded[j] == self.image_token_id:
                    labels.append(IGNORE_INDEX)
                    j += 1
                continue
            if j >= len(expanded) or expanded[j] != tok:
                raise WorkbenchError(f"sample {sample_id}: processor and tokenizer disagree on the token sequence")
            in_answer = any(s <= a and b <= e and b > a for s, e in spans)
            labels.append(tok if in_answer else IGNORE_INDEX)
            j += 1
        if j != len(expanded):
            raise WorkbenchError(f"sample {sample_id}: processor and tokenizer disagree on the token sequence")
        return labels

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        texts = [self._render(s["messages"]) for s in samples]
        images = [image for s in samples for image in s.get("images", [s["image"]] if s["image"] else [])]
        enc = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        input_ids, attention = enc["input_ids"], enc["attention_mask"]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for i, (s, text) in enumerate(zip(samples, texts)):
            keep = attention[i].bool()
            expanded = input_ids[i][keep].tolist()
            key = (s["id"], text, len(expanded))
            if key not in self._label_cache:  # chat-template renders dominate collation time
                self._label_cache[key] = self._labels(text, self._answer_spans(s["messages"], text), expanded, s["id"])
            row = self._label_cache[key]
            labels[i, keep.nonzero().squeeze(1)] = torch.tensor(row, dtype=labels.dtype)
        batch = dict(enc)
        batch["labels"] = labels
        if self.max_length is not None and input_ids.shape[1] > self.max_length:
            batch = self._truncate(batch, samples)
        batch["image_mask"] = batch["input_ids"] == self.image_token_id
        if self.teacher_images is not None and images:
            if len(images) != sum(s["image"] is not None for s in samples):
                raise WorkbenchError("a vision-encoder target reads one image per sample; these records hold several")
            batch["teacher_pixel_values"] = self.teacher_images(images)
        batch["ids"] = [s["id"] for s in samples]
        batch["qtypes"] = [s["qtypes"] for s in samples]
        return batch

    def _truncate(self, batch: dict, samples: list[dict]) -> dict:
        n = self.max_length
        cut = batch["input_ids"][:, n:] == self.image_token_id
        if cut.any():
            bad = samples[int(cut.any(1).nonzero()[0])]["id"]
            raise WorkbenchError(
                f"sample {bad}: data.max_length={n} would cut through its image tokens; raise data.max_length"
            )
        answered = (batch["labels"] != IGNORE_INDEX).any(1)
        for key in ("input_ids", "attention_mask", "labels"):
            batch[key] = batch[key][:, :n]
        lost = answered & ~(batch["labels"] != IGNORE_INDEX).any(1)
        if lost.any():
            bad = samples[int(lost.nonzero()[0])]["id"]
            raise WorkbenchError(f"sample {bad}: data.max_length={n} cuts off every answer token (nothing left "
                                 "to learn from); raise data.max_length")
        return batch
