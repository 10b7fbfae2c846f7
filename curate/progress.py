"""Progress bars for long stages (rich), quiet when not in a terminal or under CI.

Usage::

    with stage_progress("embed shard 3", total=len(rows)) as bar:
        ...
        bar.advance(len(batch))
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

_enabled: bool | None = None
_progress = None
_lock = threading.Lock()
_active = 0


def configure(enabled: bool | None) -> None:
    """``None`` = auto: on in an interactive terminal, off under CI or when output is piped."""
    global _enabled
    _enabled = enabled


def is_enabled() -> bool:
    if _enabled is not None:
        return _enabled
    if os.environ.get("CI") or os.environ.get("CURATE_NO_PROGRESS"):
        return False
    return sys.stderr.isatty()


class _Bar:
    def __init__(self, progress, task_id):
        self._progress = progress
        self._task = task_id

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)


@contextlib.contextmanager
def stage_progress(description: str, total: int | None) -> Iterator[_Bar]:
    global _progress, _active
    if not is_enabled() or not total:
        yield _Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with _lock:
        if _progress is None:
            _progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            _progress.start()
        _active += 1
        task_id = _progress.add_task(description, total=total)
    try:
        yield _Bar(_progress, task_id)
    finally:
        with _lock:
            _progress.update(task_id, completed=total)
            _active -= 1
            if _active == 0:
                _progress.stop()
                _progress = None
