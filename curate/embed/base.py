"""The embedder contract.

An embedder turns records into vectors for diversity selection (k-center, Repr Filter, facility
location …). It is a plug-in (:mod:`curate.plugin`): one file in ``curate/embed/`` plus one line in
``EMBEDDERS`` (``curate/embed/__init__.py``); the flow picks one with ``embed.method``. It is built as
``cls(name, params: EmbedSpec, context: EmbedContext)`` (``build_embedder(spec, torch_threads)`` does it):
its ``Params`` are the flow's ``embed:`` section (:class:`curate.embed.spec.EmbedSpec`, also ``self.spec``).

- ``embed(texts) -> float32 array (n, dim)``, L2-normalised when ``spec.normalize``;
- ``fingerprint()``: everything that changes the vectors (model id and revision, text view, length,
  pooling, dtype), computed without loading weights where possible; hashed into ``key``, the store
  key of its vectors;
- ``dim``: the vector length.

``embed.storage`` (float32 | float16) is how the store keeps the vectors; an embedder adds
:meth:`Embedder.storage_fingerprint` to its fingerprint, which is empty for float32 (so float32 keys
are the keys they always were) and ``{"storage": "float16"}`` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from curate.embed.spec import EmbedSpec
from curate.plugin import Context, Plugin
from curate.records import canonical_json, conversation_text, prompt_text, response_text, sha256_hex

#: ``embed.text``: which text of a record is embedded
TEXTS: dict[str, Callable[[list[dict]], str]] = {
    "conversation": conversation_text,
    "prompt": prompt_text,
    "response": response_text,
}


def embed_text(record: dict[str, Any], mode: str) -> str:
    """The text of ``record`` that ``embed.text = mode`` embeds."""
    return TEXTS[mode](record["messages"])


@dataclass
class EmbedContext(Context):
    """What an embedder gets from the run: ``torch_threads`` (None: the default, min(2, CPU count))."""

    torch_threads: int | None = None


class Embedder(Plugin):
    kind = "embedder"
    Params = EmbedSpec
    context_type = EmbedContext
    params: EmbedSpec
    context: EmbedContext

    @property
    def spec(self) -> EmbedSpec:
        """The flow's ``embed:`` section (``self.params``)."""
        return self.params

    @property
    def torch_threads(self) -> int | None:
        return self.context.torch_threads

    def fingerprint(self) -> dict[str, Any]:
        raise NotImplementedError

    def storage_fingerprint(self) -> dict[str, Any]:
        """What ``embed.storage`` adds to the fingerprint: nothing for float32, the dtype otherwise."""
        return {} if self.spec.storage == "float32" else {"storage": self.spec.storage}

    @property
    def key(self) -> str:
        return sha256_hex(canonical_json(self.fingerprint()))

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def embed(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def embed_records(self, records: list[dict[str, Any]]) -> np.ndarray:
        return self.embed([embed_text(r, self.spec.text) for r in records])
