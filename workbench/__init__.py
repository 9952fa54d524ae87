"""distill-workbench's glue: configs, building, training, run directories and results.

`import workbench` stays light; `workbench.load_runs` and `workbench.compare` load
`workbench.results` (and pandas) on first use.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"load_runs": "workbench.results", "compare": "workbench.results"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
