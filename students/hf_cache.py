"""The keyword under which `transformers` passes the decoding cache between its modules.

Up to 5.23 it is `past_key_values`; from 5.24 it is `cache` (the old name is still accepted,
with a warning, until 5.40), and model outputs carry the field under the same name. Modules
here that take or forward a cache accept either name and pass on the installed release's.
"""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version

CACHE_KWARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def either_cache(cache: Any, past_key_values: Any) -> Any:
    """The cache given under either name (callers of both generations of the API)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the decoding cache as `cache` or `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def output_cache(outputs: Any) -> Any:
    """The cache a model output carries, under the installed release's field name."""
    return getattr(outputs, CACHE_KWARG, None)
