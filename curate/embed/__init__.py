"""Embedders: one file each, one line each in ``EMBEDDERS`` (imported lazily, by dotted path)."""

from __future__ import annotations

from curate.config import EmbedSpec
from curate.embed.base import Embedder, embed_text
from curate.registry import load_class

EMBEDDERS: dict[str, str] = {
    "sentence_transformers": "curate.embed.sentence_transformer:SentenceTransformerEmbedder",
    "precomputed": "curate.embed.precomputed:PrecomputedEmbedder",
}


def embedder_class(method: str) -> type[Embedder]:
    return load_class(EMBEDDERS, "embedder", method)


def build_embedder(spec: EmbedSpec, torch_threads: int | None = None) -> Embedder:
    """The embedder ``spec.method`` names; no weights are loaded until it embeds."""
    return embedder_class(spec.method)(spec, torch_threads)


__all__ = ["EMBEDDERS", "Embedder", "build_embedder", "embed_text", "embedder_class"]
