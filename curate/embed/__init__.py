"""Embedders: one file each, one line each in ``EMBEDDERS`` (a :class:`curate.plugin.Registry`: imported lazily, by dotted path).

The ``embed:`` section of a flow is an :class:`~curate.embed.spec.EmbedSpec` (``curate/embed/spec.py``), the embedders' ``Params``.
"""

from __future__ import annotations

from curate.embed.base import EmbedContext, Embedder, embed_text
from curate.embed.spec import EmbedSpec
from curate.plugin import Registry

EMBEDDERS = Registry("embedder", {
    "sentence_transformers": "curate.embed.sentence_transformer:SentenceTransformerEmbedder",
    "precomputed": "curate.embed.precomputed:PrecomputedEmbedder",
})


def embedder_class(method: str) -> type[Embedder]:
    return EMBEDDERS.get(method)


def build_embedder(spec: EmbedSpec, torch_threads: int | None = None) -> Embedder:
    """The embedder ``spec.method`` names (named "embed", like the stage); no weights are loaded until it embeds."""
    return embedder_class(spec.method)("embed", spec, EmbedContext(torch_threads=torch_threads))


__all__ = ["EMBEDDERS", "EmbedContext", "EmbedSpec", "Embedder", "build_embedder", "embed_text", "embedder_class"]
