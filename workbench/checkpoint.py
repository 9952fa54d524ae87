"""Checkpoint files that are whole or absent: Lightning's `CheckpointIO` with each file
written to a temporary name beside its destination, flushed to disk, then renamed over it.

Lightning's default goes through fsspec, whose local "transaction" writes a temporary file in
the system temp folder and moves it into place - a copy, truncated in place, when `out_root`
is on another filesystem and the disk fills up. Here a failed write leaves the previous
`last.ckpt` as it was, and no temporary file behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic renames within the destination folder."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
