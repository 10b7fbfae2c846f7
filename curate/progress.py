"""Progress of long stages: rich bars in a terminal; time-based progress lines elsewhere.

Usage::

    with stage_watch("score:heuristic", total=rows_to_compute):   # the run, once per stage
        ...
        with stage_progress("score heuristic shard 3", total=len(rows)) as bar:   # a shard, a unit
            ...
            bar.advance(len(batch))

In a terminal each :func:`stage_progress` call draws a bar. When output is not a terminal (CI, a log
file, a Prefect worker) each call logs one line when it ends (``embed all-MiniLM-L6-v2 shard 3: 100
done in 2.1 s``) on the ``curate`` logger, and a *heartbeat* logs one line per running stage every
``runtime.progress_interval_s`` seconds (30 by default) with the rows done, the rate and the time
left::

    score:superfiltering: 1,536 of 6,000 rows (26%), 2.1 rows/s, about 35 min left (running 12 min 10 s)

A stage that ends before the interval has passed logs no heartbeat line. The bars of a stage's shards
feed its line (:func:`stage_watch`; the model stages set its total to the rows they will compute);
a bar in a process without a stage watch (a Dask or Ray worker) gets a line of its own. The
libraries' own tqdm bars (weight loading, GGUF de-quantisation) are always silenced: they would
interleave with ours and fill log files.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator

logger = logging.getLogger("curate")

#: seconds between two progress lines of a running stage when output is not a terminal
DEFAULT_INTERVAL_S = 30.0

_enabled: bool | None = None
_interval: float = DEFAULT_INTERVAL_S
_progress = None
_lock = threading.Lock()
_active = 0


def configure(enabled: bool | None, interval_s: float | None = None) -> None:
    """``enabled``: ``None`` = auto (bars on in an interactive terminal, off under CI or when output is
    piped). ``interval_s``: seconds between heartbeat lines when bars are off (0: none)."""
    global _enabled, _interval
    _enabled = enabled
    if interval_s is not None:
        _interval = float(interval_s)
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


# -- the heartbeat: rows done, rate and time left of each running stage, every interval ---------------

def duration(seconds: float) -> str:
    """``0.4 s``, ``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _rate(r: float) -> str:
    return f"{r:,.0f}" if r >= 100 else f"{r:.1f}" if r >= 1 else f"{r:.2f}"


class _Meter:
    """Rows done of one running stage (or of one bar outside a stage) in this process. Thread-safe:
    the shards of a stage may run on several threads."""

    def __init__(self, name: str, total: int | None = None, unit: str = "rows"):
        self.name = name
        self.total = total  # rows to do; None: the sum of its bars' totals (``bar_total``), or unknown
        self.unit = unit
        self.done = 0
        self.skipped = 0  # rows of ``total`` found done meanwhile (stored by another run): not to do
        self.bar_total = 0
        self.started = time.monotonic()
        self.last_line = self.started
        self.lock = threading.Lock()
        # the context it was made in: a Prefect run's log lines are attributed to the run through it
        self.context = contextvars.copy_context()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n

    def skip(self, n: int) -> None:
        with self.lock:
            self.skipped += n

    def expect(self, n: int) -> None:
        with self.lock:
            self.bar_total += n

    def line(self, now: float | None = None) -> str:
        """``<stage>: <done> of <todo> rows (<pct>), <rate> rows/s, about <left> left (running <elapsed>)``."""
        now = time.monotonic() if now is None else now
        with self.lock:
            done, skipped, bar_total, total = self.done, self.skipped, self.bar_total, self.total
        elapsed = max(now - self.started, 1e-9)
        todo = (total - skipped) if total is not None else (bar_total or None)
        rate = done / elapsed
        if todo is None and not done and not skipped:  # a stage that counts no rows (select, ledger, export …)
            return f"{self.name}: still running ({duration(elapsed)})"
        parts = []
        if todo is not None:
            todo = max(todo, done)
            if not todo:
                return f"{self.name}: nothing left to compute (running {duration(elapsed)})"
            parts.append(f"{done:,} of {todo:,} {self.unit} ({done / todo:.0%})")
        else:
            parts.append(f"{done:,} {self.unit} done")
        if skipped and total is None:
            parts.append(f"{skipped:,} done before")
        if done:
            parts.append(f"{_rate(rate)} {self.unit}/s")
            if todo is not None:
                parts.append(f"about {duration((todo - done) / rate)} left")
        else:
            parts.append("no batch finished yet")
        return f"{self.name}: " + ", ".join(parts) + f" (running {duration(elapsed)})"


