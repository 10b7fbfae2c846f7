"""The run report: ``<output_dir>/report/report.md`` with PNG plots beside it.

- ``outcomes.png``: rows per outcome (selected / not selected / filtered / quarantined)
- ``hist-<score>.png``: each score's histogram, all candidates vs selected
- ``embedding-map.png``: a 2-D PCA projection of the embeddings, selected rows highlighted
"""

from __future__ import annotations

from curate.report.report import write_report

__all__ = ["write_report"]
