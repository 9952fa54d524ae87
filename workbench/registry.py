"""Name -> builder tables: configs name students, teachers, loss terms, targets, student
transforms and datasets by key.

A `Registry` checks the arguments a config passes against the builder's signature before
calling it, so a misspelt argument or a value of the wrong type is a short error naming the
key, not a TypeError deep inside a model constructor. The built-in entries are registered in
`workbench/builtins.py` (one line per method), loaded on the first lookup; a project of your
own registers more the same way (`LOSSES.register("my_term", MyTerm)`) before it builds.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

from workbench.errors import WorkbenchError


def closest(name: str, options) -> str:
    """' Did you mean ...?' for the nearest of `options`, or ''."""
    near = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(repr(n) for n in near)}?" if near else ""


def _accepts(value: Any, hint: Any) -> bool:
    """Loose check of a config value against a (possibly union / generic) annotation."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is not None:
        hint = origin
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


class Registry:
    """A named table of builders for one kind of thing (student, teacher, loss, dataset)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}
        self._presets: dict[str, dict[str, Any]] = {}
        self.info: dict[str, dict[str, Any]] = {}  # per name: what the registering code declared

    def register(self, name: str, builder: Callable[..., Any] | None = None, *, preset: dict[str, Any] | None = None,
                 **info: Any):
        """Add `builder` under `name`; usable as a decorator. `preset` fixes some of its
        arguments (e.g. which divergence a loss type is); `info` is kept for the reader."""
        def add(fn):
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = fn
            self._presets[name] = dict(preset or {})
            self.info[name] = info
            return fn
        return add(builder) if builder is not None else add

    def unregister(self, name: str) -> None:
        """Remove `name` (tests that register their own entries clean up with this)."""
        self._builders.pop(name, None)
        self._presets.pop(name, None)
        self.info.pop(name, None)

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self._builders)

    def get(self, name: str, key: str | None = None) -> Callable[..., Any]:
        """The builder registered as `name`; `key` is the config key that named it (for errors)."""
        _load_builtins()
        if name not in self._builders:
            where = f"config key '{key}': " if key else ""
            raise WorkbenchError(
                f"{where}unknown {self.kind} {name!r}.{closest(name, self._builders)} "
                f"Registered: {', '.join(self.names())}"
            )
        return self._builders[name]

    def check_kwargs(self, name: str, kwargs: dict[str, Any], where: str, siblings: tuple[str, ...] = ()) -> None:
        """Fail on arguments the builder does not take or whose type does not fit; `siblings`
        are other keys valid beside them (a loss term's `type` and `weight`), for suggestions."""
        params, hints = self.parameters(name)
        for key, value in kwargs.items():
            if key in self._presets[name]:
                raise WorkbenchError(f"config key '{where}.{key}' is fixed by {self.kind} {name!r}; remove it")
            if key not in params:
                raise WorkbenchError(
                    f"unknown config key '{where}.{key}': {self.kind} {name!r} takes no argument {key!r}."
                    f"{closest(key, [*params, *siblings])}"
                )
            if not _accepts(value, hints.get(key, Any)):
                expected = getattr(hints[key], "__name__", str(hints[key]))
                raise WorkbenchError(
                    f"config key '{where}.{key}' has the wrong type: expected {expected}, got {value!r}"
                )

    def parameters(self, name: str) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
        """The arguments a config may give `name` (its builder's, less the preset ones), and their hints."""
        fn = self.get(name)
        target = fn.__init__ if isinstance(fn, type) else fn
        params = {k: p for k, p in inspect.signature(fn).parameters.items()
                  if k not in self._presets[name] and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        return params, typing.get_type_hints(target)

    def build(self, name: str, where: str, /, fixed: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Call the builder with its preset, `fixed` (filled in by the workbench) and user `kwargs`."""
        self.check_kwargs(name, kwargs, where)
        clash = set(kwargs) & set(fixed or {})
        if clash:
            raise WorkbenchError(
                f"config key '{where}.{sorted(clash)[0]}' is set by the workbench (from the processor); remove it"
            )
        return self.get(name)(**self._presets[name], **(fixed or {}), **kwargs)


STUDENTS = Registry("student")
TEACHERS = Registry("teacher")
LOSSES = Registry("loss")
DATASETS = Registry("dataset")
TARGETS = Registry("target")
TRANSFORMS = Registry("student transform")

_loaded = False


def _load_builtins() -> None:
    """Register the built-in entries (`workbench/builtins.py`) once, on the first lookup."""
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module("workbench.builtins")