_meters: list[_Meter] = []  # the meters the heartbeat reports on
_current: _Meter | None = None  # the stage the run is in (stages run one at a time)
_beat: threading.Thread | None = None
_meters_lock = threading.Lock()
_wake = threading.Event()  # set when a meter is registered with a heartbeat already running


def _heartbeat_on() -> bool:
    return _interval > 0 and not is_enabled()


def _register(meter: _Meter) -> None:
    global _beat
    if not _heartbeat_on():
        return
    with _meters_lock:
        _meters.append(meter)
        if _beat is None:
            _beat = threading.Thread(target=_heartbeat, name="curate-progress", daemon=True)
            _beat.start()
        else:  # a running heartbeat may be in a long sleep of an earlier interval: it takes up this one's now
            _wake.set()


def _unregister(meter: _Meter) -> None:
    with _meters_lock:
        if meter in _meters:
            _meters.remove(meter)


def _heartbeat() -> None:
    """Every ``runtime.progress_interval_s`` seconds, one line per meter that has run that long since
    its last line; ends when no meter is left (the next one starts a new thread)."""
    global _beat
    while True:
        interval = _interval
        if _wake.wait(min(1.0, max(interval, 0.01) / 4)):
            _wake.clear()
            interval = _interval  # a new stage may have brought another interval
        now = time.monotonic()
        with _meters_lock:
            if not _meters or interval <= 0:
                _beat = None
                return
            due = [m for m in _meters if now - m.last_line >= interval]
            for m in due:
                m.last_line = now
        for m in due:
            try:
                m.context.run(logger.info, "%s", m.line(now))
            except Exception:  # a log handler's failure must never stop the run
                pass


@contextlib.contextmanager
def stage_watch(name: str, total: int | None = None) -> Iterator[_Meter]:
    """The run is in stage ``name`` for the block: the bars opened meanwhile count towards its line."""
    global _current
    meter = _Meter(name, total)
    previous, _current = _current, meter
    _register(meter)
    try:
        yield meter
    finally:
        _unregister(meter)
        _current = previous


def set_total(total: int) -> None:
    """The rows the current stage will compute (a model stage knows them once it has checked the store)."""
    if _current is not None:
        with _current.lock:
            _current.total = total


def advance(n: int) -> None:
    """``n`` more rows of the current stage done (work that does not draw a bar: ingest chunks)."""
    if _current is not None:
        _current.add(n)


def skip(n: int) -> None:
    """``n`` rows of the current stage's total turned out done already: they are not to do."""
    if _current is not None and n:
        _current.skip(n)


class _Bar:
    def __init__(self, progress, task_id, meter: _Meter | None = None):
        self._progress = progress
        self._task = task_id
        self._meter = meter

    def advance(self, n: int = 1) -> None:
        if self._meter is not None:
            self._meter.add(n)
        if self._progress is not None:
            self._progress.advance(self._task, n)


@contextlib.contextmanager
def stage_progress(description: str, total: int | None) -> Iterator[_Bar]:
    global _progress, _active
    stage = _current
    if stage is not None and total and stage.total is None:
        stage.expect(total)
    if not is_enabled() or not total:
        t0 = time.perf_counter()
        own = None
        if stage is None and total:  # a worker process (Dask, Ray): this bar gets a line of its own
            own = _Meter(description, total)
            _register(own)
        try:
            yield _Bar(None, None, stage or own)
        finally:
            if own is not None:
                _unregister(own)
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
    finished = False
    try:
        yield _Bar(_progress, task_id, stage)
        finished = True
    finally:
        with _lock:
            if finished:  # a failed unit's bar stays where it stopped
                _progress.update(task_id, completed=total)
            _active -= 1
            if _active == 0:
                _progress.stop()
                _progress = None
