"""Rewriters: one file each, one line each in ``REWRITERS`` (imported lazily, by dotted path)."""

from __future__ import annotations

from curate.registry import load_class
from curate.rewrite.base import Derived, Rewriter, RewriteContext, UnitResult

REWRITERS: dict[str, str] = {
    "mosaic": "curate.rewrite.mosaic_it:MosaicIT",
}


def rewriter_class(method: str) -> type[Rewriter]:
    return load_class(REWRITERS, "rewriter", method)


__all__ = ["REWRITERS", "Derived", "RewriteContext", "Rewriter", "UnitResult", "rewriter_class"]
