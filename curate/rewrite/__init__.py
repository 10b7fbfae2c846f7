"""Rewriters: one file each, one line each in ``REWRITERS`` (a :class:`curate.plugin.Registry`: imported lazily, by dotted path).

``mosaic`` (Mosaic-IT, methods.md C3) composes several single-turn rows into one multi-instruction
row without a model; its wording lists live in ``mosaic_text``.
"""

from __future__ import annotations

from curate.plugin import Registry
from curate.rewrite.base import Derived, Rewriter, RewriteContext, UnitResult

REWRITERS = Registry("rewriter", {
    "mosaic": "curate.rewrite.mosaic:MosaicStep",
    "reflection": "curate.rewrite.reflection:ReflectionTuning",
    "selective_reflection": "curate.rewrite.selective:SelectiveReflection",
    "aide": "curate.rewrite.aide:AIDEStep",
})


def rewriter_class(method: str) -> type[Rewriter]:
    return REWRITERS.get(method)


__all__ = ["REWRITERS", "Derived", "RewriteContext", "Rewriter", "UnitResult", "rewriter_class"]
