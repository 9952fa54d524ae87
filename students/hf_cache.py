"""The keyword under which `transformers` passes the decoding cache between its modules, and the
cache entry of a recurrent layer.

Up to 5.23 it is `past_key_values`; from 5.24 it is `cache` (the old name is still accepted,
with a warning, until 5.40), and model outputs carry the field under the same name. Modules
here that take or forward a cache accept either name and pass on the installed release's.

`StateCacheLayer` is a recurrent layer's entry in a `transformers` DynamicCache (Mamba-2 in
`students.hybrid`, MLGRU in `students.mmfree`); `state_layer` puts one at a layer's index.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import DynamicLayer

CACHE_KWARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def either_cache(cache: Any, past_key_values: Any) -> Any:
    """The cache given under either name (callers of both generations of the API)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the decoding cache as `cache` or `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def output_cache(outputs: Any) -> Any:
    """The cache a model output carries, under the installed release's field name."""
    return getattr(outputs, CACHE_KWARG, None)


class StateCacheLayer(DynamicLayer):
    """A recurrent layer's entry in a `transformers` cache: its state (a tensor, or a dataclass
    of tensors; its size fixed by the layer, not the context) and the number of tokens it has
    seen, which it reports as its sequence length so position ids and masks stay right when
    layer 0 is recurrent. A state holds no per-token history: it cannot be cropped."""

    supports_early_init = False
    is_sliding = False
    is_croppable = False

    def __init__(self, **kwargs: Any):
        super().__init__()
        self.state: Any = None
        self.seen = 0

    def tensors(self) -> list[torch.Tensor]:
        if self.state is None:
            return []
        if dataclasses.is_dataclass(self.state):
            return [getattr(self.state, f.name) for f in dataclasses.fields(self.state)]
        return [self.state]

    def _map(self, fn) -> None:
        if self.state is None:
            return
        if dataclasses.is_dataclass(self.state):
            self.state = type(self.state)(*map(fn, self.tensors()))
        else:
            self.state = fn(self.state)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def offload(self) -> None:
        pass  # a few KiB per layer: it stays where it is (offloading is for KV entries)

    def prefetch(self) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError(f"a recurrent layer's state ({type(self).__name__}) cannot be rolled back (crop); it holds "
                           "no per-token history")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def state_layer(cache: Any, layer_idx: int, kind: type[StateCacheLayer]) -> StateCacheLayer:
    """The `kind` entry at `layer_idx` of a DynamicCache, put there (in place of the attention
    layer a cache built from a config holds) on first use."""
    layers = cache.layers
    while len(layers) <= layer_idx:
        layers.append(DynamicLayer())
    if not isinstance(layers[layer_idx], kind):
        layers[layer_idx] = kind()
    return layers[layer_idx]
