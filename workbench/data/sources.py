"""Where conversation records come from, and where their images are read from.

Every source becomes LLaVA-style records - `{"id", "conversations": [{"from", "value"}],
"image", "qtypes"}` - that `LlavaDataset` checks and serves:

- LLaVA JSON: a list of such records (LLaVA, ShareGPT4V and most VLM SFT mixes);
- JSONL, one record per line, either LLaVA-style or the `messages` + `images` layout of
  ms-swift and ShareGPT-style chat data (`{"messages": [{"role", "content"}], "images": [...]}`);
- a Hugging Face `datasets` folder (`save_to_disk`) or parquet / arrow files, whose columns
  hold either layout, with images as paths or as bytes (an `Image` column).

Image files are checked by their headers, once per distinct file; images stored as bytes in
a dataset are decoded when a sample is read (`data.bad_images` applies there too).
"""

from __future__ import annotations

import glob
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from workbench.errors import WorkbenchError

IMAGE_PLACEHOLDER = "<image>"
_ROLE_NAMES = {"user": "human", "assistant": "gpt", "system": "system"}


def from_messages(rec: dict, where: str) -> dict:
    """A `messages` + `images` record as a LLaVA-style one."""
    messages = rec.get("messages")
    if not isinstance(messages, list) or not messages:
        raise WorkbenchError(f"{where}: needs a non-empty 'messages' list")
    turns = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in _ROLE_NAMES:
            raise WorkbenchError(f"{where}: each message needs a 'role' of {sorted(_ROLE_NAMES)}, got {str(m)[:60]!r}")
        turns.append({"from": _ROLE_NAMES[m["role"]], "value": _text(m.get("content"), where)})
    out = {k: v for k, v in rec.items() if k != "messages"}
    out["conversations"] = turns
    return out


def image_field(rec: dict) -> dict:
    """`images` (a list of paths, or a path) as LLaVA's `image`: a path, or a list of paths for
    a multi-image record (frames of a clip, LLaVA-OneVision style)."""
    if "images" not in rec:
        return rec
    out = {k: v for k, v in rec.items() if k != "images"}
    images = rec["images"] if isinstance(rec["images"], list) else [rec["images"]]
    images = [im for im in images if im is not None]
    if images:
        out["image"] = images[0] if len(images) == 1 else images
    return out


def image_paths(rec: dict) -> list[str]:
    """A record's image paths in order: none, one (`image` a path) or several (`image` a list)."""
    image = rec.get("image")
    if not image:
        return []
    return list(image) if isinstance(image, list) else [image]


def _text(content: Any, where: str) -> str:
    """Message content as text: a string, or typed parts (`{"type": "text"|"image", ...}`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(str(part.get("text", "")))
            elif kind == "image":
                parts.append(IMAGE_PLACEHOLDER)
            else:
                raise WorkbenchError(f"{where}: content part {str(part)[:60]!r} is neither text nor image")
        return "\n".join(parts)
    raise WorkbenchError(f"{where}: message content must be a string or a list of parts, got {type(content).__name__}")


def normalise(rec: Any, where: str) -> Any:
    """A record in either layout as a LLaVA-style one (anything else is left for the checks)."""
    if not isinstance(rec, dict):
        return rec
    if "messages" in rec and "conversations" not in rec:
        rec = from_messages(rec, where)
    return image_field(rec)


def read_json_records(path: Path) -> list:
    """The records of a LLaVA JSON list, or of a JSONL file (one record per line)."""
    try:
        if path.suffix == ".jsonl":
            records = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise WorkbenchError(f"data file {path} line {n} is not valid JSON: {e}") from None
        else:
            records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkbenchError(f"data file {path} is not valid JSON: {e}") from None
    if not isinstance(records, list):
        raise WorkbenchError(f"data file {path} must hold a JSON list of records (or be .jsonl, one per line)")
    return [normalise(r, f"{path} record {i}") for i, r in enumerate(records)]


# ---------------------------------------------------------------- images


class FileImages:
    """Images as files under a folder: header checks, once per distinct file."""

    lazy = False

    def __init__(self, folder: Path):
        self.folder = folder
        self._problems: dict[str, str | None] = {}

    def path(self, image: str) -> Path:
        return Path(image) if Path(image).is_absolute() else self.folder / image

    def problem(self, rec: dict) -> str | None:
        """Why the record's images cannot be used (missing, not an image), or None."""
        for image in image_paths(rec):
            if image not in self._problems:
                self._problems[image] = _file_problem(self.path(image))
            if self._problems[image]:
                return self._problems[image]
        return None

    def open(self, rec: dict) -> list[Image.Image]:
        images = []
        for image in image_paths(rec):
            with Image.open(self.path(image)) as im:
                images.append(im.convert("RGB"))
        return images

    def describe(self, rec: dict) -> str:
        return f"image file {self.path(image_paths(rec)[0])}" if len(image_paths(rec)) == 1 else \
            f"image files {', '.join(str(self.path(p)) for p in image_paths(rec))}"


def _file_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"image file {path} does not exist"
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - parses the header
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"image file {path} is not a readable image ({type(e).__name__})"
    return None


