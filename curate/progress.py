"""Progress of long stages: rich bars in a terminal; one log line per stage and shard elsewhere.

Usage::

    with stage_progress("embed shard 3", total=len(rows)) as bar:
        ...
        bar.advance(len(batch))

In a terminal each call draws a bar. When output is not a terminal (CI, a log file, a Prefect
worker) each call logs one line when it ends (``embed all-MiniLM-L6-v2 shard 3: 100 rows in 2.1 s``)
on the ``curate`` logger. The libraries' own tqdm bars (weight loading, GGUF de-quantisation) are
always silenced: they would interleave with ours and fill log files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator

logger = logging.getLogger("curate")

_enabled: bool | None = None
_progress = None
_lock = threading.Lock()
_active = 0


def configure(enabled: bool | None) -> None:
    """``None`` = auto: on in an interactive terminal, off under CI or when output is piped."""
    global _enabled
    _enabled = enabled
    silence_library_bars()


def silence_library_bars(before_loading: bool = False) -> None:
    """Turn off tqdm bars of transformers, huggingface_hub, datasets and sentence-transformers.
    ``before_loading``: a model is about to load, so import the libraries' switches now (their
    import-time defaults would otherwise win)."""
    os.environ["TQDM_DISABLE"] = "1"  # tqdm itself honours this (every library bar is a tqdm)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "Loading weights" chatter
    if before_loading or "huggingface_hub" in sys.modules:
        with contextlib.suppress(ImportError):
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
    if before_loading or "transformers" in sys.modules:
        with contextlib.suppress(ImportError):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


def attach_console_log() -> None:
    """Print the ``curate`` logger's lines on stderr when nothing else does (in-process runs; a
    Prefect run hands them to Prefect's own console and API handlers)."""
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | curate - %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


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
        t0 = time.perf_counter()
        yield _Bar(None, None)
        if total:
            logger.info("%s: %d done in %.1f s", description, total, time.perf_counter() - t0)
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
