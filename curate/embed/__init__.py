"""Embedders turn records into unit vectors for diversity selection (k-center, Repr Filter, …)."""

from curate.embed.sentence_transformer import SentenceTransformerEmbedder, embed_text

__all__ = ["SentenceTransformerEmbedder", "embed_text"]
