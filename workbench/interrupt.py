"""How a run ends when it does not complete: signals become `Interrupted`, everything else
`failed`, and both are recorded in summary.json before the process exits.

`workbench run` installs handlers (main thread only) so that SIGTERM and SIGINT end a run
`interrupted` and exit 143 / 130 wherever they arrive. Inside `Trainer.fit` Lightning handles
them itself - SIGTERM finishes the current batch and raises its `SIGTERMException` (a
`SystemExit` with code 0), Ctrl-C ends in `sys.exit(1)` - and `ending` maps those back.
Elsewhere SIGTERM raises `Terminated`, a BaseException like KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from workbench.errors import WorkbenchError

_received: list[str] = []  # signal names seen by this process, latest last


class Interrupted(WorkbenchError):
    """The run was stopped by a signal; resume it with `workbench run --resume RUN_DIR`."""

    def __init__(self, signame: str, run_dir: object = "RUN_DIR"):
        super().__init__(f"interrupted by {signame}; resume with `workbench run --resume {run_dir}`")
        self.signame = signame
        self.exit_code = 128 + getattr(signal, signame)


class Terminated(BaseException):
    """SIGTERM outside `Trainer.fit`: unwinds like KeyboardInterrupt (no `except Exception`
    on the way can swallow it) and becomes `Interrupted` once the run has recorded it."""


_fitting = False  # inside Trainer.fit Lightning stops the loop itself after the current batch


@contextlib.contextmanager
def fitting() -> Iterator[None]:
    """Mark a `Trainer.fit` call: SIGTERM there is left to Lightning's graceful stop."""
    global _fitting
    _fitting = True
    try:
        yield
    finally:
        _fitting = False


def _on_signal(signum: int, _frame) -> None:
    name = signal.Signals(signum).name
    _received.append(name)
    if name == "SIGINT":
        raise KeyboardInterrupt
    if not _fitting:
        raise Terminated(name)


def install() -> None:
    """SIGTERM / SIGINT -> `Interrupted` / KeyboardInterrupt, remembered for `ending`."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)


def ending(exc: BaseException) -> tuple[str, str]:
    """(status, reason) for a run that stopped with `exc`: "interrupted" or "failed"."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    if isinstance(exc, Interrupted):
        return "interrupted", exc.signame
    if isinstance(exc, Terminated):
        return "interrupted", "SIGTERM"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", "SIGINT"
    if isinstance(exc, SIGTERMException):
        return "interrupted", "SIGTERM"
    if isinstance(exc, SystemExit) and _received:  # Lightning's sys.exit(1) after Ctrl-C
        return "interrupted", _received[-1]
    return "failed", f"{type(exc).__name__}: {exc}"


def reraise(exc: BaseException, run_dir: object = "RUN_DIR") -> BaseException:
    """What to raise after recording `exc`: signals become `Interrupted` (naming the run to resume)."""
    status, reason = ending(exc)
    if status == "interrupted" and isinstance(exc, (SystemExit, Terminated, KeyboardInterrupt)):
        return Interrupted(reason, run_dir)
    return exc
