"""Checkpoint files that are whole or absent: Lightning's `CheckpointIO` with each file
written to a temporary name beside its destination, flushed to disk, then renamed over it.

Lightning's default goes through fsspec, whose local "transaction" writes a temporary file in
the system temp folder and moves it into place - a copy, truncated in place, when `out_root`
is on another filesystem and the disk fills up. Here a failed write leaves the previous
`last.ckpt` as it was, and no temporary file behind.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from teachers.cache import write_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic renames within the destination folder."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()  # in memory first, as Lightning's own save does
        torch.save(checkpoint, buffer)
        write_atomic(path, buffer.getbuffer())
