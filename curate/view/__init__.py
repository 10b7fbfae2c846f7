"""Looking at a run: its rows, with text, scores, outcome and reason (``curate show``, the report's rows
section). Everything here reads a finished run's own files and writes nothing.

- :func:`run_rows` (``curate.view.rows``): every input and derived row of a run as one Polars
  ``LazyFrame``.
- :func:`with_text`: the text of a page of rows (filter, sort and slice first, then fetch the text).
- :func:`find_run`: the output folder of a run from a folder or a flow file.
- :func:`run_files`: the one place that knows where a run keeps its files.
"""

from __future__ import annotations

from curate.view.rows import NotARun, RunFiles, find_run, kept_columns, run_files, run_rows, score_columns, with_text

__all__ = ["NotARun", "RunFiles", "find_run", "kept_columns", "run_files", "run_rows", "score_columns", "with_text"]
