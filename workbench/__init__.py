"""distill-workbench's glue: configs, building, training, run directories and results.

`import workbench` stays light; `workbench.load_runs` and `workbench.compare` load
`workbench.results` (and pandas) on first use.
"""

from __future__ import annotations

import logging
from typing import Any

# torchao (which transformers imports when it is installed) registers enums with torch's pytree;
# torch 2.14 logs one deprecation line per enum for it. Not ours to fix, and not for the console.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

_LAZY = {"load_runs": "workbench.results", "compare": "workbench.results"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