class DatasetImages:
    """Images stored as bytes in a Hugging Face dataset column, decoded when read."""

    lazy = True

    def __init__(self, dataset, column: str, source: str):
        self.dataset, self.column, self.source = dataset, column, source

    def problem(self, rec: dict) -> str | None:
        return None  # checked when decoded

    def open(self, rec: dict) -> list[Image.Image]:
        value = self.dataset[int(rec["_row"])][self.column]
        data = value.get("bytes") if isinstance(value, dict) else value
        if data is None and isinstance(value, dict) and value.get("path"):
            with Image.open(value["path"]) as im:
                return [im.convert("RGB")]
        with Image.open(io.BytesIO(data)) as im:
            return [im.convert("RGB")]

    def describe(self, rec: dict) -> str:
        return f"image of row {rec['_row']} of {self.source}"


# ---------------------------------------------------------------- Hugging Face datasets


def load_hf_dataset(path: str, key: str):
    """A `datasets.Dataset` from a `save_to_disk` folder or parquet / arrow files (a glob)."""
    try:
        import datasets
    except ImportError:
        raise WorkbenchError(f"config key '{key}': data.type=hf_dataset needs the datasets package; "
                             "pip install -e \".[data]\"") from None
    p = Path(path)
    try:
        if p.is_dir():
            loaded = datasets.load_from_disk(str(p))
            if isinstance(loaded, datasets.DatasetDict):
                raise WorkbenchError(f"config key '{key}': {p} holds the splits {sorted(loaded)}; name one of their "
                                     f"folders, e.g. {p / next(iter(loaded))}")
            return loaded
        files = sorted(glob.glob(str(p))) if glob.has_magic(str(p)) else ([str(p)] if p.is_file() else [])
        if not files:
            raise WorkbenchError(f"config key '{key}': {path} does not exist")
        kinds = {Path(f).suffix for f in files}
        if not kinds <= {".parquet", ".arrow"} or len(kinds) != 1:
            raise WorkbenchError(f"config key '{key}': expected a save_to_disk folder or .parquet / .arrow files, "
                                 f"got {', '.join(sorted(kinds))}")
        builder = "parquet" if kinds == {".parquet"} else "arrow"
        return datasets.load_dataset(builder, data_files=files, split="train")
    except WorkbenchError:
        raise
    except Exception as e:  # noqa: BLE001 - arrow, fsspec and datasets raise many kinds for unreadable files
        raise WorkbenchError(f"config key '{key}': cannot read {path} as a dataset: {e}".splitlines()[0]) from None


def _column(ds, columns: dict[str, str], name: str, *defaults: str) -> str | None:
    if name in columns:
        if columns[name] not in ds.column_names:
            raise WorkbenchError(f"config key 'data.columns.{name}': the dataset has no column {columns[name]!r} "
                                 f"(it has {', '.join(ds.column_names)})")
        return columns[name]
    return next((c for c in defaults if c in ds.column_names), None)


def hf_records(ds, columns: dict[str, str], source: str) -> tuple[list[dict], DatasetImages | None]:
    """LLaVA-style records from a dataset's columns; images as paths stay paths, images as
    bytes are read from the dataset by row (`DatasetImages`)."""
    unknown = set(columns) - {"id", "conversations", "messages", "image", "images", "qtypes"}
    if unknown:
        raise WorkbenchError(f"config key 'data.columns': unknown field(s) {sorted(unknown)}; map id, conversations "
                             "or messages, image or images, qtypes")
    layout = "conversations" if _column(ds, columns, "conversations", "conversations") else "messages"
    turns = _column(ds, columns, layout, layout)
    if turns is None:
        raise WorkbenchError(f"{source}: no 'conversations' or 'messages' column (it has {', '.join(ds.column_names)}); "
                             "map one with data.columns")
    image = _column(ds, columns, "image", "image") or _column(ds, columns, "images", "images")
    ident, qtypes = _column(ds, columns, "id", "id"), _column(ds, columns, "qtypes", "qtypes")
    as_bytes = image is not None and _holds_bytes(ds.features[image])
    read = [c for c in (turns, ident, qtypes, None if as_bytes else image) if c is not None]
    records = []
    for i, row in enumerate(ds.select_columns(read).to_list()):  # never the image bytes
        rec = {"id": row[ident] if ident else i, "_row": i, layout: row[turns]}
        if qtypes:
            rec["qtypes"] = row[qtypes]
        if image is not None:
            rec["images"] = f"row-{i}" if as_bytes else row[image]
        records.append(normalise(rec, f"{source} row {i}"))
    if not as_bytes:
        return records, None
    return records, DatasetImages(_undecoded(ds, image), image, source)


def _holds_bytes(feature) -> bool:
    from datasets import Image as ImageFeature

    inner = feature[0] if isinstance(feature, list) else getattr(feature, "feature", None)
    if inner is not None:  # a list per row: paths are read as `images` lists; lists of bytes are not
        if getattr(inner, "dtype", None) in ("string", "large_string"):
            return False
        raise WorkbenchError("an image column holding a list of images per row is supported for paths only")
    return isinstance(feature, ImageFeature) or getattr(feature, "dtype", None) in ("binary", "large_binary")


def _undecoded(ds, column: str):
    """The dataset with its `Image` column left as {"bytes", "path"} (decoded by us, when read)."""
    from datasets import Image as ImageFeature

    return ds.cast_column(column, ImageFeature(decode=False)) if isinstance(ds.features[column], ImageFeature) else ds
